"""The conversation list: reopen, rename, delete, export to Markdown/JSON, full-text search."""

from __future__ import annotations

import time

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, Input, Label, OptionList
from textual.widgets.option_list import Option

from gptchat.core.errors import GptchatError


class HistoryScreen(Screen[str | None]):
    BINDINGS = [
        Binding("escape", "dismiss(None)", "Back"),
        Binding("enter", "open", "Open", show=False),
        Binding("r", "rename", "Rename"),
        Binding("d", "delete", "Delete"),
        Binding("m", "export('md')", "Export Markdown"),
        Binding("j", "export('json')", "Export JSON"),
        Binding("slash", "search", "Search"),
    ]

    def __init__(self):
        super().__init__()
        self._armed_delete: str | None = None

    @property
    def store(self):
        return self.app.session.store

    def compose(self) -> ComposeResult:
        yield Label("History  (type to search every message; ↓ to the list)", classes="panel-title")
        yield Input(placeholder="search…", id="search")
        yield OptionList(id="convs")
        yield Footer()

    def on_mount(self) -> None:
        self.refresh_list()
        self.query_one(OptionList).focus()

    def refresh_list(self, query: str = "") -> None:
        ol = self.query_one(OptionList)
        ol.clear_options()
        for c in self.store.conversations(query or None):
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(c.updated))
            kind = " [compare]" if c.kind == "compare" else ""
            # a Text prompt: names are shown as typed, and " [compare]" is not read as markup
            count = f"{c.n_messages} message{'s' if c.n_messages != 1 else ''}"
            ol.add_option(Option(Text(f"{when}  {c.name or 'Untitled'}{kind}  ({count})"), id=c.id))
        if ol.option_count:
            ol.highlighted = 0

    @on(Input.Changed, "#search")
    def searched(self, event: Input.Changed) -> None:
        self.refresh_list(event.value)

    @on(Input.Submitted, "#search")
    def search_done(self, event: Input.Submitted) -> None:
        self.query_one(OptionList).focus()

    def on_key(self, event) -> None:
        """Down leaves the search box for the list (as its title says)."""
        if event.key == "down" and self.focused is self.query_one("#search", Input):
            event.stop()
            self.query_one(OptionList).focus()

    def action_search(self) -> None:
        self.query_one("#search", Input).focus()

    def _current(self) -> str | None:
        ol = self.query_one(OptionList)
        if ol.highlighted is None or not ol.option_count:
            self.notify("no conversation selected", severity="warning")
            return None
        return ol.get_option_at_index(ol.highlighted).id

    @on(OptionList.OptionSelected)
    def selected(self, event: OptionList.OptionSelected) -> None:
        self._open(event.option.id)

    def action_open(self) -> None:
        if (cid := self._current()) is not None:
            self._open(cid)

    def _open(self, cid: str) -> None:
        c = self.store.conversation(cid)
        if c is not None and c.kind == "compare":
            from gptchat.tui.app.screens.compare import CompareScreen

            self.app.push_screen(CompareScreen.from_history(self.store, cid))
            return
        self.dismiss(cid)

    def action_rename(self) -> None:
        cid = self._current()
        if cid is None:
            return
        from gptchat.tui.app.screens.ask import Ask

        def done(name: str | None) -> None:
            if name:
                self.store.rename(cid, name.strip())
                self.refresh_list(self.query_one("#search", Input).value)

        self.app.push_screen(Ask("New name:", self.store.conversation(cid).name), done)

    def action_delete(self) -> None:
        cid = self._current()
        if cid is None:
            return
        if self._armed_delete != cid:
            self._armed_delete = cid
            self.notify("press d again to delete this conversation", severity="warning")
            return
        self.store.delete(cid)
        self._armed_delete = None
        if self.app.session.conv_id == cid:
            self.app.session.new()
        self.refresh_list(self.query_one("#search", Input).value)
        self.notify("deleted")

    def action_export(self, fmt: str) -> None:
        cid = self._current()
        if cid is None:
            return
        from gptchat.core.session.store import export_file

        try:
            self.notify(f"exported to {export_file(self.store, cid, fmt)}")
        except GptchatError as e:
            self.notify(str(e), severity="error")
