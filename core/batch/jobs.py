"""Batch prompting: many prompts, a grid of models x templates x shots, results row by row.

The work is a list of jobs, one per (input row, grid cell). Jobs sharing sampling settings are sorted
by prompt length, longest first, and run ``batch_size`` at a time through the text layer's
``stream_rows`` over the engine's one decode loop, which drops rows from the batch as they finish
and gives their places to the next prompts waiting; each row's text, stop strings and finish reason
are the same ``RowText`` that ``generate`` uses for one prompt, so a row's greedy result equals
running it alone. A row's seed is a hash of the base seed and the row id: results do not depend
on which rows share a batch, or on their order.

Files and resume live in ``batch_io.py``; sharding under torchrun in ``batch_dist.py``.
"""

from __future__ import annotations

import hashlib
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from gptchat.core.batch.io import Row, Skipped
from gptchat.core.config import sampling_defaults
from gptchat.core.errors import BatchInputError, ContextOverflow, TemplateError, UsageError
from gptchat.core.generate.options import NAMES as OPTION_NAMES
from gptchat.core.generate.options import resolve, sampling_params
from gptchat.core.generate.sampling import SamplingParams
from gptchat.core.generate.text import Completion, RowRequest, stream_rows

DEFAULT_MODEL = "gpt2"


@dataclass(frozen=True)
class Cell:
    """One point of the grid. ``model`` is the spec as the user gave it (it keys resume)."""

    model: str
    template: str | None = None
    shots: int | None = None


@dataclass
class Job:
    row: Row
    cell: Cell
    cell_index: int
    ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    stop: tuple[str, ...]
    seed: int
    example_ids: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


@dataclass
class Settings:
    """What the command line fixes for every row (a row's own options come first)."""

    given: dict = field(default_factory=dict)  # temperature, top_k, top_p, repetition_penalty, max_new_tokens
    greedy: bool = False
    stop: tuple[str, ...] = ()
    seed: int = 0
    variables: dict[str, str] = field(default_factory=dict)
    examples: str | None = None  # an examples file for the templates
    skip_bad: bool = False


def row_seed(base: int, row_id: str) -> int:
    """A row's seed: sha256 of "base:id" as a 63-bit integer (stable across runs and machines)."""
    digest = hashlib.sha256(f"{base}:{row_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def make_grid(models: list[str] | None, templates: list[str] | None, shots: list[int] | None,
              takes_examples: Callable[[str], bool]) -> tuple[list[Cell], list[str]]:
    """Every combination, in the order given, and notes on what was collapsed.

    ``shots`` needs a template; a template that shows no examples gets one cell (shots None).
    """
    models = list(dict.fromkeys(models or [DEFAULT_MODEL]))
    if shots and not templates:
        raise UsageError("--shots needs a --template that shows examples (few-shot, few-shot-qa, one-shot ...)")
    if any(s < 0 for s in shots or []):
        raise UsageError("--shots must be 0 or more")
    cells, notes = [], []
    for m in models:
        for t in list(dict.fromkeys(templates or [None])):
            values: list[int | None] = list(dict.fromkeys(shots or [None]))
            if t is not None and shots and not takes_examples(t):
                if m == models[0]:
                    notes.append(f"template {t!r} shows no examples: --shots does not apply to it")
                values = [None]
            cells.extend(Cell(m, t, s) for s in values)
    return cells, notes


# -- rendering rows into jobs -------------------------------------------------------------------


def build_jobs(rows: list[Row], cell: Cell, cell_index: int, tokenizer, n_ctx: int, settings: Settings,
               skipped: list[Skipped], label: str) -> list[Job]:
    """Render each row for a cell. A row that cannot be rendered is a bad row (see Settings.skip_bad)."""
    from gptchat.core.prompting.templates import get_template, load_examples

    tpl = get_template(cell.template) if cell.template else None
    pool = None
    if tpl is not None and settings.examples and tpl.takes_examples:
        pool = load_examples(settings.examples, tpl.example_fields)
    jobs = []
    for row in rows:
        try:
            jobs.append(_job(row, cell, cell_index, tpl, pool, tokenizer, n_ctx, settings))
        except (TemplateError, ContextOverflow, ValueError) as e:
            where = f"{label}:{row.line}" + (f" (template {cell.template})" if cell.template else "")
            if not settings.skip_bad:
                raise BatchInputError(f"{where}: {e} (--skip-bad skips such rows)") from None
            skipped.append(Skipped(row.line, f"{where}: {e}"))
    return jobs


def _job(row, cell, cell_index, tpl, pool, tokenizer, n_ctx, settings) -> Job:
    from gptchat.core.prompting.templates import Budget, render

    # the row's own value > the command line's > the template's > the default
    mine = {k: v for k, v in row.overrides.items() if k in OPTION_NAMES}
    o = resolve({**settings.given, **mine}, tpl.options if tpl else None, sampling_defaults())
    params, max_new = sampling_params(o, greedy=row.overrides.get("greedy", settings.greedy))
    seed = row.overrides.get("seed", row_seed(settings.seed, row.id))
    stop = tuple(settings.stop) + tuple(row.overrides.get("stop", ()))
    if tpl is None:
        if row.prompt is None:
            raise ValueError("the row has no 'prompt'")
        ids = tokenizer.encode(row.prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= n_ctx:
            raise ContextOverflow(f"the prompt is {len(ids)} tokens; the model's window is {n_ctx}")
        return Job(row, cell, cell_index, ids, params, max_new, tuple(dict.fromkeys(stop)), seed)
    variables = {**settings.variables, **row.variables}
    if row.prompt is not None:
        if tpl.input_variable in row.variables:
            raise ValueError(f"the row gives both 'prompt' and {tpl.input_variable!r}, which is the same input")
        variables[tpl.input_variable] = row.prompt
    r = render(tpl, variables, None, tokenizer, Budget(n_ctx=n_ctx, reserve=min(max_new, n_ctx - 1)),
               examples=pool, shots=cell.shots, seed=seed)
    stop = tuple(dict.fromkeys(stop + tuple(r.stop)))
    return Job(row, cell, cell_index, r.ids, params, max_new, stop, seed, list(r.example_ids), list(r.dropped))


def plan_groups(jobs: list[Job]) -> list[list[Job]]:
    """Jobs that can share a batch (the same sampling settings), each group longest prompt first:
    neighbours have similar lengths, so left padding stays small, and a prompt waiting for a place
    in a running batch is never longer than the prompts already in it."""
    groups: dict[SamplingParams, list[Job]] = {}
    for j in jobs:
        groups.setdefault(j.params, []).append(j)
    return [sorted(g, key=lambda j: (-len(j.ids), j.row.index)) for g in groups.values()]


def plan_batches(jobs: list[Job], batch_size: int) -> list[list[Job]]:
    """The static batches ``run_group`` starts from (what a reference without refill would run)."""
    return [g[i : i + batch_size] for g in plan_groups(jobs) for i in range(0, len(g), batch_size)]


def auto_batch_size(engine, jobs: list[Job], memory_bytes: int = 2 << 30) -> int:
    """As many rows as keep the KV cache under ``memory_bytes``, at most 16 on a CPU (64 on a GPU)."""
    cfg = engine.model.config
    longest = max((len(j.ids) + j.max_new_tokens for j in jobs), default=1)
    per_row = 2 * cfg.n_layer * min(longest, engine.n_ctx) * cfg.n_embd * engine.kv_dtype.itemsize
    cap = 16 if engine.device.type == "cpu" else 64
    return max(1, min(cap, memory_bytes // max(per_row, 1)))


# -- running ------------------------------------------------------------------------------------


def run_group(lm, group: list[Job], batch_size: int, emit: Callable[[dict], None], cancel=None,
              rank: int = 0) -> int:
    """Generate for jobs sharing sampling settings (from ``plan_groups``), ``batch_size`` at a time;
    a finished row's place goes to the next waiting job. ``emit`` gets each row's record as soon as
    the row is finished (rows cut short by ``cancel`` are not emitted: a resume runs them again).
    Returns the number of tokens generated."""
    queue = deque(group)
    n_tokens = 0
    while queue:
        first = [queue.popleft() for _ in range(min(batch_size, len(queue)))]
        n_tokens += _run(lm, first, queue, emit, cancel, rank, batch_size)
        if cancel is not None and cancel.is_set():
            break
    return n_tokens


def _request(j: Job) -> RowRequest:
    return RowRequest(j.ids, j.max_new_tokens, j.seed, j.stop)


def _run(lm, first: list[Job], queue: deque, emit, cancel, rank: int, batch_size: int) -> int:
    """One batch through the text layer; jobs it takes from ``queue`` for finished rows' places are
    popped from it."""
    jobs = first + list(queue)
    waiting = deque(_request(j) for j in queue)
    n_tokens = 0
    for ev in stream_rows(lm.engine, lm.tokenizer, first[0].params, [_request(j) for j in first], cancel, waiting):
        c = ev.completion
        if c is not None and c.finish_reason != "cancelled":
            n_tokens += c.completion_tokens + (c.finish_reason == "eos")
            emit(_record(jobs[ev.row], c, batch_size, rank, lm.engine.quantize))
    for _ in range(len(jobs) - len(first) - len(waiting)):
        queue.popleft()
    return n_tokens


def _record(j: Job, c: Completion, batch_size: int, rank: int, quantize: str = "none") -> dict:
    rec = {
        "id": j.row.id,
        "model": j.cell.model,
        **({} if quantize == "none" else {"quantize": quantize}),  # the weights the completion came from
        "template": j.cell.template,
        "shots": j.cell.shots,
        "examples": j.example_ids,
        "prompt": j.row.prompt,
    }
    if j.row.variables:
        rec["variables"] = j.row.variables
    rec.update({
        "completion": c.text,
        "finish_reason": c.finish_reason,
        "prompt_tokens": len(j.ids),
        "completion_tokens": c.completion_tokens,
        "seed": j.seed,
        "sampling": j.params.to_dict(),
        "max_new_tokens": j.max_new_tokens,
        "stop": list(j.stop),
    })
    if j.dropped:
        rec["dropped"] = j.dropped
    rec["timings"] = {"prefill_s": round(c.prefill_s, 4), "decode_s": round(c.decode_s, 4), "batch_size": batch_size,
                      "rank": rank}
    return rec
