"""Living in the chat app: focus follows the task, the layout adapts to the terminal, settings stick
(across launches and per conversation), template variables, the exact prompt, dropped turns, Markdown.

Each test presses the keys a person would and asserts on the focused widget and on what the app shows.
"""

from __future__ import annotations

import json
import os
import stat

from gptchat.core.session import prefs
from gptchat.core.session.chat import ChatSettings, Turn
from gptchat.core.session.store import Store
from gptchat.tui.app.app import GptchatApp
from gptchat.tui.app.screens.history import HistoryScreen
from gptchat.tui.app.screens.model_picker import ModelPicker
from gptchat.tui.app.screens.prompt_view import PromptView
from gptchat.tui.app.widgets.message_view import MessageView
from gptchat.tui.app.widgets.settings_panel import SettingsPanel
from gptchat.tui.app.widgets.welcome import Welcome
from tests.tui.helpers import (
    chat_screen, exchange, make_app, notifications, open_with, ready, run, send, wait_for, wait_reply,
)


def focused_id(app):
    return app.focused.id if app.focused is not None else None


# -- focus ------------------------------------------------------------------------------------------


def test_tab_from_the_input_reaches_the_newest_message_before_the_settings(tiny_model):
    app = make_app(tiny_model, None, greedy=True, max_new_tokens=4)

    async def go():
        async with ready(app, (160, 48)) as pilot:
            scr = chat_screen(app)
            assert scr.query_one(SettingsPanel).display  # wide: the panel is open
            await send(pilot, app, "hello")
            await wait_reply(pilot, app)
            scr.query_one("#input").focus()
            await pilot.press("tab")
            first = app.focused
            await pilot.press("tab")
            second = app.focused
            await pilot.press("shift+tab", "shift+tab")
            return first, second, focused_id(app)

    first, second, back = run(go())
    assert isinstance(first, MessageView) and first.role == "assistant"  # the newest message first
    assert isinstance(second, MessageView) and second.role == "user"
    assert back == "input"


def test_picker_never_takes_the_focus_from_typing_and_starts_on_the_current_model(tiny_model):
    app = make_app(tiny_model, None)

    async def go():
        async with ready(app, (120, 40)) as pilot:
            picker = await open_with(pilot, app, "ctrl+o", ModelPicker)
            await pilot.press(*"./my")
            note = picker.query_one("#scan-note")
            await wait_for(pilot, lambda: "scanning" not in str(note.render()), what="the scan to finish")
            typed = (focused_id(app), picker.query_one("#path").value)
            await pilot.press("down")  # from the box to the list, on the current model
            ol = picker.query_one("#models")
            return typed, focused_id(app), ol.get_option_at_index(ol.highlighted).id

    typed, after_down, highlighted = run(go())
    assert typed == ("path", "./my")
    assert after_down == "models"
    assert highlighted == f"m:{tiny_model}"


def test_down_leaves_the_history_search_box(tmp_path):
    store = Store(tmp_path / "h.sqlite3")
    store.new_conversation("first [compare] talk")
    app = GptchatApp(ChatSettings(device="cpu"), store=store, autoload=False)

    async def go():
        async with app.run_test(size=(100, 30)) as pilot:
            await open_with(pilot, app, "f3", HistoryScreen)
            await pilot.press("slash", *"fir")
            search = (focused_id(app), app.screen.query_one("#search").value)
            await pilot.press("down")
            on_list = focused_id(app)
            row = str(app.screen.query_one("#convs").get_option_at_index(0).prompt)
            await pilot.press("r")  # rename asks for a name: the key did not land in the search box
            await wait_for(pilot, lambda: not isinstance(app.screen, HistoryScreen), what="the rename dialog")
            return search, on_list, row

    search, on_list, row = run(go())
    store.close()
    assert search == ("search", "fir")
    assert on_list == "convs"
    assert "first [compare] talk" in row  # brackets in a name are shown, not read as markup


# -- layout -----------------------------------------------------------------------------------------


def test_narrow_terminal_hides_the_settings_panel_and_f2_toggles_it(tiny_model):
    app = make_app(tiny_model, None)

    async def go():
        async with ready(app, (80, 24)) as pilot:
            scr = chat_screen(app)
            panel = scr.query_one(SettingsPanel)
            box = scr.query_one("#input")
            start = (panel.display, focused_id(app), box.placeholder, scr.query_one(Welcome).display,
                     str(scr.query_one(Welcome).render()))
            await pilot.press("f2")
            opened = (panel.display, focused_id(app))
            await pilot.press("f2")
            closed = (panel.display, focused_id(app))
            return start, opened, closed

    (shown, focus, placeholder, welcome, words), opened, closed = run(go())
    assert not shown and focus == "input"
    assert "Enter sends" in placeholder
    assert welcome and "Type a message" in words and tiny_model in words
    assert opened == (True, "set-template")
    assert closed == (False, "input")


# -- settings that stick ----------------------------------------------------------------------------


def test_settings_are_restored_after_a_restart(tiny_model):
    app = make_app(tiny_model, None)

    async def first():
        async with ready(app, (160, 48)) as pilot:
            await send(pilot, app, "/set temperature 0.3")
            await send(pilot, app, "/template zero-shot")
            await send(pilot, app, "/var task Say it in French")
            await wait_for(pilot, lambda: app.session.settings.vars.get("task") == "Say it in French", what="/var")

    run(first())
    assert stat.S_IMODE(os.stat(prefs.prefs_path()).st_mode) == 0o600
    settings = prefs.startup_settings({"device": "cpu"})
    app2 = GptchatApp(settings)

    async def second():
        async with ready(app2, (160, 48)) as pilot:
            scr = chat_screen(app2)
            await wait_for(pilot, lambda: scr.query("#var-task"), what="the template variable's box")
            await wait_for(pilot, lambda: scr.query_one("#var-task").value == "Say it in French", what="its value")
            return scr.query_one("#set-temperature").value, scr.loaded.spec

    temperature, spec = run(second())
    s = app2.session.settings
    assert (s.model, s.template, s.temperature, s.vars) == (tiny_model, "zero-shot", 0.3, {"task": "Say it in French"})
    assert temperature == "0.3" and spec == tiny_model
    assert prefs.startup_settings({"temperature": 0.9}).temperature == 0.9  # a flag given wins


def test_a_bad_settings_file_never_blocks_a_launch(tmp_path):
    path = prefs.prefs_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"temperature": -4, "template": "no-such-template", "top_k": 7, "examples": "/gone.jsonl"}))
    s = prefs.startup_settings({})
    assert (s.temperature, s.template, s.top_k, s.examples) == (None, "chat", 7, None)
    path.write_text("{not json")
    assert prefs.startup_settings({}) == ChatSettings()


def test_a_reopened_conversation_comes_back_with_its_own_settings_and_exports_under_its_name(tiny_model, tmp_path):
    store = Store(tmp_path / "h.sqlite3")
    app = make_app(tiny_model, store, max_new_tokens=3)

    async def go():
        async with ready(app, (160, 48)) as pilot:
            await send(pilot, app, "/set temperature 0.3")
            await exchange(pilot, app, "first chat")
            first = app.session.conv_id
            await pilot.press("ctrl+n")
            await send(pilot, app, "/set temperature 0.9")
            await send(pilot, app, "/template raw")
            await open_with(pilot, app, "f3", HistoryScreen)
            ol = app.screen.query_one("#convs")
            ol.highlighted = [ol.get_option_at_index(i).id for i in range(ol.option_count)].index(first)
            await pilot.press("enter")
            await wait_for(pilot, lambda: app.session.conv_id == first, what="the conversation reopened")
            shown = app.session.settings, chat_screen(app).query_one("#set-temperature").value
            # its export is named after it (the id keeps two of the same name apart)
            await send(pilot, app, "/rename Green tea, brewed [right]")
            await send(pilot, app, "/export md")
            await wait_for(pilot, lambda: any(n.startswith("exported to") for n in notifications(app)), what="export")
            note = next(n for n in notifications(app) if n.startswith("exported to"))
            # a path alone takes its format from its suffix (it was read as the format: "export formats are ...")
            await send(pilot, app, f"/export {tmp_path / 'tea.json'}")
            await send(pilot, app, f"/export {tmp_path / 'notes' / 'tea.md'}")
            await send(pilot, app, f"/export {tmp_path}")  # a folder: one line, nothing written
            await wait_for(pilot, lambda: sum(n.startswith("exported to") for n in notifications(app)) == 3
                           and any("is a folder" in n for n in notifications(app)), what="the exports")
            return shown, note, first

    (s, shown), note, first = run(go())
    store.close()
    assert (s.temperature, s.template, s.model, s.max_new_tokens) == (0.3, "chat", tiny_model, 3)
    assert shown == "0.3"
    assert note.endswith(f"green-tea-brewed-right-{first}.md")
    assert json.loads((tmp_path / "tea.json").read_text())["conversation"]["name"] == "Green tea, brewed [right]"
    assert (tmp_path / "notes" / "tea.md").read_text().startswith("# Green tea")


# -- the exact prompt, dropped turns, Markdown ------------------------------------------------------


def test_f5_shows_the_exact_prompt_with_the_template_variable(tiny_model):
    app = make_app(tiny_model, None, template="zero-shot")

    async def go():
        async with ready(app, (120, 40)) as pilot:
            await send(pilot, app, "/var task Name the [b]colour[/b]")
            scr = chat_screen(app)
            scr.query_one("#input").text = "the sky"
            view = await open_with(pilot, app, "f5", PromptView)
            text = view.rendered.text, str(view.query_one("#prompt-text").render())
            await pilot.press("escape")
            await wait_for(pilot, lambda: not isinstance(app.screen, PromptView), what="the view closed")
            return text

    rendered, shown = run(go())
    assert "Name the [b]colour[/b]" in rendered and "Input: the sky" in rendered
    assert "Name the [b]colour[/b]" in shown  # shown as typed: not read as markup
    assert "Input: the sky" in shown and "For the message you are typing" in shown


def test_turns_dropped_to_fit_the_window_are_dimmed(tiny_model):
    app = make_app(tiny_model, None, max_new_tokens=200)

    async def go():
        async with ready(app, (130, 45)) as pilot:
            scr = chat_screen(app)
            long = " ".join(["word"] * 150)
            app.session.turns = [Turn("user" if i % 2 == 0 else "assistant", long) for i in range(8)]
            scr.show_turns()
            scr.query_one("#input").text = "and now?"
            await wait_for(pilot, lambda: scr.messages.turns_dropped > 0, 10, "the budget preview")
            return [v.has_class("dropped") for v in scr.query(MessageView)], scr.messages.turns_dropped, \
                str(scr.query(MessageView).first().border_title)

    dimmed, n, title = run(go())
    assert dimmed == [True] * n + [False] * (8 - n) and 0 < n < 8
    assert "not in the prompt" in title


def test_the_budget_bar_says_when_the_reply_is_capped(tiny_model):
    """max new tokens 600 in a 1024 window: the reserve is half the window, and the bar says so."""
    app = make_app(tiny_model, None, max_new_tokens=600)

    async def go():
        async with ready(app, (120, 40)) as pilot:
            bar = chat_screen(app).query_one("#budget")
            await wait_for(pilot, lambda: bool(bar.segments), 30, "the budget bar")
            return bar.values()["reserve"], str(bar.render())

    reserve, text = run(go())
    assert reserve == 512 and "reply capped at 512 tokens (max new tokens 600)" in text


def test_markdown_on_draws_replies_as_markdown(tiny_model):
    app = make_app(tiny_model, None, greedy=True, max_new_tokens=3)

    async def go():
        async with ready(app, (120, 40)) as pilot:
            await send(pilot, app, "hi")
            await wait_reply(pilot, app)
            scr = chat_screen(app)
            before = [v.markdown for v in scr.query(MessageView)]
            await send(pilot, app, "/markdown on")
            after = [v.markdown for v in scr.query(MessageView)]
            await wait_for(pilot, lambda: "markdown on" in notifications(app), what="the note")
            await send(pilot, app, "/markdown maybe")
            await wait_for(pilot, lambda: any("usage: /markdown on|off" in n for n in notifications(app)),
                           what="the usage error")
            return before, after

    before, after = run(go())
    assert before == [False, False] and after == [True, True]


# -- the command line -------------------------------------------------------------------------------


def test_gptchat_dash_dash_model_opens_the_chat(tiny_model, monkeypatch):
    """``gptchat --model X`` and ``gptchat -m X`` open the chat with that model; ``gptchat`` alone opens it
    with the last launch's model. The app is not run here (its start is what is recorded)."""
    from typer.testing import CliRunner

    from gptchat.tui.cli.main import app as cli

    opened = []
    monkeypatch.setattr(GptchatApp, "run", lambda self: opened.append(self.session.settings.model))
    prefs.save(ChatSettings(model="last-used"))
    results = [CliRunner().invoke(cli, args) for args in (["--model", tiny_model], ["-m", tiny_model], [])]
    assert [r.exit_code for r in results] == [0, 0, 0], [r.output for r in results]
    assert opened == [tiny_model, tiny_model, "last-used"]


# -- the first run ------------------------------------------------------------------------------------


def test_first_run_offers_open_download_and_train(tiny_model, tmp_path, monkeypatch):
    """No model anywhere: the panel's buttons open the picker, try the download (offline here: it says so
    and the bar goes), and open the finetune form prefilled to train a small GPT-2 from scratch."""
    from gptchat.tui.app.screens.finetune import FinetuneScreen

    monkeypatch.chdir(tmp_path)
    app = make_app(None, None)

    async def go():
        async with app.run_test(size=(120, 40)) as pilot:
            scr = None
            await wait_for(pilot, lambda: len(app.screen_stack) > 1
                           and not chat_screen(app).query_one("#no-model").has_class("hidden"), what="the no-model panel")
            scr = chat_screen(app)
            await send(pilot, app, "hello")  # nothing is loading: the note says what to do, not "wait for it"
            await wait_for(pilot, lambda: any("no model is loaded: pick one" in n for n in notifications(app)), 10,
                           "the no-model note")
            assert scr.query_one("#input").text == "hello"  # the message is kept
            scr.query_one("#input").text = ""
            await pilot.click("#get-open")
            await wait_for(pilot, lambda: isinstance(app.screen, ModelPicker), what="the picker")
            await pilot.press("escape")
            await wait_for(pilot, lambda: app.screen is scr, what="back")
            await pilot.click("#get-download")
            await wait_for(pilot, lambda: any("HF_HUB_OFFLINE" in n for n in notifications(app)), 30, "the offline note")
            await wait_for(pilot, lambda: scr.query_one("#download-bar").has_class("hidden"), what="the bar to go")
            assert focused_id(app) == "get-download"  # a failed download leaves the focus where it was
            await pilot.press("tab")  # the keys the panel names: Tab to a button, Enter
            assert focused_id(app) == "get-train"
            await pilot.press("enter")
            await wait_for(pilot, lambda: isinstance(app.screen, FinetuneScreen) and app.screen.query("#ft-arch")
                           and app.screen.query_one("#ft-arch").value == "tiny", what="the finetune form")
            ft = app.screen
            form = ft.query_one("#ft-scratch").value, focused_id(app)
            await pilot.press("escape")  # back; now open a checkpoint from the panel, with the keys
            await wait_for(pilot, lambda: app.screen is scr, what="back on the chat")
            assert focused_id(app) == "get-train"
            await pilot.press("shift+tab", "shift+tab")
            picker = await open_with(pilot, app, "enter", ModelPicker)
            picker.query_one("#path").value = tiny_model
            await pilot.press("enter")
            await wait_for(pilot, lambda: scr.loaded is not None, 60, "the model")
            await wait_for(pilot, lambda: focused_id(app) == "input", 10, "the focus back in the input")
            return form, scr.query_one("#no-model").has_class("hidden")

    (scratch, focus), panel_hidden = run(go())
    assert scratch and focus == "ft-data"  # the form waits for the folder of text
    assert panel_hidden


def test_the_config_model_opens_when_none_is_remembered_and_a_bad_config_says_why(tiny_model):
    """config.toml's model is what the app opens with no model given or remembered (it showed "no GPT-2
    checkpoint was found" with one configured); a config it cannot use is one notification naming the file and
    the key, and the app goes on with the built-in defaults (`gptchat chat` refuses it before the app opens)."""
    from gptchat.core.paths import get_paths

    path = get_paths().config_file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'model = "{tiny_model}"\n')

    async def go(app, ready):
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_for(pilot, lambda: len(app.screen_stack) > 1 and ready(chat_screen(app)), 60, "the start")
            return chat_screen(app)

    scr = run(go(make_app(None, None), lambda s: s.loaded is not None))
    assert scr.loaded.spec == tiny_model
    path.write_text(f'model = "{tiny_model}"\ndevice = "gpu"\n')  # the whole file is ignored, never half applied
    app = make_app(None, None)
    scr = run(go(app, lambda s: not s.query_one("#no-model").has_class("hidden")))
    assert scr.loaded is None and any(f"{path}: device = 'gpu': use auto, cpu" in n and "built-in defaults apply" in n
                                      for n in notifications(app))


# -- charts and compare speeds ----------------------------------------------------------------------


def test_bar_chart_draws_one_labelled_bar_per_value():
    from textual.app import App

    from gptchat.tui.app.widgets.bar_chart import BarChart

    class One(App):
        def compose(self):
            yield BarChart()

    app = One()

    async def go():
        async with app.run_test(size=(80, 18)) as pilot:
            chart = app.query_one(BarChart)
            chart.show(["gpt2:chat", "run:chat"], [3.21, 2.93], "val loss per variant")
            await pilot.pause()
            return str(chart.render())

    drawn = run(go())
    assert "val loss per variant" in drawn and "gpt2:chat 3.21" in drawn and "run:chat 2.93" in drawn
    try:
        BarChart().show(["a"], [1.0, 2.0])
    except ValueError as e:
        assert "1 labels for 2 values" in str(e)
    else:
        raise AssertionError("a label count that does not match was accepted")


def test_a_compare_panes_speed_is_timed_from_its_own_first_token():
    from gptchat.tui.app.screens.compare import pane_speed

    # 11 tokens, the first at t=5 (after waiting 5 s for another pane), the last at t=7: 10 tokens in 2 s
    assert pane_speed(11, 5.0, 7.0, 1.5) == 5.0
    assert pane_speed(1, 5.0, 7.0, 1.5) == 1.5 and pane_speed(11, None, 7.0, None) is None


def test_a_streaming_message_lays_the_screen_out_only_when_it_outgrows_its_box():
    """While a reply streams, its box grows STREAM_LINES lines at a time: a piece of text that fits the lines
    the box has repaints it without a layout (each layout reflows the whole screen: the UI thread's cost to
    decoding); one that needs more lines grows the box by a step. Finished, the box fits its text exactly."""
    from textual.app import App
    from textual.containers import VerticalScroll
    from textual.widgets import Static

    from gptchat.tui.app.widgets.message_view import STREAM_LINES

    class One(App):
        def compose(self):
            with VerticalScroll():
                yield MessageView("assistant", "", status="streaming", id="m")

    app = One()

    async def go():
        async with app.run_test(size=(40, 20)) as pilot:
            view = app.query_one(MessageView)

            def state():  # (layouts so far, box height, lines the text takes)
                exact = Static.get_content_height(view, view.size, app.size, view.content_region.width)
                return sum(layouts), view.size.height, exact

            view.append("one")  # the first piece after mounting may lay out (no height known yet)
            await wait_for(pilot, lambda: view.size.height > 0, what="the message laid out")
            layouts = []
            refresh = view.refresh
            view.refresh = lambda *a, **kw: (layouts.append(kw.get("layout", False)), refresh(*a, **kw))[1]
            steps = [state()]
            view.append(" two")  # the same line
            await pilot.pause()
            steps.append(state())
            view.append(" three four five six seven eight nine")  # onto the box's second line
            await pilot.pause()
            steps.append(state())
            h0 = view.size.height
            view.append(" ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen"
                        " twenty twenty-one twenty-two twenty-three twenty-four twenty-five twenty-six")
            await wait_for(pilot, lambda: view.size.height > h0, what="the box to grow")
            steps.append(state())
            view.finish(view.text, "done", {})
            await wait_for(pilot, lambda: view.size.height < steps[-1][1], what="the box to fit its text")
            steps.append(state())
            return steps

    (l0, h0, n0), (l1, h1, n1), (l2, h2, n2), (l3, h3, n3), (l4, h4, n4) = run(go())
    border = h0 - STREAM_LINES
    assert n0 == n1 == 1 and n2 == 2 and STREAM_LINES < n3 <= 2 * STREAM_LINES, "the texts meant to take 1, 1, 2, >4 lines"
    assert l1 == l2 == l0 == 0 and h1 == h2 == h0, "pieces that fit the box's lines must not lay the screen out"
    assert l3 >= 1 and h3 == border + 2 * STREAM_LINES, "the box grows a step when the text needs more lines"
    assert l4 > l3 and h4 == border + n4, "the finished message fits its text"
