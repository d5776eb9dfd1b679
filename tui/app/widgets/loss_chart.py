"""The live loss chart of a finetune run: train loss per step and validation loss per evaluation."""

from __future__ import annotations

from textual.app import RenderResult
from textual_plotext import PlotextPlot


class LossChart(PlotextPlot):
    """Two lines (train, val) on step/loss axes with ticks and a legend, drawn by plotext.

    The points live here; the plot is rebuilt from them at each render (plotext keeps no history).
    """

    DEFAULT_CSS = "LossChart { height: 14; }"

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

    def caption(self) -> str:
        if not self.train:
            return "loss · waiting for the first step…"
        return f"loss · step {self.train[-1][0]}/{self.steps or '?'}"

    def render(self) -> RenderResult:
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title(self.caption())
        plt.xlabel("step")
        for points, label, color, marker in ((self.train, "train", "cyan", "braille"),
                                             (self.val, "val", "orange", "dot")):
            if points:
                plt.plot([s for s, _ in points], [v for _, v in points], label=label, color=color, marker=marker)
        last = max((s for s, _ in self.train + self.val), default=1)
        end = max(self.steps, last, 2)
        plt.xlim(1, end)  # the whole run's width: the chart shows how far it has come
        plt.xticks(sorted({round(1 + i * (end - 1) / 4) for i in range(5)}))  # whole steps
        return super().render()
