"""Pilot tests: inspecting a reply from the chat (``i`` on a focused reply, ``/inspect`` for the last one)."""

from __future__ import annotations

from textual.widgets import Static

from gptchat.core.generate.inspect import inspect_model
from gptchat.core.session.chat import render_prompt
from gptchat.tui.app.screens.chat import ChatScreen
from gptchat.tui.app.screens.inspect import InspectView
from gptchat.tui.app.widgets.message_view import MessageView
from tests.tui.helpers import chat_screen, make_app, notifications, run, send, wait_for, wait_ready, wait_reply


def shown(app) -> str:
    return str(app.screen.query_one("#inspect-text", Static).render())


async def open_inspect(pilot, app, start) -> str:
    """Run ``start`` (a key or a slash command), wait for the scored rows, close the view; returns its text."""
    await start()
    await wait_for(pilot, lambda: isinstance(app.screen, InspectView) and "perplexity" in shown(app), 60,
                   "the inspect view with the scored reply")
    text = shown(app)
    await pilot.press("escape")
    await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen), 10, "the inspect view to close")
    return text


def expected(scr, history_end: int) -> dict:
    """What the view must show for the reply at ``history_end``: scored here, after its own prompt."""
    s, lm, turns = scr.session.settings, scr.loaded.lm, scr.session.turns
    r, tpl = render_prompt(s, lm.tokenizer, lm.engine.n_ctx, turns[history_end - 1].text, turns[:history_end - 1])
    reply = turns[history_end].info["token_ids"]
    return inspect_model(lm, list(r.ids) + reply, s.gen_options(tpl.options).params, 5, score_from=len(r.ids))


def test_inspect_a_reply_by_key_and_the_last_by_slash(tiny_model):
    app = make_app(tiny_model, max_new_tokens=12, seed=7, top_k=20)

    async def go():
        async with app.run_test(size=(130, 45)) as pilot:
            await wait_ready(pilot, app)
            scr = chat_screen(app)
            for text in ("Hello there", "And what else?"):
                await send(pilot, app, text)
                await wait_reply(pilot, app)
            first, last = expected(scr, 1), expected(scr, 3)

            async def key_on_first_reply():
                await pilot.press("tab")  # the newest message first: the last reply, my message, the first reply
                await pilot.press("tab")
                await pilot.press("tab")
                assert isinstance(app.focused, MessageView) and app.focused is scr.messages.views[1]
                await pilot.press("i")

            by_key = await open_inspect(pilot, app, key_on_first_reply)
            by_slash = await open_inspect(pilot, app, lambda: send(pilot, app, "/inspect"))

            await pilot.press("tab", "tab")  # from the input: the last reply, then my last message
            assert app.focused is scr.messages.views[2]
            await pilot.press("i")
            await wait_for(pilot, lambda: any("only a reply" in n for n in notifications(app)), 10, "the note")
            warned = any("only a reply" in n for n in notifications(app))
            views = [v.role for v in scr.messages.views]
            return first, last, by_key, by_slash, warned, views, isinstance(app.screen, ChatScreen)

    first, last, by_key, by_slash, warned, roles, on_chat = run(go())
    for text, want in ((by_key, first), (by_slash, last)):
        # the reply's tokens only (its prompt is the context), scored after the prompt it was written for
        assert f"perplexity {want['perplexity']:.2f} over {len(want['tokens'])} tokens" in text
        assert repr(want["tokens"][0]["text"]) in text and "top_k: 20 kept" in text
    assert first["perplexity"] != last["perplexity"]
    assert warned and on_chat and roles == ["user", "assistant", "user", "assistant"]
