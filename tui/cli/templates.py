"""`gptchat templates list | show | path`: see the prompt templates and where yours go."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from gptchat.tui.cli.common import JsonOpt, err, print_json
from gptchat.tui.cli.table import print_table

app = typer.Typer(
    name="templates",
    help="List, show and locate prompt templates (bundled ones and your own).\n\n"
    "\b\nExamples:\n  gptchat templates list\n  gptchat templates show few-shot-qa\n"
    "  gptchat templates path",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)


def _summary(t) -> dict:
    """What a script needs to know about a template (``t`` is a gptchat.prompts.Template)."""
    return {
        "name": t.name,
        "kind": t.kind,
        "description": t.description,
        "source": t.source,
        "overrides_bundled": t.overrides_bundled,
        "path": t.path,
    }


@app.command("list")
def list_templates(json_out: JsonOpt = False) -> None:
    """List the bundled and user templates with their kind and description.

    A user template (a NAME.toml in `gptchat templates path`) replaces the bundled one of the
    same name. Files that fail to load are reported on stderr and left out.
    """
    from gptchat.core.prompting.templates import list_templates as scan

    templates, broken = scan()
    if json_out:
        print_json([_summary(t) for t in templates])
    else:
        if templates:
            print_table([(t.name, t.kind, "user*" if t.overrides_bundled else t.source, t.description)
                         for t in templates])
        if any(t.overrides_bundled for t in templates):
            err("* a user template that replaces the bundled one of the same name")
    for message in broken:
        err(f"warning: skipped {message}")


@app.command("show")
def show(
    name: Annotated[str, typer.Argument(help="The template's name, as `gptchat templates list` shows it.")],
    json_out: JsonOpt = False,
) -> None:
    """Show a template's file, its variables and its default sampling options.

    The output is valid TOML (the notes are comments), so it can start a template of your own.

    \b
    Examples:
      gptchat templates show few-shot-qa
      gptchat templates show chat --json
    """
    from gptchat.core.prompting.templates import get_template

    t = get_template(name)
    variables = {v: t.variables.get(v) for v in t.variable_names()}
    info = {
        **_summary(t),
        "input_variable": t.input_variable,
        "variables": variables,  # name -> default (null: you must give it)
        "example_fields": t.example_fields,
        "examples": len(t.examples),
        "default_shots": t.default_shots,
        "stop": list(t.stop),
        "options": t.options,
        "text": t.text,
    }
    if json_out:
        print_json(info)
        return
    print(f"# {t.path} ({'user, replaces the bundled one' if t.overrides_bundled else t.source})")
    print(t.text.rstrip("\n"))
    print("# ---")
    for var, default in variables.items():
        if var == t.input_variable:
            note = "your input text"
        elif default is None:
            note = "required: --var " + var + "=..."
        else:
            note = f"default {json.dumps(default, ensure_ascii=False)}"
        print(f"# variable {var}: {note}")
    if t.example_fields:
        print(f"# example fields: {', '.join(t.example_fields)} "
              f"({len(t.examples)} built-in, {t.default_shots} shown by default)")
    if t.stop:
        print("# stop at: " + "  ".join(json.dumps(s, ensure_ascii=False) for s in t.stop))
    opts = " ".join(f"{k}={v}" for k, v in t.options.items()) or "none (the generate defaults apply)"
    print(f"# default options: {opts}")


@app.command("path")
def path(json_out: JsonOpt = False) -> None:
    """Print the folder for your own templates.

    Put NAME.toml files there; a file named like a bundled template replaces it.
    """
    from gptchat.core.paths import get_paths

    folder = get_paths().templates
    if json_out:
        print_json({"templates": str(folder), "exists": folder.is_dir()})
        return
    print(folder)
    if not folder.is_dir():
        err("(it does not exist yet: create it and save a template there, e.g. `gptchat templates show raw`)")
