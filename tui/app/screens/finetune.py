"""Finetune: a form with a live memory/time plan, then a live view of the run (chart, speed, ETA, sample).

The run is a detached `gptchat finetune` process (see finetune_launch.py); this screen only reads its
``events.jsonl`` (new bytes, every half second) and ``status.json``, so it can close and reattach.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Button, Checkbox, Footer, Input, Label, OptionList, Static
from textual.widgets.option_list import Option

from gptchat.core.config import default_model
from gptchat.core.errors import GptchatError, UsageError
from gptchat.core.paths import get_paths
from gptchat.core.train.plan import preview
from gptchat.core.train.runs import check_free, default_name, list_runs, run_info
from gptchat.tui.app import finetune_launch as launch
from gptchat.tui.app.event_tail import EventTail
from gptchat.tui.app.finetune_launch import FIELDS
from gptchat.tui.app.screens.compare import CompareScreen
from gptchat.tui.app.widgets.loss_chart import LossChart
from gptchat.tui.cli.finetune import hms, settings_from

TAIL_S = 0.5
DONE_STATES = ("finished", "early-stopped", "interrupted", "failed", "dead", "broken")


@dataclass
class PlanReady(Message, bubble=False):
    lines: list[str]
    error: str | None = None


class FinetuneScreen(Screen):
    """Form mode (``run`` is None) or attach mode (follow the run of that name)."""

    BINDINGS = [
        Binding("escape", "back", "Back (the run goes on)"),
        Binding("ctrl+s", "start", "Start"),
        Binding("ctrl+x", "stop", "Stop run"),
    ]

    def __init__(self, arg: str = "", run: str | None = None, base_model: str | None = None):
        super().__init__()
        self.arg = arg
        self.run_name = run
        self.base_model = base_model
        self.extra: list[str] = []
        self.proc = None  # the Popen we started (None when attached to an older run)
        self.log_path: Path | None = None
        self.tail: EventTail | None = None
        self.state = "new"
        self.step = 0
        self.steps = 0
        self.val_loss: float | None = None
        self.best_val: float | None = None
        self.stopping = False
        self.last_step: dict = {}  # the latest step event
        self.error: str | None = None
        self.folder: Path | None = None
        self._plan_timer = None
        self._tail_timer = None

    def check_action(self, action: str, parameters) -> bool | None:
        if action == "start":
            return not self.run_name
        if action == "stop":  # shown while the run can be stopped, and only then
            return bool(self.run_name) and self.state not in DONE_STATES and not self.stopping
        return True

    # -- layout -----------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Label("Finetune", classes="panel-title", id="ft-title")
        with Horizontal(id="ft-main"):
            with Vertical(id="ft-form"):
                with VerticalScroll(id="ft-fields"):
                    for fid, _param, label in FIELDS:
                        yield Label(label)
                        yield Input(id=f"ft-{fid}")
                        if fid == "model":
                            yield Checkbox("From scratch (new weights)", id="ft-scratch")
                    yield Label("", id="ft-extra", classes="dim")
                yield Button("Start (Ctrl+S)", id="ft-start", variant="primary")
            with Vertical(id="ft-side"):
                yield Static("plan: fill in the data to see the memory and time plan", id="ft-plan")
                yield Label("Runs (Enter opens one)", classes="panel-title", id="ft-runs-title")
                yield OptionList(id="ft-runs")
            with Vertical(id="ft-live", classes="hidden"):
                yield Label("", id="ft-run-title", classes="panel-title")
                yield LossChart(id="ft-chart")
                yield Static("", id="ft-stats")
                yield Static("", id="ft-sample")
                with Horizontal(id="ft-buttons"):
                    yield Button("Stop", id="ft-stop", variant="error")
                    yield Button("Compare base vs finetuned", id="ft-compare", variant="success", disabled=True)
                    yield Button("Chat with it", id="ft-chat", variant="primary", disabled=True)
        yield Footer()

    def on_mount(self) -> None:
        if self.run_name:
            self.attach(self.run_name)
            return
        self.query_one("#ft-model", Input).value = self.base_model or self.chat_model()
        try:
            given = launch.parse(self.arg)
        except GptchatError as e:
            self.notify(str(e), severity="error")
            given = launch.FinetuneArgs()
        for k, v in given.values.items():
            self.query_one(f"#ft-{k}", Input).value = v
        self.query_one("#ft-scratch", Checkbox).value = given.from_scratch
        self.extra = given.extra
        if self.extra:
            self.query_one("#ft-extra", Label).update("also passed: " + " ".join(self.extra))
        self.sync_scratch()
        self.fill_runs()
        self.query_one("#ft-data", Input).focus()
        self.schedule_plan()

    def chat_model(self) -> str:
        session = getattr(self.app, "session", None)
        return (session.settings.model if session is not None else None) or default_model()

    def fill_runs(self) -> None:
        runs = self.query_one("#ft-runs", OptionList)
        runs.clear_options()
        found = list_runs()
        for r in found:
            best = f"  best val {r['best_val_loss']:.3f}" if r["best_val_loss"] is not None else ""
            runs.add_option(Option(f"{r['name']}  {r['state']}  {r['step'] or 0}/{r['steps'] or '?'}{best}", id=r["name"]))
        if not found:
            runs.add_option(Option("no runs yet", disabled=True))

    def sync_scratch(self) -> None:
        scratch = self.query_one("#ft-scratch", Checkbox).value
        self.query_one("#ft-model", Input).disabled = scratch
        self.query_one("#ft-arch", Input).disabled = not scratch

    # -- the form and its plan ---------------------------------------------------------------------

    def form_values(self) -> dict[str, str]:
        return {fid: self.query_one(f"#ft-{fid}", Input).value.strip() for fid, _param, _label in FIELDS}

    def form_args(self) -> tuple[list[str], str]:
        """The CLI arguments for the form (without --name) and the run name."""
        v = self.form_values()
        try:
            data = shlex.split(v["data"])
        except ValueError as e:
            raise UsageError(f"data: {e}") from None
        if not data:
            raise UsageError("give the training data: a .txt file, several files or a folder")
        args = list(data)
        scratch = self.query_one("#ft-scratch", Checkbox).value
        if scratch:
            args.append("--from-scratch")
        for fid, param, _label in FIELDS:
            if fid not in ("data", "name") and v[fid] and (fid != "model" or not scratch) and (fid != "arch" or scratch):
                args += [launch.flag_of(param), v[fid]]
        return args + self.extra, v["name"] or default_name(data)

    def form_settings(self, args: list[str] | None = None, name: str | None = None):
        """The form (or its ``args`` and ``name`` from form_args) as the trainer's Settings: parsed by the finetune
        command itself (same checks as the CLI)."""
        if args is None:
            args, name = self.form_args()
        return settings_from(launch.command_params(args + ["--name", name]))

    @on(Input.Changed)
    @on(Checkbox.Changed)
    def on_form_changed(self, event) -> None:
        if isinstance(event, Checkbox.Changed):
            self.sync_scratch()
        self.schedule_plan()

    def schedule_plan(self) -> None:
        if self.run_name:
            return
        if self._plan_timer is not None:
            self._plan_timer.stop()
        self._plan_timer = self.set_timer(0.4, self.refresh_plan)

    def refresh_plan(self) -> None:
        try:
            settings = self.form_settings()
        except GptchatError as e:
            self.query_one("#ft-plan", Static).update(f"plan: {e}")
            return
        self.query_one("#ft-plan", Static).update("plan: estimating…")
        self.compute_plan(settings)

    @work(thread=True, exclusive=True, group="ft-plan", exit_on_error=False)
    def compute_plan(self, settings) -> None:
        try:
            plan, r = preview(settings)
        except (GptchatError, OSError, ValueError) as e:
            self.post_message(PlanReady([], str(e)))
            return
        lines = plan.lines() + [
            f"  run: {r['steps']} steps, batch {r['batch_size']} x block {r['block_size']}, lr {r['lr']:.2g}, "
            f"evaluate every {r['eval_every']} (data ~{r['est_tokens']:,} tokens, estimated from its size)"
        ]
        if not plan.fits:
            lines.append("  does not fit: " + plan.advice())
        self.post_message(PlanReady(lines))

    def on_plan_ready(self, msg: PlanReady) -> None:
        self.query_one("#ft-plan", Static).update(f"plan: {msg.error}" if msg.error else "\n".join(msg.lines))

    # -- starting and following a run --------------------------------------------------------------

    @on(Button.Pressed, "#ft-start")
    def action_start(self) -> None:
        if self.run_name:
            return
        try:
            args, name = self.form_args()
            # what `gptchat finetune` refuses before it makes a folder is refused here, the form still filled in
            settings = self.form_settings(args, name)
            if settings is not None:
                settings.check()
            check_free(name)
        except GptchatError as e:
            self.notify(str(e), severity="error")
            return
        if not self.query_one("#ft-scratch", Checkbox).value:
            self.base_model = self.query_one("#ft-model", Input).value.strip() or "gpt2"
        self.proc, self.log_path = launch.start(args, name)
        self.notify(f"run {name} started (pid {self.proc.pid}); it goes on if you leave this screen")
        self.attach(name)

    def attach(self, name: str) -> None:
        self.run_name = name
        self.folder = get_paths().runs / name
        if self.log_path is None:
            self.log_path = get_paths().runs / f"{name}.log"
        self.query_one("#ft-form").add_class("hidden")
        self.query_one("#ft-side").add_class("hidden")
        self.query_one("#ft-live").remove_class("hidden")
        self.query_one("#ft-stop", Button).focus()  # the hidden form must not keep the keys (Ctrl+X is its "cut")
        self.query_one("#ft-title", Label).update(f"Finetune · {name}")
        self.refresh_bindings()
        self.query_one("#ft-run-title", Label).update(f"run {name}  ({self.folder})")
        self.query_one(LossChart).clear()
        self.tail = EventTail(self.folder / "events.jsonl")
        self.poll()
        self._tail_timer = self.set_interval(TAIL_S, self.poll)

    @on(OptionList.OptionSelected, "#ft-runs")
    def open_run(self, event: OptionList.OptionSelected) -> None:
        if event.option.id:
            self.attach(event.option.id)

    def poll(self) -> None:
        """Apply the new events and the status file; stop following once the run is over."""
        for ev in self.tail.read():
            self.apply_event(ev)
        self.state = self.read_status().get("state", self.state)
        exited = self.proc is None or self.proc.poll() is not None
        if self.proc is not None and exited and self.state in ("new", "running") and not self.tail.path.exists():
            self.state = "failed"  # it failed before it made its folder: show why
            self.error = launch.log_tail(self.log_path)
        if self.state in DONE_STATES and self._tail_timer is not None and exited:
            self._tail_timer.stop()
            self._tail_timer = None
            self.stopping = False
        self.show_stats()

    def read_status(self) -> dict:
        if not (self.folder / "run.json").is_file():
            return {}
        info = run_info(self.folder)
        if self.base_model is None and not info["base"].startswith("scratch:"):
            self.base_model = info["base"]
        return info

    def apply_event(self, ev: dict) -> None:
        t = ev.get("type")
        chart = self.query_one(LossChart)
        if t == "start":
            if self.base_model is None:
                s = ev.get("settings", {})
                if not s.get("from_scratch"):
                    self.base_model = s.get("model") or "gpt2"
        elif t == "step":
            self.step, self.steps = ev["step"], ev["steps"]
            self.last_step = ev
            chart.add_train(ev["step"], ev["loss"], ev["steps"])
        elif t == "eval":
            self.val_loss = ev["val_loss"]
            chart.add_val(ev["step"], ev["val_loss"])
            if ev.get("best"):
                self.best_val = ev["val_loss"]
        elif t == "sample":
            text = (ev.get("prompt", "") + "│" + ev.get("text", "")).replace("\n", "⏎ ")
            self.query_one("#ft-sample", Static).update(f"sample at step {ev['step']}: {text[:400]}")
        elif t == "warning":
            self.notify(ev.get("message", ""), severity="warning")
        elif t == "error":
            self.error = ev.get("message")
        elif t == "done":
            self.state = ev.get("status", "finished")
            self.best_val = ev.get("best_val_loss", self.best_val)

    def show_stats(self) -> None:
        ev = self.last_step
        parts = [f"state {self.state}", f"step {self.step}/{self.steps or '?'}"]
        if ev:
            parts += [f"loss {ev['loss']:.4f}", f"{ev.get('tokens_per_s', 0):,.0f} tokens/s"]
            if self.state == "running":
                parts.append(f"ETA {hms(ev.get('eta_s'))}")
        if self.val_loss is not None:
            parts.append(f"val loss {self.val_loss:.4f}")
        if self.best_val is not None:
            parts.append(f"best {self.best_val:.4f}")
        line = "  ·  ".join(parts)
        if self.stopping and self.state == "running":
            line += "\nstopping… (saving)"
        if self.error and self.state in ("failed", "dead", "interrupted"):
            line += f"\nerror: {self.error}"
        self.query_one("#ft-stats", Static).update(line)
        done = self.state in DONE_STATES
        stop, compare = self.query_one("#ft-stop", Button), self.query_one("#ft-compare", Button)
        stop.disabled = done or self.stopping
        has_ckpt = (self.folder / "best").exists() or (self.folder / "last").exists()
        compare.disabled = not (done and has_ckpt)
        chat = self.query_one("#ft-chat", Button)
        chat.disabled = compare.disabled
        if stop.disabled and self.focused in (stop, None) and not chat.disabled:
            chat.focus()  # what comes next once the run is over
        self.refresh_bindings()

    # -- actions ------------------------------------------------------------------------------------

    @on(Button.Pressed, "#ft-stop")
    def action_stop(self) -> None:
        if not self.run_name or self.state in DONE_STATES:
            return
        pid = self.read_status().get("pid") or (self.proc.pid if self.proc is not None else None)
        if not pid:
            self.notify("the run has not started yet; try again in a moment", severity="warning")
            return
        if not launch.stop(pid):
            self.notify(f"the trainer (pid {pid}) is gone", severity="warning")
            return
        self.stopping = True
        self.show_stats()

    @on(Button.Pressed, "#ft-compare")
    def action_compare(self) -> None:
        base = self.base_model or self.chat_model()
        self.app.push_screen(CompareScreen(f"{base}:chat, {self.run_name}:chat"))

    @on(Button.Pressed, "#ft-chat")
    def chat_with_it(self) -> None:
        """Back to the chat, switched to this run's model (open_finetune's callback switches it)."""
        if self._tail_timer is not None:
            self._tail_timer.stop()
        self.dismiss(self.run_name)

    def action_back(self) -> None:
        if self._tail_timer is not None:
            self._tail_timer.stop()
        self.dismiss()


def open_finetune(app, arg: str = "") -> None:
    """``/finetune [FILE [OPTIONS]]``: the form, prefilled (no argument: the form and the list of runs).

    Raises UsageError for data that does not exist (the chat screen shows it as a notification).
    """
    given = launch.parse(arg)
    for path in shlex.split(given.values.get("data", "")):
        if not Path(path).expanduser().exists():
            raise UsageError(f"{path} is not a file; give a plain text file (or a folder of them) to finetune on")
    app.push_screen(FinetuneScreen(arg), partial(_chat_with, app))


def _chat_with(app, run_name: str | None) -> None:
    """The finetune screen closed with "Chat with it": the chat switches to the run's model."""
    controller = getattr(app.screen, "controller", None)  # only the chat screen has one
    if run_name and controller is not None:
        controller.apply_setting("model", run_name)
