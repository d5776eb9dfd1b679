"""Pick a local checkpoint (what `gptchat models` lists) or type a path; loaded ones are marked."""

from __future__ import annotations

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label, OptionList
from textual.widgets.option_list import Option

from gptchat.tui.app.messages import ModelsScanned


class ModelPicker(ModalScreen[str | None]):
    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label("Pick a model  (Enter loads it; type a path or hub name below)", classes="panel-title")
            yield OptionList(id="models")
            yield Input(placeholder="a checkpoint folder, a ckpt.pt, a run name or gpt2 …", id="path")
            yield Label("scanning…", id="scan-note", classes="dim")

    def on_mount(self) -> None:
        loaded = [m.spec for m in self.app.pool.loaded()]
        ol = self.query_one(OptionList)
        for spec in loaded:
            ol.add_option(Option(f"● {spec}  (loaded)", id=f"m:{spec}"))
        self.query_one("#path", Input).focus()
        self.scan()

    @work(thread=True, exclusive=True, group="scan", exit_on_error=False)
    def scan(self) -> None:
        from gptchat.core.weights.discover import local_models

        self.post_message(ModelsScanned(local_models()))

    def on_models_scanned(self, msg: ModelsScanned) -> None:
        ol = self.query_one(OptionList)
        loaded = {m.spec for m in self.app.pool.loaded()}
        for m in msg.models:
            if m.name in loaded:
                continue
            ol.add_option(Option(f"  {m.name}  [{m.format}, {m.params / 1e6:.1f}M, {m.source}]  {m.path}", id=f"m:{m.name}"))
        note = self.query_one("#scan-note", Label)
        if ol.option_count == 0:
            note.update("No checkpoints found here. Type a path above, run `gptchat pull gpt2` (online), "
                        "or /finetune data.txt to train one.")
        else:
            note.update(f"{ol.option_count} model(s)")
            if not self.query_one("#path", Input).value:
                ol.focus()

    @on(OptionList.OptionSelected)
    def chosen(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id[2:])

    @on(Input.Submitted)
    def typed(self, event: Input.Submitted) -> None:
        if event.value.strip():
            self.dismiss(event.value.strip())
