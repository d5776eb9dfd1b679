"""Slash commands typed in the chat input: the table, parsing and the help text.

Each command either changes a setting (``/template few-shot`` is ``/set template few-shot``), runs a
chat-screen action (``/new`` is Ctrl+N), or is one of the controller's own commands
(tui/app/controller.py runs them all).
"""

from __future__ import annotations

from dataclasses import dataclass

from gptchat.core.errors import UsageError


@dataclass(frozen=True)
class Command:
    args: str  # how its argument is written in the help; "" for none
    help: str
    setting: str | None = None  # with an argument, the command sets this setting
    action: str | None = None  # (without an argument, if it also has a setting) runs the screen's action_<name>


# The help screen lists these, in this order.
COMMANDS: dict[str, Command] = {
    "model": Command("[NAME|PATH]", "switch model; with no argument, open the model picker", "model", "pick_model"),
    "template": Command("NAME", "use a prompt template (chat, few-shot, raw, ...)", "template"),
    "shots": Command("N", "how many examples few-shot templates show (default: the template's)", "shots"),
    "examples": Command("FILE", "a JSONL or TSV file of examples for the template", "examples"),
    "set": Command("NAME VALUE", "change a setting, e.g. /set temperature 0.7, /set seed 42, /set greedy on"),
    "var": Command("NAME [VALUE]", "set a template variable, e.g. /var task Translate to French (no value: unset)"),
    "markdown": Command("on|off", "draw replies as Markdown (off by default: GPT-2 is a base model)"),
    "prompt": Command("", "show the exact prompt the model sees (F5)", action="show_prompt"),
    "compare": Command("[MODEL:TEMPLATE:SHOTS, ...]", "send one prompt to 2-4 panes side by side", action="compare"),
    "finetune": Command("FILE [--steps N ...]", "open the finetune screen (no argument: also the list of runs)"),
    "experiment": Command("[NAME]", "open the experiments: each study's table and perplexity chart, or start one"),
    "new": Command("", "start a new chat", action="new_chat"),
    "history": Command("", "open the conversation list", action="history"),
    "regen": Command("", "regenerate the last reply", action="regenerate"),
    "edit": Command("", "edit the last message and send it again", action="edit_last"),
    "copy": Command("", "copy the last reply", action="copy_last"),
    "inspect": Command("", "each token of the last reply with its probability and the alternatives (i on a reply)",
                       action="inspect_last"),
    "rename": Command("NAME", "rename this conversation"),
    "export": Command("[md|json] [PATH]", "export this conversation to Markdown or JSON"),
    "unload": Command("NAME", "unload a model to free memory"),
    "help": Command("", "list every key and command", action="help"),
}
ALIASES = {"runs": "finetune", "experiments": "experiment", "m": "model", "t": "template", "h": "help", "?": "help", "regenerate": "regen", "clear": "new",
           "temp": "set temperature"}


def is_slash(text: str) -> bool:
    t = text.strip()
    return t.startswith("/") and not t.startswith("//")


def parse(text: str) -> tuple[str, str]:
    """``"/set temperature 0.7"`` -> ``("set", "temperature 0.7")``; UsageError for unknown commands."""
    body = text.strip()[1:]
    name, _, arg = body.partition(" ")
    name = name.lower()
    if name in ALIASES:
        alias = ALIASES[name].split(" ", 1)
        name = alias[0]
        if len(alias) > 1:
            arg = f"{alias[1]} {arg}".strip()
    if name not in COMMANDS:
        close = [c for c in COMMANDS if c.startswith(name[:2])] if name else []
        hint = f" (did you mean /{close[0]}?)" if close else ""
        raise UsageError(f"unknown command /{name}{hint}; /help lists them")
    return name, arg.strip()


def help_lines() -> list[tuple[str, str]]:
    return [(f"/{n} {c.args}".strip(), c.help) for n, c in COMMANDS.items()]
