"""Every key and slash command, built from the screens' BINDINGS so it cannot go stale.

The chat screen opens this one and passes its own bindings in (importing the chat screen here would
make a cycle)."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from gptchat.tui.app import slash
from gptchat.tui.app.screens.compare import CompareScreen
from gptchat.tui.app.screens.history import HistoryScreen
from gptchat.tui.app.widgets.message_view import MessageView


def _key(b: Binding) -> str:
    return ", ".join(k.strip().replace("ctrl+", "Ctrl+").replace("escape", "Esc").replace("slash", "/").title()
                     if len(k.strip()) > 1 else k.strip() for k in b.key.split(","))


def help_table(chat_bindings: list[Binding]) -> Table:
    t = Table(box=None, show_header=False, padding=(0, 2))
    t.add_column(style="bold cyan", no_wrap=True)
    t.add_column()  # cells are Text: "/export [md|json] [PATH]" must not be read as markup
    sections = [  # (title, a note beside it, bindings)
        ("Chat", "", list(chat_bindings) + [Binding("enter", "", "Send"), Binding("shift+enter,ctrl+j", "", "New line"),
                                            Binding("ctrl+p", "", "Command palette")]),
        ("A message", "Tab from the input reaches the newest", MessageView.BINDINGS),
        ("History", "", HistoryScreen.BINDINGS),
        ("Compare", "", CompareScreen.BINDINGS),
    ]
    for title, note, bindings in sections:
        t.add_row(Text(title, style="bold underline"), Text(note, style="dim"))
        for b in bindings:
            if b.description:
                t.add_row(Text(_key(b)), Text(b.description))
        t.add_row("", "")
    t.add_row(Text("Slash commands", style="bold underline"), Text("type them in the input", style="dim"))
    for cmd, desc in slash.help_lines():
        t.add_row(Text(cmd), Text(desc))
    return t


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,f1", "dismiss(None)", "Close")]

    def __init__(self, chat_bindings: list[Binding]) -> None:
        super().__init__()
        self.chat_bindings = chat_bindings

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="dialog", classes="wide"):
            yield Static(help_table(self.chat_bindings), id="help-table")
