"""Choosing between equivalent ways of running a kernel by timing them where they run.

Some choices are the machine's and show only under real conditions (weights streamed from memory between other
work, not a warm harness): how far ahead the int8 products prefetch, whether a batch's int8 products go to the C
kernel or PyTorch's int8 GEMM. A ``Trial`` takes its candidates in turn on the real calls, times each, and after
a warm-up round and ``rounds`` more keeps the one with the lowest median. The candidates give the same results.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Trial(Generic[T]):
    def __init__(self, candidates: tuple[T, ...], rounds: int = 4, on_choice: Callable[[T], None] | None = None):
        self.candidates, self.rounds, self.on_choice, self.calls = candidates, rounds, on_choice, 0
        self.times: dict[T, list[float]] = {c: [] for c in candidates}
        self.chosen: T | None = None

    def next(self) -> T:
        """The candidate the next call is to run with: the chosen one once there is one, else the next in turn."""
        return self.chosen if self.chosen is not None else self.candidates[self.calls % len(self.candidates)]

    @property
    def timing(self) -> bool:
        """Whether calls are still to be timed (and ``record``-ed)."""
        return self.chosen is None

    def call(self, fn: Callable[[T], R]) -> R:
        """``fn(candidate)`` for the candidate of the moment: timed and recorded while the trial lasts."""
        way = self.next()
        if not self.timing:
            return fn(way)
        t0 = time.perf_counter()
        out = fn(way)
        self.record(way, time.perf_counter() - t0)
        return out

    def record(self, candidate: T, seconds: float) -> None:
        self.calls += 1
        if self.chosen is not None or self.calls <= len(self.candidates):  # decided, or the warm-up round
            return
        self.times[candidate].append(seconds)
        if all(len(t) >= self.rounds for t in self.times.values()):
            self.chosen = min(self.candidates, key=lambda c: statistics.median(self.times[c]))
            if self.on_choice is not None:
                self.on_choice(self.chosen)
