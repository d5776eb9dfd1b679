"""A run's event stream (``events.jsonl``) and status file (``status.json``).

``events.jsonl`` gets one JSON object per line, flushed as it is written, so the CLI's progress bar
and the TUI's chart can follow a run that lives in another process:

    {"type": "start", "t": ..., "run": ..., "settings": {...}, "resolved": {...}, "plan": {...}}
    {"type": "step", "step": 12, "steps": 500, "loss": 3.1, "lr": 1e-4, "tokens_per_s": 5300.0,
     "eta_s": 410.0, "epoch": 0.3, "tokens": 49152}
    {"type": "eval", "step": 50, "val_loss": 2.9, "ppl": 18.2, "best": true}
    {"type": "sample", "step": 50, "prompt": "...", "text": "..."}
    {"type": "checkpoint", "step": 50, "kind": "last" | "best", "path": "..."}
    {"type": "warning", "message": "..."}
    {"type": "notice", "message": "..."}          (Ctrl+C: what the run does about it)
    {"type": "done", "status": "finished" | "early-stopped" | "interrupted", "step": ..., "best_val_loss": ...}
    {"type": "error", "message": "..."}

``status.json`` is rewritten atomically: state (running, finished, early-stopped, interrupted,
failed), pid, host, step, steps, best_val_loss, updated. A reader whose pid is gone while the state
says running knows the process died (``runs.run_info`` reports it as "dead").
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from gptchat.core.paths import open_private


class EventLog:
    """Appends events to ``events.jsonl`` and hands each one to an optional callback.

    ``hold=True``: the run folder does not exist yet; events are kept and written by ``attach``
    once it does (a run that fails to start leaves no folder, and its events go to the callback only).
    """

    def __init__(self, path: Path | None, callback=None, hold: bool = False):
        self.path = path
        self.callback = callback
        self._f = open_private(path, "a") if path is not None else None
        self._held: list[str] | None = [] if hold else None

    def attach(self, path: Path) -> None:
        """Start writing to ``path``, held events first."""
        self.path, self._f = path, open_private(path, "a")
        self._f.write("".join(self._held or []))
        self._f.flush()
        self._held = None

    def emit(self, type: str, **fields) -> dict:
        ev = {"type": type, "t": round(time.time(), 3), **fields}
        line = json.dumps(ev, ensure_ascii=False, default=str) + "\n"
        if self._f is not None:
            self._f.write(line)
            self._f.flush()
        elif self._held is not None:
            self._held.append(line)
        if self.callback is not None:
            try:
                self.callback(ev)
            except OSError:  # the launcher went away (closed pipe): the run goes on without it
                self.callback = None
        return ev

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def read_events(path: Path) -> list[dict]:
    """Every complete event in a file (a half-written last line, from a kill, is skipped)."""
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.endswith("\n"):
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass
    except FileNotFoundError:
        pass
    return out


class Status:
    def __init__(self, path: Path | None):
        self.path = path
        self.data: dict = {"pid": os.getpid(), "host": socket.gethostname()}
        self._last = 0.0

    def update(self, force: bool = True, **fields) -> None:
        self.data.update(fields)
        now = time.time()
        if self.path is None or (not force and now - self._last < 2.0):
            return
        self._last = now
        self.data["updated"] = round(now, 3)
        write_json(self.path, self.data)


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open_private(tmp, "w") as f:
        f.write(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)
