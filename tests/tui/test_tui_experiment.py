"""Pilot tests: the experiments screen shows a study's table and perplexity chart, starts a study from
a form that takes every contender the CLI does (bad values: one line), and stops a running study."""

from __future__ import annotations

import pytest
from textual.command import CommandPalette
from textual.widgets import DataTable

from gptchat.core.eval import experiment, study as X
from gptchat.core.paths import get_paths
from gptchat.core.train import list_runs
from gptchat.core.train.events import read_events
from gptchat.tui.app.screens.experiment import ExperimentScreen, command, form_args
from gptchat.tui.cli.experiment import spec_from
from gptchat.tui.cli.main import main
from gptchat.tui.app.widgets.bar_chart import BarChart
from tests.tui.helpers import make_app, notifications, palette_shows, run, send, wait_for, wait_ready

TEXT = "".join(f"The red fox number {i} jumps over the lazy dog.\n" for i in range(30))


def corpus(tmp_path):
    f = tmp_path / "fox.txt"
    f.write_text(TEXT)
    return f


async def open_screen(pilot, app) -> ExperimentScreen:
    """Once the model has loaded, type /experiment and wait for the screen."""
    await wait_ready(pilot, app)
    await send(pilot, app, "/experiment")
    await wait_for(pilot, lambda: isinstance(app.screen, ExperimentScreen), 10, "the experiment screen")
    return app.screen


async def open_directly(pilot, app) -> ExperimentScreen:
    """The screen on an app without a model (the form and the stop key need none)."""
    await wait_for(pilot, lambda: len(app.screen_stack) > 1, 30, "the app's first screen")
    await app.push_screen(ExperimentScreen())
    await wait_for(pilot, lambda: isinstance(app.screen, ExperimentScreen), 10, "the experiment screen")
    return app.screen


def _shows(scr, name: str, n_rows: int) -> bool:
    """The screen shows study ``name`` with ``n_rows`` rows, all scored, in the table and the chart."""
    table = scr.query_one("#x-table", DataTable)
    chart = scr.query_one("#x-chart", BarChart)
    return (scr.selected == name and table.row_count == n_rows and len(chart.values) == n_rows
            and all(v > 0 for v in chart.values))


def test_experiment_screen_shows_a_finished_study(tiny_model, tmp_path):
    spec = X.Spec(name="fox", data=[str(corpus(tmp_path))], models=[tiny_model], shots=[0, 1], device="cpu")
    cells = experiment.run(spec)
    app = make_app(tiny_model, None)

    async def go():
        async with app.run_test(size=(160, 50)) as pilot:
            scr = await open_screen(pilot, app)
            await wait_for(pilot, lambda: _shows(scr, "fox", 2), 30, "the study's table and chart")
            table = scr.query_one("#x-table", DataTable)
            shown = [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]
            values = list(scr.query_one("#x-chart", BarChart).values)
            await pilot.press("escape")
            await wait_for(pilot, lambda: not isinstance(app.screen, ExperimentScreen), 10, "back to the chat")
            # the palette opens it too
            await pilot.press("ctrl+p")
            await wait_for(pilot, lambda: isinstance(app.screen, CommandPalette), 10, "the command palette")
            await pilot.press(*"experiments")
            await wait_for(pilot, lambda: palette_shows(app.screen, "experiments"), 30, "the entry listed")
            await pilot.press("enter")
            await wait_for(pilot, lambda: isinstance(app.screen, ExperimentScreen), 10, "the screen from the palette")
            return shown, values

    shown, values = run(go())
    order = [r.id for r in X.rows(spec)]
    assert values == [cells[r]["ppl"] for r in order]
    assert [row[1] for row in shown] == [cells[r]["label"] for r in order]
    assert [row[3] for row in shown] == [f"{cells[r]['ppl']:.2f}" for r in order]


def test_experiment_screen_starts_a_study_and_follows_it(tiny_model, tmp_path):
    data = corpus(tmp_path)
    app = make_app(tiny_model, None)

    async def go():
        async with app.run_test(size=(160, 50)) as pilot:
            scr = await open_screen(pilot, app)
            scr.query_one("#x-data").value = str(data)
            scr.query_one("#x-name").value = "live"
            scr.query_one("#x-models").value = tiny_model
            scr.query_one("#x-shots").value = "0,1"
            await pilot.pause()
            await pilot.press("ctrl+s")
            await wait_for(pilot, lambda: len(scr.procs) == 1, 10, "the study started")
            proc, log = scr.procs[0]
            try:
                await wait_for(pilot, lambda: _shows(scr, "live", 2) or proc.poll() is not None, 240,
                               "the running study's rows")
            finally:
                proc.wait(timeout=120)
            if proc.returncode:
                return proc.returncode, log.read_text(), notifications(app)
            # the screen drops the ended process, then its notice reaches the app as a message: wait for both
            await wait_for(pilot, lambda: _shows(scr, "live", 2) and not scr.procs
                           and "the study finished" in notifications(app), 30, "the finished study")
            return proc.returncode, log.read_text(), notifications(app)

    rc, output, notes = run(go())
    assert rc == 0, output
    assert "the study finished" in notes
    assert len(X.load_cells(X.folder("live"))) == 2


def test_form_builds_every_contender_with_the_commands_own_parser(tmp_path):
    data, held = corpus(tmp_path), tmp_path / "held.txt"
    held.write_text("The lazy dog sleeps.\n")
    values = {"x-data": f"'{data}'", "x-name": "all", "x-models": "m1,m2", "x-shots": "0,2", "x-steps": "7",
              "x-scratch": "nano", "x-heldout": str(held), "x-more": "--lr 3e-3 --block-size 32 --device cpu"}
    words, name = form_args(values, lora=True)
    assert name == "all" and words[0] == str(data)
    # the words are the command line: the command's parser reads them into the study the CLI would run
    spec = spec_from(command().make_context("experiment", [*words, "--name", name]).params)
    assert (spec.models, spec.shots, spec.finetune_steps, spec.lora, spec.from_scratch, spec.heldout) == \
        (["m1", "m2"], [0, 2], 7, True, "nano", str(held))
    assert spec.train == {"lr": 3e-3, "block_size": 32} and spec.device == "cpu"
    assert [r.kind for r in X.rows(spec)] == ["base", "shots", "finetuned"] * 2 + ["scratch"]


def test_models_come_from_models_and_repeated_m_as_the_other_commands_take_them():
    """`-m` (repeatable, as generate, batch, eval and compare take it) joins --models; each model once, in order;
    gpt2 only where neither is given, and `--models ''` (with --from-scratch) asks for no pretrained rows."""
    def models(*words):
        return spec_from(command().make_context("experiment", ["d.txt", "--name", "n", *words]).params).models

    assert models("-m", "a", "--model", "b") == ["a", "b"]
    assert models("--models", "a,b", "-m", "b", "-m", "c") == ["a", "b", "c"]
    assert models() == ["gpt2"] and models("--models", "", "--from-scratch", "nano") == []


def test_form_shows_bad_values_as_one_line(tiny_model, tmp_path):
    data = corpus(tmp_path)
    bad = [({"x-steps": "many"}, "'--finetune-steps'"), ({"x-scratch": "huge"}, "not an architecture"),
           ({"x-scratch": "nano"}, "--from-scratch needs --finetune-steps"),
           ({"x-heldout": str(tmp_path / "nope.txt")}, "no such file"), ({"x-shots": "1,x"}, "--shots must be"),
           ({"x-more": "--lr fast"}, "'--lr'"), ({"x-more": "--nope"}, "--nope"), ({"x-name": "a b"}, "--name"),
           ({"x-more": "--show x"}, "for the command line")]
    app = make_app(None, None)

    async def go():
        async with app.run_test(size=(160, 50)) as pilot:
            scr = await open_directly(pilot, app)
            shown = []
            for change, _ in bad:
                fields = {"x-data": str(data), "x-name": "ok", "x-models": tiny_model, "x-shots": "0", "x-steps": "0",
                          "x-scratch": "", "x-heldout": "", "x-more": "", **change}
                for fid, value in fields.items():
                    scr.query_one(f"#{fid}").value = value
                await pilot.pause()
                await pilot.press("ctrl+s")
                await pilot.pause()
                shown.append(str(scr.query_one("#x-error").render()))
            return shown, scr.procs, isinstance(app.screen, ExperimentScreen)

    shown, procs, still = run(go())
    assert still and not procs  # nothing started, nothing crashed
    for (_, expected), line in zip(bad, shown):
        assert expected in line and "\n" not in line.strip(), (expected, line)


def _events(run_name: str) -> list[dict]:
    f = get_paths().runs / run_name / "events.jsonl"
    return read_events(f) if f.exists() else []


async def _start_then_stop(pilot, scr, training, stop) -> tuple[int, str]:
    """Start the form's study (ctrl+s), wait until ``training()`` (the finetune is stepping), stop it
    with ``stop()``, wait for the process to end; (its exit status, its output)."""
    said = len(notifications(scr.app))
    await pilot.press("ctrl+s")
    await wait_for(pilot, lambda: len(scr.procs) == 1, 10, "the study started")
    proc, log = scr.procs[0]
    try:
        await wait_for(pilot, lambda: proc.poll() is not None or training(), 240, "the finetune stepping")
        assert proc.poll() is None, log.read_text()
        assert X.study_state("halt")["state"] == "running"
        await stop()
        await wait_for(pilot, lambda: proc.poll() is not None, 120, "the study to stop")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    await wait_for(pilot, lambda: not scr.procs and len(notifications(scr.app)) >= said + 2, 10,
                   "the screen to say it ended")  # the start's notification, then the end's
    return proc.returncode, log.read_text()


@pytest.mark.slow
def test_stop_key_and_button_stop_a_study_which_keeps_its_rows_shows_stopped_and_resumes(tiny_model, tmp_path,
                                                                                          capsys):
    data = corpus(tmp_path)
    app = make_app(None, None)
    run_name = "halt-finetuned-tiny"
    steps = lambda: [e for e in _events(run_name) if e["type"] == "step"]  # noqa: E731
    starts = lambda: [e for e in _events(run_name) if e["type"] == "start"]  # noqa: E731

    def resumed_stepping() -> bool:
        types = [e["type"] for e in _events(run_name)]
        return types.count("start") == 2 and "step" in types[types.index("start", types.index("start") + 1):]

    async def go():
        async with app.run_test(size=(160, 50)) as pilot:
            scr = await open_directly(pilot, app)
            for fid, value in {"x-data": str(data), "x-name": "halt", "x-models": tiny_model, "x-steps": "100000",
                               "x-more": "--block-size 32 --batch-size 2 --device cpu"}.items():
                scr.query_one(f"#{fid}").value = value
            await pilot.pause()
            # the base row is scored and the finetune has taken a step: the key stops it mid-finetune
            first = await _start_then_stop(pilot, scr, lambda: bool(steps()), lambda: pilot.press("ctrl+t"))
            label = str(scr.query_one("#x-list").get_option("halt").prompt)
            kept = X.folder("halt").joinpath("cells", "base-tiny.json").stat().st_mtime_ns
            # the same form again resumes it; the button stops it once the resumed run has stepped
            second = await _start_then_stop(pilot, scr, resumed_stepping,
                                            lambda: pilot.pause(0) if scr.query_one("#x-stop").press() else None)
            return first, second, label, kept, notifications(app)

    (rc, output), (rc2, output2), label, kept, notes = run(go())
    assert rc == rc2 == 143, (output, output2)
    assert X.study_state("halt")["state"] == "stopped" and label == "halt · stopped 1/2"
    assert any("the study stopped" in n for n in notes)
    assert set(X.load_cells(X.folder("halt"))) == {"base-tiny"}  # the finished row is kept ...
    assert X.folder("halt").joinpath("cells", "base-tiny.json").stat().st_mtime_ns == kept  # ... not redone
    assert "cached" in output2 and f"resuming run {run_name} from step" in output2
    done = [e for e in _events(run_name) if e["type"] == "done"]
    assert [d["status"] for d in done] == ["interrupted", "interrupted"]  # the finetune saved each time
    assert starts()[1]["resumed"] and next(r for r in list_runs() if r["name"] == run_name)["saved_step"] > 1
    with pytest.raises(SystemExit) as e:  # --show draws what finished, and says the study stopped
        main(["experiment", "--show", "halt"])
    assert e.value.code in (0, None)
    out, err = capsys.readouterr()
    assert "experiment halt: stopped, 1/2 rows done" in err and "tiny" in out
