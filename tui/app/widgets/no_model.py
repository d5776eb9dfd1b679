"""Shown instead of failing when no model can be loaded: the three ways to get one, one key each.

Open a checkpoint folder or ckpt.pt (the model picker), download gpt2 (when online; a progress bar
while it comes), or, fully offline, train a small GPT-2 from scratch on a folder of your own text
(the finetune screen, prefilled) and chat with it when it finishes. The panel only posts ``Chosen``;
the chat screen does the work.
"""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Button, Label, ProgressBar, Static

from gptchat.tui.format import human_bytes

CHOICES = [("open", "Open folder or ckpt.pt", "primary"), ("download", "Download gpt2", "default"),
           ("train", "Train on my text", "success")]  # short: the three fit in 80 columns


def how_to_get_a_model(reason: str, local: list[str]) -> Text:
    t = Text()
    t.append("No model loaded\n", style="bold red")
    if reason:
        t.append(reason + "\n\n", style="red")
    if local:
        t.append("Models on this machine (Ctrl+O to pick one):\n", style="bold")
        for name in local[:8]:
            t.append(f"  • {name}\n")
        t.append("\n")
    t.append("Get a model any of these ways (Tab to a button, Enter):\n", style="bold")
    t.append("  • Open a checkpoint folder or nanoGPT ckpt.pt: ")
    t.append("Ctrl+O", style="bold cyan")
    t.append(" or ")
    t.append("/model PATH\n", style="bold cyan")
    t.append("  • Download GPT-2 (124M, about 550 MB; needs the network): ")
    t.append("/model gpt2\n", style="bold cyan")
    t.append("  • No network? Train a small GPT-2 from scratch on a folder of your own .txt files ")
    t.append("(a few minutes on a CPU, with a live loss chart), then chat with it")
    return t


class NoModelPanel(Vertical):
    class Chosen(Message):
        def __init__(self, choice: str) -> None:
            super().__init__()
            self.choice = choice  # open | download | train

    def compose(self) -> ComposeResult:
        yield Static(how_to_get_a_model("", []), id="how")
        with Horizontal(classes="choices"):
            for cid, label, variant in CHOICES:
                yield Button(label, id=f"get-{cid}", variant=variant, compact=True)
        yield ProgressBar(id="download-bar", show_eta=False, classes="hidden")
        yield Label("", id="download-note", classes="dim")

    def set_reason(self, reason: str, local: list[str]) -> None:
        self.query_one("#how", Static).update(how_to_get_a_model(reason, local))

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.post_message(self.Chosen(event.button.id.removeprefix("get-")))

    def downloading(self, name: str, done_bytes: int | None) -> None:
        """Show a download under way (``done_bytes`` None: it ended, the bar goes)."""
        bar = self.query_one("#download-bar", ProgressBar)
        bar.set_class(done_bytes is None, "hidden")  # the button stays enabled: disabling it moves the focus
        note = "" if done_bytes is None else f"downloading {name}: {human_bytes(done_bytes)} so far"
        self.query_one("#download-note", Label).update(note)
