"""Experiments: the studies in the data dir, the selected one's table and perplexity chart, and a form
that starts a new one.

A study runs as a detached `gptchat experiment` process (finetune_launch.start_command); this screen only
re-reads ``<data>/experiments/NAME/cells/`` every second (each cell is written atomically), so it shows a
running study filling in and can close and reopen at any time.
"""

from __future__ import annotations

import shlex

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Button, DataTable, Footer, Input, Label, OptionList
from textual.widgets.option_list import Option

from gptchat.core.errors import GptchatError, UsageError
from gptchat.core.eval import experiment as X
from gptchat.core.eval.report import HEADERS, table_rows
from gptchat.tui.app.finetune_launch import log_tail, start_command
from gptchat.tui.app.widgets.bar_chart import BarChart

REFRESH_S = 1.0
# The form's fields: (input id, label, default)
FIELDS = [
    ("x-data", "Data (files or folders, space-separated)", ""),
    ("x-name", "Name", ""),
    ("x-models", "Models (comma-separated)", "gpt2"),
    ("x-shots", "Shots (comma-separated, e.g. 0,1,3)", "0"),
    ("x-steps", "Finetune steps (0: no finetuned rows)", "0"),
]


def experiment_names() -> list[str]:
    """The studies in the data dir (a folder with a spec.json), by name."""
    root = X.folder("_").parent  # <data>/experiments: where folder() puts every study
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "spec.json").is_file())


def form_args(values: dict[str, str]) -> tuple[list[str], str]:
    """The form's values -> (`gptchat experiment` arguments without --name, the name); UsageError if wrong."""
    data = shlex.split(values.get("x-data", ""))
    name = values.get("x-name", "").strip()
    if not data or not name:
        raise UsageError("give the data and a name")
    steps = values.get("x-steps", "").strip() or "0"
    if not steps.isdigit():
        raise UsageError(f"finetune steps must be a whole number, got {steps!r}")
    X.Spec(name=name, data=data).check()  # the name rule lives there
    models = values.get("x-models", "").strip() or "gpt2"
    shots = values.get("x-shots", "").strip() or "0"
    return [*data, "--models", models, "--shots", shots, "--finetune-steps", steps], name


class ExperimentScreen(Screen):
    DEFAULT_CSS = """
    ExperimentScreen #x-main { height: 1fr; }
    ExperimentScreen #x-side { width: 40; padding: 0 1; border-right: vkey $primary 30%; }
    ExperimentScreen #x-list { height: 1fr; min-height: 4; }
    ExperimentScreen #x-form { height: auto; max-height: 24; }
    ExperimentScreen #x-form Label { color: $text-muted; }
    ExperimentScreen #x-start { width: 100%; }
    ExperimentScreen #x-view { width: 1fr; padding: 0 1; }
    ExperimentScreen #x-table { height: auto; max-height: 14; }
    ExperimentScreen #x-chart { height: 1fr; min-height: 8; }
    """
    BINDINGS = [Binding("escape", "back", "Back (a study goes on)"), Binding("ctrl+s", "start", "Start")]

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
                    for fid, label, default in FIELDS:
                        yield Label(label)
                        yield Input(default, id=fid)
                    yield Button("Start study", id="x-start", variant="primary")
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
                if proc.returncode:
                    self.notify(f"the study failed: {log_tail(log)} (output: {log})", severity="error", timeout=15)
                else:
                    self.notify("the study finished")
        names = experiment_names()
        lst = self.query_one("#x-list", OptionList)
        if [o.id for o in lst.options] != names:
            lst.clear_options()
            lst.add_options([Option(n, id=n) for n in names])
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
        if self.shown == (name, rows):
            return
        self.shown = (name, rows)
        table = self.query_one("#x-table", DataTable)
        table.clear()
        for r in rows:
            table.add_row(*r)
        done = [r for r in order if r in cells]
        self.query_one("#x-info", Label).update(
            f"{name}: {len(done)}/{len(order)} rows done · held-out split: {X.split_rule(spec)}")
        self.query_one("#x-chart", BarChart).show([cells[r]["label"] for r in done], [cells[r]["ppl"] for r in done],
                                        "perplexity per row (lower is better)")

    @on(Button.Pressed, "#x-start")
    def action_start(self) -> None:
        try:
            args, name = form_args({fid: self.query_one(f"#{fid}", Input).value for fid, _l, _d in FIELDS})
            proc, log = start_command("experiment", args, name, X.folder(name).parent)
        except (GptchatError, OSError) as e:
            self.notify(str(e), severity="error")
            return
        self.procs.append((proc, log))
        self.selected = name
        self.notify(f"study {name} started (output: {log})")

    def action_back(self) -> None:
        self.dismiss()
