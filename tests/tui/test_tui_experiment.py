"""Pilot tests: the experiments screen shows a study's table and perplexity chart, and starts a study."""

from __future__ import annotations

from textual.command import CommandPalette
from textual.widgets import DataTable

from gptchat.core.eval import experiment as X
from gptchat.tui.app.screens.experiment import ExperimentScreen
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


def _shows(scr, name: str, n_rows: int) -> bool:
    """The screen shows study ``name`` with ``n_rows`` rows, all scored, in the table and the chart."""
    table = scr.query_one("#x-table", DataTable)
    chart = scr.query_one("#x-chart", BarChart)
    return (scr.selected == name and table.row_count == n_rows and len(chart.values) == n_rows
            and all(v > 0 for v in chart.values))


def test_experiment_screen_shows_a_finished_study(tiny_model, tmp_path):
    spec = X.Spec(name="fox", data=[str(corpus(tmp_path))], models=[tiny_model], shots=[0, 1], device="cpu")
    cells = X.run(spec)
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
            await wait_for(pilot, lambda: _shows(scr, "live", 2) and not scr.procs, 30, "the finished study")
            return proc.returncode, log.read_text(), notifications(app)

    rc, output, notes = run(go())
    assert rc == 0, output
    assert "the study finished" in notes
    assert len(X.load_cells(X.folder("live"))) == 2
