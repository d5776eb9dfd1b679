"""The `gptchat` command: wires one small module per command and turns errors into one line."""

from __future__ import annotations

import sys

import typer

from . import cmd_paths

app = typer.Typer(
    name="gptchat",
    help="Chat with, prompt, compare and finetune GPT-2 models from a terminal.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

app.command("paths")(cmd_paths.paths)


def _register() -> None:
    # Each module imports only typer and the stdlib at top level: `gptchat --help` never loads torch.
    from . import cmd_generate, cmd_models, cmd_bench

    app.command("generate", no_args_is_help=False)(cmd_generate.generate)
    app.command("models")(cmd_models.models)
    app.command("pull")(cmd_models.pull)
    app.command("bench")(cmd_bench.bench)
    try:
        from . import cmd_templates
    except ImportError:  # pragma: no cover - while the templates module is being written
        return
    app.add_typer(cmd_templates.app, name="templates")


def main(argv: list[str] | None = None) -> None:
    from gptchat.core.errors import GptchatError, UsageError

    from .common import debug, err

    _register()
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
