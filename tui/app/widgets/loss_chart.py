"""A small line chart of train loss per step (dots) and validation loss per evaluation (diamonds)."""

from __future__ import annotations

from rich.text import Text
from textual.widget import Widget


class LossChart(Widget):
    """Train loss is averaged into one column per bucket of steps; val loss is drawn on top."""

    DEFAULT_CSS = "LossChart { height: 12; }"

    def __init__(self, **kw):
        super().__init__(**kw)
        self.train: list[tuple[int, float]] = []
        self.val: list[tuple[int, float]] = []
        self.steps = 0

    def add_train(self, step: int, loss: float, steps: int | None = None) -> None:
        self.train.append((step, loss))
        if steps:
            self.steps = steps
        self.refresh()

    def add_val(self, step: int, loss: float) -> None:
        self.val.append((step, loss))
        self.refresh()

    def clear(self) -> None:
        self.train, self.val, self.steps = [], [], 0
        self.refresh()

    def render(self) -> Text:
        w, h = max(10, self.size.width - 8), max(3, self.size.height - 1)
        pts = self.train + self.val
        if not pts:
            return Text("waiting for the first step…", style="dim")
        lo, hi = min(v for _, v in pts), max(v for _, v in pts)
        if hi - lo < 1e-9:
            hi = lo + 1.0
        x_max = max(self.steps, max(s for s, _ in pts), 1)
        grid = [[" "] * w for _ in range(h)]
        style = [[""] * w for _ in range(h)]

        def put(step, v, ch, st):
            x = min(w - 1, int((step - 1) / max(1, x_max - 1) * (w - 1))) if x_max > 1 else 0
            y = min(h - 1, int((hi - v) / (hi - lo) * (h - 1) + 0.5))
            grid[y][max(0, x)], style[y][max(0, x)] = ch, st

        cols: dict[int, list[float]] = {}
        for s, v in self.train:
            cols.setdefault(min(w - 1, int((s - 1) / max(1, x_max - 1) * (w - 1))), []).append(v)
        for x, vs in cols.items():
            put(1 + x * max(1, x_max - 1) / max(1, w - 1), sum(vs) / len(vs), "•", "cyan")
        for s, v in self.val:
            put(s, v, "◆", "bold yellow")
        out = Text()
        for y in range(h):
            label = f"{hi:7.3f} " if y == 0 else f"{lo:7.3f} " if y == h - 1 else " " * 8
            out.append(label, style="dim")
            for x in range(w):
                out.append(grid[y][x], style=style[y][x] or None)
            out.append("\n")
        out.append(" " * 8 + "• train  ", style="cyan")
        out.append("◆ val", style="bold yellow")
        out.append(f"   step {self.train[-1][0] if self.train else 0}/{self.steps or '?'}", style="dim")
        return out
