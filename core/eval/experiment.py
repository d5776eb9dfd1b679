"""`gptchat experiment`: base, in-context, finetuned and from-scratch models scored on the same held-out text.

An experiment lives in ``<data>/experiments/NAME/``: ``spec.json`` (what was asked), ``train.txt`` and
``heldout.txt`` (the split, written once), and one ``cells/ROW.json`` per finished row, written
atomically. A rerun skips every row whose cell exists, so a study killed at any point resumes where
it stopped; a finetune killed mid-way resumes its own run (``gptchat runs`` lists it).

The split rule (stated in the output): the documents of DATA (``<|endoftext|>`` separates them in a
text file; a JSONL row is one) are shuffled with ``random.Random(seed)``, and the first
``max(1, round(heldout_fraction * n))`` go to held-out, the rest to training. A single document is
cut instead: its last ``heldout_fraction`` of lines are held out.
"""

from __future__ import annotations

import json
import os
import random
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from gptchat.core.errors import DataError, TrainError, UsageError
from gptchat.core.eval.heldout import HeldOut, documents
from gptchat.core.eval.perplexity import evaluate
from gptchat.core.eval.shots import InContext
from gptchat.core.generate.loaded import LoadedModel, open_model
from gptchat.core.generate.sampling import SamplingParams
from gptchat.core.generate.text import GenOptions, complete
from gptchat.core.paths import get_paths, private_dir
from gptchat.core.text.tokenizer import EOT
from gptchat.core.train import Settings, train
from gptchat.core.train.data import collect_files
from gptchat.core.train.events import read_events
from gptchat.core.train.runs import find_run, run_info
from gptchat.core.train.settings import NAME_RE

PROBES = 3  # probe prompts, taken from the held-out text
PROBE_WORDS = 8  # words of held-out text per probe prompt
SAMPLE_TOKENS = 24
SAMPLE_SEED = 1234  # the same seed for every row: differences come from the models


@dataclass
class Spec:
    name: str
    data: list[str]
    models: list[str] = field(default_factory=lambda: ["gpt2"])
    shots: list[int] = field(default_factory=lambda: [0])
    finetune_steps: int = 0  # 0: no finetuned rows
    lora: bool = False
    from_scratch: str | None = None  # a preset arch for a from-scratch row
    heldout: str | None = None  # a held-out file instead of the split
    heldout_fraction: float = 0.1
    seed: int = 0
    train: dict = field(default_factory=dict)  # more Settings fields for the finetunes (lr, block_size ...)
    device: str | None = None
    dtype: str | None = None

    def check(self) -> None:
        if not NAME_RE.match(self.name):
            raise UsageError(f"--name {self.name!r}: use letters, digits, '.', '_' and '-' (at most 64)")
        if not self.models and not self.from_scratch:
            raise UsageError("nothing to compare: give --models, or --from-scratch ARCH")
        if any(k < 0 for k in self.shots) or self.finetune_steps < 0:
            raise UsageError("--shots and --finetune-steps must be 0 or more")
        if self.from_scratch and not self.finetune_steps:
            raise UsageError("--from-scratch needs --finetune-steps N (the steps to train it for)")


@dataclass(frozen=True)
class Row:
    id: str  # file-safe: the cell's name
    kind: str  # base | shots | finetuned | scratch
    model: str
    shots: int = 0

    @property
    def label(self) -> str:
        return {"base": self.model, "shots": f"{self.model} +{self.shots} shots",
                "finetuned": f"{self.model} finetuned", "scratch": f"{self.model} from scratch"}[self.kind]


def rows(spec: Spec) -> list[Row]:
    out = []
    for m in spec.models:
        slug = _slug(m)
        out += [Row(f"base-{slug}", "base", m)]
        out += [Row(f"shots{k}-{slug}", "shots", m, k) for k in spec.shots if k > 0]
        if spec.finetune_steps:
            out.append(Row(f"finetuned-{slug}", "finetuned", m))
    if spec.from_scratch:
        out.append(Row(f"scratch-{spec.from_scratch}", "scratch", spec.from_scratch))
    return out


def _slug(spec: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in spec.rstrip("/").split("/")[-1])[:48] or "model"


# -- the folder and the split ---------------------------------------------------------------------


def folder(name: str) -> Path:
    return get_paths().data / "experiments" / name


def _write(path: Path, text: str) -> None:
    """Atomically: a cell is there whole or not at all (a SIGKILL mid-write leaves only a .tmp)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def open_experiment(spec: Spec) -> Path:
    """The experiment's folder with its spec and split; a rerun must ask for the same study."""
    spec.check()
    root = private_dir(folder(spec.name))
    private_dir(root / "cells")
    saved = root / "spec.json"
    if saved.exists():
        old = json.loads(saved.read_text())
        if old != asdict(spec):
            raise UsageError(f"experiment {spec.name!r} exists with other settings; use another --name, or "
                             f"`gptchat experiment --show {spec.name}`")
    else:
        train, held = split(spec)
        _write(root / "train.txt", EOT.join(train))
        _write(root / "heldout.txt", EOT.join(held))
        _write(saved, json.dumps(asdict(spec), indent=2))
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


def split_rule(spec: Spec) -> str:
    if spec.heldout:
        return f"held-out: {spec.heldout}; training: all of {', '.join(spec.data)}"
    return (f"documents shuffled with seed {spec.seed}, the first {spec.heldout_fraction:.0%} held out "
            f"(one document: its last {spec.heldout_fraction:.0%} of lines)")


def load_spec(name: str) -> Spec:
    path = folder(name) / "spec.json"
    if not path.exists():
        raise UsageError(f"no experiment named {name!r} in {path.parent.parent}")
    return Spec(**json.loads(path.read_text()))


def load_cells(root: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((root / "cells").glob("*.json"))}


# -- running --------------------------------------------------------------------------------------


@dataclass
class Context:
    spec: Spec
    root: Path
    heldout: HeldOut
    train_docs: list[str]
    log: Callable[[str], None]


def run(spec: Spec, log: Callable[[str], None] = lambda s: None) -> dict[str, dict]:
    """Compute every missing cell; returns all cells by row id."""
    root = open_experiment(spec)
    held = HeldOut([d for d in (root / "heldout.txt").read_text().split(EOT) if d.strip()], "heldout.txt")
    train_docs = [d for d in (root / "train.txt").read_text().split(EOT) if d.strip()]
    ctx = Context(spec, root, held, train_docs, log)
    log(f"split: {split_rule(spec)} -> {len(train_docs)} training, {len(held.docs)} held-out documents")
    loaded: tuple[str, LoadedModel] | None = None
    for row in rows(spec):
        path = root / "cells" / f"{row.id}.json"
        if path.exists():
            log(f"{row.label}: cached")
            continue
        if row.kind in ("base", "shots") and (loaded is None or loaded[0] != row.model):
            loaded = (row.model, open_model(row.model, device=spec.device, dtype=spec.dtype))
        cell = _cell(ctx, row, loaded[1] if row.kind in ("base", "shots") else None)
        _write(path, json.dumps(cell, indent=2))
        log(f"{row.label}: loss {cell['loss']:.4f}, ppl {cell['ppl']:.2f}")
    return load_cells(root)


def _cell(ctx: Context, row: Row, lm: LoadedModel | None) -> dict:
    _reset_peak()
    prepare_s, run_name, curve = 0.0, None, []
    if lm is None:
        t0 = time.perf_counter()
        run_name = _train(ctx, row)
        prepare_s = time.perf_counter() - t0
        curve = _curve(run_name)
        lm = open_model(run_name, device=ctx.spec.device, dtype=ctx.spec.dtype)
    shots = InContext(row.shots, [{"text": d} for d in ctx.train_docs], lm.tokenizer, seed=ctx.spec.seed) \
        if row.shots else None
    ctx.log(f"{row.label}: scoring {len(ctx.heldout.docs)} held-out documents")
    s = evaluate(lm, ctx.heldout, shots=shots)
    return {
        "row": row.id, "label": row.label, "kind": row.kind, "model": row.model, "shots": row.shots,
        "run": run_name, "loss": s.loss, "ppl": s.ppl, "bits_per_byte": s.bits_per_byte, "word_ppl": s.word_ppl,
        "tokens": s.tokens, "params": s.params, "prepare_s": prepare_s, "score_s": s.seconds,
        "peak_mem": _peak(lm), "context_tokens": max(s.context_tokens, default=0), "curve": curve,
        "samples": samples(lm, probes(ctx.heldout), shots),
    }


def _train(ctx: Context, row: Row) -> str:
    """The row's finetune (or from-scratch run) through the ordinary training machinery."""
    name = f"{ctx.spec.name}-{row.id}"[:64]
    try:
        info = run_info(find_run(name))
    except TrainError:  # no such run yet
        info = None
    if info is not None and info["state"] == "finished":
        return name
    if info is not None and info["saved_step"]:
        ctx.log(f"{row.label}: resuming run {name} from step {info['saved_step']}")
        result = train(resume=name)
    else:
        if info is not None:  # killed before its first checkpoint: nothing to resume
            name = f"{name[:58]}-{int(time.time()) % 100000}"
        ctx.log(f"{row.label}: training run {name} for {ctx.spec.finetune_steps} steps")
        scratch = row.kind == "scratch"
        s = Settings(data=[str(ctx.root / "train.txt")], model=None if scratch else row.model, from_scratch=scratch,
                     arch=row.model if scratch else None, steps=ctx.spec.finetune_steps, lora=ctx.spec.lora and not scratch,
                     name=name, device=ctx.spec.device, dtype=ctx.spec.dtype, seed=ctx.spec.seed,
                     **{"sample_tokens": 0, **ctx.spec.train})
        result = train(s)
    if result.status not in ("finished", "early-stopped"):
        raise UsageError(f"the run {name} ended {result.status}; rerun the experiment to resume it")
    return result.name


def _curve(run_name: str) -> list[list[float]]:
    events = read_events(find_run(run_name) / "events.jsonl")
    return [[e["step"], e["loss"]] for e in events if e.get("type") == "step" and "loss" in e]


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


def _peak(lm: LoadedModel) -> int:
    """Peak bytes: the accelerator's since the row started, else the process's peak RSS so far."""
    if lm.engine.device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(lm.engine.device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def best(cells: dict[str, dict]) -> str | None:
    return min(cells, key=lambda k: cells[k]["loss"]) if cells else None
