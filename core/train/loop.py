"""The training loop: nanoGPT's, made safe to stop, kill and resume.

``train(settings)`` starts a run, ``train(resume="NAME")`` continues one. Everything a run does is
reported as events (events.py); the function returns a ``Result`` for callers and tests.

Resume is exact: the batch order is a pure function of (seed, step) (data.Batches), the learning
rate a pure function of step (settings.lr_at), and the checkpoint holds the fp32 weights, the
optimizer state, the GradScaler, and the RNG states. A resumed run produces the same losses as one
that never stopped.
"""

from __future__ import annotations

import math
import os
import random
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gptchat.core.errors import TrainError, UsageError
from gptchat.core.train import runs
from gptchat.core.train.data import Batches, prepare, split
from gptchat.core.train.dist import Dist, full_state, load_full_state, wrap
from gptchat.core.train.evaluate import amp_context, loss_fn, probe_prompts, sample, val_loss
from gptchat.core.train.events import EventLog, Status
from gptchat.core.train.settings import Settings, lr_at, resolve


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
    """Ctrl+C / SIGTERM: finish the step, save, exit. A second Ctrl+C stops at once."""

    def __init__(self):
        self.flag = False
        self._old = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.flag and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.flag = True

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(settings: Settings | None = None, *, resume: str | None = None, steps: int | None = None,
          on_event=None, stop_at: int | None = None) -> Result:
    """Run (or continue) a training run. ``stop_at``: behave as if interrupted after that step."""
    from gptchat.core.weights.checkpoints import resolve as resolve_ckpt
    from gptchat.core.model.device import pick_device, pick_dtype
    from gptchat.core.text.tokenizer import load_tokenizer

    dist = Dist.from_env()
    # -- what to do -------------------------------------------------------------------------------
    if resume is not None:
        folder = runs.find_run(resume)
        meta = runs.load_run_json(folder)
        s = Settings.from_dict(meta["settings"])
        if settings is not None and settings.device is not None:
            s.device = settings.device
        if steps is not None:
            if steps <= 0:
                raise UsageError(f"--steps must be > 0, not {steps}")
            meta["resolved"]["steps"] = steps
        if runs.link_target(folder, "last") is None:
            raise TrainError(f"run {resume!r} has no finished checkpoint to resume from; start it again")
    else:
        if settings is None:
            raise UsageError("nothing to train: give data files or --resume NAME")
        s = settings
        s.check()
        s.data = [str(Path(p).expanduser().resolve()) for p in s.data]
        folder, meta = None, None
    device = dist.device_for(pick_device(s.device))
    dist.init(device)
    amp_dtype = pick_dtype(s.dtype, device)
    if device.type == "cpu" and amp_dtype == torch.float16:
        raise UsageError("--dtype fp16 training is not supported on CPU; use fp32 (default) or bf16")
    if device.type == "mps" and amp_dtype != torch.float32:
        amp_dtype = torch.float32  # autocast on mps is incomplete; train in fp32
    amp = amp_context(device, amp_dtype)
    if s.fsdp and s.lora:
        raise UsageError("--fsdp with --lora is not supported; LoRA's small optimizer state rarely needs sharding")

    # -- data, tokenizer, model shape (all cheap; errors before anything big is loaded) -----------
    from gptchat.core.train.data import scan

    warnings: list[str] = []
    scanned = scan(s.data, s.format, warn=warnings.append)
    if s.template is not None:
        from gptchat.core.prompting.templates import get_template

        get_template(s.template)
    ck = None
    if s.from_scratch:
        from gptchat.core.model.config import PRESETS

        cfg = PRESETS[s.arch or "tiny"]
        from dataclasses import replace

        cfg = replace(cfg, dropout=s.dropout)
        tok = load_tokenizer(None)
    else:
        ck = resolve_ckpt(s.model or "gpt2")
        cfg = ck.config
        tok = load_tokenizer(ck.folder)
    if tok.n_vocab > cfg.vocab_size:
        raise TrainError(f"the tokenizer has {tok.n_vocab} tokens but the model only {cfg.vocab_size}")
    ds = None
    if dist.main:
        ds = prepare(s.data, tok, s.format, s.template, scanned=scanned)
    dist.barrier()
    if ds is None:
        ds = prepare(s.data, tok, s.format, s.template, scanned=scanned)
    if meta is not None and meta.get("data", {}).get("key") not in (None, ds.key):
        raise TrainError(f"the training data changed since run {resume!r} started; start a new run instead")

    if meta is not None:
        from gptchat.core.train.settings import Resolved

        r = Resolved(**meta["resolved"])
    else:
        r = resolve(s, n_positions=cfg.n_positions, n_params=cfg.n_params(), n_tokens=ds.n_tokens,
                    world=dist.world, device_type=device.type)
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

    # -- the run folder (rank 0 writes; others only read) ----------------------------------------
    if folder is None:
        name = dist.broadcast_obj(s.name or (runs.default_name(s.data) if dist.main else None))
        s.name = name
        if dist.main:
            folder = runs.create_run(name)
            runs.save_run_json(folder, {"settings": s.to_dict(), "resolved": r.to_dict(),
                                        "data": {"key": ds.key, **{k: ds.meta[k] for k in ("files", "n_tokens", "n_docs", "format")}},
                                        "created": time.time()})
        dist.barrier()
        folder = runs.runs_root() / name
    elif dist.main and steps is not None:
        runs.save_run_json(folder, meta)
    lock = runs.RunLock(folder).acquire() if dist.main else None
    log = EventLog(folder / "events.jsonl" if dist.main else None, on_event if dist.main else None)
    status = Status(folder / "status.json" if dist.main else None)
    stopper = _Stop()
    result = Result(folder.name, folder, "failed", 0, None)
    try:
        status.update(state="running", steps=r.steps, step=None)
        for w in warnings:
            log.emit("warning", message=w)
        _run(s, r, cfg, ck, tok, ds, sp, folder, dist, device, amp_dtype, amp, log, status, stopper,
             result, resume is not None, stop_at)
        return result
    except BaseException as e:
        state = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        log.emit("error", message=msg, step=result.step)
        status.update(state=state, error=msg)
        raise
    finally:
        stopper.restore()
        log.close()
        if lock is not None:
            lock.release()
        dist.close()


def _run(s, r, cfg, ck, tok, ds, sp, folder, dist, device, amp_dtype, amp, log, status, stopper,
         result, resuming, stop_at):
    from gptchat.core.weights.checkpoints import load_model, save_hf, sniff
    from gptchat.core.model.gpt import GPT
    from gptchat.core.train import lora as lora_mod
    from gptchat.core.train.plan import make_plan

    last_dir = runs.link_target(folder, "last") if resuming else None
    trainer = torch.load(last_dir / "trainer.pt", map_location="cpu", weights_only=True) if last_dir else None

    # -- the model ------------------------------------------------------------------------------
    if s.lora:
        targets = [t.strip() for t in s.lora_targets.split(",") if t.strip()]
    frozen_bytes = 4
    if resuming and not s.lora:
        model = load_model(sniff(last_dir), device=device, dtype=torch.float32)
    elif s.from_scratch:
        with torch.device(device):
            model = GPT(cfg)
        model.init_weights(s.seed)
    else:
        base_dtype = amp_dtype if (s.lora and device.type == "cuda") else torch.float32
        frozen_bytes = torch.finfo(base_dtype).bits // 8
        model = load_model(ck, device=device, dtype=base_dtype)
    if s.dropout and not s.from_scratch:
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = s.dropout
            if hasattr(m, "dropout") and isinstance(m.dropout, float):
                m.dropout = s.dropout
    if s.lora:
        lora_mod.add_lora(model, targets, s.lora_rank, s.lora_alpha)
        if trainer is not None:
            missing = set(lora_mod.adapter_state(model)) - set(trainer["adapters"])
            if missing:
                raise TrainError(f"{last_dir}: the checkpoint lacks adapter {sorted(missing)[0]}")
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n in trainer["adapters"]:
                        p.copy_(trainer["adapters"][n])
    model.train()
    for block in model.transformer.h:
        block.grad_checkpointing = s.grad_checkpointing
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for _, p in trainable)

    # -- the plan -------------------------------------------------------------------------------
    amp_bytes = 4 if amp_dtype == torch.float32 else 2
    plan = make_plan(cfg, trainable=n_trainable, batch=r.batch_size, block=r.block_size, steps=r.steps,
                     tokens_per_step=r.tokens_per_step, device=device, amp_bytes=amp_bytes,
                     frozen_bytes=frozen_bytes, grad_checkpointing=s.grad_checkpointing,
                     shards=dist.world if s.fsdp else 1, measure=dist.main)
    log.emit("start", run=folder.name, path=str(folder), resumed=resuming, settings=s.to_dict(), resolved=r.to_dict(),
             plan=plan.to_dict(), plan_text=plan.lines(), world=dist.world, device=str(device),
             dtype=str(amp_dtype).replace("torch.", ""), data={"key": ds.key, "n_tokens": ds.n_tokens,
             "train_tokens": sp.train[1] - sp.train[0], "val_tokens": sp.val[1] - sp.val[0], "n_docs": ds.meta["n_docs"]})
    if not plan.fits:
        raise TrainError(plan.advice())

    # -- wrapping, optimizer ----------------------------------------------------------------------
    net, raw = wrap(model, dist, device, s.fsdp)
    fwd = torch.compile(net) if s.compile else net
    decay = [p for n, p in raw.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for n, p in raw.named_parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": r.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type == "cuda" or (device.type == "cpu" and not s.fsdp)
    opt = torch.optim.AdamW(groups, lr=r.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)
    scaler = torch.amp.GradScaler(device.type, enabled=(amp_dtype == torch.float16 and device.type == "cuda"))
    step, best, bad_evals, tokens_seen, elapsed = 0, None, 0, 0, 0.0
    if trainer is not None:
        # the weights came with the model (loaded before wrapping); the optimizer state follows them
        load_full_state(raw, opt, None, trainer["optimizer"], s.fsdp, dist)
        scaler.load_state_dict(trainer["scaler"]) if trainer.get("scaler") else None
        step, best, bad_evals = trainer["step"], trainer["best_val_loss"], trainer["bad_evals"]
        tokens_seen, elapsed = trainer["tokens_seen"], trainer["elapsed"]
        rng = trainer["rng"]
        torch.set_rng_state(rng["torch"])
        if device.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"], device)
        random.setstate(_py_state(rng["python"]))
    else:
        torch.manual_seed(s.seed + dist.rank)
        random.seed(s.seed + dist.rank)
    result.best_val_loss = best
    batches = Batches(ds, sp.train, r.block_size, s.seed)
    probes = probe_prompts(ds, sp.val, tok.eot_id)[:2] if s.sample_tokens else []
    tok_dir = ck.folder if ck is not None else (Path(tok.source).parent if Path(tok.source).is_file() else None)
    stopper.install()

    saved = [step]  # the step of the newest "last" checkpoint

    def save(links: list[str], val: float | None):
        if "last" in links:
            saved[0] = step
        msd, osd = full_state(raw, opt, s.fsdp, dist) if (s.fsdp or dist.main) else (None, None)
        if not dist.main:
            dist.barrier()
            return
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
               "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        state = {"step": step, "optimizer": osd, "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                 "rng": rng, "best_val_loss": best, "bad_evals": bad_evals, "tokens_seen": tokens_seen,
                 "elapsed": elapsed + (time.time() - t_session)}
        if s.lora:
            state["adapters"] = lora_mod.adapter_state(raw)
        prov = {
            "format": "gptchat-finetune", "version": 1, "run": folder.name, "step": step, "links": links,
            "base_model": None if s.from_scratch else (s.model or "gpt2"), "from_scratch": s.from_scratch,
            "arch": (s.arch or "tiny") if s.from_scratch else None,
            "data": {"key": ds.key, "files": ds.meta["files"], "n_tokens": ds.n_tokens, "format": s.format, "template": s.template},
            "settings": s.to_dict(), "resolved": r.to_dict(), "tokenizer": tok.source,
            "lora": {"rank": s.lora_rank, "alpha": s.lora_alpha, "targets": s.lora_targets, "merged": True} if s.lora else None,
            "metrics": {"train_loss": result.losses.get(step), "val_loss": val, "ppl": _ppl(val), "best_val_loss": best},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

        def write(tmp: Path):
            plain = _plain(raw, msd, s)
            save_hf(plain, tmp, tok_dir, prov)
            if "last" in links:
                torch.save(state, tmp / "trainer.pt")

        path = runs.write_checkpoint(folder, step, write, links)
        for link in links:
            log.emit("checkpoint", step=step, kind=link, path=str(folder / link), target=str(path))
        dist.barrier()

    # -- the loop -------------------------------------------------------------------------------
    t_session = time.time()
    step_times: list[float] = []
    reason = "finished"
    while step < r.steps:
        if dist.any(stopper.flag, device):
            reason = "interrupted"
            break
        t0 = time.perf_counter()
        lr = lr_at(step, r)
        for g in opt.param_groups:
            g["lr"] = lr
        loss_sum = 0.0
        for micro in range(r.grad_accum):
            x, y = batches.micro_batch(step, micro, dist.rank, dist.world, r.grad_accum, r.batch_size)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            last_micro = micro == r.grad_accum - 1
            ctx = net.no_sync() if (dist.enabled and not s.fsdp and not last_micro) else nullcontext()
            with ctx:
                with amp():
                    loss = loss_fn(fwd(x), y)
                scaler.scale(loss / r.grad_accum).backward()
            loss_sum += loss.item()
        if s.clip > 0:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_([p for _, p in trainable], s.clip)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        step += 1
        train_loss = dist.mean(loss_sum / r.grad_accum, device)
        if not math.isfinite(train_loss):
            raise TrainError(f"the loss became {train_loss} at step {step}; lower --lr (now {r.lr:g})")
        dt = time.perf_counter() - t0
        step_times.append(dt)
        tokens_seen += r.tokens_per_step
        result.losses[step] = train_loss
        recent = step_times[-20:]
        tps = r.tokens_per_step * len(recent) / sum(recent)
        log.emit("step", step=step, steps=r.steps, loss=round(train_loss, 5), lr=lr, tokens_per_s=round(tps, 1),
                 eta_s=round((r.steps - step) * sum(recent) / len(recent), 1),
                 epoch=round(step * r.tokens_per_step / r.block_size / batches.n_chunks, 3), tokens=tokens_seen)
        status.update(force=False, step=step)

        links: list[str] = []
        val = None
        if step % r.eval_every == 0 or step == r.steps:
            val, n_scored = val_loss(net if s.fsdp else raw, ds, sp.val, r.block_size, r.batch_size,
                                     s.eval_batches, device, amp, dist)
            improved = best is None or val < best
            if improved:
                best, bad_evals = val, 0
                links.append("best")
            else:
                bad_evals += 1
            result.val_losses[step] = val
            result.best_val_loss = best
            log.emit("eval", step=step, val_loss=round(val, 5), ppl=round(_ppl(val), 3), best=improved,
                     best_val_loss=round(best, 5), tokens=n_scored)
            status.update(step=step, best_val_loss=best)
            for i, p in enumerate(probes):
                ids = sample(net if s.fsdp else raw, p, s.sample_tokens, r.block_size, tok.n_vocab, tok.eot_id,
                             device, amp, seed=s.seed + i)
                log.emit("sample", step=step, prompt=tok.decode(p), text=tok.decode(ids))
            if s.patience and bad_evals >= s.patience:
                reason = "early-stopped"
        stopping = reason == "early-stopped" or (stop_at is not None and step >= stop_at) or step == r.steps
        if step % r.save_every == 0 or stopping:
            links.append("last")
        if links:
            save(links, val)
        if reason == "early-stopped":
            break
        if stop_at is not None and step >= stop_at and step < r.steps:
            reason = "interrupted"
            break
    if reason == "interrupted" and saved[0] != step:
        save(["last"], None)
    result.status, result.step = reason, step
    status.update(state=reason, step=step, best_val_loss=best, pid=os.getpid())
    log.emit("done", status=reason, step=step, steps=r.steps, best_val_loss=best, path=str(folder),
             elapsed_s=round(elapsed + time.time() - t_session, 1))


def _plain(raw, msd, s):
    from gptchat.core.train import lora as lora_mod

    if msd is None or not s.fsdp:
        return lora_mod.plain_model(raw)
    from gptchat.core.model.gpt import GPT

    with torch.device("meta"):
        out = GPT(raw.config)
    msd = dict(msd)
    msd["lm_head.weight"] = msd["transformer.wte.weight"]
    out.load_state_dict(msd, strict=True, assign=True)
    out.lm_head.weight = out.transformer.wte.weight
    return out


def _ppl(v):
    return math.exp(min(v, 50)) if v is not None and math.isfinite(v) else None


def _py_state(st):
    # torch.load turns the tuple inside random.getstate() into a list; random.setstate needs tuples
    return (st[0], tuple(st[1]), st[2])
