"""Pilot tests for the finetune screen: a real detached run, its live chart, attach, stop, compare."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gptchat.core.train.events import read_events
from tests.train.util import write_corpus
from tests.tui.helpers import make_app, notifications, palette_shows, run, send, wait_for

FAST = ["--from-scratch", "--arch", "nano", "--block-size", "32", "--batch-size", "4", "--sample-tokens", "4"]


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "data", 20_000)


def runs_dir():
    from gptchat.core.paths import get_paths

    return get_paths().runs


def finetune_screen(app):
    from gptchat.tui.app.screens.finetune import FinetuneScreen

    assert isinstance(app.screen, FinetuneScreen), type(app.screen).__name__
    return app.screen


def text_of(scr, sel) -> str:
    return str(scr.query_one(sel).render())


def test_parse_prefills_the_form_with_the_finetune_commands_own_options():
    from gptchat.core.errors import UsageError
    from gptchat.tui.app.finetune_launch import parse

    got = parse("docs.txt 'my notes.txt' --steps 50 --lr=3e-5 --from-scratch --lora -b 2 -t chat --seed 3")
    assert got.values == {"steps": "50", "lr": "3e-5", "batch": "2", "data": "docs.txt 'my notes.txt'"}
    assert got.from_scratch and got.extra == ["--lora", "--template", "chat", "--seed", "3"]
    # what `gptchat finetune` refuses, /finetune refuses with the same words (never a Click exception)
    for bad, why in [("x --steps many", "'--steps'"), ("x --bogus", "No such option: --bogus"),
                     ("x --steps", "requires an argument"), ("x --help", "No such option: --help"),
                     ("'x", "No closing quotation")]:
        with pytest.raises(UsageError, match=why):
            parse(bad)


def page(app, scr) -> bool:
    """The finetune screen is on top and mounted (its widgets can be queried)."""
    return app.screen is scr and scr.is_mounted


def test_start_from_the_form_follows_a_real_run_then_attach_and_compare(corpus, tmp_path):
    """(1) Start launches a detached trainer; the chart and labels show its real final step and val loss.
    (2) Reopening the finished run shows the same numbers. (4) Compare opens base vs the run."""
    from gptchat.tui.app.screens.compare import CompareScreen
    from gptchat.tui.app.screens.finetune import FinetuneScreen, open_finetune
    from gptchat.tui.app.widgets.loss_chart import LossChart

    app = make_app(None, None)
    app.autoload = False

    async def go():
        async with app.run_test(size=(140, 45)) as pilot:
            open_finetune(app, f"{corpus} --steps 6 --eval-every 3 --name ui-run {' '.join(FAST)}")
            await wait_for(pilot, lambda: isinstance(app.screen, FinetuneScreen) and app.screen.query("#ft-steps"),
                           what="the finetune screen")
            scr = finetune_screen(app)
            await wait_for(pilot, lambda: scr.query_one("#ft-steps").value == "6", what="the prefilled form")
            assert scr.query_one("#ft-scratch").value
            assert scr.query_one("#ft-name").value == "ui-run"
            await wait_for(pilot, lambda: "memory:" in text_of(scr, "#ft-plan"), 30, "the plan")
            scr.query_one("#ft-data").focus()  # typing in the form, then Ctrl+S as a person would
            await pilot.press("ctrl+s")
            await wait_for(pilot, lambda: scr.run_name == "ui-run", 10, "the run to start")
            # the live view takes the focus: Ctrl+X stops at once (the hidden form's input would take it as "cut")
            started = (scr.focused.id if scr.focused else None, scr.check_action("stop", ()),
                       any(b.binding.action == "stop" for b in scr.active_bindings.values()))
            await wait_for(pilot, lambda: scr.state == "finished" and scr._tail_timer is None, 90, "the run to finish")
            assert started == ("ft-stop", True, True), started
            assert not scr.check_action("stop", ()) and not any(  # the binding leaves the footer when the run ends
                b.binding.action == "stop" for b in scr.active_bindings.values())
            chart = scr.query_one(LossChart)
            stats = text_of(scr, "#ft-stats")
            live = (chart.train[-1][0], chart.val[-1][0], chart.val[-1][1], stats, str(chart.render()),
                    scr.query_one("#ft-compare").disabled, scr.proc.returncode)
            assert text_of(scr, "#ft-sample").startswith("sample at step 6:")
            # (4) compare: the base pane and the run pane
            await pilot.click("#ft-compare")
            await wait_for(pilot, lambda: isinstance(app.screen, CompareScreen), what="the compare screen")
            spec = app.screen.query_one("#panes").value
            await pilot.press("escape")
            await wait_for(pilot, lambda: app.screen is scr, what="back on the finetune screen")
            await pilot.press("escape")  # leave the finetune screen
            await wait_for(pilot, lambda: not isinstance(app.screen, FinetuneScreen), what="the finetune screen closed")
            # (2) attach: the palette's screen lists the run; opening it replays its numbers
            open_finetune(app, "")
            await wait_for(pilot, lambda: isinstance(app.screen, FinetuneScreen) and app.screen.query("#ft-runs")
                           and app.screen.query_one("#ft-runs").option_count > 0, what="the list of runs")
            scr2 = finetune_screen(app)
            runs = scr2.query_one("#ft-runs")
            assert runs.get_option_at_index(0).id == "ui-run"
            runs.focus()
            runs.highlighted = 0
            await pilot.press("enter")
            await wait_for(pilot, lambda: scr2.run_name == "ui-run" and scr2.state == "finished" and scr2.step == 6,
                           10, "attach")
            attached = text_of(scr2, "#ft-stats")
            # (5) "Chat with it": back on the chat screen, talking to the new model
            await wait_for(pilot, lambda: scr2.focused is not None and scr2.focused.id == "ft-chat", 10, "Chat with it")
            await pilot.press("enter")
            await wait_for(pilot, lambda: not isinstance(app.screen, FinetuneScreen), what="back to the chat")
            await wait_for(pilot, lambda: getattr(app.screen, "loaded", None) is not None, 60, "the run's model")
            return live, spec, attached, (app.session.settings.model, app.screen.loaded.spec)

    live, spec, attached, chatting = run(go())
    assert chatting == ("ui-run", "ui-run")
    folder = runs_dir() / "ui-run"
    events = read_events(folder / "events.jsonl")
    last_eval = [e for e in events if e["type"] == "eval"][-1]
    last_step = [e for e in events if e["type"] == "step"][-1]
    train_step, val_step, val_loss, stats, chart_text, compare_disabled, rc = live
    assert rc == 0 and (folder.parent / "ui-run.log").is_file()
    assert train_step == last_step["step"] == 6 and val_step == last_eval["step"]
    assert val_loss == last_eval["val_loss"]
    assert "step 6/6" in stats and f"val loss {last_eval['val_loss']:.4f}" in stats and "finished" in stats
    assert "step 6/6" in chart_text and "train" in chart_text and "val" in chart_text  # title and legend
    assert any("\u2801" <= c <= "\u28ff" for c in chart_text) and "•" in chart_text  # train line, val line
    assert not compare_disabled
    assert spec == "gpt2:chat, ui-run:chat"  # from scratch: the base is the chat model (gpt2 by default)
    assert "step 6/6" in attached and f"val loss {last_eval['val_loss']:.4f}" in attached


def test_stop_a_running_run_keeps_a_loadable_checkpoint(corpus, tmp_path):
    """(3) Attach to a run started outside the UI, press Stop: SIGINT, "stopping… (saving)", a checkpoint."""
    from gptchat.core.weights.checkpoints import load
    from gptchat.tui.app.screens.finetune import FinetuneScreen

    env = {**os.environ, "GPTCHAT_TRAIN_SAVE_DELAY": "0.5"}
    log = open(tmp_path / "trainer.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "gptchat.tui", "finetune", str(corpus), *FAST, "--steps", "400",
                             "--eval-every", "2", "--name", "long-run"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    app = make_app(None, None)
    app.autoload = False

    async def go():
        async with app.run_test(size=(140, 45)) as pilot:
            app.push_screen(FinetuneScreen(run="long-run"))
            await wait_for(pilot, lambda: isinstance(app.screen, FinetuneScreen), what="the finetune screen")
            scr = finetune_screen(app)
            await wait_for(pilot, lambda: scr.state == "running" and scr.step >= 2 and (runs_dir() / "long-run" / "last").exists(),
                           60, "the run to be under way")
            await pilot.click("#ft-stop")
            await wait_for(pilot, lambda: scr.stopping, 10, "the stop request")
            stopping = text_of(scr, "#ft-stats")
            await wait_for(pilot, lambda: scr.state in ("interrupted", "finished") and scr._tail_timer is None, 60, "stop")
            return stopping, scr.state, scr.step

    try:
        stopping, state, step = run(go())
        assert proc.wait(30) in (0, 130)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert "stopping… (saving)" in stopping
    assert state == "interrupted" and 2 <= step < 400
    status = json.loads((runs_dir() / "long-run" / "status.json").read_text())
    assert status["state"] == "interrupted"
    model = load(str(runs_dir() / "long-run" / "last"), device="cpu")
    assert model is not None


def test_palette_opens_the_finetune_screen_with_the_chat_model_as_base(tiny_model):
    from textual.command import CommandPalette

    from gptchat.tui.app.screens.finetune import FinetuneScreen

    app = make_app(tiny_model, None)
    app.autoload = False

    async def go():
        async with app.run_test(size=(140, 45)) as pilot:
            await wait_for(pilot, lambda: len(app.screen_stack) > 1, what="the chat screen")
            await pilot.press("ctrl+p")
            await wait_for(pilot, lambda: isinstance(app.screen, CommandPalette), what="the command palette")
            await pilot.press(*"Finetune")
            await wait_for(pilot, lambda: palette_shows(app.screen, "Finetune…"), 30, "the Finetune command listed")
            await pilot.press("enter")
            await wait_for(pilot, lambda: isinstance(app.screen, FinetuneScreen), 30, "the finetune screen")
            scr = app.screen
            await wait_for(pilot, lambda: "give the training data" in str(scr.query_one("#ft-plan").render()), 30,
                           "the plan asking for the training data")
            return scr.query_one("#ft-model").value, str(scr.query_one("#ft-plan").render())

    model, plan = run(go())
    assert model == tiny_model
    assert "give the training data" in plan


def test_slash_finetune_opens_the_form_prefilled(tiny_model, tmp_path):
    """/finetune FILE --steps N opens the screen prefilled; a missing file is a notification."""
    from gptchat.tui.app.screens.finetune import FinetuneScreen

    data = tmp_path / "notes.txt"
    data.write_text("hello world\n" * 10)
    app = make_app(tiny_model, None)
    app.autoload = False

    async def go():
        async with app.run_test(size=(140, 45)) as pilot:
            await wait_for(pilot, lambda: len(app.screen_stack) > 1, what="the chat screen")
            await send(pilot, app, "/finetune missing.txt")
            # checked as it shows: a toast expires after a few seconds, and a loaded machine can take longer
            await wait_for(pilot, lambda: any("missing.txt is not a file" in n for n in notifications(app)), 10,
                           "the notification")
            assert not isinstance(app.screen, FinetuneScreen)
            await send(pilot, app, f"/finetune {data} --steps nine")  # a bad value: a notification, no screen
            await wait_for(pilot, lambda: any("--steps" in n for n in notifications(app)), 10, "the bad flag")
            assert not isinstance(app.screen, FinetuneScreen)
            await send(pilot, app, f"/finetune {data} --steps 5 --lr 1e-4")
            await wait_for(pilot, lambda: isinstance(app.screen, FinetuneScreen), 10, "the finetune screen")
            scr = app.screen
            await wait_for(pilot, lambda: scr.query("#ft-steps") and scr.query_one("#ft-steps").value == "5",
                           10, "the prefilled form")
            got = {k: scr.query_one(f"#ft-{k}").value for k in ("data", "steps", "lr", "model")}
            return got

    got = run(go())
    assert got == {"data": str(data), "steps": "5", "lr": "1e-4", "model": tiny_model}


def test_start_refuses_what_the_trainer_would_refuse_and_keeps_the_form(corpus, tmp_path):
    """Start checks the settings and the run name as `gptchat finetune` does before it starts a process: a
    learning rate of 5 or a name a run has already are one notification each, the form stays filled in and no
    trainer or log is started (it used to start one, which failed ~20 s later on a live view that had replaced
    the form, saying "error: error: ...")."""
    from gptchat.tui.app.finetune_launch import log_tail
    from gptchat.tui.app.screens.finetune import FinetuneScreen, open_finetune

    (runs_dir() / "taken").mkdir(parents=True)
    (runs_dir() / "taken" / "run.json").write_text("{}")
    app = make_app(None, None)
    app.autoload = False

    async def go():
        async with app.run_test(size=(140, 45)) as pilot:
            seen = []
            for flags, why in [("--lr 5 --name fresh", "--lr 5.0 is far too large"),
                               ("--name taken", "a run named 'taken' exists already")]:
                open_finetune(app, f"{corpus} --steps 6 {flags} {' '.join(FAST)}")
                await wait_for(pilot, lambda: isinstance(app.screen, FinetuneScreen) and app.screen.query("#ft-name")
                               and app.screen.query_one("#ft-name").value, what="the prefilled form")
                scr = finetune_screen(app)
                await pilot.press("ctrl+s")
                await wait_for(pilot, lambda: any(why in n for n in notifications(app)), 10, why)
                seen.append((scr.run_name, scr.proc, scr.query_one("#ft-steps").value, scr.is_mounted))
                await pilot.press("escape")
                await wait_for(pilot, lambda: not isinstance(app.screen, FinetuneScreen), what="the form closed")
            return seen

    assert run(go()) == [(None, None, "6", True)] * 2
    assert not (runs_dir() / "fresh").exists() and not (runs_dir() / "fresh.log").exists()
    log = tmp_path / "t.log"
    log.write_text("loading...\nerror: --lr 5.0 is far too large; typical values are 1e-5 to 1e-3\n")
    assert log_tail(log) == "--lr 5.0 is far too large; typical values are 1e-5 to 1e-3"  # the screen adds "error:"
