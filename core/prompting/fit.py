"""Fitting a prompt into the window: drop the oldest chat turns, then the largest examples, then cut
the input from its start; every step recorded (see templates.render)."""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field
from itertools import accumulate

from gptchat.core.errors import ContextOverflow
from gptchat.core.prompting.rendered import Budget, Part, Rendered


@dataclass
class Fit:
    """What is kept so far while fitting, and what was removed."""

    turns: list[int]
    examples: list[int]
    value: str
    turns_dropped: int = 0
    turn_tokens: int = 0
    example_steps: list[str] = field(default_factory=list)
    value_ids: list[int] | None = None
    keep: int | None = None  # input tokens kept, once cutting starts


def shrink(fit: Fit, pieces, parts: list[Part], over: int, out: Rendered, tokenizer, budget: Budget,
            reserve: int, n_ids: int) -> None:
    """One fitting step: drop the oldest turns, else the largest examples, else cut the input's start."""
    n_head = len(pieces.head)
    n_hist = n_head + len(fit.examples)
    if fit.turns:
        n, saved = drop_turns(pieces.turn_roles, fit.turns, parts[n_hist : n_hist + len(fit.turns)], over)
        fit.turns_dropped += n
        fit.turn_tokens += saved
        fit.turns = fit.turns[n:]
    elif fit.examples:
        for j in examples_to_drop(parts[n_head:n_hist], over):
            out.examples_dropped.append(fit.examples[j])
            part = parts[n_head + j]
            fit.example_steps.append(f"dropped {part.label} ({part.tokens} tokens)")
        fit.examples = [i for i in fit.examples if i not in out.examples_dropped]
    else:
        if fit.value_ids is None:
            fit.value_ids = tokenizer.encode(fit.value)
            fit.keep = len(fit.value_ids)
        new_keep = max(fit.keep - over, min(budget.min_input, len(fit.value_ids)))
        if new_keep >= fit.keep:  # nothing left that we may cut
            raise ContextOverflow(overflow_message(budget, reserve, n_ids - fit.keep, new_keep))
        fit.keep = new_keep
        fit.value = tail(tokenizer, fit.value_ids, fit.keep)


def steps(fit: Fit, out: Rendered, tokenizer) -> list[str]:
    """What fitting removed, in order (turns can go over several passes: one step for all of them)."""
    steps = []
    out.turns_dropped = fit.turns_dropped
    if fit.turns_dropped:
        plural = "s" if fit.turns_dropped != 1 else ""
        steps.append(f"dropped {fit.turns_dropped} oldest chat turn{plural} ({fit.turn_tokens} tokens)")
    steps += fit.example_steps
    if fit.value_ids is not None:
        kept = len(tokenizer.encode(fit.value))
        out.input_cut = len(fit.value_ids) - kept
        steps.append(f"cut {out.input_cut} tokens from the start of the input (kept the last {kept})")
    return steps


def attribute(tokenizer, ids: list[int], texts: list[str]) -> list[int]:
    """Tokens per part: each token counts for the part holding its first byte."""
    starts = list(accumulate((len(t.encode("utf-8")) for t in texts), initial=0))[:-1]
    counts, offset = [0] * len(texts), 0
    for t in ids:
        counts[bisect_right(starts, offset) - 1] += 1
        offset += len(tokenizer.token_bytes(t))
    return counts


def drop_turns(turns, kept: list[int], parts: list[Part], over: int) -> tuple[int, int]:
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


def examples_to_drop(parts: list[Part], over: int) -> list[int]:
    """Positions of the examples to drop: largest first, so the fewest go that free enough room."""
    out = []
    for j in sorted(range(len(parts)), key=lambda j: -parts[j].tokens):  # stable: ties go earliest first
        out.append(j)
        over -= parts[j].tokens
        if over <= 0:
            break
    return out


def tail(tokenizer, ids: list[int], keep: int) -> str:
    """The text of the last ``keep`` tokens, starting on a whole character."""
    data = b"".join(tokenizer.token_bytes(t) for t in ids[len(ids) - keep :]) if keep else b""
    start = 0
    while start < len(data) and 0x80 <= data[start] < 0xC0:  # UTF-8 continuation bytes
        start += 1
    return data[start:].decode("utf-8", errors="replace")


def overflow_message(budget: Budget, reserve: int, fixed: int, min_keep: int) -> str:
    room = budget.n_ctx - reserve - fixed
    return (
        f"the prompt cannot fit in {budget.n_ctx} tokens: without the input it takes {fixed} tokens and "
        f"{reserve} are reserved for the reply, leaving {max(room, 0)} for the input (at least {min_keep} "
        f"needed); lower --max-new-tokens or use a template with a shorter instruction"
    )
