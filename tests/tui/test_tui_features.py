"""Pilot tests: settings, slash commands, the budget bar, help, palette, history and compare."""

from __future__ import annotations

from dataclasses import replace

import pytest

from gptchat.core.session.chat import Turn, render_prompt
from gptchat.core.session.compare import parse_panes
from gptchat.core.session.store import Store
from gptchat.tui.app.widgets.budget_bar import BudgetBar
from gptchat.tui.app.widgets.message_view import MessageView
from textual.command import CommandPalette
from textual.widgets import OptionList

from gptchat.tui.app.screens.history import HistoryScreen
from tests.tui.helpers import (
    chat_screen, make_app, notifications, palette_shows, run, send, wait_for, wait_ready, wait_reply,
)


def expected_score(app, pane, text, completion_ids):
    """The mean of Engine.score over a pane's completion tokens, after the prompt compare rendered for it."""
    s = replace(app.session.settings, model=pane.model, template=pane.template, shots=pane.shots)
    lm = app.pool.load(pane.model, "cpu").lm
    engine = lm.engine
    rendered, _ = render_prompt(s, lm.tokenizer, engine.n_ctx, text, [])
    lp = engine.score(list(rendered.ids) + list(completion_ids))[-len(completion_ids):]
    return sum(lp) / len(lp) if completion_ids else None


async def slash(pilot, app, text):
    await send(pilot, app, text)
    await pilot.pause()


def test_slash_commands_and_settings_panel_change_the_next_message(tiny_model, tmp_path):
    app = make_app(tiny_model, Store(tmp_path / "h.sqlite3"), max_new_tokens=40)

    async def go():
        async with app.run_test(size=(130, 45)) as pilot:
            await wait_ready(pilot, app)
            scr = chat_screen(app)
            bar = scr.query_one(BudgetBar)
            await wait_for(pilot, lambda: bar.values().get("reserve") == 40, 10, "the budget bar")
            before = bar.values()
            await slash(pilot, app, "/set temperature 0.3")
            await slash(pilot, app, "/set top_p 2")  # bad value: a notification, not a crash
            await slash(pilot, app, "/template few-shot")
            await slash(pilot, app, "/shots 2")
            await slash(pilot, app, "/set seed 11")
            await slash(pilot, app, "/frobnicate")
            await wait_for(pilot, lambda: any("/frobnicate" in n for n in notifications(app))
                           and bar.values().get("example", 0) > 0, 10, "the few-shot examples in the budget bar")
            after = bar.values()
            # The settings panel: type a value and press Enter.
            box = scr.query_one("#set-max_new_tokens")
            box.focus()
            box.value = ""
            await pilot.press(*"12", "enter")
            await wait_for(pilot, lambda: app.session.settings.max_new_tokens == 12, 10, "the panel's setting")
            s = app.session.settings
            panel_temp = scr.query_one("#set-temperature").value
            # The next message uses all of it: few-shot, 2 shots, seed 11, 12 tokens.
            await send(pilot, app, "cold")
            await wait_reply(pilot, app)
            return before, after, s, panel_temp, notifications(app)

    before, after, s, panel_temp, notes = run(go())
    assert (s.temperature, s.template, s.shots, s.seed, s.max_new_tokens) == (0.3, "few-shot", 2, 11, 12)
    assert panel_temp == "0.3"  # slash commands and the panel show the same settings
    assert any("top_p must be between 0 and 1" in n for n in notes)
    assert any("unknown command /frobnicate" in n for n in notes)
    assert before["example"] == 0 and before["history"] == 0 and before["reserve"] == 40
    assert after["example"] > 0 and after["reserve"] == 40  # the explicit setting beats the template
    assert sum(after.values()) == 1024
    store = app.session.store
    (conv,) = store.conversations()
    reply = store.messages(conv.id)[-1]
    assert reply.template == "few-shot" and reply.seed == 11 and len(reply.examples_used) == 2
    assert reply.options["temperature"] == 0.3 and reply.options["max_new_tokens"] == 12 and reply.options["shots"] == 2


def test_budget_bar_shows_what_will_be_dropped_before_sending(tiny_model):
    app = make_app(tiny_model, None, max_new_tokens=200)

    async def go():
        async with app.run_test(size=(130, 45)) as pilot:
            await wait_ready(pilot, app)
            scr = chat_screen(app)
            long = " ".join(["word"] * 150)
            app.session.turns = [Turn("user" if i % 2 == 0 else "assistant", long) for i in range(8)]
            scr.query_one("#input").text = "and now?"
            bar = scr.query_one(BudgetBar)
            # the bar is refreshed 0.15 s after the last keystroke: wait for it rather than a fixed time
            await wait_for(pilot, lambda: bool(bar.dropped), 10, "the budget bar to update")
            return bar.values(), bar.dropped, str(bar.render())

    values, dropped, text = run(go())
    assert values["reserve"] == 200 and sum(values.values()) == 1024 and values["history"] > 0
    assert dropped and "oldest chat turns" in dropped[0]
    assert "to fit the window: dropped" in text


def test_help_screen_lists_every_key_and_command(tiny_model):
    app = make_app(tiny_model, None)

    async def go():
        async with app.run_test(size=(130, 50)) as pilot:
            from gptchat.tui.app.screens.chat import ChatScreen
            from gptchat.tui.app.screens.help import HelpScreen, help_table

            await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen), 10, "the chat screen")
            await pilot.press("f1")
            await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen), 10, "the help screen")
            from rich.console import Console

            con = Console(width=120, record=True)
            con.print(help_table(ChatScreen.BINDINGS))
            await pilot.press("escape")
            await wait_for(pilot, lambda: not isinstance(app.screen, HelpScreen), 10, "the help screen closed")
            return con.export_text(), type(app.screen).__name__

    text, after = run(go())
    for key in ("Esc", "Ctrl+R", "Ctrl+B", "Ctrl+T", "Ctrl+N", "Ctrl+O", "F2", "F3", "F4", "Ctrl+P", "Ctrl+Q"):
        assert key in text, key
    for cmd in ("/model", "/template", "/shots", "/set NAME VALUE", "/compare", "/finetune FILE", "/help"):
        assert cmd in text, cmd
    assert after == "ChatScreen"


def test_palette_switches_template(tiny_model):
    app = make_app(tiny_model, None)

    async def go():
        async with app.run_test(size=(130, 45)) as pilot:
            await wait_ready(pilot, app)
            await pilot.press("ctrl+p")
            await wait_for(pilot, lambda: isinstance(app.screen, CommandPalette), 10, "the command palette")
            await pilot.press(*"template: raw")
            await wait_for(pilot, lambda: palette_shows(app.screen, "template: raw"), 30, "the template listed")
            await pilot.press("enter")
            await wait_for(pilot, lambda: app.session.settings.template == "raw", 10, "the template switched")
            return app.session.settings.template

    assert run(go()) == "raw"


def test_finetune_slash_with_missing_data_is_a_notification(tiny_model, tmp_path):
    app = make_app(tiny_model, None)

    async def go():
        async with app.run_test(size=(130, 45)) as pilot:
            await wait_for(pilot, lambda: len(app.screen_stack) > 1, 10, "the chat screen")
            screens = len(app.screen_stack)
            await slash(pilot, app, "/finetune missing.txt")
            await wait_for(pilot, lambda: len(notifications(app)) >= 1, 10, "the notification")
            return notifications(app), len(app.screen_stack) == screens

    notes, same_screen = run(go())
    assert any("missing.txt is not a file" in n for n in notes)
    assert same_screen  # no finetune form opened on data that does not exist


def test_history_reopen_rename_export_search_delete(tiny_model, tmp_path):
    store = Store(tmp_path / "h.sqlite3")
    app = make_app(tiny_model, store, max_new_tokens=5)

    async def first():
        async with app.run_test(size=(130, 45)) as pilot:
            await wait_ready(pilot, app)
            await send(pilot, app, "Remember the word pineapple")
            await wait_reply(pilot, app)
            return [(v.role, v.text) for v in chat_screen(app).query(MessageView)]

    shown = run(first())
    other = store.new_conversation(name="Other chat")
    store.add_message(other.id, "user", "something else entirely")

    app2 = make_app(tiny_model, store, max_new_tokens=5)

    async def second():
        async with app2.run_test(size=(130, 45)) as pilot:
            await wait_ready(pilot, app2)
            await pilot.press("f3")
            await wait_for(pilot, lambda: isinstance(app2.screen, HistoryScreen), 10, "the history screen")
            history = app2.screen
            ol = history.query_one(OptionList)
            await wait_for(pilot, lambda: ol.option_count == 2, 10, "both conversations listed")
            listed = [str(ol.get_option_at_index(i).prompt) for i in range(2)]
            assert any("Other chat  (1 message)" in t for t in listed), listed  # not "(1 messages)"
            assert any("(2 messages)" in t for t in listed), listed
            history.query_one("#search").value = "pineap"
            await wait_for(pilot, lambda: ol.option_count == 1, 10, "the search result")
            ol.focus()
            await pilot.press("r")
            await wait_for(pilot, lambda: app2.screen.query("#answer"), 10, "the rename box")
            app2.screen.query_one("#answer").value = "Fruit talk"
            await pilot.press("enter")
            await wait_for(pilot, lambda: any(c.name == "Fruit talk" for c in store.conversations()), 10, "the rename")
            await wait_for(pilot, lambda: app2.screen is history, 10, "back on the history list")
            await pilot.press("m")
            await wait_for(pilot, lambda: any(n.startswith("exported to ") for n in notifications(app2)), 10, "the export")
            await pilot.press("enter")
            await wait_for(pilot, lambda: not isinstance(app2.screen, HistoryScreen)
                           and len(chat_screen(app2).query(MessageView)) == len(shown), 10, "the reopened chat")
            reopened = [(v.role, v.text) for v in chat_screen(app2).query(MessageView)]
            # Continue the reopened chat: the reply goes into the same conversation.
            await send(pilot, app2, "and again")
            await wait_reply(pilot, app2)
            # Delete the other conversation (d twice).
            await pilot.press("f3")
            await wait_for(pilot, lambda: isinstance(app2.screen, HistoryScreen), 10, "the history screen")
            ol = app2.screen.query_one(OptionList)
            await wait_for(pilot, lambda: ol.option_count == 2, 10, "both conversations listed")
            idx = [ol.get_option_at_index(i).id for i in range(ol.option_count)].index(other.id)
            ol.highlighted = idx
            ol.focus()
            await pilot.press("d", "d")
            await wait_for(pilot, lambda: len(store.conversations()) == 1, 10, "the deletion")
            await pilot.press("escape")
            await pilot.pause()
            return reopened, notifications(app2)

    reopened, notes = run(second())
    assert reopened == shown
    convs = store.conversations()
    assert [c.name for c in convs] == ["Fruit talk"] and convs[0].n_messages == 4
    exported = [n for n in notes if n.startswith("exported to ")]
    assert exported and "pineapple" in open(exported[0].removeprefix("exported to ")).read()


async def compare_hot(pilot, app, panes: str):
    """/compare PANES, then "hot" sent from its prompt box, as a person does; the compare screen."""
    await wait_ready(pilot, app)
    await slash(pilot, app, f"/compare {panes}")
    await wait_for(pilot, lambda: type(app.screen).__name__ == "CompareScreen", 10, "the compare screen")
    scr = app.screen
    box = scr.query_one("#prompt")
    box.focus()
    box.text = "hot"
    await pilot.press("enter")
    return scr


def test_a_compare_whose_pane_model_is_missing_says_why(tiny_model, tmp_path):
    """A pane naming a model that is not there fails the comparison before anything streams: the panes say
    "error" and a notification says why (the reason was lost: the screen did not pass its worker's error on)."""
    app = make_app(tiny_model, None, max_new_tokens=4)

    async def go():
        async with app.run_test(size=(160, 45)) as pilot:
            scr = await compare_hot(pilot, app, f"{tiny_model}:raw, {tmp_path / 'nope'}:raw")
            await wait_for(pilot, lambda: any("nope does not exist" in n for n in notifications(app)), 30, "the reason")
            await wait_for(pilot, lambda: not scr.running, 10, "the end")
            return [v.status for v in scr.views]

    assert run(go()) == ["error", "error"]


def test_compare_panes_stream_together_and_are_saved(tiny_model, tmp_path):
    store = Store(tmp_path / "h.sqlite3")
    app = make_app(tiny_model, store, max_new_tokens=8, seed=4)

    async def go():
        async with app.run_test(size=(160, 45)) as pilot:
            scr = await compare_hot(pilot, app, f"{tiny_model}:chat, {tiny_model}:few-shot:3, {tiny_model}:raw")
            await wait_for(pilot, lambda: not scr.running and len(scr.views) == 3
                           and all(v.status != "streaming" for v in scr.views), 60, "the comparison")
            views = [(v.border_title, v.text, v.status) for v in scr.views]
            scores = [(v.info.get("mean_logprob"), v.footer()) for v in scr.views]
            expected = [expected_score(app, p, "hot", scr.completions[i].token_ids)
                        for i, p in enumerate(parse_panes(scr.query_one("#panes").value))]
            await pilot.press("escape")
            await pilot.pause()
            return views, type(app.screen).__name__, scores, expected

    views, back, scores, expected = run(go())
    assert len(views) == 3 and all(status == "done" and text for _, text, status in views)
    # each pane's footer: its reply's mean log p under its own model, as Engine.score gives it
    assert all(e is not None for e in expected)
    assert [lp for lp, _ in scores] == pytest.approx(expected)
    assert all(f"mean log p {e:.2f}" in footer for e, (_, footer) in zip(expected, scores))
    assert "few-shot 3-shot" in views[1][0]
    assert back == "ChatScreen"
    (conv,) = store.conversations()
    assert conv.kind == "compare" and len(conv.meta["panes"]) == 3
    msgs = store.messages(conv.id)
    replies = [m for m in msgs if m.role == "assistant"]
    assert [m.pane for m in replies] == [0, 1, 2] and {m.seed for m in replies} == {4}
    assert [m.content for m in replies] == [v[1] for v in views]
    assert [m.template for m in replies] == ["chat", "few-shot", "raw"] and len(replies[1].examples_used) == 3
    # Same sampler everywhere: one temperature for all panes.
    assert len({m.options["temperature"] for m in replies}) == 1
