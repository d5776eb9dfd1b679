"""Helpers for the Pilot tests: a tiny real checkpoint, an app factory, waiting on worker results."""

from __future__ import annotations

import asyncio
import time

import pytest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A random-weight GPT-2 with a 1024-token window (so the budget bar has real proportions)."""
    from tests.factory import hf_model, save

    return str(save(hf_model(n_positions=1024, seed=3), tmp_path_factory.mktemp("tiny") / "tiny"))


@pytest.fixture(scope="session")
def slower_model(tmp_path_factory) -> str:
    """Wider than tiny_model, so a long reply takes seconds even on a fast machine: a stop key pressed
    after the first chunk always lands while the reply is still being generated."""
    from tests.factory import hf_model, save

    return str(save(hf_model(n_layer=4, n_head=4, n_embd=256, n_positions=1024, seed=3),
                    tmp_path_factory.mktemp("slower") / "slower"))


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

    return GptchatApp(ChatSettings(model=model, device="cpu", **settings), store=store)


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
    scr = chat_screen(app)
    await pilot.pause(0.05)
    await wait_for(pilot, lambda: not scr.generating, timeout, "the reply to finish")
    await pilot.pause(0.05)


def notifications(app) -> list[str]:
    return [n.message for n in app._notifications]
