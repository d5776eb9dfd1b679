"""/finetune FILE: start `gptchat finetune` as a detached process that outlives the UI."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

from gptchat.core.errors import UsageError


def available() -> bool:
    return importlib.util.find_spec("gptchat.tui.cmd_finetune") is not None


def launch(arg: str) -> str:
    """Start the run; returns the line to show the user."""
    import shlex

    args = shlex.split(arg)
    if not args:
        raise UsageError("usage: /finetune FILE [options], e.g. /finetune data.txt")
    if not Path(args[0]).expanduser().is_file():
        raise UsageError(f"{args[0]} is not a file; give a plain text file to finetune on")
    if not available():
        return "finetuning is not available in this build"
    from gptchat.core.paths import get_paths

    logs = get_paths().runs
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"tui-launch-{time.strftime('%Y%m%d-%H%M%S')}.log"
    with open(log, "wb") as out:
        p = subprocess.Popen([sys.executable, "-m", "gptchat.tui", "finetune", *args], stdout=out,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    return f"finetuning {args[0]} in the background (pid {p.pid}); log: {log}"
