"""SIGTERM ends a command as Ctrl+C does: a scheduler's stop, `timeout` or `kill` gets the same tidy end (what is
done kept, one line saying how to go on) instead of the default, which kills the process where it stands."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


@contextmanager
def term_as_interrupt():
    """Inside the block, SIGTERM raises KeyboardInterrupt in the main thread (elsewhere signals cannot be set: the
    block runs unchanged)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
