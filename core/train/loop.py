"""The training loop: nanoGPT's, made safe to stop, kill and resume.

``train(settings)`` starts a run, ``train(resume="NAME")`` continues one. Everything a run does is
reported as events (events.py); the function returns a ``Result`` for callers and tests.

A run goes through named steps over its context (context.py): open (settings, device, data), build
(model, plan, optimizer), restore (checkpoint.py: optimizer, scaler, RNG, counters), create its
folder (only now: a start that fails leaves none), then per step
``_step`` (one optimizer step with accumulation and clipping), ``_evaluate`` (val loss, samples)
and ``checkpoint.save`` (every ``save_every`` steps, and whenever ``save_minutes`` have passed).

Resume is exact: the batch order is a pure function of (seed, step) (data.Batches), the learning
rate a pure function of step (settings.lr_at), and the checkpoint holds the fp32 weights, the
optimizer state, the GradScaler, and the RNG states. A resumed run produces the same losses as one
that never stopped.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gptchat.core.errors import TrainError
from gptchat.core.model.gpt import GPT
from gptchat.core.train import checkpoint, lora, runs
from gptchat.core.train.checkpoint import ppl
from gptchat.core.train.context import Progress, Run, Trainee, create_folder, name_folder, open_run, settings_for
from gptchat.core.train.dist import Dist, wrap
from gptchat.core.train.evaluate import head_loss, loss_fn, sample, val_loss
from gptchat.core.train.events import EventLog, Status
from gptchat.core.train.plan import make_plan, pick_sharding
from gptchat.core.train.settings import Settings, lr_at
from gptchat.core.weights.checkpoints import load_model, sniff


@dataclass
class Result:
    name: str
    run: Path | None
    status: str  # finished | early-stopped | interrupted
    step: int
    best_val_loss: float | None
    losses: dict[int, float] = field(default_factory=dict)  # step -> train loss
    val_losses: dict[int, float] = field(default_factory=dict)


class _Stop:
    """Ctrl+C / SIGTERM: finish the step, save, stop. A second Ctrl+C stops at once, without saving
    (the run resumes from its last checkpoint); during a save it is held back with a message, and
    only another one within ``GRACE_S`` seconds aborts the save."""

    GRACE_S = 5

    def __init__(self):
        self.flag = False
        self.aborted = False
        self.saving = False
        self.notify = lambda message: None  # the run's event log, once it has one
        self._warned = -math.inf
        self._old = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if not self.flag:
            self.flag = True
            self.notify("stopping after this step and saving a checkpoint (Ctrl+C again: stop now, without saving)")
            return
        if signum != signal.SIGINT:
            return
        now = time.monotonic()
        if self.saving and now - self._warned > self.GRACE_S:
            self._warned = now
            self.notify(f"saving a checkpoint; press Ctrl+C again within {self.GRACE_S} s to stop without it")
            return
        self.aborted = True
        raise KeyboardInterrupt

    @contextmanager
    def save(self):
        self.saving = True
        try:
            yield
        finally:
            self.saving = False

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(settings: Settings | None = None, *, resume: str | None = None, steps: int | None = None,
          on_event=None, stop_at: int | None = None) -> Result:
    """Run (or continue) a training run. ``stop_at``: behave as if interrupted after that step."""
    dist = Dist.from_env()
    stopper = _Stop()
    run = lock = None
    try:
        s, folder, meta = settings_for(settings, resume, steps)
        lock = runs.RunLock(folder).acquire() if (folder is not None and dist.main) else None
        run = open_run(s, meta, dist, resume, folder)
        run.lock, lock = lock, None
        name_folder(run, meta, steps)
        main, held = dist.main, not run.created
        run.log = EventLog(run.folder / "events.jsonl" if main and not held else None, on_event if main else None,
                           hold=main and held)
        run.status = Status(run.folder / "status.json" if main and not held else None)
        stopper.notify = lambda message: run.log.emit("notice", message=message)
        result = Result(run.folder.name, run.folder, "failed", 0, None)
        for w in run.warnings:
            run.log.emit("warning", message=w)
        _run(run, stopper, result, stop_at)
        return result
    except BaseException as e:
        if run is None or run.log is None:
            raise
        return _failed(run, stopper, e)
    finally:
        stopper.restore()
        if run is not None and run.log is not None:
            run.log.close()
        for held_lock in (lock, run.lock if run is not None else None):
            if held_lock is not None:
                held_lock.release()
        dist.close()


def _failed(run: Run, stopper: _Stop, e: BaseException) -> Result:
    """Record why the run ended early, with the step a resume continues from; re-raise, except for
    a second Ctrl+C, which is an ordinary (if unsaved) stop."""
    saved = runs.last_step(run.folder) if run.created and run.dist.main else 0
    state = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    if stopper.aborted and run.created:
        run.log.emit("notice", message=f"stopped without saving; --resume continues from step {saved}")
        run.status.update(state=state, step=saved)
        run.log.emit("done", status=state, step=saved, steps=run.r.steps, best_val_loss=None, path=str(run.folder),
                     elapsed_s=None, saved=False)
        return Result(run.folder.name, run.folder, state, saved, None)
    run.log.emit("error", message=msg, step=saved)
    run.status.update(state=state, error=msg, step=saved)
    raise e


def _run(run: Run, stopper: _Stop, result: Result, stop_at: int | None) -> None:
    """Build, restore, then step until done, stopped or interrupted; save on the way out."""
    last_dir, trainer = checkpoint.load_trainer(run)
    t = _build(run, trainer, last_dir)
    p = checkpoint.restore(run, t, trainer)
    _open_folder(run, p)
    result.best_val_loss = p.best_val_loss
    stopper.install()
    p.t_session, p.t_saved = time.time(), time.monotonic()
    reason = _loop(run, t, p, stopper, result, stop_at)
    if reason == "interrupted" and p.saved_step != p.step:
        with stopper.save():
            checkpoint.save(run, t, p, ["last"], _metrics(result, p, None))
    result.status, result.step = reason, p.step
    run.status.update(state=reason, step=p.step, best_val_loss=p.best_val_loss, pid=os.getpid())
    run.log.emit("done", status=reason, step=p.step, steps=run.r.steps, best_val_loss=p.best_val_loss,
                 path=str(run.folder), elapsed_s=round(p.elapsed_now(), 1))


def _open_folder(run: Run, p: Progress) -> None:
    """The run can start: make a new run's folder, write the events held so far, mark it running."""
    create_folder(run)
    if run.dist.main:
        if run.log.path is None:
            run.log.attach(run.folder / "events.jsonl")
        run.status.path = run.folder / "status.json"
        run.status.update(state="running", steps=run.r.steps, step=p.step)


def _flags(run: Run, stopper: _Stop, p: Progress) -> tuple[bool, bool]:
    """(stop, save now), agreed by every rank in one all-reduce: a stop request; save_minutes passed."""
    minutes = run.s.save_minutes
    due = bool(minutes) and time.monotonic() - p.t_saved >= minutes * 60
    stop, due = run.dist.sum([float(stopper.flag), float(due)], run.device)
    return stop > 0, due > 0


def _loop(run: Run, t: Trainee, p: Progress, stopper: _Stop, result: Result, stop_at: int | None) -> str:
    """Step, evaluate and save until the run ends; returns why it ended."""
    r = run.r
    while p.step < r.steps:
        stop, due = _flags(run, stopper, p)
        if stop:
            return "interrupted"
        if due and p.saved_step != p.step:
            with stopper.save():
                checkpoint.save(run, t, p, ["last"], _metrics(result, p, None))
        _step(run, t, p, result)
        links: list[str] = []
        val, early = None, False
        if p.step % r.eval_every == 0 or p.step == r.steps:
            val, improved = _evaluate(run, t, p, result)
            links += ["best"] if improved else []
            early = bool(run.s.patience and p.bad_evals >= run.s.patience)
        stop_here = stop_at is not None and p.step >= stop_at
        if p.step % r.save_every == 0 or early or stop_here or p.step == r.steps:
            links.append("last")
        if links:
            with stopper.save():
                checkpoint.save(run, t, p, links, _metrics(result, p, val))
        if early:
            return "early-stopped"
        if stop_here and p.step < r.steps:
            return "interrupted"
    return "finished"


# -- build ------------------------------------------------------------------------------------------


def _build(run: Run, trainer: dict | None, last_dir: Path | None) -> Trainee:
    """The model (base, scratch or resumed; adapters attached), checked against the memory plan, wrapped."""
    model, frozen_bytes = _load_model(run, last_dir)
    s = run.s
    if s.lora:
        targets = lora.parse_targets(s.lora_targets)
        torch.manual_seed(s.seed)  # the adapters' initial A: the same run gives the same weights
        lora.add_lora(model, targets, s.lora_rank, s.lora_alpha)
        if trainer is not None:
            checkpoint.restore_adapters(model, trainer, last_dir)
    model.train()
    for block in model.transformer.h:
        block.grad_checkpointing = s.grad_checkpointing
    _check_plan(run, sum(q.numel() for q in model.parameters() if q.requires_grad), frozen_bytes)
    return _optimizer(run, model)


def _load_model(run: Run, last_dir: Path | None):
    """(model, bytes per frozen weight): resumed full finetunes load the last checkpoint's weights."""
    s, device = run.s, run.device
    frozen_bytes = 4
    if last_dir is not None and not s.lora:
        model = load_model(sniff(last_dir), device=device, dtype=torch.float32)
    elif s.from_scratch:
        with torch.device(device):
            model = GPT(run.cfg)
        model.init_weights(s.seed)
    else:
        # a LoRA base on GPU stays in the autocast dtype: it is frozen, so no fp32 master copy is needed;
        # not under FSDP, which shards a block's frozen and trained weights together and needs one dtype
        base_dtype = run.amp_dtype if (s.lora and device.type == "cuda" and not s.fsdp) else torch.float32
        frozen_bytes = torch.finfo(base_dtype).bits // 8
        model = load_model(run.ck, device=device, dtype=base_dtype)
    if s.dropout:  # a checkpoint's config.json does not carry it (a resumed scratch run included)
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = s.dropout
            if hasattr(m, "dropout") and isinstance(m.dropout, float):
                m.dropout = s.dropout
    return model, frozen_bytes


def _check_plan(run: Run, n_trainable: int, frozen_bytes: int) -> None:
    """Emit the start event with the memory and time plan; refuse a run that will not fit."""
    s, r, dist, device, ds, sp = run.s, run.r, run.dist, run.device, run.ds, run.sp
    amp_bytes = 4 if run.amp_dtype == torch.float32 else 2
    targets = lora.parse_targets(s.lora_targets) if s.lora else None

    def plan_at(shards: int):  # shards 1 with several processes: DDP
        return make_plan(run.cfg, trainable=n_trainable, batch=r.batch_size, block=r.block_size, steps=r.steps,
                         tokens_per_step=r.tokens_per_step, device=device, amp_bytes=amp_bytes,
                         frozen_bytes=frozen_bytes, grad_checkpointing=s.grad_checkpointing, shards=shards,
                         measure=dist.main, lora_targets=targets, ddp=dist.world > 1 and shards <= 1)

    plan, fsdp = pick_sharding(plan_at, dist.world, s.fsdp)
    if dist.any(fsdp, device) and not s.fsdp:  # one rank short of memory is enough: all ranks shard
        plan, s.fsdp = plan_at(dist.world), True
        run.log.emit("warning", message=f"a full copy of the model and optimizer state does not fit one device: "
                                        f"sharding it over {dist.world} processes (FSDP, as with --fsdp)")
    data = {"key": ds.key, "n_tokens": ds.n_tokens, "train_tokens": sp.train[1] - sp.train[0],
            "val_tokens": sp.val[1] - sp.val[0], "n_docs": ds.meta["n_docs"]}
    run.log.emit("start", run=run.folder.name, path=str(run.folder), resumed=run.resuming, settings=s.to_dict(),
                 resolved=r.to_dict(), plan=plan.to_dict(), plan_text=plan.lines(), world=dist.world,
                 device=str(device), dtype=str(run.amp_dtype).replace("torch.", ""), data=data)
    if not plan.fits:
        raise TrainError(plan.advice())


def _optimizer(run: Run, model) -> Trainee:
    """DDP/FSDP around the model, AdamW (decay on 2-D weights only), the fp16 GradScaler."""
    s, device = run.s, run.device
    net, raw = wrap(model, run.dist, device, s.fsdp, run.amp_dtype)
    fwd = torch.compile(net) if s.compile else net
    # listed after wrapping: fully_shard swaps every parameter for a sharded one, and a list taken
    # before would hold tensors that never get a gradient (clipping them was a silent no-op, issue 13)
    trainable = [q for q in raw.parameters() if q.requires_grad]
    decay = [q for q in trainable if q.dim() >= 2]  # FSDP2 keeps each parameter's logical shape
    no_decay = [q for q in trainable if q.dim() < 2]
    groups = [{"params": decay, "weight_decay": run.r.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type == "cuda" or (device.type == "cpu" and not s.fsdp)
    opt = torch.optim.AdamW(groups, lr=run.r.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)
    scaler = torch.amp.GradScaler(device.type, enabled=(run.amp_dtype == torch.float16 and device.type == "cuda"))
    return Trainee(raw, net, fwd, opt, scaler, trainable)


# -- one step -----------------------------------------------------------------------------------------


def _step(run: Run, t: Trainee, p: Progress, result: Result) -> None:
    """One optimizer step: accumulate micro-batches, clip, update; log the loss."""
    r, dist, device = run.r, run.dist, run.device
    t0 = time.perf_counter()
    lr = lr_at(p.step, r)
    for g in t.opt.param_groups:
        g["lr"] = lr
    loss_sum = 0.0
    for micro in range(r.grad_accum):
        x, y = run.batches.micro_batch(p.step, micro, dist.rank, dist.world, r.grad_accum, r.batch_size)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        # DDP: all-reduce the gradients once, on the last micro-batch
        last_micro = micro == r.grad_accum - 1
        with t.net.no_sync() if (dist.enabled and not run.s.fsdp and not last_micro) else nullcontext():
            with run.amp():
                loss = _loss(run, t, x, y)
            t.scaler.scale(loss / r.grad_accum).backward()
        loss_sum += loss.item()
    if run.s.clip > 0:
        t.scaler.unscale_(t.opt)
        torch.nn.utils.clip_grad_norm_(t.trainable, run.s.clip)
    t.scaler.step(t.opt)
    t.scaler.update()
    t.opt.zero_grad(set_to_none=True)
    p.step += 1
    train_loss = dist.mean(loss_sum / r.grad_accum, device)
    if not math.isfinite(train_loss):
        raise TrainError(f"the loss became {train_loss} at step {p.step}; lower --lr (now {r.lr:g})")
    p.step_times.append(time.perf_counter() - t0)
    p.tokens_seen += r.tokens_per_step
    result.losses[p.step] = train_loss
    recent = p.step_times[-20:]
    run.log.emit("step", step=p.step, steps=r.steps, loss=round(train_loss, 5), lr=lr,
                 tokens_per_s=round(r.tokens_per_step * len(recent) / sum(recent), 1),
                 eta_s=round((r.steps - p.step) * sum(recent) / len(recent), 1),
                 epoch=round(p.step * r.tokens_per_step / r.block_size / run.batches.n_chunks, 3), tokens=p.tokens_seen)
    run.status.update(force=False, step=p.step)


def _loss(run: Run, t: Trainee, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The micro-batch's mean loss. One process and DDP: the final hidden states, then the tied head
    and cross-entropy fused in chunks (evaluate.head_loss), so the (B*T, V) fp32 logits and their
    gradient never exist. FSDP computes the full logits inside the forward: outside it the tied head
    is a shard, which the chunked loss cannot use."""
    if not _chunked_head(run):
        return loss_fn(t.fwd(x), y)
    return head_loss(t.fwd(x, return_hidden=True), t.raw.lm_head.weight, y)


def _chunked_head(run: Run) -> bool:
    """The loss goes through the tied head in head_loss's chunks (steps and validation alike): everywhere but under
    FSDP over several processes, where the head outside the forward is a shard."""
    return not (run.s.fsdp and run.dist.enabled)


def _evaluate(run: Run, t: Trainee, p: Progress, result: Result) -> tuple[float, bool]:
    """Validation loss on the fixed window, then the probe samples: (val loss, improved on the best)."""
    s, r, tok = run.s, run.r, run.tok
    net = t.net if s.fsdp else t.raw
    val, n_scored = val_loss(net, run.ds, run.sp.val, r.block_size, r.batch_size, s.eval_batches, run.device,
                             run.amp, run.dist, chunked=_chunked_head(run))
    improved = p.best_val_loss is None or val < p.best_val_loss
    if improved:
        p.best_val_loss, p.bad_evals = val, 0
    else:
        p.bad_evals += 1
    result.val_losses[p.step] = val
    result.best_val_loss = p.best_val_loss
    run.log.emit("eval", step=p.step, val_loss=round(val, 5), ppl=round(ppl(val), 3), best=improved,
                 best_val_loss=round(p.best_val_loss, 5), tokens=n_scored)
    run.status.update(step=p.step, best_val_loss=p.best_val_loss)
    for i, prompt in enumerate(run.probes):
        ids = sample(net, prompt, s.sample_tokens, r.block_size, tok.n_vocab, tok.eot_id, run.device, run.amp,
                     seed=s.seed + i)
        run.log.emit("sample", step=p.step, prompt=tok.decode(prompt), text=tok.decode(ids))
    return val, improved


def _metrics(result: Result, p: Progress, val: float | None) -> dict:
    return {"train_loss": result.losses.get(p.step), "val_loss": val, "ppl": ppl(val), "best_val_loss": p.best_val_loss}
