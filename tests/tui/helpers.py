"""Helpers for the Pilot tests: an app factory, sending text, waiting for what the user would see.

The fixtures (tiny_model, slower_model) are in conftest.py."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
import time


def run(coro):
    return asyncio.run(coro)


async def wait_for(pilot, cond, timeout: float = 30.0, what: str = "condition"):
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


def make_app(model=None, store=None, **settings):
    from gptchat.core.session.chat import ChatSettings
    from gptchat.tui.app.app import GptchatApp

    app = GptchatApp(ChatSettings(model=model, device="cpu", **settings), store=store)
    # A notification arrives as a message (after the state change that posted it) and expires after a few
    # seconds: tests wait for it, and it must still be there however slow the machine is.
    app.NOTIFICATION_TIMEOUT = 3600
    return app


def chat_screen(app):
    from gptchat.tui.app.screens.chat import ChatScreen

    for s in app.screen_stack:
        if isinstance(s, ChatScreen):
            return s
    raise AssertionError("no chat screen")


async def wait_ready(pilot, app):
    await wait_for(pilot, lambda: len(app.screen_stack) > 1 and chat_screen(app).loaded is not None, what="model loaded")


async def send(pilot, app, text: str):
    scr = chat_screen(app)
    box = scr.query_one("#input")
    box.focus()
    box.text = text
    await pilot.press("enter")


async def wait_reply(pilot, app, timeout=60):
    """Wait until the message just sent has its whole reply: the box is cleared when the message is taken
    (in the same step as the reply starts), and ``generating`` drops when the reply has ended."""
    scr = chat_screen(app)
    box = scr.query_one("#input")
    await wait_for(pilot, lambda: not box.text and not scr.generating, timeout, "the reply to finish")
    await pilot.pause()  # let the messages the end of the reply posted be handled


def notifications(app) -> list[str]:
    return [n.message for n in app._notifications]


def palette_shows(palette, title: str) -> bool:
    """The command palette's highlighted command starts with ``title`` (Enter would run it)."""
    from textual.command import CommandList

    lists = palette.query(CommandList)
    if not lists or lists.first().highlighted is None:
        return False
    ol = lists.first()
    return str(ol.get_option_at_index(ol.highlighted).prompt).startswith(title)


async def open_with(pilot, app, key: str, screen_type, timeout: float = 30.0):
    """Press ``key`` and wait until a screen of ``screen_type`` is on top; returns it."""
    await pilot.press(key)
    await wait_for(pilot, lambda: isinstance(app.screen, screen_type), timeout, f"{screen_type.__name__} after {key}")
    return app.screen


@asynccontextmanager
async def ready(app, size: tuple[int, int]):
    """``app.run_test`` at ``size``, entered once the model has loaded."""
    async with app.run_test(size=size) as pilot:
        await wait_ready(pilot, app)
        yield pilot


async def exchange(pilot, app, text: str, timeout: float = 60):
    """Send a message and wait for its whole reply."""
    await send(pilot, app, text)
    await wait_reply(pilot, app, timeout)
