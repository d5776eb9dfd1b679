"""The chat app paints before torch is loaded: torch comes with the first model, in the load worker.

Importing torch takes 1.5-3 s on the CPUs we run on; the app's own imports and first screen about 1 s.
Each scenario runs in a fresh process (this one has torch loaded long ago) that notes which thread asks
for torch first: with a model, the load worker must (an import of torch anywhere on the app's path
would be asked for by the main thread, before the first paint); with no model found, nothing may.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHILD = r"""
import asyncio, importlib.abc, json, sys, threading

asked = []


class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch" and not asked:
            asked.append(threading.current_thread().name)
        return None  # the import itself goes on as usual


sys.meta_path.insert(0, Watch())
from tests.tui.helpers import chat_screen, make_app, wait_for, wait_ready

model = sys.argv[1] or None
app = make_app(model, None)


async def go():
    async with app.run_test(size=(100, 30)) as pilot:
        if model:
            await wait_ready(pilot, app)
        else:
            await wait_for(pilot, lambda: len(app.screen_stack) > 1
                           and not chat_screen(app).query_one("#no-model").has_class("hidden"), what="the no-model panel")
        return {"asked_by": asked, "torch_loaded": "torch" in sys.modules, "main": threading.main_thread().name,
                "loaded": chat_screen(app).loaded is not None}


print(json.dumps(asyncio.run(go())))
"""


# `gptchat ARGS` up to the moment the app would start: what it imported by then
LAUNCH = r"""
import json, sys
from gptchat.tui.app.app import GptchatApp
from gptchat.tui.cli.main import main

GptchatApp.run = lambda self: print(json.dumps({"torch_loaded": "torch" in sys.modules, "model": self.session.settings.model}))
main(sys.argv[1:])
"""


def _child(model: str, cwd: Path, code: str = CHILD, *args: str) -> dict:
    """``code`` run in ``cwd`` (the app looks for checkpoints there), with this test's home and HF cache."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # for tests.tui.helpers
    r = subprocess.run([sys.executable, "-c", code, model, *args], capture_output=True, text=True, timeout=600,
                       cwd=cwd, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_the_model_and_torch_load_in_the_worker_after_the_first_paint(tiny_model, tmp_path):
    got = _child(tiny_model, tmp_path)
    assert got["loaded"] and got["torch_loaded"]
    assert got["asked_by"] and got["asked_by"][0] != got["main"], got  # the load worker asked first


def test_no_model_found_never_loads_torch(tmp_path):
    got = _child("", tmp_path)  # nothing in tmp_path, an empty home and HF cache (tests/conftest.py), offline
    assert not got["loaded"]
    assert got == {**got, "asked_by": [], "torch_loaded": False}


def test_the_chat_command_starts_the_app_without_torch(tiny_model, tmp_path):
    """`gptchat chat`'s checks before the app (device and dtype words, the model's path) need no torch."""
    for argv in ([], ["--model", tiny_model, "--device", "cpu", "--dtype", "float32", "--quantize", "int8"]):
        got = _child("chat", tmp_path, LAUNCH, *argv)
        assert got["torch_loaded"] is False and got["model"] == (argv[1] if argv else None), (argv, got)
