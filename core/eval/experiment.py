"""`gptchat experiment`: base, in-context, finetuned and from-scratch models scored on the same held-out text.

An experiment lives in ``<data>/experiments/NAME/``: ``spec.json`` (what was asked), ``train.txt`` and
``heldout.txt`` (the split, written once), and one ``cells/ROW.json`` per finished row, written
atomically. A rerun skips every row whose cell exists, so a study killed at any point resumes where
it stopped; a finetune killed mid-way resumes its own run (``gptchat runs`` lists it). ``state.json``
says whether the study is running (with its pid), finished, stopped (SIGTERM or Ctrl+C: the running
finetune saves first) or failed; "running" with a dead pid is read back as killed.

Under torchrun rank 0 alone writes the folder and scores; before each finetune it tells the other
ranks what to train (a broadcast), and they all run it with DDP through ``train``. ``train`` destroys
its process group when it ends and torchrun's rendezvous cannot be joined twice, so each finetune
gets a new group on torchrun's store under a prefix of its own.

The split rule (stated in the output): the documents of DATA (``<|endoftext|>`` separates them in a
text file; a JSONL row is one) are shuffled with ``random.Random(seed)``, and the first
``max(1, round(heldout_fraction * n))`` go to held-out, the rest to training. A single document is
cut instead: its last ``heldout_fraction`` of lines are held out.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as tdist

from gptchat.core.errors import DataError, GptchatError, TrainError, UsageError
from gptchat.core.eval.heldout import HeldOut, documents
from gptchat.core.eval.perplexity import evaluate
from gptchat.core.eval.shots import InContext, text_cut
from gptchat.core.eval.study import Row, Spec, folder, load_cells, rows, set_state, split_rule, write
from gptchat.core.generate.loaded import LoadedModel, open_model
from gptchat.core.generate.sampling import SamplingParams
from gptchat.core.generate.text import GenOptions, complete
from gptchat.core.model.device import pick_device
from gptchat.core.paths import private_dir
from gptchat.core.session.pool import peak_rss, reset_peak_rss
from gptchat.core.stops import term_as_interrupt
from gptchat.core.text.tokenizer import EOT
from gptchat.core.train import Settings, train
from gptchat.core.train.data import collect_files
from gptchat.core.train.dist import Dist
from gptchat.core.train.events import read_events
from gptchat.core.train.runs import find_run, run_info

PROBES = 3  # probe prompts, taken from the held-out text
PROBE_WORDS = 8  # words of held-out text per probe prompt
SAMPLE_TOKENS = 24
SAMPLE_SEED = 1234  # the same seed for every row: differences come from the models


class Stopped(GptchatError):
    """The study was asked to stop (SIGTERM, Ctrl+C); its finished cells are kept."""


# -- the folder and the split ---------------------------------------------------------------------


def open_experiment(spec: Spec) -> Path:
    """The experiment's folder with its spec and split; a rerun must ask for the same study."""
    spec.check()
    root = folder(spec.name)
    saved = root / "spec.json"
    if saved.exists():
        old = json.loads(saved.read_text())
        if old != asdict(spec):
            raise UsageError(f"experiment {spec.name!r} exists with other settings; use another --name, or "
                             f"`gptchat experiment --show {spec.name}`")
    else:
        train, held = split(spec)  # bad data fails here, before the study's folder exists
        private_dir(root)
        write(root / "train.txt", EOT.join(train))
        write(root / "heldout.txt", EOT.join(held))
        write(saved, json.dumps(asdict(spec), indent=2))
    private_dir(root / "cells")
    return root


def split(spec: Spec) -> tuple[list[str], list[str]]:
    docs = [d for f in collect_files(spec.data, "text") for d in documents(f)]
    if spec.heldout:
        held = [d for f in collect_files([spec.heldout], "text") for d in documents(f)]
        return docs, held
    if len(docs) == 1:
        lines = docs[0].split("\n")
        cut = len(lines) - max(1, round(spec.heldout_fraction * len(lines)))
        if cut < 1:
            raise DataError(f"{spec.data[0]} is one line; give more text or --heldout FILE")
        return ["\n".join(lines[:cut])], ["\n".join(lines[cut:])]
    random.Random(spec.seed).shuffle(docs)
    n = max(1, round(spec.heldout_fraction * len(docs)))
    return docs[n:], docs[:n]


# -- running --------------------------------------------------------------------------------------


@dataclass
class Context:
    spec: Spec
    root: Path
    heldout: HeldOut
    train_docs: list[str]
    log: Callable[[str], None]
    ranks: "Ranks"
    progress: Callable[[str, int, int], None] | None = None  # (row label, windows done, windows) while a row scores


def run(spec: Spec, log: Callable[[str], None] = lambda s: None,
        progress: Callable[[str, int, int], None] | None = None) -> dict[str, dict] | None:
    """Compute every missing cell; returns all cells by row id (None on a torchrun rank other than 0,
    which only takes part in the finetunes). Raises Stopped after SIGTERM or Ctrl+C. ``progress(row label,
    windows done, windows)`` after each batch of a row's scoring."""
    ranks = Ranks(Dist.from_env(), spec.device)
    if not ranks.dist.main:
        ranks.follow()
        return None
    root = open_experiment(spec)
    try:
        with term_as_interrupt():  # SIGTERM stops the study as Ctrl+C does
            set_state(root, "running")
            _run_rows(spec, root, ranks, log, progress)
            ranks.order(None)
            set_state(root, "finished")
    except (Stopped, KeyboardInterrupt):
        set_state(root, "stopped")
        if not ranks.training:  # the other ranks wait for an order: let them go
            ranks.order(None)
        raise Stopped(f"study {spec.name!r} stopped; its finished rows are kept: run the same command "
                      "again to resume it") from None
    except BaseException as e:
        set_state(root, "failed", error=str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise
    finally:
        ranks.close()
    return load_cells(root)


def _run_rows(spec: Spec, root: Path, ranks: "Ranks", log: Callable[[str], None],
              progress: Callable[[str, int, int], None] | None = None) -> None:
    held = HeldOut([d for d in (root / "heldout.txt").read_text().split(EOT) if d.strip()], "heldout.txt")
    train_docs = [d for d in (root / "train.txt").read_text().split(EOT) if d.strip()]
    ctx = Context(spec, root, held, train_docs, log, ranks, progress)
    log(f"split: {split_rule(spec)} -> {len(train_docs)} training, {len(held.docs)} held-out documents")
    loaded: tuple[str, LoadedModel] | None = None
    for row in rows(spec):
        path = root / "cells" / f"{row.id}.json"
        if path.exists():
            log(f"{row.label}: cached")
            continue
        set_state(root, "running", row=row.id)
        if row.kind in ("base", "shots") and (loaded is None or loaded[0] != row.model):
            loaded = None  # the previous model, and the packed copy a long eval built, go before the next loads
            loaded = (row.model, open_model(row.model, device=spec.device, dtype=spec.dtype))
        cell = _cell(ctx, row, loaded[1] if row.kind in ("base", "shots") else None)
        write(path, json.dumps(cell, indent=2))
        log(f"{row.label}: loss {cell['loss']:.4f}, ppl {cell['ppl']:.2f}")


class Ranks:
    """Rank 0 announces each finetune to the other torchrun ranks, and every rank runs it (DDP).

    Each announcement needs a process group, and ``train`` destroys the one it ran in; torchrun's
    env:// rendezvous cannot be joined twice, so the store is joined once and every group gets a
    prefix of its own on it. The others wait while rank 0 scores: the groups' timeout is long.
    """

    TIMEOUT = timedelta(hours=24)

    def __init__(self, dist: Dist, device: str | None):
        self.dist, self.device, self.store, self.groups, self.training = dist, device, None, 0, False

    def order(self, order: dict | None = None) -> dict | None:
        """Rank 0: send ``order`` (None: the study is over); the others: receive it."""
        if not self.dist.enabled:
            return order
        if not tdist.is_initialized():
            self._group()
        box = [order]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def _group(self) -> None:
        device = self.dist.device_for(pick_device(self.device))
        if self.store is None:
            self.store = next(tdist.rendezvous("env://", self.dist.rank, self.dist.world, timeout=self.TIMEOUT))[0]
        if device.type == "cuda":
            torch.cuda.set_device(device)
        self.groups += 1
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=self.dist.rank,
                                 world_size=self.dist.world, timeout=self.TIMEOUT,
                                 store=tdist.PrefixStore(f"gptchat-experiment/{self.groups}", self.store))

    def train(self, order: dict):
        """The announced finetune, on this rank: a new run's settings, or the run to resume."""
        self.training = True
        try:
            return train(Settings.from_dict(order["settings"])) if "settings" in order else train(resume=order["resume"])
        finally:
            self.training = False

    def follow(self) -> None:
        """A rank other than 0: take part in every finetune rank 0 announces, until it says the end."""
        try:
            while (order := self.order()) is not None:
                self.train(order)
        finally:
            self.close()

    def close(self) -> None:
        if self.dist.enabled and tdist.is_initialized():
            tdist.destroy_process_group()


def _cell(ctx: Context, row: Row, lm: LoadedModel | None) -> dict:
    _reset_peak()
    prepare_s, run_name, curve, world = 0.0, None, [], 1
    if lm is None:
        t0 = time.perf_counter()
        run_name = _train(ctx, row)
        prepare_s = time.perf_counter() - t0
        curve, world = _run_facts(run_name)
        lm = open_model(run_name, device=ctx.spec.device, dtype=ctx.spec.dtype)
    shots = InContext(row.shots, [{"text": d} for d in ctx.train_docs], lm.tokenizer, seed=ctx.spec.seed,
                      cut=text_cut(lm.engine.n_ctx, row.shots)) if row.shots else None
    if shots is not None and shots.excerpts:
        ctx.log(f"{row.label}: {shots.excerpt_note('training documents as examples')}")
    ctx.log(f"{row.label}: scoring {len(ctx.heldout.docs)} held-out documents")
    tick = ctx.progress
    s = evaluate(lm, ctx.heldout, shots=shots, progress=(lambda d, n: tick(row.label, d, n)) if tick else None)
    return {
        "row": row.id, "label": row.label, "kind": row.kind, "model": row.model, "shots": row.shots,
        "run": run_name, "world": world, "loss": s.loss, "ppl": s.ppl, "bits_per_byte": s.bits_per_byte,
        "word_ppl": s.word_ppl, "tokens": s.tokens, "params": s.params, "prepare_s": prepare_s, "score_s": s.seconds,
        "peak_mem": _peak(lm), "context_tokens": max(s.context_tokens, default=0), "curve": curve,
        "samples": samples(lm, probes(ctx.heldout), shots),
    }


def _train(ctx: Context, row: Row) -> str:
    """The row's finetune (or from-scratch run) through the ordinary training machinery, on every rank."""
    name = f"{ctx.spec.name}-{row.id}"[:64]
    try:
        info = run_info(find_run(name))
    except TrainError:  # no such run yet
        info = None
    if info is not None and info["state"] == "finished":
        return name
    if info is not None and info["saved_step"]:
        ctx.log(f"{row.label}: resuming run {name} from step {info['saved_step']}")
        order: dict = {"resume": name}
    else:
        if info is not None:  # killed before its first checkpoint: nothing to resume
            name = f"{name[:58]}-{int(time.time()) % 100000}"
        ctx.log(f"{row.label}: training run {name} for {ctx.spec.finetune_steps} steps"
                + (f" on {ctx.ranks.dist.world} processes" if ctx.ranks.dist.enabled else ""))
        scratch = row.kind == "scratch"
        s = Settings(data=[str(ctx.root / "train.txt")], model=None if scratch else row.model, from_scratch=scratch,
                     arch=row.model if scratch else None, steps=ctx.spec.finetune_steps, lora=ctx.spec.lora and not scratch,
                     name=name, device=ctx.spec.device, dtype=ctx.spec.dtype, seed=ctx.spec.seed,
                     **{"sample_tokens": 0, **ctx.spec.train})
        order = {"settings": s.to_dict()}
    ctx.ranks.order(order)
    result = ctx.ranks.train(order)
    if result.status == "interrupted":  # SIGTERM or Ctrl+C: the run saved its step; a rerun resumes it
        raise Stopped(f"the run {result.name} stopped at step {result.step}")
    if result.status not in ("finished", "early-stopped"):
        raise UsageError(f"the run {name} ended {result.status}; rerun the experiment to resume it")
    return result.name


def _run_facts(run_name: str) -> tuple[list[list[float]], int]:
    """(the run's loss curve [[step, loss] ...], the number of processes its last session ran on)."""
    events = read_events(find_run(run_name) / "events.jsonl")
    starts = [e for e in events if e.get("type") == "start"]
    curve = [[e["step"], e["loss"]] for e in events if e.get("type") == "step" and "loss" in e]
    return curve, int(starts[-1].get("world", 1)) if starts else 1


def probes(held: HeldOut) -> list[str]:
    """The first words of up to PROBES held-out documents (or of the held-out text's parts)."""
    docs = held.docs if len(held.docs) >= PROBES else [
        w for d in held.docs for w in _thirds(d)]
    return [" ".join(d.split()[:PROBE_WORDS]) for d in docs[:PROBES] if d.split()]


def _thirds(text: str) -> list[str]:
    words = text.split()
    n = max(1, len(words) // PROBES)
    return [" ".join(words[i : i + n]) for i in range(0, len(words), n)]


def samples(lm: LoadedModel, prompts: list[str], shots: InContext | None) -> list[dict]:
    out = []
    for p in prompts:
        ids = lm.tokenizer.encode(p)
        pre = shots.prefix(0) if shots else []
        room = lm.engine.n_ctx - SAMPLE_TOKENS - len(ids)
        full = (pre[-room:] if room > 0 else []) + ids
        opts = GenOptions(SamplingParams(temperature=0.8, top_k=40), SAMPLE_TOKENS, SAMPLE_SEED)
        out.append({"prompt": p, "completion": complete(lm.engine, lm.tokenizer, full, opts).text})
    return out


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()  # each row's own peak (a 3M model's row had shown the finetune's before it)


def _peak(lm: LoadedModel) -> int:
    """Peak bytes since the row started: the accelerator's, else the process's resident memory (where Linux can
    reset it; elsewhere the process's peak so far)."""
    if lm.engine.device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(lm.engine.device))
    return peak_rss()
