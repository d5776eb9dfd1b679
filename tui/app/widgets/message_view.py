"""One chat message: its text grows while a reply streams; focus it to copy or edit."""

from __future__ import annotations

from textual.binding import Binding
from textual.message import Message
from textual.widgets import Static
from rich.text import Text


class MessageView(Static, can_focus=True):
    BINDINGS = [
        Binding("c", "copy", "Copy message"),
        Binding("e", "edit", "Edit and resend"),
    ]

    class Action(Message):
        def __init__(self, view: "MessageView", action: str) -> None:
            super().__init__()
            self.view = view
            self.action = action

    def __init__(self, role: str, text: str = "", status: str = "done", info: dict | None = None, label: str | None = None, **kw):
        super().__init__("", markup=False, **kw)
        self.role = role
        self.text = text
        self.status = status
        self.info = info or {}
        self.add_class(role)
        self.border_title = label or ("You" if role == "user" else "GPT-2")
        self._paint()

    def append(self, text: str) -> None:
        self.text += text
        self._paint()

    def finish(self, text: str, status: str, info: dict) -> None:
        self.text, self.status, self.info = text, status, info
        self._paint()

    def set_status(self, status: str) -> None:
        self.status = status
        self._paint()

    def _paint(self) -> None:
        self.set_class(self.status == "streaming", "streaming")
        self.set_class(self.status in ("stopped", "error"), "stopped")
        body = Text(self.text.strip("\n") if self.status != "streaming" else self.text.lstrip("\n"))
        if self.status == "streaming":
            body.append(" ▌", style="bold")
        elif not self.text.strip() and self.role == "assistant":
            body.append("(empty reply)", style="dim italic")
        self.update(body)
        self.border_subtitle = self.footer()

    def footer(self) -> str:
        if self.role != "assistant":
            return ""
        if self.status == "streaming":
            return "streaming… Esc stops"
        i = self.info
        bits = []
        if self.status == "stopped":
            bits.append("■ stopped")
        elif self.status == "error":
            bits.append("✗ error")
        if i.get("tokens") is not None and i:
            bits.append(f"{i.get('tokens', 0)} tok")
        if i.get("tokens_per_s"):
            bits.append(f"{i['tokens_per_s']:.1f} tok/s")
        if i.get("finish") and self.status != "stopped":
            bits.append(str(i["finish"]))
        if i.get("seed") is not None:
            bits.append(f"seed {i['seed']}")
        return " · ".join(bits)

    def action_copy(self) -> None:
        self.post_message(self.Action(self, "copy"))

    def action_edit(self) -> None:
        self.post_message(self.Action(self, "edit"))
