"""A rendered prompt and its token budget: what ``render`` returns, and the ``--explain`` report of it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Budget:
    n_ctx: int = 1024  # the model's n_positions
    reserve: int | None = None  # tokens kept for the reply; None: the template's max_new_tokens
    min_input: int = 16  # never cut the input below this many tokens (or its length, if shorter)


@dataclass
class Part:
    kind: str  # "instruction" | "example" | "history" | "input"
    label: str  # "instruction", "example #2", "user turn 3", "input"
    text: str  # separators that follow a part belong to it
    tokens: int = 0


@dataclass
class Rendered:
    template: str
    ids: list[int]
    text: str
    parts: list[Part]
    n_ctx: int
    reserve: int
    stop: list[str]
    options: dict  # the template's default sampling options
    examples_used: list[int] = field(default_factory=list)  # indices into the pool, prompt order
    example_ids: list[str] = field(default_factory=list)  # "#2", "faq.jsonl:7" or the row's id
    dropped: list[str] = field(default_factory=list)  # what was removed to fit, in order
    turns_dropped: int = 0
    examples_dropped: list[int] = field(default_factory=list)
    input_cut: int = 0  # tokens cut from the start of the input

    @property
    def n_prompt(self) -> int:
        return len(self.ids)

    @property
    def free(self) -> int:
        return self.n_ctx - self.n_prompt - self.reserve

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("ids")
        d["n_prompt"] = self.n_prompt
        return d


def format_explain(r: Rendered) -> str:
    """The budget, what was dropped to fit, and the exact prompt text, for a person to read."""
    rows: list[tuple[str, int]] = []
    history = [p for p in r.parts if p.kind == "history"]
    for p in r.parts:
        if p.kind != "history":
            rows.append((p.label, p.tokens))
        elif p is history[0]:  # turns are many and alike: one line for all of them
            n = len(history)
            rows.append((f"history ({n} turn{'s' if n != 1 else ''})", sum(h.tokens for h in history)))
    totals = [("prompt", r.n_prompt), ("reserved for the reply", r.reserve), ("free", r.free)]
    width = max(len(label) for label, _ in rows + totals)
    lines = [f"budget: template {r.template}, {r.n_ctx}-token window"]
    lines += [f"  {label:<{width}}  {n:>5}" for label, n in rows]
    lines.append("  " + "-" * (width + 7))
    lines += [f"  {label:<{width}}  {n:>5}" for label, n in totals]
    lines.append("dropped to fit:" + ("" if r.dropped else " nothing"))
    lines += [f"  - {step}" for step in r.dropped]
    if r.stop:
        lines.append("stop at: " + "  ".join(_show(s) for s in r.stop))
    lines.append(f"----- prompt text ({r.n_prompt} tokens, exactly what the model sees) -----")
    lines.append(r.text)
    lines.append("----- end of prompt text -----")
    return "\n".join(lines)


def _show(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)  # quotes, with newlines shown as \n
