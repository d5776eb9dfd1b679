"""SVG snapshot tests of the main screens (pytest-textual-snapshot).

A plain ``pytest`` compares against the SVGs in tests/__snapshots__/; ``pytest --snapshot-update``
regenerates them (look at the report before committing the new ones).

What would make a screenshot differ from run to run is pinned or masked here, never in the app:
the model is opened by a relative path from its own folder (no temp path on screen), replies are
greedy with a fixed seed, the local time zone is UTC and conversation times are fixed, and the parts
of the status line and reply footers that depend on the machine (tok/s, resident memory) are
rewritten through the widgets' own reactive fields before the screenshot, and cursors stop blinking.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest



from gptchat.core.session.store import Store  # noqa: E402
from gptchat.tui.app.widgets.message_view import MessageView  # noqa: E402
from gptchat.tui.app.widgets.status_line import StatusLine  # noqa: E402
from tests.tui.helpers import chat_screen, make_app, send, wait_for, wait_ready, wait_reply

SIZE = (110, 32)
SPEC = "./tiny"  # tiny_model's folder, opened from its parent directory


@pytest.fixture
def in_model_dir(tiny_model, monkeypatch):
    monkeypatch.chdir(Path(tiny_model).parent)
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield SPEC
    monkeypatch.undo()
    time.tzset()


def _mask(text: str) -> str:
    text = re.sub(r"\d+(\.\d+)? tok/s", "– tok/s", text)
    return re.sub(r"[\d.]+ ?[KMGT]?i?B RSS", "– RSS", text)


def freeze(app) -> None:
    """Replace the machine-dependent numbers on the current screen with fixed text."""
    scr = app.screen
    for st in (st for screen in app.screen_stack for st in screen.query(StatusLine)):  # also under a modal
        st.last, st.memory = _mask(st.last), _mask(st.memory)
    for v in scr.query(MessageView):
        if v.info.get("tokens_per_s") is not None:
            v.finish(v.text, v.status, {k: x for k, x in v.info.items() if k != "tokens_per_s"})
    for screen in app.screen_stack:  # a blinking cursor is on or off depending on when the shot is taken
        for w in screen.query("*"):
            if hasattr(w, "cursor_blink"):
                w.cursor_blink = False
                w.notify_style_update()  # drop lines cached while the cursor was blinking
                w.refresh()
    app.clear_notifications()


def test_snapshot_chat_after_greedy_reply(in_model_dir, tmp_path, snap_compare):
    app = make_app(in_model_dir, Store(tmp_path / "h.sqlite3"), max_new_tokens=20, greedy=True, seed=1)

    async def run_before(pilot):
        await wait_ready(pilot, app)
        await send(pilot, app, "What is a transformer?")
        await wait_reply(pilot, app)
        freeze(app)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_snapshot_empty_chat_80x24(in_model_dir, snap_compare):
    """A small terminal: the settings panel is hidden, the welcome says what to type, Help and Quit show."""
    app = make_app(in_model_dir, None)

    async def run_before(pilot):
        await wait_ready(pilot, app)
        bar = chat_screen(app).query_one("#budget")
        await wait_for(pilot, lambda: bool(bar.segments), 30, "the budget bar")
        freeze(app)

    assert snap_compare(app, terminal_size=(80, 24), run_before=run_before)


def test_snapshot_chat_160x48_with_settings(in_model_dir, tmp_path, snap_compare):
    """A large terminal: the settings panel is open beside the conversation, its title whole."""
    app = make_app(in_model_dir, Store(tmp_path / "h.sqlite3"), max_new_tokens=20, greedy=True, seed=1,
                   template="zero-shot")

    async def run_before(pilot):
        await wait_ready(pilot, app)
        await send(pilot, app, "/var task Answer briefly")
        await send(pilot, app, "What is a transformer?")
        await wait_reply(pilot, app)
        bar = chat_screen(app).query_one("#budget")
        await wait_for(pilot, lambda: bool(bar.segments), 30, "the budget bar")
        freeze(app)

    assert snap_compare(app, terminal_size=(160, 48), run_before=run_before)


def test_snapshot_help(in_model_dir, snap_compare):
    app = make_app(in_model_dir, None)

    async def run_before(pilot):
        await wait_ready(pilot, app)
        bar = chat_screen(app).query_one("#budget")  # the budget preview arrives from a worker
        await wait_for(pilot, lambda: bool(bar.segments), 30, "the budget bar")
        await pilot.press("f1")
        await pilot.pause()
        freeze(app)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_snapshot_history_with_two_conversations(in_model_dir, tmp_path, snap_compare):
    store = Store(tmp_path / "h.sqlite3")
    for i, (name, q, a) in enumerate([("Tea", "How do I brew green tea?", "Use water below boiling."),
                                      ("Bikes", "Why does my chain skip?", "A worn cassette, most likely.")]):
        c = store.new_conversation(name)
        store.add_message(c.id, "user", q)
        store.add_message(c.id, "assistant", a)
        with store.db:
            store.db.execute("UPDATE conversations SET created = ?, updated = ? WHERE id = ?",
                             (1_700_000_000 + i * 3600, 1_700_000_000 + i * 3600, c.id))
    app = make_app(in_model_dir, store)

    async def run_before(pilot):
        await wait_ready(pilot, app)
        await pilot.press("f3")
        await pilot.pause()
        freeze(app)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_snapshot_compare_two_panes(in_model_dir, tmp_path, snap_compare):
    app = make_app(in_model_dir, Store(tmp_path / "h.sqlite3"), max_new_tokens=12, greedy=True, seed=1)

    async def run_before(pilot):
        from gptchat.tui.app.screens.compare import CompareScreen

        await wait_ready(pilot, app)
        await pilot.press("f4")
        await wait_for(pilot, lambda: isinstance(app.screen, CompareScreen), what="the compare screen")
        scr = app.screen
        scr.query_one("#panes").value = f"{SPEC}:chat, {SPEC}:few-shot:2"
        box = scr.query_one("#prompt")
        box.focus()
        box.text = "Name a colour."
        await pilot.press("enter")
        await wait_for(pilot, lambda: not scr.running and len(scr.views) == 2
                       and all(v.status != "streaming" for v in scr.views), 60, "the comparison to finish")
        await pilot.pause()  # let the last repaint happen
        freeze(app)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_snapshot_no_model(tmp_path, monkeypatch, snap_compare):
    monkeypatch.chdir(tmp_path)  # nothing here, an empty HF cache, offline
    app = make_app(None, None)

    async def run_before(pilot):
        await wait_for(pilot, lambda: len(app.screen_stack) > 1
                       and not chat_screen(app).query_one("#no-model").has_class("hidden"), what="the no-model panel")
        await pilot.pause()
        freeze(app)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)
