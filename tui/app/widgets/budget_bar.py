"""A stacked bar of the context window: instruction, examples, history, input, reply reserve, free.

The controller computes the numbers (tui/format.py budget_segments, in a worker) and the screen calls
``show``; this only draws.
"""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

COLORS = {"instruction": "magenta", "example": "cyan", "history": "blue", "input": "green",
          "reserve": "yellow", "free": "grey23"}
NAMES = {"instruction": "instr", "example": "examples", "history": "history", "input": "input",
         "reserve": "reply", "free": "free"}


class BudgetBar(Static):
    def __init__(self, **kw):
        super().__init__("", **kw)
        self.segments: list[tuple[str, int]] = []
        self.n_ctx = 0
        self.dropped: list[str] = []
        self.note = "budget: no model loaded yet"
        self.reserve_note = ""

    def show(self, segments: list[tuple[str, int]], n_ctx: int, dropped: list[str], reserve_note: str = "") -> None:
        self.segments, self.n_ctx, self.dropped, self.note = list(segments), n_ctx, list(dropped), ""
        self.reserve_note = reserve_note
        self.refresh(layout=True)

    def show_note(self, note: str) -> None:
        self.segments, self.note = [], note
        self.refresh(layout=True)

    def values(self) -> dict[str, int]:
        return dict(self.segments)

    def render(self) -> Text:
        if not self.segments:
            return Text(self.note, style="dim")
        width = max(self.size.width, 20)
        total = max(self.n_ctx, 1)
        bar = Text()
        used = 0
        cells = []
        for kind, n in self.segments:
            w = round(n * width / total)
            cells.append([kind, w, n])
            used += w
        if cells and used != width:  # rounding: fix the free (or last) segment
            cells[-1][1] = max(cells[-1][1] + width - used, 0)
        for kind, w, n in cells:
            bar.append(("░" if kind == "free" else "█") * w, style=COLORS.get(kind, "white"))
        legend = Text()
        for kind, _, n in cells:
            legend.append("■ ", style=COLORS.get(kind, "white"))
            legend.append(f"{NAMES.get(kind, kind)} {n}  ")
        legend.append(f"of {self.n_ctx}", style="dim")
        out = Text("\n").join([bar, legend])
        notes = [f"to fit the window: {'; '.join(self.dropped)} (dimmed above, F5 shows the prompt)"] if self.dropped else []
        notes += [self.reserve_note] if self.reserve_note else []
        if notes:
            out.append("\n")
            out.append("; ".join(notes), style="bold yellow")
        return out
