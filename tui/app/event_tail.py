"""Follow a run's ``events.jsonl`` as another process appends to it (the format: core/train/events.py)."""

from __future__ import annotations

import json
from pathlib import Path


class EventTail:
    """Each ``read()`` returns the events completed since the last one; a half-written line waits."""

    def __init__(self, path: Path):
        self.path = path
        self.pos = 0
        self.partial = b""

    def read(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                chunk = f.read()
        except FileNotFoundError:
            return []
        self.pos += len(chunk)
        *lines, self.partial = (self.partial + chunk).split(b"\n")
        events = []
        for line in lines:
            try:
                events.append(json.loads(line))
            except ValueError:  # a line cut by a kill -9 is skipped, as read_events does
                pass
        return events
