"""Numbers for people, shared by the CLI and the app: byte sizes, counts, the context-window budget."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def human_count(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return str(n)


def budget_segments(rendered) -> list[tuple[str, int]]:
    """(kind, tokens) for the budget bar: instruction, examples, history, input, reply reserve, free."""
    totals = {"instruction": 0, "example": 0, "history": 0, "input": 0}
    for p in rendered.parts:
        totals[p.kind] = totals.get(p.kind, 0) + p.tokens
    segs = list(totals.items())
    segs.append(("reserve", rendered.reserve))
    segs.append(("free", max(rendered.free, 0)))
    return segs


def surprise_style(logprob: float) -> str:
    """A token's colour by how much it surprised the model (bits): green expected, red surprising."""
    bits = -logprob / 0.6931471805599453  # ln 2
    return "green" if bits < 1 else "yellow" if bits < 4 else "dark_orange" if bits < 8 else "red"
