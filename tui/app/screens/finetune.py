"""Finetune: a form with a live memory/time plan, then a live view of the run (chart, speed, ETA, sample).

The run is a detached `gptchat finetune` process (see finetune_launch.py); this screen only reads its
``events.jsonl`` (new bytes, every half second) and ``status.json``, so it can close and reattach.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
from dataclasses import dataclass
from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Button, Checkbox, Footer, Input, Label, OptionList, Static
from textual.widgets.option_list import Option

from gptchat.core.errors import GptchatError, UsageError

from gptchat.tui.app.widgets.loss_chart import LossChart

TAIL_S = 0.5
FIELDS = [  # (input id, flag, label)
    ("data", None, "Data (files or folders, space-separated)"),
    ("model", "--model", "Base model"),
    ("arch", "--arch", "Architecture (from scratch)"),
    ("steps", "--steps", "Steps (empty: from epochs)"),
    ("lr", "--lr", "Learning rate (empty: by model size)"),
    ("batch", "--batch-size", "Batch size"),
    ("block", "--block-size", "Block size"),
    ("name", "--name", "Run name"),
]
FLAGS = {"--model": "model", "-m": "model", "--arch": "arch", "--steps": "steps", "--lr": "lr",
         "--batch-size": "batch", "-b": "batch", "--block-size": "block", "--name": "name"}
DONE_STATES = ("finished", "early-stopped", "interrupted", "failed", "dead")


@dataclass
class PlanReady(Message, bubble=False):
    lines: list[str]
    error: str | None = None
    key: str = ""


def parse_args(arg: str) -> tuple[dict[str, str], bool, list[str]]:
    """``"docs.txt --steps 50 --lora"`` -> (form values, from_scratch, flags the form has no field for)."""
    try:
        words = shlex.split(arg)
    except ValueError as e:
        raise UsageError(f"/finetune: {e}") from None
    values: dict[str, str] = {}
    data: list[str] = []
    extra: list[str] = []
    scratch = False
    i = 0
    while i < len(words):
        w = words[i]
        flag, eq, val = w.partition("=")
        if flag in FLAGS:
            if not eq:
                i += 1
                if i >= len(words):
                    raise UsageError(f"/finetune: {w} needs a value")
                val = words[i]
            values[FLAGS[flag]] = val
        elif w == "--from-scratch":
            scratch = True
        elif w.startswith("-"):
            extra.append(w)
            if not eq and i + 1 < len(words) and not words[i + 1].startswith("-"):
                i += 1
                extra.append(words[i])
        else:
            data.append(w)
        i += 1
    if data:
        values["data"] = " ".join(shlex.quote(d) for d in data)
    return values, scratch, extra


def fmt_s(s) -> str:
    if s is None:
        return "?"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


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
        self.tail_pos = 0
        self.partial = b""
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
        if action == "stop":
            return bool(self.run_name)
        return True

    # -- layout -----------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Label("Finetune", classes="panel-title", id="ft-title")
        with Horizontal(id="ft-main"):
            with Vertical(id="ft-form"):
                with VerticalScroll(id="ft-fields"):
                    for fid, _flag, label in FIELDS:
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
        yield Footer()

    def on_mount(self) -> None:
        if self.run_name:
            self.attach(self.run_name)
            return
        settings = getattr(self.app, "session", None)
        model = self.base_model or (settings.settings.model if settings is not None else None) or "gpt2"
        self.query_one("#ft-model", Input).value = model
        try:
            values, scratch, self.extra = parse_args(self.arg)
        except GptchatError as e:
            self.notify(str(e), severity="error")
            values, scratch = {}, False
        for k, v in values.items():
            self.query_one(f"#ft-{k}", Input).value = v
        self.query_one("#ft-scratch", Checkbox).value = scratch
        if self.extra:
            self.query_one("#ft-extra", Label).update("also passed: " + " ".join(self.extra))
        self.sync_scratch()
        self.fill_runs()
        self.query_one("#ft-data", Input).focus()
        self.schedule_plan()

    def fill_runs(self) -> None:
        from gptchat.core.train.runs import list_runs

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

    def form_args(self) -> tuple[list[str], str]:
        """The CLI arguments for the form (without --name) and the run name."""
        from gptchat.core.train.runs import default_name

        v = {fid: self.query_one(f"#ft-{fid}", Input).value.strip() for fid, _f, _l in FIELDS}
        try:
            data = shlex.split(v["data"])
        except ValueError as e:
            raise UsageError(f"data: {e}") from None
        if not data:
            raise UsageError("give the training data: a .txt file, several files or a folder")
        args = list(data)
        if self.query_one("#ft-scratch", Checkbox).value:
            args.append("--from-scratch")
            if v["arch"]:
                args += ["--arch", v["arch"]]
        elif v["model"]:
            args += ["--model", v["model"]]
        for fid, flag, _l in FIELDS:
            if fid in ("steps", "lr", "batch", "block") and v[fid]:
                args += [flag, v[fid]]
        return args + self.extra, v["name"] or default_name(data)

    def form_settings(self):
        from gptchat.core.train.settings import Settings

        args, name = self.form_args()
        scratch = "--from-scratch" in args
        v = {fid: self.query_one(f"#ft-{fid}", Input).value.strip() for fid, _f, _l in FIELDS}

        def num(key, kind):
            try:
                return kind(v[key]) if v[key] else None
            except ValueError:
                raise UsageError(f"{key}: {v[key]!r} is not a number") from None

        return Settings(data=shlex.split(v["data"]), model=None if scratch else (v["model"] or None),
                        from_scratch=scratch, arch=(v["arch"] or None) if scratch else None, steps=num("steps", int),
                        lr=num("lr", float), batch_size=num("batch", int), block_size=num("block", int),
                        name=name, lora="--lora" in self.extra)

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
        from gptchat.core.train.plan import preview

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
        from gptchat.tui.app.finetune_launch import start

        if self.run_name:
            return
        try:
            args, name = self.form_args()
        except GptchatError as e:
            self.notify(str(e), severity="error")
            return
        if not self.query_one("#ft-scratch", Checkbox).value:
            self.base_model = self.query_one("#ft-model", Input).value.strip() or "gpt2"
        self.proc, self.log_path = start(args, name)
        self.notify(f"run {name} started (pid {self.proc.pid}); it goes on if you leave this screen")
        self.attach(name)

    def attach(self, name: str) -> None:
        from gptchat.core.paths import get_paths

        self.run_name = name
        self.folder = get_paths().runs / name
        if self.log_path is None:
            self.log_path = get_paths().runs / f"{name}.log"
        self.query_one("#ft-form").add_class("hidden")
        self.query_one("#ft-side").add_class("hidden")
        self.query_one("#ft-live").remove_class("hidden")
        self.query_one("#ft-title", Label).update(f"Finetune · {name}")
        self.refresh_bindings()
        self.query_one("#ft-run-title", Label).update(f"run {name}  ({self.folder})")
        self.query_one(LossChart).clear()
        self.tail_pos, self.partial = 0, b""
        self.poll()
        self._tail_timer = self.set_interval(TAIL_S, self.poll)

    @on(OptionList.OptionSelected, "#ft-runs")
    def open_run(self, event: OptionList.OptionSelected) -> None:
        if event.option.id:
            self.attach(event.option.id)

    def poll(self) -> None:
        """Read the new bytes of events.jsonl and the status file; update the view."""
        path = self.folder / "events.jsonl"
        try:
            with open(path, "rb") as f:
                f.seek(self.tail_pos)
                chunk = f.read()
        except FileNotFoundError:
            chunk = b""
        if chunk:
            self.tail_pos += len(chunk)
            data = self.partial + chunk
            *lines, self.partial = data.split(b"\n")
            for line in lines:
                try:
                    self.apply_event(json.loads(line))
                except ValueError:
                    pass
        status = self.read_status()
        self.state = status.get("state", self.state)
        if self.proc is not None and self.proc.poll() is not None and self.state in ("new", "running"):
            if not path.exists():  # failed before it made its folder: show why
                self.state = "failed"
                self.show_stats(error=self.log_tail())
        self.show_stats()
        if self.state in DONE_STATES and self._tail_timer is not None and (self.proc is None or self.proc.poll() is not None):
            self._tail_timer.stop()
            self._tail_timer = None
            self.stopping = False
            self.show_stats()

    def read_status(self) -> dict:
        from gptchat.core.train.runs import run_info

        if not (self.folder / "run.json").is_file():
            return {}
        info = run_info(self.folder)
        if self.base_model is None and not info["base"].startswith("scratch:"):
            self.base_model = info["base"]
        return info

    def log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except (OSError, AttributeError):
            return "the trainer exited"
        return lines[-1] if lines else "the trainer exited"

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

    def show_stats(self, error: str | None = None) -> None:
        ev = self.last_step
        parts = [f"state {self.state}", f"step {self.step}/{self.steps or '?'}"]
        if ev:
            parts += [f"loss {ev['loss']:.4f}", f"{ev.get('tokens_per_s', 0):,.0f} tokens/s"]
            if self.state == "running":
                parts.append(f"ETA {fmt_s(ev.get('eta_s'))}")
        if self.val_loss is not None:
            parts.append(f"val loss {self.val_loss:.4f}")
        if self.best_val is not None:
            parts.append(f"best {self.best_val:.4f}")
        line = "  ·  ".join(parts)
        if self.stopping and self.state == "running":
            line += "\nstopping… (saving)"
        err = error or self.error
        if err and self.state in ("failed", "dead", "interrupted"):
            line += f"\nerror: {err}"
        self.query_one("#ft-stats", Static).update(line)
        done = self.state in DONE_STATES
        self.query_one("#ft-stop", Button).disabled = done or self.stopping
        has_ckpt = (self.folder / "best").exists() or (self.folder / "last").exists()
        self.query_one("#ft-compare", Button).disabled = not (done and has_ckpt)

    # -- actions ------------------------------------------------------------------------------------

    @on(Button.Pressed, "#ft-stop")
    def action_stop(self) -> None:
        if not self.run_name or self.state in DONE_STATES:
            return
        pid = self.read_status().get("pid") or (self.proc.pid if self.proc is not None else None)
        if not pid:
            self.notify("the run has not started yet; try again in a moment", severity="warning")
            return
        try:
            os.kill(int(pid), signal.SIGINT)
        except ProcessLookupError:
            self.notify(f"the trainer (pid {pid}) is gone", severity="warning")
            return
        self.stopping = True
        self.show_stats()

    @on(Button.Pressed, "#ft-compare")
    def action_compare(self) -> None:
        from gptchat.tui.app.screens.compare import CompareScreen

        session = getattr(self.app, "session", None)
        base = self.base_model or (session.settings.model if session is not None else None) or "gpt2"
        self.app.push_screen(CompareScreen(f"{base}:chat, {self.run_name}:chat"))

    def action_back(self) -> None:
        if self._tail_timer is not None:
            self._tail_timer.stop()
        self.dismiss()


def open_finetune(app, arg: str = "") -> None:
    """``/finetune [FILE [OPTIONS]]``: the form, prefilled (no argument: the form and the list of runs).

    Raises UsageError for data that does not exist (the chat screen shows it as a notification).
    """
    from gptchat.tui.app.finetune_launch import available

    values, _scratch, _extra = parse_args(arg)
    for path in shlex.split(values.get("data", "")):
        if not Path(path).expanduser().exists():
            raise UsageError(f"{path} is not a file; give a plain text file (or a folder of them) to finetune on")
    if not available():
        app.notify("finetuning is not available in this build", severity="warning")
        return
    app.push_screen(FinetuneScreen(arg))
