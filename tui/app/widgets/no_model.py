"""Shown instead of failing when no model can be loaded: exactly how to get one."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static


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
    t.append("Get a model any of these ways:\n", style="bold")
    t.append("  1. Open a checkpoint folder or nanoGPT ckpt.pt:  ", style="")
    t.append("Ctrl+O", style="bold cyan")
    t.append(" (then type a path), or ")
    t.append("/model PATH\n", style="bold cyan")
    t.append("  2. Download GPT-2 (needs the network):           ")
    t.append("gptchat pull gpt2", style="bold cyan")
    t.append(" in a shell, then ")
    t.append("/model gpt2\n", style="bold cyan")
    t.append("  3. Train one on a text file:                      ")
    t.append("/finetune data.txt", style="bold cyan")
    t.append("  (or ")
    t.append("gptchat finetune data.txt --from-scratch", style="bold cyan")
    t.append(")\n")
    return t


class NoModelPanel(Static):
    def __init__(self, reason: str = "", local: list[str] | None = None, **kw):
        super().__init__(how_to_get_a_model(reason, local or []), **kw)

    def set_reason(self, reason: str, local: list[str]) -> None:
        self.update(how_to_get_a_model(reason, local))
