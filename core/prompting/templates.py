"""Render a prompt template to token ids inside the model's context window, and account for it.

GPT-2's positions are absolute (1024 of them), so prompt + reply must fit. ``render`` builds the
prompt from parts (instruction, examples, chat turns, input), and when it is too long it drops the
oldest chat turns, then examples, then cuts the input from the start, and records every step.

Token counts are exact. BPE does not split cleanly at part boundaries (``"\\n\\n"`` alone is one
token, but two before a letter), so encoding parts one by one would not give the ids the model
sees. We encode the whole text once and charge each token to the part its first byte is in: the
ids are ``tokenizer.encode(text)`` and the part counts add up to ``len(ids)`` by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

from gptchat import prompts
from gptchat.prompts import Template, TemplateFileError

from gptchat.core.config import sampling_defaults
from gptchat.core.errors import ContextOverflow, TemplateError
from gptchat.core.generate import options as gen_options
from gptchat.core.prompting import fit as fit_
from gptchat.core.prompting.examples import ID, choose_examples, load_examples
from gptchat.core.prompting.rendered import Budget, Part, Rendered, format_explain

__all__ = [
    "Budget", "Part", "Rendered", "Template", "check_template_options", "get_template", "list_templates", "load_examples",
    "substitute", "render", "format_explain",
]

# -- templates by name, with the user's folder -------------------------------------------------


def _user_dir():
    from gptchat.core.paths import get_paths

    return get_paths().templates


def get_template(name: str) -> Template:
    """The user's template ``name`` if there is one, else the bundled one."""
    try:
        tpl = prompts.load_template(name, _user_dir())
    except TemplateFileError as e:
        raise TemplateError(str(e)) from None
    return check_template_options(tpl)


def list_templates() -> tuple[list[Template], list[str]]:
    """All templates (user ones replace bundled ones by name) and one message per broken file."""
    found, errors = prompts.scan_templates(_user_dir())
    good = []
    for tpl in found:
        try:
            good.append(check_template_options(tpl))
        except TemplateError as e:
            errors.append(str(e))
    return good, errors


def check_template_options(tpl: Template) -> Template:
    """``tpl`` if its ``[options]`` are known generation settings with legal values (the options module
    is their one home: the same names and ranges as the CLI flags, ``/set`` and batch rows)."""
    try:
        gen_options.check_options(tpl.options)
    except ValueError as e:
        raise TemplateError(f"{tpl.path or tpl.name + '.toml'}: {e}") from None
    return tpl


def substitute(fmt: str, values: dict[str, str], what: str = "template") -> str:
    """Fill ``{name}`` fields; values are inserted as they are, never parsed again."""
    try:
        pieces = prompts.parse_format(fmt)
    except TemplateFileError as e:
        raise TemplateError(f"{what}: {e}") from None
    missing = [name for _, name in pieces if name and name not in values]
    if missing:
        raise TemplateError(f"{what} is missing {_names(missing)}")
    return "".join(lit + (values[name] if name else "") for lit, name in pieces)


def _names(names) -> str:
    names = list(dict.fromkeys(names))
    return ("variable " if len(names) == 1 else "variables ") + ", ".join(map(repr, names))


# -- rendering ----------------------------------------------------------------------------------


def render(
    template: Template | str,
    variables: dict[str, str] | None = None,
    history: list[tuple[str, str]] | None = None,
    tokenizer=None,
    budget: Budget | None = None,
    *,
    examples: list[dict[str, str]] | None = None,
    shots: int | None = None,
    seed: int = 0,
) -> Rendered:
    """Build the prompt and fit it, with the reply reserve, into ``budget.n_ctx`` tokens.

    ``variables`` fills the template's fields (the user's text goes in ``template.input_variable``;
    the template's own defaults apply to the rest). ``history`` is (role, text) chat turns, role
    "user" or "assistant", oldest first. ``examples`` replaces the template's example pool;
    ``shots`` of the pool are picked by ``seed``. With the caller's ``examples``, an instruction
    variable left at the template's demo value is left out (and ``dropped`` says so): a bundled
    few-shot's "Write the opposite of each word." would misdescribe the caller's examples.
    """
    if tokenizer is None:
        raise TypeError("render() needs a tokenizer")
    tpl = get_template(template) if isinstance(template, str) else template
    budget = budget or Budget()
    reserve = _reserve(tpl, budget)
    values = _values(tpl, variables or {})
    notes = _drop_demo_instruction(tpl, values, variables or {}) if examples is not None else []
    pool, chosen = _pick_examples(tpl, examples, shots, seed)
    pieces = _pieces(tpl, values, _turns(tpl, history or []), pool, chosen)
    out = Rendered(tpl.name, [], "", [], budget.n_ctx, reserve, list(tpl.stop), dict(tpl.options))
    fit = fit_.Fit(list(range(len(pieces.turns))), list(chosen), pieces.value)
    while True:
        parts = pieces.assemble(tpl, values, fit)
        ids = tokenizer.encode("".join(p.text for p in parts))
        for p, n in zip(parts, fit_.attribute(tokenizer, ids, [p.text for p in parts])):
            p.tokens = n
        over = len(ids) + reserve - budget.n_ctx
        if over <= 0:
            break
        fit_.shrink(fit, pieces, parts, over, out, tokenizer, budget, reserve, len(ids))
    if not ids:
        raise TemplateError("the prompt is empty: give some input text")
    out.dropped = notes + fit_.steps(fit, out, tokenizer)
    out.ids, out.parts, out.text = ids, parts, "".join(p.text for p in parts)
    out.examples_used = fit.examples
    out.example_ids = [pool[i][ID] for i in fit.examples]
    return out


def _reserve(tpl: Template, budget: Budget) -> int:
    reserve = budget.reserve
    if reserve is None:
        # neither the caller nor the template says: config.toml's, else the default
        reserve = int(tpl.options.get("max_new_tokens", sampling_defaults()["max_new_tokens"]))
    if reserve < 0 or reserve >= budget.n_ctx:
        raise ContextOverflow(
            f"{reserve} tokens reserved for the reply leave no room for a prompt in a {budget.n_ctx}-token "
            f"window; use --max-new-tokens below {budget.n_ctx}"
        )
    return reserve


def _drop_demo_instruction(tpl: Template, values: dict[str, str], given: dict[str, str]) -> list[str]:
    """Blank the instruction's variables still at the template's defaults; the note that says so."""
    demo = [n for n in prompts.format_fields(tpl.instruction)
            if n in tpl.variables and n not in given and n not in prompts.format_fields(tpl.input_format)]
    for n in demo:
        values[n] = ""
    if not demo or not substitute(tpl.instruction, {**values, **{n: tpl.variables[n] for n in demo}}, "instruction"):
        return []
    return [f"left out the template's demo instruction (your examples replace its own; "
            f"give {' '.join(f'--var {n}=...' for n in demo)} to keep one)"]


@dataclass
class _Pieces:
    """The prompt's parts before fitting: the instruction, every example, every turn, the input value."""

    head: list[Part]
    examples: dict[int, Part]
    turns: list[Part]
    turn_roles: list[tuple[str, str]]
    value: str

    def assemble(self, tpl: Template, values: dict[str, str], fit: "fit_.Fit") -> list[Part]:
        # fresh Part objects each pass: their token counts are set from this pass's encoding
        parts = [Part(p.kind, p.label, p.text) for p in self.head]
        parts += [Part(p.kind, p.label, p.text) for p in (self.examples[i] for i in fit.examples)]
        parts += [Part(p.kind, p.label, p.text) for p in (self.turns[i] for i in fit.turns)]
        parts.append(Part("input", "input", _input_text(tpl, values, fit.value)))
        return parts


def _pieces(tpl: Template, values: dict[str, str], turns, pool, chosen) -> _Pieces:
    sep = tpl.separators
    instruction = substitute(tpl.instruction, values, f"template {tpl.name!r}: instruction")
    head = [Part("instruction", "instruction", instruction + sep["instruction"])] if instruction else []
    ex_parts = {
        i: Part("example", f"example {pool[i][ID]}", _example_text(tpl, pool[i]) + sep["example"]) for i in chosen
    }
    labels = {"user": tpl.user_label, "assistant": tpl.assistant_label}
    turn_parts = [
        Part("history", f"{role} turn {n}", f"{labels[role]} {text.strip()}{sep['turn']}")
        for n, (role, text) in enumerate(turns, 1)
    ]
    value = values[tpl.input_variable]
    return _Pieces(head, ex_parts, turn_parts, turns, value.strip() if tpl.kind == "chat" else value)


def _values(tpl: Template, given: dict[str, str]) -> dict[str, str]:
    needed = tpl.variable_names()
    unknown = [k for k in given if k not in needed]
    if unknown:
        raise TemplateError(
            f"template {tpl.name!r} does not use {_names(unknown)}; it uses {', '.join(needed)} "
            f"(the input text fills {tpl.input_variable!r})"
        )
    for k, v in given.items():
        if not isinstance(v, str):
            raise TemplateError(f"variable {k!r} must be text, not {type(v).__name__}")
    values = {**tpl.variables, **given}
    missing = [k for k in needed if k not in values]
    if missing:
        raise TemplateError(
            f"template {tpl.name!r} is missing {_names(missing)}; give each with --var NAME=VALUE "
            f"(the input text fills {tpl.input_variable!r})"
        )
    return values


def _turns(tpl: Template, history: list[tuple[str, str]]) -> list[tuple[str, str]]:
    if history and tpl.kind != "chat":
        raise TemplateError(
            f"template {tpl.name!r} is kind {tpl.kind!r}; chat history needs a chat template"
        )
    for n, (role, text) in enumerate(history, 1):
        if role not in ("user", "assistant") or not isinstance(text, str):
            raise TemplateError(f"chat turn {n} has role {role!r}; roles are 'user' and 'assistant'")
    return list(history)


def _pick_examples(tpl: Template, examples, shots, seed) -> tuple[list[dict[str, str]], list[int]]:
    if not tpl.takes_examples:
        if examples is not None or shots:
            raise TemplateError(
                f"template {tpl.name!r} is kind {tpl.kind!r} and shows no examples; for examples use a one-shot "
                f"or few-shot template (e.g. few-shot), or leave examples and shots unset"
            )
        return [], []
    if examples is None:
        pool = [{**row, ID: row.get(ID, f"#{i + 1}")} for i, row in enumerate(tpl.examples)]
    else:
        pool = [{**row, ID: str(row.get(ID, f"#{i + 1}"))} for i, row in enumerate(examples)]
    for row in pool:
        missing = [f for f in tpl.example_fields if f not in row]
        if missing:
            raise TemplateError(
                f"example {row[ID]} is missing {_names(missing)} "
                f"(template {tpl.name!r} needs {', '.join(tpl.example_fields)})"
            )
    want = tpl.default_shots if shots is None else shots
    if want > 0 and not pool:
        raise TemplateError(
            f"template {tpl.name!r} has no built-in examples; give some with --examples FILE or use --shots 0"
        )
    if shots is None:  # a default never asks for more than there are
        want = min(want, len(pool))
    return pool, choose_examples(len(pool), want, seed)


def _example_text(tpl: Template, row: dict[str, str]) -> str:
    return substitute(tpl.example_format, row, f"example {row[ID]}")


def _input_text(tpl: Template, values: dict[str, str], value: str) -> str:
    if tpl.kind == "chat":
        # End on the assistant label (no trailing space: GPT-2 words carry their leading space).
        return f"{tpl.user_label} {value}{tpl.separators['turn']}{tpl.assistant_label}"
    values = {**values, tpl.input_variable: value}
    return substitute(tpl.input_format, values, f"template {tpl.name!r}: input_format")


