"""The `gptchat` command: wires one small module per command and turns errors into one line."""

from __future__ import annotations

import sys

import typer

from gptchat.tui.cli import batch as cmd_batch
from gptchat.tui.cli import bench as cmd_bench
from gptchat.tui.cli import chat as cmd_chat
from gptchat.tui.cli import finetune as cmd_finetune
from gptchat.tui.cli import generate as cmd_generate
from gptchat.tui.cli import models as cmd_models
from gptchat.tui.cli import paths as cmd_paths
from gptchat.tui.cli import templates as cmd_templates

app = typer.Typer(
    name="gptchat",
    help="Chat with, prompt, compare and finetune GPT-2 models from a terminal.",
    add_completion=False,
    invoke_without_command=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)



@app.callback()
def _default(ctx: typer.Context) -> None:
    """Chat with, prompt, compare and finetune GPT-2 models from a terminal.

    With no command, opens the chat app (gptchat chat).
    """
    if ctx.invoked_subcommand is None:
        ctx.invoke(cmd_chat.chat)


# Each command module imports only typer and the stdlib at top level: `gptchat --help` never loads torch.
app.command("generate")(cmd_generate.generate)
app.command("chat")(cmd_chat.chat)
app.command("batch")(cmd_batch.batch)
app.command("finetune")(cmd_finetune.finetune)
app.command("runs")(cmd_finetune.runs)
app.command("models")(cmd_models.models)
app.command("pull")(cmd_models.pull)
app.command("bench")(cmd_bench.bench)
app.command("paths")(cmd_paths.paths)
app.add_typer(cmd_templates.app, name="templates")


def main(argv: list[str] | None = None) -> None:
    from gptchat.core.errors import GptchatError, UsageError

    from gptchat.tui.cli.common import debug, err

    try:
        app(args=argv, prog_name="gptchat", standalone_mode=True)
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
    except BrokenPipeError:
        sys.exit(0)
