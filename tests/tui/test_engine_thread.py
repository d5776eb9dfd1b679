"""The chat app runs every model computation on one long-lived thread (tui/app/engine_thread.py): a second
thread's OpenMP team made libgomp sleep at the decode step's barriers."""

from __future__ import annotations

import threading

import pytest

from gptchat.core.session.chat import ChatSession
from gptchat.core.session.pool import ModelPool
from gptchat.core.session.store import Store
from gptchat.tui.app import engine_thread
from tests.tui.helpers import make_app, run, send, wait_ready, wait_reply


def test_run_returns_raises_and_keeps_one_thread_in_call_order():
    names, order = set(), []

    def job(i):
        names.add(threading.current_thread().name)
        order.append(i)
        return i * i

    callers = [threading.Thread(target=lambda i=i: engine_thread.run(job, i)) for i in range(4)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    assert engine_thread.run(job, 5) == 25
    assert names == {"gptchat-engine"} and sorted(order) == [0, 1, 2, 3, 5] and order[-1] == 5
    with pytest.raises(ZeroDivisionError):
        engine_thread.run(lambda: 1 / 0)
    assert engine_thread.run(job, 2) == 4  # the thread outlives a failed job
    assert threading.current_thread().name not in names


def test_the_app_loads_and_replies_on_the_engine_thread(tiny_model, tmp_path, monkeypatch):
    seen: dict[str, set] = {"load": set(), "reply": set()}
    load, reply = ModelPool.load, ChatSession.reply

    def spy_load(self, *a, **kw):
        seen["load"].add(threading.current_thread().name)
        return load(self, *a, **kw)

    def spy_reply(self, *a, **kw):
        seen["reply"].add(threading.current_thread().name)
        yield from reply(self, *a, **kw)

    monkeypatch.setattr(ModelPool, "load", spy_load)
    monkeypatch.setattr(ChatSession, "reply", spy_reply)
    app = make_app(tiny_model, Store(tmp_path / "h.sqlite3"), max_new_tokens=6)

    async def go():
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_ready(pilot, app)
            await send(pilot, app, "Hello")
            await wait_reply(pilot, app)

    run(go())
    assert seen == {"load": {"gptchat-engine"}, "reply": {"gptchat-engine"}}
