"""Pilot tests of the chat screen against a real engine on a tiny random checkpoint."""

from __future__ import annotations

from gptchat.core.session.store import Store
from gptchat.tui.app.messages import ReplyChunk, ReplyEnded
from gptchat.tui.app.widgets.message_view import MessageView
from tests.tui.helpers import chat_screen, make_app, notifications, run, send, wait_for, wait_ready, wait_reply


def test_send_streams_persists_and_matches_the_engine(tiny_model, tmp_path):
    store = Store(tmp_path / "h.sqlite3")
    app = make_app(tiny_model, store, max_new_tokens=24, seed=5, greedy=False)
    seen = []

    def hook(msg):
        if isinstance(msg, (ReplyChunk, ReplyEnded)):
            seen.append(msg)

    async def go():
        async with app.run_test(size=(120, 40), message_hook=hook) as pilot:
            await wait_ready(pilot, app)
            scr = chat_screen(app)
            await send(pilot, app, "Hello there")
            assert scr.query_one("#input").text == ""  # the box is cleared at once
            await wait_reply(pilot, app)
            views = list(scr.query(MessageView))
            status = str(scr.query_one("#status").render())
            return [(v.role, v.text, v.status) for v in views], status, scr.loaded

    views, status, loaded = run(go())
    assert [v[0] for v in views] == ["user", "assistant"] and views[0][1] == "Hello there"
    chunks = [m for m in seen if isinstance(m, ReplyChunk)]
    ended = [m for m in seen if isinstance(m, ReplyEnded)]
    assert len(ended) == 1 and len(chunks) >= 2, "the reply should stream in several batches"
    assert "".join(c.text for c in chunks) == ended[0].text == views[1][1]
    assert "tok/s" in status and "cpu" in status

    # The reply is exactly what the engine gives for the rendered prompt and the recorded seed.
    from gptchat.core.session.chat import ChatSession, ChatSettings, Turn
    from gptchat.core.generate.text import complete

    (conv,) = store.conversations()
    user, reply = store.messages(conv.id)
    s = ChatSettings(model=tiny_model, max_new_tokens=24, seed=5)
    rendered, tpl = ChatSession(None, s).render(loaded.lm.tokenizer, 1024, "Hello there", [])
    ref = complete(loaded.lm.engine, loaded.lm.tokenizer, rendered.ids, s.gen_options(tpl.options, rendered.stop, 5))
    assert reply.content == ref.text == views[1][1]
    # Full provenance per reply.
    assert (user.role, user.content) == ("user", "Hello there")
    assert reply.model == tiny_model and len(reply.checkpoint_hash) == 16 and reply.template == "chat"
    assert reply.seed == 5 and reply.options["temperature"] == 0.7 and reply.options["max_new_tokens"] == 24
    assert reply.options["device"] == "cpu" and reply.prompt_tokens == len(rendered.ids)
    assert reply.completion_tokens == len(ref.token_ids) and reply.finish_reason == ref.finish_reason
    assert reply.status == "done"
    t = reply.timings  # measured: decode speed counts the tokens after the first (which prefill made)
    assert t["prefill_s"] > 0 and t["decode_s"] > 0 and reply.completion_tokens > 1
    assert abs(t["tokens_per_s"] - (reply.completion_tokens - 1) / t["decode_s"]) <= 0.05 * t["tokens_per_s"]
    del Turn


def test_escape_stops_and_keeps_the_partial_reply(slower_model, tmp_path):
    store = Store(tmp_path / "h.sqlite3")
    app = make_app(slower_model, store, max_new_tokens=900, greedy=True)
    chunks = []

    async def go():
        async with app.run_test(size=(120, 40), message_hook=lambda m: chunks.append(m) if isinstance(m, ReplyChunk) else None) as pilot:
            await wait_ready(pilot, app)
            await send(pilot, app, "Tell me a long story")
            await wait_for(pilot, lambda: len(chunks) >= 1, what="first chunk")
            await pilot.press("escape")
            await wait_reply(pilot, app, timeout=15)
            v = list(chat_screen(app).query(MessageView))[-1]
            return v.text, v.status, v.has_class("stopped"), v.border_subtitle

    text, status, stopped_class, subtitle = run(go())
    assert status == "stopped" and stopped_class and "stopped" in subtitle
    (conv,) = store.conversations()
    reply = store.messages(conv.id)[1]
    assert reply.status == "stopped" and reply.finish_reason == "cancelled"
    assert 0 < reply.completion_tokens < 900 and reply.content == text


def test_regenerate_edit_copy_and_new_chat(tiny_model, tmp_path):
    store = Store(tmp_path / "h.sqlite3")
    app = make_app(tiny_model, store, max_new_tokens=6)

    async def go():
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_ready(pilot, app)
            scr = chat_screen(app)
            await send(pilot, app, "First question")
            await wait_reply(pilot, app)
            first = [v.text for v in scr.query(MessageView)]
            await pilot.press("ctrl+r")
            await wait_reply(pilot, app)
            after_regen = [(v.role, v.text) for v in scr.query(MessageView)]
            await pilot.press("ctrl+t")
            await pilot.pause()
            copied = app.clipboard
            await pilot.press("ctrl+b")
            await pilot.pause()
            edit_box = scr.query_one("#input").text
            n_after_edit = len(scr.query(MessageView))
            scr.query_one("#input").text = "First question, edited"
            await pilot.press("enter")
            await wait_reply(pilot, app)
            after_resend = [(v.role, v.text) for v in scr.query(MessageView)]
            await pilot.press("ctrl+n")
            await pilot.pause()
            return first, after_regen, copied, edit_box, n_after_edit, after_resend, len(scr.query(MessageView))

    first, after_regen, copied, edit_box, n_after_edit, after_resend, n_new = run(go())
    assert len(first) == 2 and [r for r, _ in after_regen] == ["user", "assistant"]
    assert copied == after_regen[1][1]
    assert edit_box == "First question" and n_after_edit == 0
    assert after_resend[0] == ("user", "First question, edited") and len(after_resend) == 2
    assert n_new == 0
    (conv,) = store.conversations()
    rows = store.messages(conv.id)
    # Nothing is deleted: the regenerated reply and the edited exchange stay, marked replaced.
    assert [m.status for m in rows].count("replaced") == 3
    assert [m.content for m in rows if m.status != "replaced"][0] == "First question, edited"


def test_no_model_screen_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing here, an empty HF cache, offline
    app = make_app(None, None)

    async def go():
        async with app.run_test(size=(120, 40)) as pilot:
            scr = None
            await wait_for(pilot, lambda: len(app.screen_stack) > 1 and not chat_screen(app).query_one("#no-model").has_class("hidden"),
                           what="the no-model panel")
            scr = chat_screen(app)
            text = str(scr.query_one("#no-model #how").render())
            buttons = [str(b.label) for b in scr.query("#no-model Button")]
            await send(pilot, app, "hello?")  # does not crash; says what to do
            await wait_for(pilot, lambda: bool(notifications(app)), 10, "the note")
            return text, buttons, str(scr.query_one("#status").render()), notifications(app)

    text, buttons, status, notes = run(go())
    assert "/model gpt2" in text and "/model PATH" in text and "Train a small GPT-2" in text
    assert buttons == ["Open folder or ckpt.pt", "Download gpt2", "Train on my text"]
    assert "no model" in status
    assert any("no model is loaded" in n for n in notes)


def test_bad_model_path_shows_the_panel_not_a_crash(tmp_path):
    app = make_app(str(tmp_path / "nope"), None)

    async def go():
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_for(pilot, lambda: len(app.screen_stack) > 1 and not chat_screen(app).query_one("#no-model").has_class("hidden"),
                           what="the no-model panel")
            return str(chat_screen(app).query_one("#no-model #how").render())

    assert "does not exist" in run(go())


def test_edit_an_older_message_branches_the_conversation(tiny_model, tmp_path):
    from gptchat.core.session.chat import ChatSession, ChatSettings, Turn
    from gptchat.core.generate.text import complete

    store = Store(tmp_path / "h.sqlite3")
    app = make_app(tiny_model, store, max_new_tokens=5, greedy=True, seed=2)

    async def go():
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_ready(pilot, app)
            scr = chat_screen(app)
            for q in ("one", "two", "three"):
                await send(pilot, app, q)
                await wait_reply(pilot, app)
            views = list(scr.query(MessageView))
            views[2].focus()  # "two", an older message of mine
            await pilot.press("e")
            await pilot.pause()
            box = scr.query_one("#input")
            edited = box.text, [(v.role, v.text) for v in scr.query(MessageView)], [t.text for t in app.session.turns]
            box.text = "two, edited"
            await pilot.press("enter")
            await wait_reply(pilot, app)
            after = [(v.role, v.text) for v in scr.query(MessageView)]
            views = list(scr.query(MessageView))
            views[1].focus()  # a reply is not branched: its text is just copied to the input
            await pilot.press("e")
            await pilot.pause()
            return edited, after, views[1].text, box.text, len(scr.query(MessageView)), scr.loaded

    (box_text, kept_views, kept_turns), after, reply1, copied, n_views, loaded = run(go())
    assert box_text == "two" and [r for r, _ in kept_views] == ["user", "assistant"] and kept_views[0][1] == "one"
    assert kept_turns == ["one", reply1]
    assert [r for r, _ in after] == ["user", "assistant", "user", "assistant"] and after[2][1] == "two, edited"
    assert copied == reply1 and n_views == 4
    (conv,) = store.conversations()
    rows = store.messages(conv.id)
    assert [(m.role, m.content) for m in rows if m.status == "replaced"][::2] == [("user", "two"), ("user", "three")]
    assert [m.status for m in rows].count("replaced") == 4
    live = [m for m in rows if m.status != "replaced"]
    assert [m.content for m in live] == ["one", reply1, "two, edited", after[3][1]]
    # The new reply's prompt holds only the turns before the edited message.
    s = ChatSettings(model=tiny_model, max_new_tokens=5, greedy=True, seed=2)
    hist = [Turn("user", "one"), Turn("assistant", reply1)]
    rendered, tpl = ChatSession(None, s).render(loaded.lm.tokenizer, 1024, "two, edited", hist)
    ref = complete(loaded.lm.engine, loaded.lm.tokenizer, rendered.ids, s.gen_options(tpl.options, rendered.stop, 2))
    assert live[3].prompt_tokens == len(rendered.ids) and live[3].content == ref.text
    full = hist + [Turn("user", "two"), Turn("assistant", rows[3].content), Turn("user", "three"), Turn("assistant", rows[5].content)]
    assert len(ChatSession(None, s).render(loaded.lm.tokenizer, 1024, "two, edited", full)[0].ids) > len(rendered.ids)
    # Reopening the conversation shows the branch, not the replaced turns.
    again = ChatSession(store, s)
    again.open(conv.id)
    assert [t.text for t in again.turns] == ["one", reply1, "two, edited", after[3][1]]


def test_branch_only_at_a_user_message():
    import pytest

    from gptchat.core.session.chat import ChatSession, Turn
    from gptchat.core.errors import UsageError

    s = ChatSession(None)
    s.turns = [Turn("user", "a"), Turn("assistant", "b"), Turn("user", "c"), Turn("assistant", "d")]
    with pytest.raises(UsageError):
        s.branch(1)
    with pytest.raises(UsageError):
        s.branch(4)
    assert s.branch(2) == "c" and [t.text for t in s.turns] == ["a", "b"]


def test_a_streaming_reply_is_saved_while_it_grows_by_another_thread(tiny_model, tmp_path):
    """The reply row is written while it streams (a killed process keeps what was shown), and not by the
    thread that decodes: a commit syncs the WAL, which would stall decoding."""
    import threading
    import time

    from gptchat.core.session.chat import FLUSH_S, ChatSession, ChatSettings, ReplyDelta, ReplyDone
    from gptchat.core.session.pool import ModelPool

    store = Store(tmp_path / "h.sqlite3")
    writes = []
    real_update = store.update_message

    def watched(msg_id, **fields):  # the real write, noting the thread it runs on
        writes.append((threading.current_thread().name, fields.get("status")))
        return real_update(msg_id, **fields)

    store.update_message = watched
    loaded = ModelPool().load(tiny_model, "cpu")
    session = ChatSession(store, ChatSettings(model=tiny_model, max_new_tokens=60, greedy=True, seed=1))
    session.add_user("Hello there")
    events = session.reply(loaded, threading.Event())
    shown = []
    for ev in events:
        if isinstance(ev, ReplyDelta):
            shown.append(ev.text)
            if len(shown) == 2:
                time.sleep(FLUSH_S + 0.05)  # resumed after this, the reply saves the text so far
            if len(shown) == 3:
                break
    assert len(shown) == 3, "the tiny model should write at least three pieces of text"
    reply_id = session.turns[-1].msg_id
    deadline = time.monotonic() + 10
    while store.messages(session.conv_id)[-1].content != "".join(shown[:2]) and time.monotonic() < deadline:
        time.sleep(0.01)
    row = store.messages(session.conv_id)[-1]
    assert row.id == reply_id and row.content == "".join(shown[:2]) and row.status == "streaming"
    decoder = threading.current_thread().name
    assert writes and all(name != decoder for name, status in writes if status is None)
    done = [ev for ev in events if isinstance(ev, ReplyDone)]
    row = store.messages(session.conv_id)[-1]
    assert len(done) == 1 and row.content == done[0].turn.text and row.status == "done"


def test_a_message_whose_prompt_cannot_be_built_goes_back_to_the_input(tiny_model, tmp_path):
    """Shots on a template that shows no examples: the prompt cannot be built, so the message never reached the
    model. It leaves the conversation (stored row marked replaced) and returns to the input with the reason shown;
    with the setting fixed, Enter sends it (it stayed on screen with an empty reply, the text gone from the box)."""
    store = Store(tmp_path / "h.sqlite3")
    app = make_app(tiny_model, store, max_new_tokens=4, shots=2)  # the chat template shows no examples

    async def go():
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_ready(pilot, app)
            scr = chat_screen(app)
            await send(pilot, app, "hello there")
            await wait_for(pilot, lambda: any("shows no examples" in n for n in notifications(app)), 30, "the reason")
            await wait_for(pilot, lambda: not scr.generating and scr.query_one("#input").text == "hello there", 10,
                           "the message back in the input")
            taken_back = ([v.role for v in scr.messages.views], list(scr.session.turns))
            assert scr.controller.apply_setting("shots", "default", quiet=True)  # as the settings panel sets it
            scr.query_one("#input").focus()
            await pilot.press("enter")  # the same text, sent again with the setting fixed
            await wait_reply(pilot, app)
            return taken_back, [(v.role, v.status) for v in scr.messages.views]

    (roles, turns), after = run(go())
    assert roles == [] and turns == []
    assert [r for r, _ in after] == ["user", "assistant"] and after[-1][1] == "done"
    (conv,) = store.conversations()
    msgs = store.messages(conv.id)
    assert [(m.role, m.status) for m in msgs][0] == ("user", "replaced")  # the first try: kept, marked
