"""The empty chat's first words: what to type and which keys matter."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

KEYS = [("Enter", "send"), ("Shift+Enter", "new line"), ("Esc", "stop a reply"), ("Ctrl+O", "pick a model"),
        ("F2", "settings"), ("F3", "history"), ("F4", "compare"), ("F5", "the exact prompt"), ("F1", "every key"),
        ("Ctrl+Q", "quit")]


def welcome_text(model: str | None, template: str) -> Text:
    t = Text()
    t.append("Type a message and press Enter.\n", style="bold")
    if model:
        t.append("Talking to ")
        t.append(model, style="bold cyan")
        t.append(" with the ")
        t.append(template, style="bold")
        t.append(" template. GPT-2 is a base model: it continues text rather than follows instructions.\n")
    t.append("Commands start with /: ")
    for cmd in ("/template few-shot", "/set temperature 0.7", "/var NAME VALUE", "/help"):
        t.append(cmd, style="bold cyan")
        t.append("  ")
    t.append("\n")
    for i, (key, what) in enumerate(KEYS):
        t.append(key, style="bold cyan")
        t.append(f" {what}" + ("  " if i < len(KEYS) - 1 else ""))
    return t


class Welcome(Static):
    def __init__(self, **kw):
        super().__init__(welcome_text(None, "chat"), **kw)

    def show_for(self, model: str | None, template: str) -> None:
        self.update(welcome_text(model, template))
