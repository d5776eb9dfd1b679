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

import json
from bisect import bisect_right
from dataclasses import asdict, dataclass, field
from itertools import accumulate

from gptchat import prompts
from gptchat.prompts import Template, TemplateFileError

from gptchat.core.errors import ContextOverflow, TemplateError
from gptchat.core.generate import options as gen_options
from gptchat.core.prompting.examples import ID, choose_examples, load_examples

__all__ = [
    "Budget", "Part", "Rendered", "Template", "check_template_options", "get_template", "list_templates", "load_examples",
    "substitute", "render", "format_explain",
]

DEFAULT_RESERVE = gen_options.DEFAULTS["max_new_tokens"]  # reply tokens when neither the caller nor the template says


@dataclass(frozen=True)
class Budget:
    n_ctx: int = 1024  # the model's n_positions
    reserve: int | None = None  # tokens kept for the reply; None: the template's max_new_tokens
    min_input: int = 16  # never cut the input below this many tokens (or its length, if shorter)


@dataclass
class Part:
    kind: str  # "instruction" | "example" | "history" | "input"
    label: str  # "instruction", "example #2", "user turn 3", "input"
    text: str  # separators that follow a part belong to it
    tokens: int = 0


@dataclass
class Rendered:
    template: str
    ids: list[int]
    text: str
    parts: list[Part]
    n_ctx: int
    reserve: int
    stop: list[str]
    options: dict  # the template's default sampling options
    examples_used: list[int] = field(default_factory=list)  # indices into the pool, prompt order
    example_ids: list[str] = field(default_factory=list)  # "#2", "faq.jsonl:7" or the row's id
    dropped: list[str] = field(default_factory=list)  # what was removed to fit, in order
    turns_dropped: int = 0
    examples_dropped: list[int] = field(default_factory=list)
    input_cut: int = 0  # tokens cut from the start of the input

    @property
    def n_prompt(self) -> int:
        return len(self.ids)

    @property
    def free(self) -> int:
        return self.n_ctx - self.n_prompt - self.reserve

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("ids")
        d["n_prompt"] = self.n_prompt
        return d


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
    ``shots`` of the pool are picked by ``seed``.
    """
    if tokenizer is None:
        raise TypeError("render() needs a tokenizer")
    tpl = get_template(template) if isinstance(template, str) else template
    budget = budget or Budget()
    reserve = budget.reserve
    if reserve is None:
        reserve = int(tpl.options.get("max_new_tokens", DEFAULT_RESERVE))
    if reserve < 0 or reserve >= budget.n_ctx:
        raise ContextOverflow(
            f"{reserve} tokens reserved for the reply leave no room for a prompt in a {budget.n_ctx}-token "
            f"window; use --max-new-tokens below {budget.n_ctx}"
        )
    values = _values(tpl, variables or {})
    turns = _turns(tpl, history or [])
    pool, chosen = _pick_examples(tpl, examples, shots, seed)

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
    if tpl.kind == "chat":
        value = value.strip()

    kept_turns, kept_ex = list(range(len(turns))), list(chosen)
    turn_tokens, example_steps = 0, []
    value_ids: list[int] | None = None
    keep: int | None = None  # input tokens kept, once cutting starts
    out = Rendered(tpl.name, [], "", [], budget.n_ctx, reserve, list(tpl.stop), dict(tpl.options))
    while True:
        parts = head + [ex_parts[i] for i in kept_ex] + [turn_parts[i] for i in kept_turns]
        parts.append(Part("input", "input", _input_text(tpl, values, value)))
        ids = tokenizer.encode("".join(p.text for p in parts))
        for p, n in zip(parts, _attribute(tokenizer, ids, [p.text for p in parts])):
            p.tokens = n
        over = len(ids) + reserve - budget.n_ctx
        if over <= 0:
            break
        n_hist = len(head) + len(kept_ex)
        if kept_turns:
            n, saved = _drop_turns(turns, kept_turns, parts[n_hist : n_hist + len(kept_turns)], over)
            out.turns_dropped += n
            turn_tokens += saved
            kept_turns = kept_turns[n:]
        elif kept_ex:
            for j in _examples_to_drop(parts[len(head) : n_hist], over):
                out.examples_dropped.append(kept_ex[j])
                part = parts[len(head) + j]
                example_steps.append(f"dropped {part.label} ({part.tokens} tokens)")
            kept_ex = [i for i in kept_ex if i not in out.examples_dropped]
        else:
            if value_ids is None:
                value_ids = tokenizer.encode(value)
                keep = len(value_ids)
            new_keep = max(keep - over, min(budget.min_input, len(value_ids)))
            if new_keep >= keep:  # nothing left that we may cut
                raise ContextOverflow(_overflow_message(budget, reserve, len(ids) - keep, new_keep))
            keep = new_keep
            value = _tail(tokenizer, value_ids, keep)
    # Turns can go over several passes (re-encoding shifts a token at a boundary): one step each.
    if out.turns_dropped:
        plural = "s" if out.turns_dropped != 1 else ""
        out.dropped.append(f"dropped {out.turns_dropped} oldest chat turn{plural} ({turn_tokens} tokens)")
    out.dropped += example_steps
    if value_ids is not None:
        kept = len(tokenizer.encode(value))
        out.input_cut = len(value_ids) - kept
        out.dropped.append(f"cut {out.input_cut} tokens from the start of the input (kept the last {kept})")
    if not ids:
        raise TemplateError("the prompt is empty: give some input text")
    out.ids, out.parts, out.text = ids, parts, "".join(p.text for p in parts)
    out.examples_used = kept_ex
    out.example_ids = [pool[i][ID] for i in kept_ex]
    return out


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
                f"template {tpl.name!r} is kind {tpl.kind!r} and shows no examples; use a one-shot "
                f"or few-shot template (e.g. few-shot) with --examples / --shots"
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


def _attribute(tokenizer, ids: list[int], texts: list[str]) -> list[int]:
    """Tokens per part: each token counts for the part holding its first byte."""
    starts = list(accumulate((len(t.encode("utf-8")) for t in texts), initial=0))[:-1]
    counts, offset = [0] * len(texts), 0
    for t in ids:
        counts[bisect_right(starts, offset) - 1] += 1
        offset += len(tokenizer.token_bytes(t))
    return counts


def _drop_turns(turns, kept: list[int], parts: list[Part], over: int) -> tuple[int, int]:
    """How many of the oldest kept turns to drop, and the tokens that frees."""
    n = saved = 0
    while n < len(kept) and saved < over:
        saved += parts[n].tokens
        n += 1
    # A transcript that opens with a reply to a question it no longer shows confuses the model.
    while n < len(kept) and turns[kept[n]][0] == "assistant":
        saved += parts[n].tokens
        n += 1
    return n, saved


def _examples_to_drop(parts: list[Part], over: int) -> list[int]:
    """Positions of the examples to drop: largest first, so the fewest go that free enough room."""
    out = []
    for j in sorted(range(len(parts)), key=lambda j: -parts[j].tokens):  # stable: ties go earliest first
        out.append(j)
        over -= parts[j].tokens
        if over <= 0:
            break
    return out


def _tail(tokenizer, ids: list[int], keep: int) -> str:
    """The text of the last ``keep`` tokens, starting on a whole character."""
    data = b"".join(tokenizer.token_bytes(t) for t in ids[len(ids) - keep :]) if keep else b""
    start = 0
    while start < len(data) and 0x80 <= data[start] < 0xC0:  # UTF-8 continuation bytes
        start += 1
    return data[start:].decode("utf-8", errors="replace")


def _overflow_message(budget: Budget, reserve: int, fixed: int, min_keep: int) -> str:
    room = budget.n_ctx - reserve - fixed
    return (
        f"the prompt cannot fit in {budget.n_ctx} tokens: without the input it takes {fixed} tokens and "
        f"{reserve} are reserved for the reply, leaving {max(room, 0)} for the input (at least {min_keep} "
        f"needed); lower --max-new-tokens or use a template with a shorter instruction"
    )


# -- the --explain report -----------------------------------------------------------------------


def format_explain(r: Rendered) -> str:
    """The budget, what was dropped to fit, and the exact prompt text, for a person to read."""
    rows: list[tuple[str, int]] = []
    history = [p for p in r.parts if p.kind == "history"]
    for p in r.parts:
        if p.kind != "history":
            rows.append((p.label, p.tokens))
        elif p is history[0]:  # turns are many and alike: one line for all of them
            n = len(history)
            rows.append((f"history ({n} turn{'s' if n != 1 else ''})", sum(h.tokens for h in history)))
    totals = [("prompt", r.n_prompt), ("reserved for the reply", r.reserve), ("free", r.free)]
    width = max(len(label) for label, _ in rows + totals)
    lines = [f"budget: template {r.template}, {r.n_ctx}-token window"]
    lines += [f"  {label:<{width}}  {n:>5}" for label, n in rows]
    lines.append("  " + "-" * (width + 7))
    lines += [f"  {label:<{width}}  {n:>5}" for label, n in totals]
    lines.append("dropped to fit:" + ("" if r.dropped else " nothing"))
    lines += [f"  - {step}" for step in r.dropped]
    if r.stop:
        lines.append("stop at: " + "  ".join(_show(s) for s in r.stop))
    lines.append(f"----- prompt text ({r.n_prompt} tokens, exactly what the model sees) -----")
    lines.append(r.text)
    lines.append("----- end of prompt text -----")
    return "\n".join(lines)


def _show(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)  # quotes, with newlines shown as \n
