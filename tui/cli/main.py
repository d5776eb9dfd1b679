"""The `gptchat` command: wires one small module per command and turns errors into one line."""

from __future__ import annotations

import os
import sys

import typer
from typer.core import TyperGroup

from gptchat.tui.cli import batch as cmd_batch
from gptchat.tui.cli import bench as cmd_bench
from gptchat.tui.cli import chat as cmd_chat
from gptchat.tui.cli import estimate as cmd_estimate
from gptchat.tui.cli import compare as cmd_compare
from gptchat.tui.cli import eval as cmd_eval
from gptchat.tui.cli import experiment as cmd_experiment
from gptchat.tui.cli import finetune as cmd_finetune
from gptchat.tui.cli import generate as cmd_generate
from gptchat.tui.cli import inspect as cmd_inspect
from gptchat.tui.cli import models as cmd_models
from gptchat.tui.cli import paths as cmd_paths
from gptchat.tui.cli import templates as cmd_templates
from gptchat.tui.cli.common import ModelOpt

class _Commands(TyperGroup):
    """The command group; a reader that closes stdout (`gptchat generate ... | head`) ends a command normally."""

    def invoke(self, ctx):
        try:
            rv = super().invoke(ctx)
            sys.stdout.flush()  # inside the try: what is still buffered meets the closed pipe here, not at exit
            return rv
        except BrokenPipeError:
            # Python's advice (docs, "Note on SIGPIPE"): point stdout at devnull so the flush at interpreter
            # shutdown finds nothing to complain about; Click's own handler would exit 1 instead
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            ctx.exit(0)


def _new_app() -> typer.Typer:
    one = typer.Typer(
        name="gptchat",
        cls=_Commands,
        help="Chat with, prompt, compare and finetune GPT-2 models from a terminal.",
        add_completion=False,
        invoke_without_command=True,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    one.callback()(_default)
    return one


def _default(ctx: typer.Context, model: ModelOpt = None) -> None:
    """Chat with, prompt, compare and finetune GPT-2 models from a terminal.

    With no command, opens the chat app (gptchat chat); `gptchat --model X` opens it with that model.
    """
    if ctx.invoked_subcommand is None:
        ctx.invoke(cmd_chat.chat, model=model)


# Each command module imports only typer and the stdlib at top level: `gptchat --help` never loads torch.
COMMANDS = {
    "generate": cmd_generate.generate, "chat": cmd_chat.chat, "batch": cmd_batch.batch,
    "finetune": cmd_finetune.finetune, "runs": cmd_finetune.runs, "models": cmd_models.models,
    "pull": cmd_models.pull, "bench": cmd_bench.bench, "eval": cmd_eval.eval_cmd, "compare": cmd_compare.compare,
    "experiment": cmd_experiment.experiment, "estimate": cmd_estimate.estimate, "inspect": cmd_inspect.inspect,
    "paths": cmd_paths.paths,
}
app = _new_app()
for _name, _fn in COMMANDS.items():
    app.command(_name)(_fn)
app.add_typer(cmd_templates.app, name="templates")


def _app_for(args: list[str]) -> typer.Typer:
    """The app that runs ``args``: for `gptchat COMMAND ...` one holding that command alone (Typer reads the
    signature of every command it is given, through typing, before it parses anything: all of them took
    ~0.2 s of `gptchat generate`'s start on a 2-core EPYC); anything else (no command, --help, templates, a
    misspelt command) the whole app."""
    fn = COMMANDS.get(args[0]) if args else None
    if fn is None:
        return app
    one = _new_app()
    one.command(args[0])(fn)
    return one


def main(argv: list[str] | None = None) -> None:
    from gptchat.core.errors import GptchatError, UsageError

    from gptchat.tui.cli.common import debug, err

    try:
        args = list(sys.argv[1:] if argv is None else argv)
        _app_for(args)(args=args, prog_name="gptchat", standalone_mode=True)
    except UsageError as e:
        if debug():
            raise
        err(f"error: {e}")
        sys.exit(2)
    except GptchatError as e:
        if debug():
            raise
        err(f"error: {e}")
        sys.exit(1)
    except KeyboardInterrupt:
        err("interrupted")
        sys.exit(130)
    except OSError as e:  # a file the user named cannot be read or written: one line, as for our own errors
        if debug():
            raise
        where = f": {e.filename}" if e.filename else ""
        err(f"error: {e.strerror or e}{where}")
        sys.exit(1)
