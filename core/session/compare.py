"""One prompt, several panes (model x template x shots), one seed and sampler, streaming together.

Panes that share a model run as one batch (``Engine.generate`` keeps each row independent of the
batch); batches of different models are stepped in turn, so every pane advances at once in a
single thread. Each pane keeps its own stop strings and streaming decoder.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from typing import Iterator

from gptchat.core.session.chat import ChatSession, ChatSettings, Loaded, ModelPool, completion_info, provenance
from gptchat.core.errors import UsageError
from gptchat.core.session.store import Store
from gptchat.core.generate.text import Completion, StopMatcher, new_seed

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
) -> Iterator[PaneDelta | PaneDone]:
    """Stream every pane's reply to ``text``; models are loaded through ``pool`` first (blocking)."""
    if not text.strip():
        raise UsageError("the prompt is empty")
    seed = settings.seed if settings.seed is not None else new_seed()
    base = replace(settings, seed=seed)
    jobs = []  # (pane index, loaded, rendered, opts, template)
    for i, p in enumerate(panes):
        loaded = pool.load(p.model, settings.device, settings.dtype)
        s = replace(base, model=p.model, template=p.template, shots=p.shots)
        sess = ChatSession(None, s)
        rendered, tpl = sess.render(loaded.lm.tokenizer, loaded.lm.engine.n_ctx, text, [])
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
    streams = [_group_stream(g, cancel) for g in groups.values()]
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


def _group_stream(jobs: list, cancel: threading.Event) -> Iterator[PaneDelta | PaneDone]:
    """One batched generation for panes sharing a model; yields per-pane text and completions."""
    loaded: Loaded = jobs[0][1]
    engine, tok = loaded.lm.engine, loaded.lm.tokenizer
    opts = jobs[0][3]
    prompts = [j[2].ids for j in jobs]
    fit = engine.check_window(max(len(p) for p in prompts), opts.max_new_tokens)
    decs = [tok.stream_decoder() for _ in jobs]
    matchers = [StopMatcher(j[3].stop) for j in jobs]
    ids: list[list[int]] = [[] for _ in jobs]
    parts: list[list[str]] = [[] for _ in jobs]
    reason = ["window" if fit < opts.max_new_tokens else "length"] * len(jobs)
    finished = [False] * len(jobs)
    t0 = time.perf_counter()
    t_first = None
    gen = engine.generate(prompts, opts.params, fit, seeds=[opts.seed] * len(jobs), cancel=cancel)
    try:
        for step in gen:
            t_first = t_first or time.perf_counter()
            for r, tokid in enumerate(step.tokens):
                if finished[r]:
                    continue
                if tokid == engine.eos_id:
                    finished[r], reason[r] = True, "eos"
                    continue
                ids[r].append(tokid)
                out = matchers[r].push(decs[r].push(tokid))
                if out:
                    parts[r].append(out)
                    yield PaneDelta(jobs[r][0], out)
                if matchers[r].hit:
                    finished[r], reason[r] = True, "stop"
            if all(finished):
                break
    finally:
        gen.close()
    t1 = time.perf_counter()
    for r, job in enumerate(jobs):
        if not finished[r] and cancel.is_set() and len(ids[r]) < fit:
            reason[r] = "cancelled"
        if not matchers[r].hit:
            tail = matchers[r].push(decs[r].flush()) + matchers[r].flush()
            if tail:
                parts[r].append(tail)
                yield PaneDelta(job[0], tail)
        comp = Completion("".join(parts[r]), ids[r], reason[r], len(prompts[r]), opts.seed,
                          (t_first or t1) - t0, t1 - (t_first or t1))
        yield PaneDone(job[0], comp, completion_info(comp, loaded))
