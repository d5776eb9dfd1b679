"""One prompt, several panes (model x template x shots), one seed and sampler, streaming together.

Panes that share a model run as one batch (``Engine.generate`` keeps each row independent of the
batch); batches of different models are stepped in turn, so every pane advances at once in a
single thread. Each pane is one row of the text layer (``text.stream_rows``): its own stop
strings, streaming decoder and window.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from typing import Iterator

from gptchat.core.session.chat import completion_info, provenance, render_prompt
from gptchat.core.session.pool import Loaded, ModelPool
from gptchat.core.session.settings import ChatSettings
from gptchat.core.errors import UsageError
from gptchat.core.session.store import Store
from gptchat.core.generate.text import Completion, RowRequest, new_seed, stream_rows
from gptchat.core.eval.perplexity import mean_logprob

MAX_PANES = 4


@dataclass
class Pane:
    model: str | None = None
    template: str = "chat"
    shots: int | None = None

    def label(self) -> str:
        shots = "" if self.shots is None else f" {self.shots}-shot"
        return f"{self.model or 'gpt2'} · {self.template}{shots}"


@dataclass
class PaneDelta:
    pane: int
    text: str


@dataclass
class PaneDone:
    pane: int
    completion: Completion
    info: dict = field(default_factory=dict)


def parse_panes(spec: str) -> list[Pane]:
    """``"gpt2:chat:0, gpt2:few-shot:3, ./run"`` -> panes (model[:template[:shots]] separated by commas)."""
    panes = []
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        bits = item.split(":")
        model = bits[0] or None
        template = bits[1] if len(bits) > 1 and bits[1] else "chat"
        shots = None
        if len(bits) > 2 and bits[2]:
            try:
                shots = int(bits[2])
            except ValueError:
                raise UsageError(f"pane {item!r}: shots must be a whole number") from None
        panes.append(Pane(model, template, shots))
    if not 2 <= len(panes) <= MAX_PANES:
        raise UsageError(f"compare takes 2 to {MAX_PANES} panes, got {len(panes)}")
    return panes


def run_compare(
    pool: ModelPool,
    panes: list[Pane],
    text: str,
    settings: ChatSettings,
    cancel: threading.Event,
    store: Store | None = None,
    score: bool = False,
) -> Iterator[PaneDelta | PaneDone]:
    """Stream every pane's reply to ``text``; models are loaded through ``pool`` first (blocking).
    ``score``: each PaneDone's info gets ``mean_logprob``, the completion's under its own model (the
    PaneDones of a model then come when all its panes are done: scoring needs the engine free)."""
    if not text.strip():
        raise UsageError("the prompt is empty")
    seed = settings.seed if settings.seed is not None else new_seed()
    base = replace(settings, seed=seed)
    jobs = []  # (pane index, loaded, rendered, opts, template)
    for i, p in enumerate(panes):
        loaded = pool.load(p.model, settings.device, settings.dtype, settings.quantize)
        s = replace(base, model=p.model, template=p.template, shots=p.shots)
        rendered, tpl = render_prompt(s, loaded.lm.tokenizer, loaded.lm.engine.n_ctx, text, [])
        if i == 0:  # one sampler for every pane: the settings over the first pane's template defaults
            first = s.gen_options(tpl.options, seed=seed)
        opts = replace(first, stop=tuple(rendered.stop))
        jobs.append((i, loaded, rendered, opts, tpl, s))
    conv_id = None
    row_ids: dict[int, str] = {}
    if store is not None:
        conv = store.new_conversation(kind="compare", meta={"panes": [p.__dict__ for p in panes], "seed": seed,
                                                             "settings": base.to_dict()})
        conv_id = conv.id
        store.add_message(conv_id, "user", text)
        for i, loaded, rendered, opts, tpl, s in jobs:
            row_ids[i] = store.add_message(conv_id, "assistant", "", status="streaming", pane=i,
                                           **provenance(loaded, s, tpl, rendered, opts)).id
    groups: dict[int, list] = {}
    for job in jobs:
        groups.setdefault(id(job[1]), []).append(job)
    streams = [_group_stream(g, cancel, score) for g in groups.values()]
    texts: dict[int, list[str]] = {i: [] for i in range(len(panes))}
    while streams:
        for st in list(streams):
            try:
                ev = next(st)
            except StopIteration:
                streams.remove(st)
                continue
            if isinstance(ev, PaneDelta):
                texts[ev.pane].append(ev.text)
            elif store is not None:
                c = ev.completion
                store.update_message(
                    row_ids[ev.pane], content=c.text, status="stopped" if c.finish_reason == "cancelled" else "done",
                    completion_tokens=c.completion_tokens, finish_reason=c.finish_reason, prompt_tokens=c.prompt_tokens,
                    timings={"prefill_s": round(c.prefill_s, 4), "decode_s": round(c.decode_s, 4),
                             "tokens_per_s": round(c.tokens_per_s, 2)})
            yield ev
    if store is not None and conv_id:
        store.touch(conv_id)


def _group_stream(jobs: list, cancel: threading.Event, score: bool = False) -> Iterator[PaneDelta | PaneDone]:
    """One batched generation for panes sharing a model; yields per-pane text and completions."""
    loaded: Loaded = jobs[0][1]
    opts = jobs[0][3]
    rows = [RowRequest(j[2].ids, j[3].max_new_tokens, opts.seed, j[3].stop) for j in jobs]
    held: list[tuple[int, PaneDone]] = []  # with score: until generation ends and frees the engine
    for ev in stream_rows(loaded.lm.engine, loaded.lm.tokenizer, opts.params, rows, cancel):
        pane = jobs[ev.row][0]
        if ev.text:
            yield PaneDelta(pane, ev.text)
        if ev.completion is not None:
            done = PaneDone(pane, ev.completion, completion_info(ev.completion, loaded))
            if not score:
                yield done
            held.append((ev.row, done))
    for row, done in held if score else ():
        done.info["mean_logprob"] = mean_logprob(loaded.lm.engine, jobs[row][2].ids, done.completion.token_ids)
        yield done
