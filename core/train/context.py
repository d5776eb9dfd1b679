"""A run's context: what a run knows before its model is built, and the folder it lives in.

``open_run`` does the cheap work first (settings, device, data, tokenizer, model shape, the resolved
numbers), so a bad option or a bad file fails before anything big is loaded; ``name_folder`` picks
the run's folder (refusing a taken name early) and ``create_folder`` makes it only once the model is
built and the plan checked, so a start that fails leaves no folder behind. The ``Run`` travels
through every step of the loop (loop.py) and into every checkpoint (checkpoint.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from gptchat.core.errors import TrainError, UsageError
from gptchat.core.model.config import PRESETS, GPTConfig
from gptchat.core.model.device import pick_device, pick_dtype
from gptchat.core.prompting.templates import get_template
from gptchat.core.text.tokenizer import load_tokenizer
from gptchat.core.train import runs
from gptchat.core.train.data import Batches, Dataset, Split, prepare, scan, split
from gptchat.core.train.dist import Dist
from gptchat.core.train.evaluate import amp_context, probe_prompts
from gptchat.core.train.events import EventLog, Status
from gptchat.core.train.settings import Resolved, Settings, resolve
from gptchat.core.weights.checkpoints import Checkpoint
from gptchat.core.weights.checkpoints import resolve as resolve_ckpt


@dataclass
class Run:
    """Everything a run's steps share: what was asked, where it runs, the data, how it reports."""

    s: Settings
    r: Resolved
    dist: Dist
    device: torch.device
    amp_dtype: torch.dtype
    amp: Callable  # () -> the autocast context for a forward pass
    cfg: GPTConfig
    ck: Checkpoint | None  # the base checkpoint; None when training from scratch
    tok: object  # the tokenizer (core.text.tokenizer)
    ds: Dataset
    sp: Split
    resuming: bool
    batches: Batches  # which windows each step reads (a pure function of seed and step)
    probes: list[list[int]]  # the fixed prompts sampled at each eval
    warnings: list[str] = field(default_factory=list)
    folder: Path | None = None
    log: EventLog | None = None
    status: Status | None = None
    lock: runs.RunLock | None = None  # held for the whole run by the process that writes the folder
    created: bool = True  # False until a new run's folder exists (create_folder)

    @property
    def tok_dir(self) -> Path | None:
        """Where the vocabulary files to copy into each checkpoint live."""
        if self.ck is not None:
            return self.ck.folder
        source = Path(self.tok.source)
        return source.parent if source.is_file() else None


@dataclass
class Trainee:
    """The model side of a run: the module, what runs it forward, and what updates it."""

    raw: torch.nn.Module  # the plain module (adapters attached with --lora); what checkpoints read
    net: torch.nn.Module  # raw wrapped for DDP/FSDP (raw itself in one process)
    fwd: Callable  # net, compiled with --compile
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    trainable: list[torch.nn.Parameter]


@dataclass
class Progress:
    """The counters a checkpoint saves (trainer.pt) and a resume restores, beside the weights."""

    step: int = 0
    best_val_loss: float | None = None
    bad_evals: int = 0
    tokens_seen: int = 0
    elapsed: float = 0.0  # seconds trained in earlier sessions
    saved_step: int = 0  # the step of the newest "last" checkpoint
    t_saved: float = field(default_factory=time.monotonic)  # when it was saved (or this session began)
    t_session: float = field(default_factory=time.time)
    step_times: list[float] = field(default_factory=list)  # this session's, for tokens/s and the ETA

    def elapsed_now(self) -> float:
        return self.elapsed + (time.time() - self.t_session)


def settings_for(settings: Settings | None, resume: str | None, steps: int | None):
    """(settings, run folder or None, run.json or None): a new run's checked settings, or a saved run's.

    A saved run with no checkpoint yet (killed before its first save) is started over by open_run
    with these same settings: resuming it never dead-ends.
    """
    if resume is None:
        if settings is None:
            raise UsageError("nothing to train: give data files or --resume NAME")
        settings.check()
        settings.data = [str(Path(p).expanduser().resolve()) for p in settings.data]
        return settings, None, None
    folder = runs.find_run(resume)
    meta = runs.load_run_json(folder)
    s = Settings.from_dict(meta["settings"])
    if settings is not None and settings.device is not None:
        s.device = settings.device
    if steps is not None:
        if steps <= 0:
            raise UsageError(f"--steps must be > 0, not {steps}")
        done = runs.last_step(folder)
        if steps <= done:  # nothing to train: it went on to print a plan and "finished at step N"
            raise UsageError(f"--steps {steps}: run {folder.name!r} is at step {done} already; --steps is the total "
                             f"to reach, so give more than {done} to train it further")
        meta["resolved"]["steps"] = steps
    return s, folder, meta


def open_run(s: Settings, meta: dict | None, dist: Dist, resume: str | None, folder: Path | None = None) -> Run:
    """Device, data, tokenizer and resolved numbers: every cheap check, before a model is loaded.

    ``folder``: the saved run's (with ``meta``, its run.json); it resumes from its ``last`` checkpoint,
    or starts over with its saved settings when it has none.
    """
    device, amp_dtype = _device(s, dist)
    warnings: list[str] = []
    scanned = scan(s.data, s.format, warn=warnings.append)
    if s.template is not None:
        get_template(s.template)
    cfg, ck, tok = _model_shape(s)
    ds = None
    if dist.main:
        ds = prepare(s.data, tok, s.format, s.template, scanned=scanned)
    dist.barrier()  # rank 0 tokenized the data into the cache; the others read it from there
    if ds is None:
        ds = prepare(s.data, tok, s.format, s.template, scanned=scanned)
    if meta is not None and meta.get("data", {}).get("key") not in (None, ds.key):
        raise TrainError(f"the training data changed since run {resume!r} started; start a new run instead")
    if meta is not None:
        r = Resolved(**meta["resolved"])
    else:
        r = resolve(s, n_positions=cfg.n_positions, n_params=cfg.n_params(), n_tokens=ds.n_tokens,
                    world=dist.world, device_type=device.type)
    resuming = folder is not None and runs.link_target(folder, "last") is not None
    if folder is not None and not resuming:
        warnings.append(f"run {resume!r} has no checkpoint yet: starting it over from step 0 with its saved settings")
    if r.world != dist.world:
        warnings.append(f"the run started with {r.world} process(es), now {dist.world}: the batch order changes")
        r.world = dist.world
    sp = split(ds.n_tokens, r.block_size, s.val_fraction)
    train_tokens = sp.train[1] - sp.train[0]
    if train_tokens < 4 * r.block_size:
        warnings.append(
            f"only {train_tokens} training tokens ({train_tokens / r.block_size:.1f} blocks of {r.block_size}): "
            "the model will overfit; add data or lower --block-size"
        )
    batches = Batches(ds, sp.train, r.block_size, s.seed)
    probes = probe_prompts(ds, sp.val, tok.eot_id)[:2] if s.sample_tokens else []
    return Run(s, r, dist, device, amp_dtype, amp_context(device, amp_dtype), cfg, ck, tok, ds, sp,
               resuming=resuming, batches=batches, probes=probes, warnings=warnings, folder=folder)


def _device(s: Settings, dist: Dist) -> tuple[torch.device, torch.dtype]:
    device = dist.device_for(pick_device(s.device))
    dist.init(device)
    amp_dtype = pick_dtype(s.dtype, device)
    if device.type == "cpu" and amp_dtype == torch.float16:
        raise UsageError("--dtype fp16 training is not supported on CPU; use fp32 (default) or bf16")
    if device.type == "mps" and amp_dtype != torch.float32:
        amp_dtype = torch.float32  # autocast on mps is incomplete; train in fp32
    return device, amp_dtype


def _model_shape(s: Settings):
    """(config, base checkpoint or None, tokenizer): the checkpoint is resolved, not loaded."""
    if s.from_scratch:
        cfg = replace(PRESETS[s.arch or "tiny"], dropout=s.dropout)
        ck, tok = None, load_tokenizer(None)
    else:
        ck = resolve_ckpt(s.model or "gpt2")
        cfg, tok = ck.config, load_tokenizer(ck.folder, ck.config.vocab_size)
    if tok.n_vocab > cfg.vocab_size:
        raise TrainError(f"the tokenizer has {tok.n_vocab} tokens but the model only {cfg.vocab_size}")
    return cfg, ck, tok


def name_folder(run: Run, meta: dict | None, steps: int | None) -> None:
    """Where the run lives: a new run's name is checked free now (its folder is made by create_folder,
    once the run is known to start); a resumed run's folder is there already (locked by the caller)."""
    s, dist = run.s, run.dist
    if run.folder is not None:
        if dist.main and steps is not None:
            runs.save_run_json(run.folder, meta)  # the new --steps (settings_for put it in meta)
        return
    name = dist.broadcast_obj(s.name or (runs.default_name(s.data) if dist.main else None))
    s.name = name
    if dist.main and runs.check_free(name):
        run.warnings.append(f"replacing folder {name!r}, left by a run that did not start (no run.json, no checkpoint)")
    run.folder, run.created = runs.runs_root() / name, False


def create_folder(run: Run) -> None:
    """Make a new run's folder (rank 0), with its run.json and lock, now that the run can start."""
    if run.created:
        return
    run.created = True
    if not run.dist.main:
        return
    data = {"key": run.ds.key, **{k: run.ds.meta[k] for k in ("files", "n_tokens", "n_docs", "format")}}
    meta = {"settings": run.s.to_dict(), "resolved": run.r.to_dict(), "data": data, "created": time.time()}
    run.folder, run.lock = runs.create_run(run.folder.name, meta)
