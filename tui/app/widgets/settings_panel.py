"""The settings side panel. It edits values and posts ``Changed``; the screen applies them."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Button, Input, Label, Select, Switch

from gptchat.core.generate import options

# (setting, label, placeholder, tooltip): generation options take their label and help from core's table.
FIELDS = [
    ("model", "model", "gpt2, a folder or a run name", "A checkpoint folder, a nanoGPT ckpt.pt, a run name or a hub name."),
    ("shots", "shots", "template default", "How many examples few-shot templates show."),
    ("examples", "examples file", "JSONL or TSV path", "A JSONL or TSV file of examples for the template."),
] + [(n, options.SETTINGS[n].label, "random" if n == "seed" else "", options.SETTINGS[n].help)
     for n in ("temperature", "top_k", "top_p", "max_new_tokens", "seed", "repetition_penalty")]
DEVICES = ["auto", "cpu", "cuda", "mps"]
DTYPES = ["auto", "fp32", "fp16", "bf16"]


class SettingsPanel(VerticalScroll):
    class Changed(Message):
        def __init__(self, name: str, value: str, final: bool = True) -> None:
            super().__init__()
            self.name = name
            self.value = value
            self.final = final  # False while typing: apply if valid, complain only when final

    def __init__(self, templates: list[str], **kw):
        super().__init__(**kw)
        self.templates = templates
        self._syncing = False
        self._shown: dict[str, str] = {}  # what sync last put in each select and switch

    def compose(self) -> ComposeResult:
        yield Label("Settings", classes="panel-title")
        yield Label("apply to the next message", classes="dim panel-sub")
        yield Label("template")
        yield Select([(t, t) for t in self.templates], id="set-template", allow_blank=False, compact=True)
        yield Vertical(id="vars-box")  # one box per variable of the template (zero-shot's task ...)
        for name, label, ph, tip in FIELDS:
            yield Label(label)
            if name == "model":
                with Horizontal(classes="model-row"):
                    yield Input(placeholder=ph, id="set-model", compact=True, tooltip=tip)
                    yield Button("…", id="pick-model", compact=True, tooltip="Pick a model (Ctrl+O)")
            else:
                yield Input(placeholder=ph, id=f"set-{name}", compact=True, tooltip=tip)
        with Horizontal(classes="switch-row"):
            yield Label(options.SETTINGS["greedy"].label + " ")
            yield Switch(id="set-greedy", tooltip=options.SETTINGS["greedy"].help)
        yield Label("device")
        yield Select([(d, d) for d in DEVICES], id="set-device", allow_blank=False, compact=True)
        yield Label("dtype")
        yield Select([(d, d) for d in DTYPES], id="set-dtype", allow_blank=False, compact=True)

    def sync(self, settings, resolved: dict, variables: dict[str, str] | None = None) -> None:
        """Show ``settings``; unset sampling values show the template's default as a placeholder.
        ``variables``: the template's variables other than the input, with their defaults."""
        self._syncing = True
        try:
            self.sync_vars(settings.vars, variables or {})
            if settings.template in self.templates:
                self.query_one("#set-template", Select).value = settings.template
            for name, _, ph, _ in FIELDS:
                w = self.query_one(f"#set-{name}", Input)
                v = getattr(settings, name)
                w.value = "" if v is None else str(v)
                if name in resolved:
                    w.placeholder = f"{resolved[name]} (template)"
            self._shown = {"set-template": settings.template, "set-greedy": "on" if settings.greedy else "off",
                           "set-device": settings.device or "auto", "set-dtype": settings.dtype or "auto"}
            self.query_one("#set-greedy", Switch).value = settings.greedy
            self.query_one("#set-device", Select).value = self._shown["set-device"]
            self.query_one("#set-dtype", Select).value = self._shown["set-dtype"]
        finally:
            self.call_after_refresh(self._done_sync)

    def sync_vars(self, values: dict[str, str], variables: dict[str, str]) -> None:
        box = self.query_one("#vars-box", Vertical)
        shown = [w.id[4:] for w in box.query(Input)]
        if shown != list(variables):
            box.remove_children()
            for name, default in variables.items():
                box.mount(Label(f"{{{name}}} (template variable)", markup=False))
                box.mount(Input(placeholder=default or "", id=f"var-{name}", compact=True,
                                tooltip=f"The template's {{{name}}}; also /var {name} VALUE"))
            self.call_after_refresh(self._fill_vars, values)
        else:
            self._fill_vars(values)

    def _fill_vars(self, values: dict[str, str]) -> None:
        for w in self.query_one("#vars-box").query(Input):
            w.value = values.get(w.id[4:], "")

    def _done_sync(self) -> None:
        self._syncing = False

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        if event.input.id.startswith("var-"):
            self.post_message(self.Changed(f"var:{event.input.id[4:]}", event.value))
        else:
            self._changed(event.input.id, event.value)

    def on_input_changed(self, event: Input.Changed) -> None:
        event.stop()
        if event.input.id.startswith("var-"):
            if not self._syncing:
                self.post_message(self.Changed(f"var:{event.input.id[4:]}", event.value, final=False))
            return
        if not self._syncing and event.input.id != "set-model":
            self.post_message(self.Changed(event.input.id[4:], event.value, final=False))

    def on_select_changed(self, event: Select.Changed) -> None:
        event.stop()
        # Selects post Changed for their first value when mounted, and sometimes after sync: neither is the
        # user's choice (applying them loaded the model twice at start and showed stray toasts).
        if not self._syncing and event.value is not Select.BLANK and event.value == event.select.value:
            self._changed(event.select.id, str(event.value))

    def on_switch_changed(self, event: Switch.Changed) -> None:
        event.stop()
        if not self._syncing:
            self._changed(event.switch.id, "on" if event.value else "off")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == "pick-model":
            self.post_message(self.Changed("pick_model", ""))

    def _changed(self, wid: str | None, value: str) -> None:
        if not wid or not wid.startswith("set-") or not self._shown or self._shown.get(wid) == value:
            return  # nothing changed (or no sync has shown anything yet: the widgets' own start-up events)
        if wid in self._shown:
            self._shown[wid] = value
        self.post_message(self.Changed(wid[4:], value))
