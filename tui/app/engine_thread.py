"""One thread for every model computation the chat app runs: loading, replies, compare panes, inspections.

Why: PyTorch's and gptchat's C kernels run on OpenMP (libgomp), and each thread that starts a parallel region
gets a team of its own that outlives the region. libgomp counts every thread of every team, and once they
outnumber the CPUs it waits at its barriers by sleeping almost at once (its "throttled" spin) instead of
spinning: a batch-1 decode step meets ~80 barriers a token. Textual runs each worker on a new thread, so a
load on one thread and a reply on the next made two teams of two on a 2-core machine: measured on an AMD EPYC
(Zen 4), int8 batch-1 decode steps took 5.5-5.8 ms from the second team against 4.2-4.5 ms from the first (the
threads idle ~20% of the time), and the same steps from one long-lived thread, with no other team in the
process, as fast as from the main thread. So the workers hand their model work to this one thread and wait
for it; the UI thread starts no team.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Callable, TypeVar

T = TypeVar("T")

_jobs: queue.SimpleQueue = queue.SimpleQueue()
_lock = threading.Lock()
_thread: threading.Thread | None = None


def _serve() -> None:
    while True:
        fut, fn, args, kwargs = _jobs.get()
        if fut.set_running_or_notify_cancel():
            try:
                fut.set_result(fn(*args, **kwargs))
            except BaseException as e:  # handed to the caller, raised there
                fut.set_exception(e)


def run(fn: Callable[..., T], *args, **kwargs) -> T:
    """``fn(*args, **kwargs)`` on the engine thread; its result, or its exception raised here. Calls queue up
    in order (a reply asked for while a model loads starts when the load is done). The thread is a daemon, as
    Textual's workers are: quitting the app never waits for a reply to finish."""
    global _thread
    with _lock:
        if _thread is None:
            _thread = threading.Thread(target=_serve, name="gptchat-engine", daemon=True)
            _thread.start()
    fut: Future = Future()
    _jobs.put((fut, fn, args, kwargs))
    return fut.result()
