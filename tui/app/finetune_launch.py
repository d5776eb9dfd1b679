"""/finetune: read its flags with `gptchat finetune`'s own definition, start the trainer detached, stop it.

The flags are parsed by the Typer command in tui/cli/finetune.py, so an option's name, spelling and
type are the same in the CLI and the TUI by construction (the form only keeps the user's spelling).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import typer

from gptchat.core.errors import UsageError
from gptchat.core.paths import get_paths, open_private, private_dir
from gptchat.tui.cli import finetune as cli_finetune
from gptchat.tui.cli.common import click_command, long_flag

# The form's fields: (input id, the finetune command's parameter name, label). Flags without a field
# are passed through as typed ("also passed: ...").
FIELDS = [
    ("data", "data", "Data (files or folders, space-separated)"),
    ("model", "model", "Base model"),
    ("arch", "arch", "Architecture (from scratch)"),
    ("steps", "steps", "Steps (empty: from epochs)"),
    ("lr", "lr", "Learning rate (empty: by model size)"),
    ("batch", "batch_size", "Batch size"),
    ("block", "block_size", "Block size"),
    ("name", "name", "Run name"),
]


def command():
    """The Click command Typer builds for `gptchat finetune`."""
    return click_command(cli_finetune.finetune)


def flag_of(param: str) -> str:
    """The long flag of a finetune parameter (``"batch_size"`` -> ``"--batch-size"``)."""
    return long_flag(command(), param)


def _context(words: list[str]):
    """Parse as `gptchat finetune WORDS` would (names, values, types); no --help inside the app."""
    try:
        return command().make_context("finetune", list(words), help_option_names=[])
    except typer.TyperException as e:
        raise UsageError(e.format_message()) from None


def command_params(words: list[str]) -> dict:
    """The finetune command's parameters, typed and checked, by name (``{"steps": 50, "lr": 3e-05, ...}``)."""
    return _context(words).params


@dataclass
class FinetuneArgs:
    values: dict[str, str] = field(default_factory=dict)  # form field id -> the text the user typed
    from_scratch: bool = False
    extra: list[str] = field(default_factory=list)  # flags the form has no field for, as given


def parse(arg: str) -> FinetuneArgs:
    """``"docs.txt --steps 50 --lora"`` -> the form's values, --from-scratch, and the other flags.

    Raises UsageError (never a Typer/Click error) for a flag `gptchat finetune` would refuse.
    """
    try:
        words = shlex.split(arg)
    except ValueError as e:
        raise UsageError(f"/finetune: {e}") from None
    try:
        ctx = _context(words)
    except UsageError as e:
        raise UsageError(f"/finetune: {e}") from None
    raw, _rest, order = command().make_parser(ctx).parse_args(list(words))  # the values as typed
    by_param = {param: fid for fid, param, _label in FIELDS}
    out = FinetuneArgs()
    for p in dict.fromkeys(order):  # each parameter once, in the order given
        value = raw.get(p.name)
        if value is None or value == ():  # an argument Click lists although nothing was given
            continue
        if p.name == "data":
            out.values["data"] = " ".join(shlex.quote(d) for d in value)
        elif p.name == "from_scratch":
            out.from_scratch = bool(value)
        elif p.name in by_param:
            out.values[by_param[p.name]] = str(value)
        elif getattr(p, "is_flag", False):
            out.extra += [p.opts[0]] if value else p.secondary_opts[:1]
        else:
            out.extra += [flag_of(p.name), str(value)]
    return out


def start(args: list[str], name: str) -> tuple[subprocess.Popen, Path]:
    """Start ``gptchat finetune ARGS --name NAME`` detached (its own session: it outlives the UI).

    The output goes to ``runs/NAME.log``, next to the run folder the trainer creates.
    """
    return start_command("finetune", args, name, get_paths().runs)


def start_command(cmd: str, args: list[str], name: str, log_dir: Path) -> tuple[subprocess.Popen, Path]:
    """Start ``gptchat CMD ARGS --name NAME`` detached, its output in ``LOG_DIR/NAME.log``."""
    private_dir(log_dir)
    log = log_dir / f"{name}.log"
    with open_private(log, "wb") as out:
        p = subprocess.Popen([sys.executable, "-m", "gptchat.tui", cmd, *args, "--name", name], stdout=out,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    return p, log


def stop(pid: int) -> bool:
    """Ask the trainer to save and stop (SIGINT, as Ctrl+C in its terminal); False if it is gone."""
    try:
        os.kill(int(pid), signal.SIGINT)
    except ProcessLookupError:
        return False
    return True


def log_tail(path: Path | None) -> str:
    """The last line the trainer printed (why it failed before it wrote any event)."""
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except (OSError, AttributeError):
        return "the trainer exited"
    last = lines[-1] if lines else "the trainer exited"
    return last.removeprefix("error: ")  # the screen says "error:" itself
