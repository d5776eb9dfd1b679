"""Experiments: the studies in the data dir with their state, the selected one's table and perplexity
chart, a form that starts a new one, and a stop key.

A study runs as a detached `gptchat experiment` process (finetune_launch.start_command); this screen only
re-reads ``<data>/experiments/NAME/`` every second (each cell and the state file are written atomically),
so it shows a running study filling in and can close and reopen at any time. The form's fields become
the command's words, parsed by the Typer command of tui/cli/experiment.py itself (as /finetune does),
so a flag is spelled, typed and checked the same in both. Stop sends the study SIGTERM: it saves the
running finetune, marks itself stopped and keeps its finished rows; starting it again resumes it.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
from dataclasses import asdict
from pathlib import Path

import typer
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Button, Checkbox, DataTable, Footer, Input, Label, OptionList
from textual.widgets.option_list import Option

from gptchat.core.config import default_model
from gptchat.core.errors import GptchatError, UsageError
from gptchat.core.eval import study as X
from gptchat.core.eval.report import HEADERS, table_rows
from gptchat.tui.app.finetune_launch import log_tail, start_command
from gptchat.tui.app.widgets.bar_chart import BarChart
from gptchat.tui.cli import experiment as cli_experiment
from gptchat.tui.cli.common import click_command, long_flag

REFRESH_S = 1.0
# The form's fields: (input id, the experiment command's parameter, label, default); --lora is a checkbox,
# and "more flags" are passed on as typed (--lr, --batch-size, --seed, --device ...).
FIELDS = [
    ("x-data", "data", "Data (files or folders, space-separated)", ""),
    ("x-name", "name", "Name", ""),
    ("x-models", "models", "Models (comma-separated)", ""),  # filled with core.config.default_model()
    ("x-shots", "shots", "Shots (comma-separated, e.g. 0,1,3)", "0"),
    ("x-steps", "finetune_steps", "Finetune steps (0: no finetuned rows)", "0"),
    ("x-scratch", "from_scratch", "From scratch: architecture (empty: none)", ""),
    ("x-heldout", "heldout", "Held-out file (empty: split the data)", ""),
    ("x-more", None, "More flags (e.g. --lr 3e-4 --device cpu)", ""),
]


def command():
    """The Click command Typer builds for `gptchat experiment`: the one parser of its flags."""
    return click_command(cli_experiment.experiment)


def flag_of(param: str) -> str:
    """The experiment command's long flag for a parameter (``"finetune_steps"`` -> ``"--finetune-steps"``)."""
    return long_flag(command(), param)


def experiment_names() -> list[str]:
    """The studies in the data dir (a folder with a spec.json), by name."""
    root = X.folder("_").parent  # <data>/experiments: where folder() puts every study
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "spec.json").is_file())


def form_words(values: dict[str, str], lora: bool = False) -> list[str]:
    """The form's fields as `gptchat experiment` words (without --name); UsageError for unbalanced quotes."""
    try:
        words = shlex.split(values.get("x-data", ""))
        for fid, param, _label, _default in FIELDS:
            text = values.get(fid, "").strip()
            if param not in (None, "data", "name") and text:
                words += [flag_of(param), text]
        return words + (["--lora"] if lora else []) + shlex.split(values.get("x-more", ""))
    except ValueError as e:
        raise UsageError(f"the form: {e}") from None


def form_args(values: dict[str, str], lora: bool = False) -> tuple[list[str], str]:
    """The form -> (`gptchat experiment` arguments without --name, the name), checked as the command
    checks them, and more (paths, a running study of that name); UsageError with one line if wrong."""
    name = values.get("x-name", "").strip()
    words = form_words(values, lora)
    try:
        params = command().make_context("experiment", [*words, "--name", name], help_option_names=[]).params
    except typer.TyperException as e:
        raise UsageError(e.format_message().splitlines()[0]) from None
    if params["show"] or params["markdown"] or params["json_out"]:
        raise UsageError("--show, --markdown and --json are for the command line; the screen shows the study")
    if not params["data"] or not name:
        raise UsageError("give the data and a name")
    spec = cli_experiment.spec_from(params)
    spec.check()
    for path in [*spec.data, *([spec.heldout] if spec.heldout else [])]:
        if not Path(path).exists():
            raise UsageError(f"{path}: no such file or folder")
    _check_free(spec)
    return words, name


def _check_free(spec: X.Spec) -> None:
    """A study of that name must be this one (then it resumes) and must not be running."""
    saved = X.folder(spec.name) / "spec.json"
    if not saved.exists():
        return
    if json.loads(saved.read_text()) != asdict(spec):
        raise UsageError(f"study {spec.name!r} exists with other settings; pick another name")
    if X.study_state(spec.name)["state"] == "running":
        raise UsageError(f"study {spec.name!r} is running already")


def list_label(name: str) -> str:
    """``"fox · stopped 2/4"``: a study's name, state and rows done, for the list."""
    try:
        order = [r.id for r in X.rows(X.load_spec(name))]
        done = sum((X.folder(name) / "cells" / f"{r}.json").exists() for r in order)
    except (GptchatError, OSError, ValueError, TypeError):
        return f"{name} · unreadable"
    return f"{name} · {X.study_state(name)['state']} {done}/{len(order)}"


class ExperimentScreen(Screen):
    DEFAULT_CSS = """
    ExperimentScreen #x-main { height: 1fr; }
    ExperimentScreen #x-side { width: 40; padding: 0 1; border-right: vkey $primary 30%; }
    ExperimentScreen #x-list { height: 1fr; min-height: 4; }
    ExperimentScreen #x-form { height: auto; max-height: 34; }
    ExperimentScreen #x-form Label { color: $text-muted; }
    ExperimentScreen #x-buttons { height: auto; }
    ExperimentScreen #x-buttons Button { width: 1fr; }
    ExperimentScreen #x-error { color: $error; }
    ExperimentScreen #x-view { width: 1fr; padding: 0 1; }
    ExperimentScreen #x-table { height: auto; max-height: 14; }
    ExperimentScreen #x-chart { height: 1fr; min-height: 8; }
    """
    BINDINGS = [Binding("escape", "back", "Back (a study goes on)"), Binding("ctrl+s", "start", "Start study"),
                Binding("ctrl+t", "stop", "Stop study (it saves; start it again to resume)")]

    def __init__(self, name: str | None = None):
        super().__init__()
        self.selected = name
        self.shown: tuple | None = None  # what the table and chart show, to redraw only on a change
        self.procs: list = []  # (Popen, log path) of the studies this screen started and still watches

    def compose(self) -> ComposeResult:
        yield Label("Experiments  (base, in-context, finetuned and from-scratch models on one held-out text)",
                    classes="panel-title")
        with Horizontal(id="x-main"):
            with Vertical(id="x-side"):
                yield OptionList(id="x-list")
                with VerticalScroll(id="x-form"):
                    for fid, _param, label, default in FIELDS:
                        yield Label(label)
                        yield Input(default_model() if fid == "x-models" else default, id=fid)  # config.toml's
                    yield Checkbox("LoRA finetunes (adapters, not all weights)", id="x-lora")
                    yield Label("", id="x-error")
                    with Horizontal(id="x-buttons"):
                        yield Button("Start study", id="x-start", variant="primary")
                        yield Button("Stop study", id="x-stop", variant="error")
            with Vertical(id="x-view"):
                yield Label("", id="x-info")
                yield DataTable(id="x-table", zebra_stripes=True)
                yield BarChart(id="x-chart")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#x-table", DataTable).add_columns(*[h or "best" for h in HEADERS])
        self.refresh_view()
        self.set_interval(REFRESH_S, self.refresh_view)

    def refresh_view(self) -> None:
        for proc, log in list(self.procs):
            if proc.poll() is not None:  # ended: say how, once
                self.procs.remove((proc, log))
                if proc.returncode == 143:  # the study's exit after SIGTERM (tui/cli/experiment.py)
                    self.notify("the study stopped; its finished rows are kept (start it again to resume)")
                elif proc.returncode:
                    self.notify(f"the study failed: {log_tail(log)} (output: {log})", severity="error", timeout=15)
                else:
                    self.notify("the study finished")
        names = experiment_names()
        labels = [list_label(n) for n in names]
        lst = self.query_one("#x-list", OptionList)
        if [(o.id, str(o.prompt)) for o in lst.options] != list(zip(names, labels)):
            lst.clear_options()
            lst.add_options([Option(label, id=n) for n, label in zip(names, labels)])
        if names and self.selected not in names:
            self.selected = names[0]
        if self.selected in names:
            lst.highlighted = names.index(self.selected)
            self.show(self.selected)

    @on(OptionList.OptionHighlighted, "#x-list")
    def picked(self, event: OptionList.OptionHighlighted) -> None:
        if event.option.id != self.selected:
            self.selected = event.option.id
            self.show(self.selected)

    def show(self, name: str) -> None:
        try:
            spec = X.load_spec(name)
            cells = X.load_cells(X.folder(name))
        except (GptchatError, OSError, ValueError) as e:  # a folder being written, or not ours
            self.query_one("#x-info", Label).update(f"{name}: {e}")
            return
        order = [r.id for r in X.rows(spec)]
        rows = table_rows(cells, order, X.best(cells))
        state = X.study_state(name)["state"]
        if self.shown == (name, state, rows):
            return
        self.shown = (name, state, rows)
        table = self.query_one("#x-table", DataTable)
        table.clear()
        for r in rows:
            table.add_row(*r)
        done = [r for r in order if r in cells]
        self.query_one("#x-info", Label).update(
            f"{name}: {state} · {len(done)}/{len(order)} rows done · held-out split: {X.split_rule(spec)}")
        self.query_one("#x-chart", BarChart).show([cells[r]["label"] for r in done], [cells[r]["ppl"] for r in done],
                                        "perplexity per row (lower is better)")

    @on(Button.Pressed, "#x-start")
    def action_start(self) -> None:
        error = self.query_one("#x-error", Label)
        try:
            values = {fid: self.query_one(f"#{fid}", Input).value for fid, _p, _l, _d in FIELDS}
            args, name = form_args(values, self.query_one("#x-lora", Checkbox).value)
            proc, log = start_command("experiment", args, name, X.folder(name).parent)
        except (GptchatError, OSError) as e:
            error.update(str(e))
            return
        error.update("")
        self.procs.append((proc, log))
        self.selected = name
        self.notify(f"study {name} started (output: {log})")

    @on(Button.Pressed, "#x-stop")
    def action_stop(self) -> None:
        """SIGTERM to the selected study's process (the one its state file names, whoever started it)."""
        name = self.selected
        st = X.study_state(name) if name else {"state": "none"}
        if st["state"] != "running":
            self.notify(f"{name or 'no study'} is not running ({st['state']})", severity="warning")
            return
        try:
            os.kill(int(st["pid"]), signal.SIGTERM)
        except ProcessLookupError:
            self.notify(f"{name} has already ended")
            return
        self.notify(f"stopping {name}: the running finetune saves first; its finished rows are kept")

    def action_back(self) -> None:
        self.dismiss()
