"""One chat message: its text grows while a reply streams; focus it to copy, edit or inspect.

Text is shown as typed (never parsed as markup); replies can be drawn as Markdown (``/markdown on``).
A message dropped from the prompt to fit the window is dimmed and says so in its title.
"""

from __future__ import annotations

from rich.console import Group
from rich.markdown import Markdown
from rich.text import Text
from textual.binding import Binding
from textual.message import Message
from textual.widgets import Static


STREAM_LINES = 4  # a streaming reply's box grows this many lines at a time (see get_content_height)


class MessageView(Static, can_focus=True):
    BINDINGS = [
        Binding("c", "copy", "Copy message"),
        Binding("e", "edit", "Edit and resend"),
        Binding("i", "inspect", "Inspect a reply: each token's probability"),
    ]

    class Action(Message):
        def __init__(self, view: "MessageView", action: str) -> None:
            super().__init__()
            self.view = view
            self.action = action

    def __init__(self, role: str, text: str = "", status: str = "done", info: dict | None = None,
                 label: str | None = None, markdown: bool = False, footer_inside: bool = False, **kw):
        super().__init__("", markup=False, **kw)
        self.role = role
        self.text = text
        self.status = status
        self.info = info or {}
        self.markdown = markdown  # draw a reply as Markdown
        self.footer_inside = footer_inside  # the footer as the body's last line (narrow panes), not the border
        self.dropped = False
        self._height: int | None = None  # content height at the last paint (see _paint)
        self.label = label or ("You" if role == "user" else "GPT-2")
        self.add_class(role)
        self.border_title = self.label
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

    def set_markdown(self, on: bool) -> None:
        if on != self.markdown:
            self.markdown = on
            self._paint()

    def set_dropped(self, dropped: bool) -> None:
        """Mark a message the prompt no longer holds (the oldest turns are dropped to fit the window)."""
        if dropped != self.dropped:
            self.dropped = dropped
            self.set_class(dropped, "dropped")
            self.border_title = f"{self.label} · not in the prompt (dropped to fit)" if dropped else self.label

    def _paint(self) -> None:
        self.set_class(self.status == "streaming", "streaming")
        self.set_class(self.status in ("stopped", "error"), "stopped")
        text = self.text.strip("\n") if self.status != "streaming" else self.text.lstrip("\n")
        body = Text(text)
        if self.status == "streaming":
            body.append(" ▌", style="bold")
        elif not self.text.strip() and self.role == "assistant":
            body.append("(empty reply)", style="dim italic")
        footer = self.footer()
        self.border_subtitle = "" if self.footer_inside else footer
        parts = [Markdown(text) if self.markdown and self.role == "assistant" and text.strip() else body]
        if self.footer_inside and footer:
            parts.append(Text(footer, style="dim"))
        # While a reply streams, a layout (the screen reflowed) only when the text outgrows its box (see
        # get_content_height): the UI thread holds the GIL the decode thread needs, and layouts were most of its work
        self.update(parts[0] if len(parts) == 1 else Group(*parts), layout=False)
        height = self._content_height()
        if self.status != "streaming" or height is None or height != self._height:
            self.refresh(layout=True)
        self._height = height

    def _content_height(self) -> int | None:
        """Lines the content takes at the current width (None before the first layout)."""
        width = self.content_region.width if self.is_mounted else 0
        return self.get_content_height(self.size, self.app.size, width) if width > 0 else None

    def get_content_height(self, container, viewport, width: int) -> int:
        """While streaming, the lines the text takes rounded up to a multiple of STREAM_LINES: the box grows
        a few lines at a time, and every growth lays the whole screen out (most of the UI's work, and it grows
        with the transcript). Done, the box fits its text exactly."""
        lines = super().get_content_height(container, viewport, width)
        return -(-lines // STREAM_LINES) * STREAM_LINES if self.status == "streaming" else lines

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
        if i.get("mean_logprob") is not None:
            bits.append(f"mean log p {i['mean_logprob']:.2f}")
        return " · ".join(bits)

    def action_copy(self) -> None:
        self.post_message(self.Action(self, "copy"))

    def action_edit(self) -> None:
        self.post_message(self.Action(self, "edit"))

    def action_inspect(self) -> None:
        self.post_message(self.Action(self, "inspect"))
