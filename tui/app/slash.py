"""Slash commands typed in the chat input: parsing and the help text (the screen runs them)."""

from __future__ import annotations

from gptchat.core.errors import UsageError

# name -> (arguments, what it does). The help screen lists these.
COMMANDS: dict[str, tuple[str, str]] = {
    "model": ("[NAME|PATH]", "switch model; with no argument, open the model picker"),
    "template": ("NAME", "use a prompt template (chat, few-shot, raw, ...)"),
    "shots": ("N", "how many examples few-shot templates show (default: the template's)"),
    "examples": ("FILE", "a JSONL or TSV file of examples for the template"),
    "set": ("NAME VALUE", "change a setting, e.g. /set temperature 0.7, /set seed 42, /set greedy on"),
    "compare": ("[MODEL:TEMPLATE:SHOTS, ...]", "send one prompt to 2-4 panes side by side"),
    "finetune": ("FILE [--steps N ...]", "open the finetune screen (no argument: also the list of runs)"),
    "new": ("", "start a new chat"),
    "history": ("", "open the conversation list"),
    "regen": ("", "regenerate the last reply"),
    "edit": ("", "edit the last message and send it again"),
    "copy": ("", "copy the last reply"),
    "rename": ("NAME", "rename this conversation"),
    "export": ("[md|json] [PATH]", "export this conversation to Markdown or JSON"),
    "unload": ("NAME", "unload a model to free memory"),
    "help": ("", "list every key and command"),
}
ALIASES = {"runs": "finetune", "m": "model", "t": "template", "h": "help", "?": "help", "regenerate": "regen", "clear": "new",
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
    return [(f"/{n} {a}".strip(), d) for n, (a, d) in COMMANDS.items()]
