"""The no-model screen's three ways to a first model: open one, download gpt2, or train one from scratch.

Downloading runs in a thread worker (group "download"); the bar shows the bytes that have reached the
Hugging Face cache so far, read every half second (huggingface_hub reports its progress only on stderr).
Training opens the finetune screen prefilled for a small from-scratch model; when its run finishes,
"Chat with it" there switches the chat to the new model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from textual.message import Message

from gptchat.core.paths import hf_hub_cache
from gptchat.core.weights import hub

from gptchat.tui.app.screens.finetune import open_finetune
from gptchat.tui.app.widgets.no_model import NoModelPanel

DOWNLOAD = "gpt2"
POLL_S = 0.5
# A from-scratch GPT-2 small enough to train in minutes on a laptop CPU (4 layers, 256 wide).
SCRATCH = "--from-scratch --arch tiny --block-size 128 --batch-size 4 --steps 250"


@dataclass
class ModelDownloaded(Message, bubble=False):
    name: str


def cache_bytes(root: Path) -> int:
    """Bytes under the Hugging Face cache (a download grows its blobs folder as it goes)."""
    total = 0
    for folder, _dirs, files in os.walk(root):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(folder, f))
            except OSError:
                continue  # a file renamed into place while we looked
    return total


class FirstRun:
    def __init__(self, screen) -> None:
        self.screen = screen  # the ChatScreen
        self._timer = None
        self._start_bytes = 0

    @property
    def panel(self) -> NoModelPanel:
        return self.screen.query_one(NoModelPanel)

    def choose(self, choice: str) -> None:
        if choice == "open":
            self.screen.action_pick_model()
        elif choice == "download":
            self.download()
        elif choice == "train":
            open_finetune(self.screen.app, SCRATCH)

    def download(self) -> None:
        if self._timer is not None:
            self.screen.notify(f"{DOWNLOAD} is already downloading")
            return
        self._start_bytes = cache_bytes(hf_hub_cache())
        self.panel.downloading(DOWNLOAD, 0)
        self._timer = self.screen.set_interval(POLL_S, self._poll)
        self.screen.run_worker(partial(self._download, DOWNLOAD), name="download", group="download", thread=True,
                               exclusive=True, exit_on_error=False)

    def _download(self, name: str) -> None:
        hub.download(name)  # ModelNotFound (offline, unreachable) becomes the app's error notification
        self.screen.post_message(ModelDownloaded(name))

    def _poll(self) -> None:
        self.panel.downloading(DOWNLOAD, max(cache_bytes(hf_hub_cache()) - self._start_bytes, 0))

    def ended(self) -> None:
        """The download finished or failed: the bar goes."""
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
        self.panel.downloading(DOWNLOAD, None)
