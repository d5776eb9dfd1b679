"""Bars on labelled axes (an experiment's metric per variant), drawn by plotext like the loss chart."""

from __future__ import annotations

from textual.app import RenderResult
from textual_plotext import PlotextPlot


class BarChart(PlotextPlot):
    """``show(["gpt2:chat", "run:chat"], [3.2, 2.9], "val loss")``: one bar per label, its value under it."""

    DEFAULT_CSS = "BarChart { height: 14; }"

    def __init__(self, **kw):
        super().__init__(**kw)
        self.labels: list[str] = []
        self.values: list[float] = []
        self.title = ""
        self.ylabel = ""

    def show(self, labels: list[str], values: list[float], title: str = "", ylabel: str = "") -> None:
        if len(labels) != len(values):
            raise ValueError(f"{len(labels)} labels for {len(values)} values")
        self.labels, self.values, self.title, self.ylabel = list(labels), list(values), title, ylabel
        self.refresh()

    def render(self) -> RenderResult:
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title(f"{self.title} ({self.ylabel})" if self.ylabel else self.title)
        if self.values:
            # the number under each bar: heights alone are hard to compare (text drawn on bars is unreadable)
            plt.bar([f"{n} {v:.3g}" for n, v in zip(self.labels, self.values)], self.values, color="cyan")
        return super().render()
