"""The conversation as message boxes: rebuilt from the session's turns, the welcome when it is empty,
the dropped oldest turns dimmed, replies drawn as Markdown or as typed."""

from __future__ import annotations

from textual.containers import VerticalScroll

from gptchat.tui.app.widgets.message_view import MessageView
from gptchat.tui.app.widgets.no_model import NoModelPanel
from gptchat.tui.app.widgets.welcome import Welcome


class Transcript(VerticalScroll):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.markdown = False
        self.turns_dropped = 0

    def compose(self):
        yield NoModelPanel(id="no-model", classes="hidden")
        yield Welcome(id="welcome")

    @property
    def views(self) -> list[MessageView]:
        return list(self.query(MessageView))

    def add(self, role: str, text: str = "", status: str = "done", info: dict | None = None) -> MessageView:
        view = MessageView(role, text, status, info, markdown=self.markdown)
        self.query_one(Welcome).display = False
        self.mount(view)
        self.anchor()
        return view

    def show_turns(self, turns) -> None:
        """Rebuild the list from the session (after new chat or reopening one)."""
        self.query(MessageView).remove()
        views = [MessageView(t.role, t.text, t.status, t.info, markdown=self.markdown) for t in turns]
        if views:
            self.mount_all(views)
        self.query_one(Welcome).display = not views and self.query_one(NoModelPanel).has_class("hidden")
        self.turns_dropped = 0
        self.keep_at_end(bool(views))

    def mark_dropped(self, n: int) -> None:
        """Dim the ``n`` oldest messages with text (those the prompt leaves out); undim the others."""
        self.turns_dropped = n
        left = n
        for v in self.views:
            gone = left > 0 and bool(v.text.strip()) and v.status != "streaming"
            left -= gone
            v.set_dropped(gone)

    def set_markdown(self, on: bool) -> None:
        self.markdown = on
        for v in self.views:
            v.set_markdown(on)

    def show_no_model(self, reason: str, local: list[str]) -> None:
        panel = self.query_one(NoModelPanel)
        panel.set_reason(reason, local)
        panel.remove_class("hidden")
        self.query_one(Welcome).display = False
        self.keep_at_end(False)

    def model_ready(self, model: str, template: str) -> None:
        self.query_one(NoModelPanel).add_class("hidden")
        welcome = self.query_one(Welcome)
        welcome.show_for(model, template)
        welcome.display = not self.views
        self.keep_at_end(bool(self.views))

    def keep_at_end(self, on: bool) -> None:
        """Follow new messages (anchored) when there are any; with none, start at the top. Anchoring an empty
        list scrolled it above its top (scroll_y < 0), leaving the welcome or no-model panel at the bottom."""
        self.anchor(on)
        if not on:
            self.scroll_y = 0
