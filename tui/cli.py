"""The `gptchat` command: wires one small module per command and turns errors into one line."""

from __future__ import annotations

import sys

import typer

from . import cmd_paths

app = typer.Typer(
    name="gptchat",
    help="Chat with, prompt, compare and finetune GPT-2 models from a terminal.",
    add_completion=False,
    invoke_without_command=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

app.command("paths")(cmd_paths.paths)

# Optional command modules, each exporting the names listed: (module, [(command name, attribute)]).
# A module exporting `app` (a typer.Typer) is added as a command group of that name.
OPTIONAL = [
    ("cmd_chat", [("chat", "chat")]),
    ("cmd_finetune", [("finetune", "finetune"), ("runs", "runs")]),
    ("cmd_batch", [("batch", "batch")]),
]


@app.callback()
def _default(ctx: typer.Context) -> None:
    """Chat with, prompt, compare and finetune GPT-2 models from a terminal.

    With no command, opens the chat app (gptchat chat).
    """
    if ctx.invoked_subcommand is None:
        cmd = ctx.command.get_command(ctx, "chat") if hasattr(ctx.command, "get_command") else None
        if cmd is None:
            print(ctx.get_help())
            return
        ctx.invoke(cmd.callback)


def _register() -> None:
    # Each module imports only typer and the stdlib at top level: `gptchat --help` never loads torch.
    import importlib
    import importlib.util

    from . import cmd_bench, cmd_generate, cmd_models, cmd_templates

    app.command("generate")(cmd_generate.generate)
    app.command("models")(cmd_models.models)
    app.command("pull")(cmd_models.pull)
    app.command("bench")(cmd_bench.bench)
    app.add_typer(cmd_templates.app, name="templates")
    for mod_name, commands in OPTIONAL:
        if importlib.util.find_spec(f"{__package__}.{mod_name}") is None:
            continue
        mod = importlib.import_module(f"{__package__}.{mod_name}")
        for cmd_name, attr in commands:
            obj = getattr(mod, attr, None)
            if isinstance(obj, typer.Typer):
                app.add_typer(obj, name=cmd_name)
            elif obj is not None:
                app.command(cmd_name)(obj)


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
