"""The batch job from start to end: the grid, resume, sharding across torchrun ranks, the summary.

The output file is never written in place: results go to a part file beside it
(``out.jsonl.part-R-of-W``, ``part-0-of-1`` for one process), opened only when the first result is
ready, and the finished output replaces the old file in one step (core.outputs). So a bad flag, a
model that does not load or a bad row leaves an existing output exactly as it was, and a killed run
leaves its part for ``--resume``. ``out.jsonl.lock`` keeps a second batch from writing the same output.

Under torchrun (RANK / WORLD_SIZE in the environment) input row ``i`` goes to rank ``i % WORLD_SIZE``
with every grid cell of that row. Each rank appends to its own part file and, when done, writes a
``.done`` marker. A gloo barrier (CPU, no GPU needed) then tells rank 0 that every rank has finished; rank 0 checks the markers, merges the parts
(and, with --resume, the earlier output) into input order through a temporary file and
``os.replace``, and only then deletes the parts. A failed merge leaves the parts in place, and a
rerun with --resume picks them up.

The final file is sorted into input order (row by row, grid cells in command-line order) in one
piece, for one process too, so the output does not depend on batching or on the number of ranks.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable

from gptchat.core.batch import io as bio
from gptchat.core.batch.jobs import Cell, Settings, auto_batch_size, build_jobs, make_grid, plan_groups, run_group
from gptchat.core.batch.io import Row, Skipped
from gptchat.core.errors import BatchOutputError, UsageError
from gptchat.core.generate.loaded import open_model
from gptchat.core.outputs import OutputLock
from gptchat.core.prompting.templates import get_template
from gptchat.core.weights.checkpoints import resolve


@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls) -> "Dist":
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
        except ValueError:
            raise UsageError("RANK and WORLD_SIZE must be whole numbers (torchrun sets them)") from None
        return cls(rank, world) if world > 1 else cls()


@dataclass
class Progress:
    rows_done: int = 0
    rows_total: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0
    model: str = ""

    @property
    def rows_per_s(self) -> float:
        return self.rows_done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass
class Summary:
    output: str | None
    rows: int = 0  # input rows read
    cells: list[dict] = field(default_factory=list)
    done: int = 0  # results written by this run
    resumed: int = 0  # results already in the output, skipped
    bad: list[str] = field(default_factory=list)
    tokens: int = 0
    finish_reasons: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0
    load_s: float = 0.0
    rank: int = 0
    world: int = 1

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        gen_s = self.elapsed_s - self.load_s  # rates leave model loading out
        d["rows_per_s"] = round(self.done / gen_s, 3) if gen_s > 0 else 0.0
        d["tokens_per_s"] = round(self.tokens / gen_s, 2) if gen_s > 0 else 0.0
        d["elapsed_s"], d["load_s"] = round(self.elapsed_s, 3), round(self.load_s, 3)
        return d


def part_path(out: Path, rank: int, world: int) -> Path:
    return out.with_name(f"{out.name}.part-{rank}-of-{world}")


def _marker(part: Path) -> Path:
    return part.with_name(part.name + ".done")


def run(
    rows: list[Row],
    label: str,
    *,
    models: list[str] | None,
    templates: list[str] | None,
    shots: list[int] | None,
    settings: Settings,
    output: Path | None,
    stdout=None,  # a binary stream, when output is None
    fmt: str = "jsonl",
    resume: bool = False,
    batch_size: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    quantize: str | None = None,
    skipped: list[Skipped] | None = None,
    progress: Callable[[Progress], None] = lambda p: None,
    log: Callable[[str], None] = lambda s: None,
    dist: Dist | None = None,
) -> Summary:
    """Run every (row, grid cell) not already in the output; write, merge and order the results."""
    dist = dist or Dist.from_env()
    target = _Target(output, fmt, resume, stdout)
    _check(target, batch_size, dist)
    cells = _grid(models, templates, shots, log)
    skipped = skipped if skipped is not None else []
    read_bad = len(skipped)  # rows every rank read and skipped alike: rank 0 reports them
    summary = Summary(str(output) if output else None, rows=len(rows), rank=dist.rank, world=dist.world,
                      cells=[c.__dict__ for c in cells])
    t0 = time.perf_counter()
    with _lock(target, dist):
        pg = _init_group(dist)
        done = _already_done(target, dist, quantize or "none") if resume else set()
        mine_rows = [r for r in rows if r.index % dist.world == dist.rank]
        pending = {c: [r for r in mine_rows if _key(r, c) not in done] for c in cells}
        summary.resumed = sum(len(mine_rows) - len(p) for p in pending.values())
        job = _Pass(settings, label, skipped, batch_size, device, dtype, quantize, lambda: _open_writer(target, dist),
                    summary, Progress(rows_total=sum(len(p) for p in pending.values())), progress, log, t0, dist.rank)
        try:
            for model in dict.fromkeys(c.model for c in cells):
                mine = [(i, c) for i, c in enumerate(cells) if c.model == model and pending[c]]
                _run_model(job, model, mine, pending)
        finally:
            if output is not None and job.writer is not None:
                job.writer.close()
        summary.bad = [s.reason for s in skipped[read_bad if dist.rank else 0:]]
        _finish(target, summary, _order(rows, cells), dist, pg)
    summary.elapsed_s = time.perf_counter() - t0
    return summary


def _lock(target: "_Target", dist: Dist):
    """One batch per output: rank 0 (or the only process) holds the output's lock, other ranks their part's."""
    if target.output is None:
        return nullcontext()
    held = target.output if dist.rank == 0 else part_path(target.output, dist.rank, dist.world)
    return OutputLock(held, "gptchat batch")


@dataclass
class _Target:
    """Where the results go: a file (resumable) or a stream."""

    output: Path | None
    fmt: str
    resume: bool
    stdout: object = None


@dataclass
class _Pass:
    """What generating the pending rows of every model shares."""

    settings: Settings
    label: str
    skipped: list[Skipped]
    batch_size: int | None
    device: str | None
    dtype: str | None
    quantize: str | None  # None or "none": the checkpoint's weights; "int8": core/model/quant.py
    open_writer: Callable[[], bio.Writer]  # called at the first result: nothing is written before then
    summary: Summary
    prog: Progress
    progress: Callable[[Progress], None]
    log: Callable[[str], None]
    t0: float
    rank: int
    writer: bio.Writer | None = None

    def emit(self, rec: dict) -> None:
        """Write one result and count it."""
        if self.writer is None:
            self.writer = self.open_writer()
        self.writer.write(rec)
        self.summary.done += 1
        reason = rec["finish_reason"]
        self.summary.finish_reasons[reason] = self.summary.finish_reasons.get(reason, 0) + 1
        self.prog.rows_done += 1
        self.prog.tokens += rec["completion_tokens"] + (reason == "eos")
        self.prog.elapsed_s = time.perf_counter() - self.t0
        self.progress(self.prog)


def _check(target: _Target, batch_size: int | None, dist: Dist) -> None:
    if target.fmt not in bio.FORMATS:
        raise UsageError(f"unknown --format {target.fmt!r}; use jsonl or csv")
    if dist.world > 1 and target.output is None:
        raise UsageError("under torchrun every rank writes a part of the output: give -o FILE")
    if target.resume and target.output is None:
        raise UsageError("--resume needs -o FILE (it skips the rows already in that file)")
    if batch_size is not None and batch_size < 1:
        raise UsageError("--batch-size must be 1 or more")


def _grid(models, templates, shots, log) -> list[Cell]:
    """The grid cells, with every template and model checked before a model loads or a row is written."""
    for t in templates or []:
        get_template(t)  # an unknown name fails now, before a model loads
    cells, notes = make_grid(models, templates, shots, lambda t: get_template(t).takes_examples)
    for model in dict.fromkeys(c.model for c in cells):
        resolve(model)  # a missing or non-GPT-2 model fails now, before any row of another model is written
    for n in notes:
        log(f"note: {n}")
    return cells


def _already_done(target: _Target, dist: Dist, quantize: str) -> set[tuple]:
    """The keys already written: the output itself and any parts a crashed or unmerged run left."""
    output, fmt = target.output, target.fmt
    chunks = bio.scan(output, fmt, repair=False)  # the output is only ever replaced whole
    for part in _parts(output):
        chunks += bio.scan(part, fmt, repair=part == part_path(output, dist.rank, dist.world))
    _same_weights(chunks, fmt, output, quantize)
    return {c.key for c in chunks}


def _same_weights(chunks: list, fmt: str, output: Path, quantize: str) -> None:
    """Rows are reused only from the same weights: an output written with another --quantize is
    refused (its rows would pass for this run's, and one file holds one setting: the merge keys rows
    by id and grid cell). JSON records name their quantization; CSV has no column for it."""
    if fmt != "jsonl":
        return
    for c in chunks:
        got = json.loads(c.data).get("quantize", "none")
        if got != quantize:
            raise UsageError(f"{output} holds rows made with --quantize {got}; resume with --quantize {got}, "
                             f"or write the --quantize {quantize} run to another file")


def _parts(output: Path) -> list[Path]:
    """The part files of results beside the output (not their .done markers, .lock files or temporaries)."""
    return sorted(p for p in output.parent.glob(output.name + ".part-*-of-*")
                  if p.suffix not in (".done", ".lock") and not p.name.endswith(".tmp"))


def _open_writer(target: _Target, dist: Dist) -> bio.Writer:
    """This process's part file beside the output (appended to on --resume), else the stream."""
    if target.output is not None:
        part = part_path(target.output, dist.rank, dist.world)
        _marker(part).unlink(missing_ok=True)
        return bio.Writer.open(part, target.fmt, append=target.resume)
    return bio.Writer(target.stdout, target.fmt, header=True)


def _key(row: Row, cell: Cell):
    return bio.record_key({"id": row.id, "model": cell.model, "template": cell.template, "shots": cell.shots})


def _run_model(job: _Pass, model: str, my_cells: list[tuple[int, Cell]], pending: dict) -> None:
    """Load one model and run its pending rows of its grid cells, grouped by sampling parameters."""
    if not my_cells:
        return
    job.log(f"loading {model} ...")
    lm = open_model(model, device=job.device, dtype=job.dtype, quantize=job.quantize)
    job.summary.load_s += lm.load_s
    job.prog.model = model
    jobs = []
    for i, c in my_cells:
        jobs += build_jobs(pending[c], c, i, lm.tokenizer, lm.engine.n_ctx, job.settings, job.skipped, job.label)
    job.prog.rows_total -= sum(len(pending[c]) for _, c in my_cells) - len(jobs)
    bs = job.batch_size or auto_batch_size(lm.engine, jobs)
    for same_params in plan_groups(jobs):
        job.summary.tokens += run_group(lm, same_params, bs, job.emit, rank=job.rank)


def _finish(target: _Target, summary: Summary, order, dist: Dist, pg) -> None:
    """Put the output in input order in one piece: rank 0 merges every rank's part after a barrier."""
    output, fmt = target.output, target.fmt
    if dist.world > 1:
        counts = {k: getattr(summary, k) for k in ("done", "resumed", "bad", "tokens", "finish_reasons")}
        _marker(part_path(output, dist.rank, dist.world)).write_text(json.dumps(counts) + "\n")
        _barrier(pg)
        if dist.rank == 0:
            _add_counts(summary, output, dist.world)
            _merge(output, fmt, dist.world, order, target.resume)
        _barrier(pg)
        _close_group(pg)
    elif output is not None:
        _merge(output, fmt, 1, order, target.resume)


def _order(rows: list[Row], cells: list[Cell]):
    row_pos = {r.id: r.index for r in rows}
    cell_pos = {bio.record_key({"id": "", "model": c.model, "template": c.template, "shots": c.shots})[1:]: i
                for i, c in enumerate(cells)}

    def order(key):
        r, c = row_pos.get(key[0]), cell_pos.get(key[1:])
        return None if r is None or c is None else (r, c)

    return order


def _add_counts(summary: Summary, output: Path, world: int) -> None:
    """Rank 0 reports the whole run: add the other ranks' counts from their .done markers."""
    for r in range(1, world):
        try:
            c = json.loads(_marker(part_path(output, r, world)).read_text())
        except (OSError, ValueError):
            continue  # _merge names the missing marker
        summary.done += c["done"]
        summary.resumed += c["resumed"]
        summary.tokens += c["tokens"]
        summary.bad += c["bad"]
        for k, v in c["finish_reasons"].items():
            summary.finish_reasons[k] = summary.finish_reasons.get(k, 0) + v


def _merge(output: Path, fmt: str, world: int, order, resume: bool) -> None:
    parts = [part_path(output, r, world) for r in range(world)]
    missing = [p.name for p in parts if world > 1 and not _marker(p).exists()]
    if missing:
        raise BatchOutputError(
            f"cannot merge: {', '.join(missing)} did not finish (no .done marker); rerun with --resume"
        )
    chunks = bio.scan(output, fmt, repair=False) if resume else []
    others = [p for p in _parts(output) if p not in parts]
    for p in parts + (others if resume else []):
        chunks += bio.scan(p, fmt, repair=False)
    bio.write_atomic(output, bio.canonical_order(chunks, order), fmt)
    _remove_parts(output)


def _remove_parts(output: Path) -> None:
    """The parts and their markers; the other ranks' .lock files are theirs to remove."""
    for p in output.parent.glob(output.name + ".part-*-of-*"):
        if p.suffix != ".lock":
            p.unlink(missing_ok=True)


# -- torch.distributed, only for barriers ---------------------------------------------------------


def _init_group(dist: Dist):
    if dist.world == 1:
        return None
    import torch.distributed as td

    if not td.is_initialized():
        # generation on other ranks can take hours: the barrier must not time out before they finish
        td.init_process_group("gloo", rank=dist.rank, world_size=dist.world, timeout=timedelta(days=2))
    return td


def _barrier(td) -> None:
    if td is not None:
        td.barrier()


def _close_group(td) -> None:
    if td is not None and td.is_initialized():
        td.destroy_process_group()
