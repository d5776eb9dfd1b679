"""The exact prompt the model sees: the rendered text, each part coloured as in the budget bar, and
what was dropped to fit the window (the CLI's ``--explain``, one key away)."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Label, Static

from gptchat.tui.app.widgets.budget_bar import COLORS


def prompt_text(rendered, what: str) -> Text:
    """The prompt, part by part in the budget bar's colours, under a legend with each part's tokens."""
    t = Text()
    t.append(f"For {what}: {rendered.n_prompt} tokens of {rendered.n_ctx}, "
             f"{rendered.reserve} kept for the reply, template {rendered.template}\n", style="bold")
    for part in rendered.parts:
        t.append("■ ", style=COLORS.get(part.kind, "white"))
        t.append(f"{part.label} {part.tokens}  ")
    t.append("\n")
    if rendered.dropped:
        t.append("dropped to fit: " + "; ".join(rendered.dropped) + "\n", style="bold yellow")
    t.append("\n")
    for part in rendered.parts:
        t.append(part.text, style=COLORS.get(part.kind, "white"))  # plain text: markup is never parsed
    return t


class PromptView(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,f5", "dismiss(None)", "Close")]

    def __init__(self, rendered, what: str) -> None:
        super().__init__()
        self.rendered = rendered
        self.what = what

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="dialog", classes="wide"):
            yield Label("The exact prompt  (coloured as in the budget bar; Esc closes)", classes="panel-title")
            yield Static(prompt_text(self.rendered, self.what), id="prompt-text")
