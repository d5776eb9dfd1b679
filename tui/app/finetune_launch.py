"""/finetune FILE: start `gptchat finetune` as a detached process that outlives the UI."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path



def available() -> bool:
    return importlib.util.find_spec("gptchat.tui.cli.finetune") is not None


def start(args: list[str], name: str) -> tuple[subprocess.Popen, Path]:
    """Start ``gptchat finetune ARGS --name NAME`` detached (its own session: it outlives the UI).

    The output goes to ``runs/NAME.log``, next to the run folder the trainer creates.
    """
    from gptchat.core.paths import get_paths

    root = get_paths().runs
    root.mkdir(parents=True, exist_ok=True)
    log = root / f"{name}.log"
    with open(log, "wb") as out:
        p = subprocess.Popen([sys.executable, "-m", "gptchat.tui", "finetune", *args, "--name", name], stdout=out,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    return p, log
