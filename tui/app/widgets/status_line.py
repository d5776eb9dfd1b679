"""One line under the chat: the model's state, the last reply's speed and device, memory in use."""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widgets import Static


class StatusLine(Static):
    state = reactive("starting")  # starting | loading | ready | generating | no model | error
    model = reactive("")
    last = reactive("")
    memory = reactive("")

    def render(self) -> Text:
        icons = {"ready": ("●", "green"), "generating": ("◉", "yellow"), "loading": ("◌", "yellow"),
                 "no model": ("○", "red"), "error": ("✗", "red")}
        icon, color = icons.get(self.state, ("◌", "grey50"))
        t = Text()
        t.append(f"{icon} {self.state}", style=f"bold {color}")
        for part in (self.model, self.last, self.memory):
            if part:
                t.append("  │  ", style="dim")
                t.append(part)
        return t
