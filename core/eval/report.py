"""An experiment's results as table rows, JSON and a Markdown report with an inline SVG chart.

The SVG is written by hand (rects and polylines): two small charts do not justify a plotting
dependency, and an inline SVG renders on GitHub and in any browser without a file next to the report.
"""

from __future__ import annotations

import html
import math

HEADERS = ["", "row", "loss", "ppl", "bits/byte", "params", "prepare s", "score s", "peak mem"]
W, BAR_H, PAD, LABEL_W = 640, 22, 8, 220
PLOT_H = 220


def table_rows(cells: dict[str, dict], order: list[str], best: str | None) -> list[list[str]]:
    out = []
    for rid in order:
        c = cells.get(rid)
        if c is None:
            out.append(["", rid, "…", "", "", "", "", "", ""])
            continue
        out.append(["*" if rid == best else "", c["label"], f"{c['loss']:.4f}", f"{c['ppl']:.2f}",
                    f"{c['bits_per_byte']:.4f}", _count(c["params"]), f"{c['prepare_s']:.1f}", f"{c['score_s']:.1f}",
                    _bytes(c["peak_mem"])])
    return out


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def _bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def markdown(name: str, rule: str, cells: dict[str, dict], order: list[str], best: str | None) -> str:
    rows = table_rows(cells, order, best)
    lines = [f"# Experiment {name}", "", f"Held-out split: {rule}.", "",
             "| " + " | ".join(h or "best" for h in HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(_md(c) for c in r) + " |" for r in rows]
    lines += ["", "## Perplexity per row", "", bars_svg([(cells[r]["label"], cells[r]["ppl"]) for r in order if r in cells])]
    curves = [(cells[r]["label"], cells[r]["curve"]) for r in order if r in cells and cells[r].get("curve")]
    if curves:
        lines += ["", "## Finetune loss curves", "", curves_svg(curves)]
    lines += ["", "## Samples", ""]
    for r in order:
        if r in cells:
            lines.append(f"### {_md(cells[r]['label'])}")
            lines += [f"- **{_md(s['prompt'])}**{_md(s['completion'])}" for s in cells[r]["samples"]]
            lines.append("")
    return "\n".join(lines) + "\n"


def _md(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def bars_svg(items: list[tuple[str, float]]) -> str:
    """Horizontal bars, log scale (perplexities span orders of magnitude), value at each bar's end."""
    if not items:
        return ""
    top = max(math.log10(max(v, 1.0)) for _, v in items) or 1.0
    h = PAD * 2 + len(items) * (BAR_H + PAD)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" font-family="sans-serif" font-size="12">']
    for i, (label, v) in enumerate(items):
        y = PAD + i * (BAR_H + PAD)
        bw = max(2.0, (W - LABEL_W - 90) * math.log10(max(v, 1.0)) / top)
        parts.append(f'<text x="{LABEL_W - 6}" y="{y + 15}" text-anchor="end">{html.escape(label)}</text>')
        parts.append(f'<rect x="{LABEL_W}" y="{y}" width="{bw:.1f}" height="{BAR_H}" fill="#4c78a8"/>')
        parts.append(f'<text x="{LABEL_W + bw + 4:.1f}" y="{y + 15}">{v:.2f}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


COLORS = ("#e45756", "#4c78a8", "#54a24b", "#f58518", "#b279a2")


def curves_svg(curves: list[tuple[str, list[list[float]]]]) -> str:
    """Training loss against step, one polyline per run, with a legend."""
    steps = [s for _, c in curves for s, _ in c]
    losses = [v for _, c in curves for _, v in c]
    x0, x1, y0, y1 = min(steps), max(steps), min(losses), max(losses)
    sx = (W - 2 * 40) / max(x1 - x0, 1)
    sy = (PLOT_H - 2 * 20) / max(y1 - y0, 1e-9)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{PLOT_H + 20 * len(curves)}" '
             f'font-family="sans-serif" font-size="12">',
             f'<text x="4" y="14">loss {y1:.2f}</text><text x="4" y="{PLOT_H - 6}">{y0:.2f}</text>',
             f'<text x="{W - 80}" y="{PLOT_H - 6}">step {int(x1)}</text>']
    for i, (label, c) in enumerate(curves):
        color = COLORS[i % len(COLORS)]
        pts = " ".join(f"{40 + (s - x0) * sx:.1f},{PLOT_H - 20 - (v - y0) * sy:.1f}" for s, v in c)
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{pts}"/>')
        parts.append(f'<text x="40" y="{PLOT_H + 14 + 20 * i}" fill="{color}">{html.escape(label)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)
