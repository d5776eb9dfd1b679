"""Pick a local checkpoint (what `gptchat models` lists) or type a path; loaded ones are marked.

Focus stays where the user put it: the path box has it at first, the scan only fills the list (it never
takes the focus from typing), Down goes from the box to the list, and the list starts on the current model.
"""

from __future__ import annotations

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label, OptionList
from textual.widgets.option_list import Option

from gptchat.core.weights.discover import local_models

from gptchat.tui.app.messages import ModelsScanned


class ModelPicker(ModalScreen[str | None]):
    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, current: str | None = None) -> None:
        super().__init__()
        self.current = current  # the chat's model: the list starts on it

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label("Pick a model  (type a path and Enter, or ↓ to the list)", classes="panel-title")
            yield Input(placeholder="a checkpoint folder, a ckpt.pt, a run name or gpt2 …", id="path")
            yield OptionList(id="models")
            yield Label("scanning…", id="scan-note", classes="dim")

    def on_mount(self) -> None:
        ol = self.query_one(OptionList)
        for spec in [m.spec for m in self.app.pool.loaded()]:
            ol.add_option(Option(Text(f"● {spec}  (loaded)"), id=f"m:{spec}"))
        self.highlight_current()
        self.query_one("#path", Input).focus()
        self.scan()

    @work(thread=True, exclusive=True, group="scan", exit_on_error=False)
    def scan(self) -> None:
        self.post_message(ModelsScanned(local_models()))

    def on_models_scanned(self, msg: ModelsScanned) -> None:
        ol = self.query_one(OptionList)
        loaded = {m.spec for m in self.app.pool.loaded()}
        for m in msg.models:
            if m.name in loaded:
                continue
            label = f"  {m.name}  [{m.format}, {m.params / 1e6:.1f}M, {m.source}]  {m.path}"
            ol.add_option(Option(Text(label), id=f"m:{m.name}"))  # Text: the brackets are not markup
        note = self.query_one("#scan-note", Label)
        if ol.option_count == 0:
            note.update("No checkpoints found here. Type a path above, run `gptchat pull gpt2` (online), "
                        "or /finetune data.txt to train one.")
        else:
            note.update(f"{ol.option_count} model(s): ↓ from the box to choose")
        self.highlight_current()

    def highlight_current(self) -> None:
        ol = self.query_one(OptionList)
        ids = [ol.get_option_at_index(i).id for i in range(ol.option_count)]
        if f"m:{self.current}" in ids:
            ol.highlighted = ids.index(f"m:{self.current}")
        elif ids and ol.highlighted is None:
            ol.highlighted = 0

    def on_key(self, event) -> None:
        if event.key == "down" and self.focused is self.query_one("#path", Input):
            event.stop()
            self.query_one(OptionList).focus()

    @on(OptionList.OptionSelected)
    def chosen(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id[2:])

    @on(Input.Submitted)
    def typed(self, event: Input.Submitted) -> None:
        if event.value.strip():
            self.dismiss(event.value.strip())
