"""Memory and time plan before launch: will the run fit, and how long will it take?

The memory and FLOP arithmetic lives in ``core.eval.estimate`` (the same numbers ``gptchat estimate``
prints, checked there against measured training steps); this module adds what a launch needs: the
memory available on the device, a live speed probe, and, for a run that cannot fit, the smallest
change that would make it fit.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Callable

from gptchat.core.eval.estimate import flops_per_token, lora_params, training_memory

GIB = 1 << 30


@dataclass
class Plan:
    params: int
    trainable: int
    weights_b: int
    grads_b: int
    adam_b: int
    activations_b: int
    total_b: int
    available_b: int | None
    device: str
    precision: str
    tokens_per_step: int
    steps: int
    flops_per_token: float
    est_tokens_per_s: float | None
    est_seconds: float | None
    fix: str | None = None  # for a run that does not fit: the change that would make it fit

    @property
    def fits(self) -> bool:
        return self.available_b is None or self.total_b <= 0.9 * self.available_b

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fits"] = self.fits
        return d

    def lines(self) -> list[str]:
        g = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
        avail = g(self.available_b) if self.available_b is not None else "unknown"
        out = [
            f"plan: {self.params / 1e6:.1f}M parameters ({self.trainable / 1e6:.2f}M trained) on {self.device} in {self.precision}",
            f"  memory: weights {g(self.weights_b)} + gradients {g(self.grads_b)} + Adam {g(self.adam_b)}"
            f" + activations {g(self.activations_b)}: peak {g(self.total_b)} of {avail} available",
        ]
        if self.est_seconds is not None:
            out.append(
                f"  time: {self.steps} steps x {self.tokens_per_step} tokens, about "
                f"{self.est_tokens_per_s:,.0f} tokens/s -> ~{_human_s(self.est_seconds)} (a rough guess until the first steps)"
            )
        return out

    def advice(self) -> str:
        fix = f"{self.fix}; " if self.fix else "no single change found that fits; "
        return (
            f"training needs about {self.total_b / GIB:.1f} GiB but {self.device} has "
            f"{(self.available_b or 0) / GIB:.1f} GiB available; {fix}other ways: a smaller --batch-size (with "
            "--grad-accum to keep the batch), a smaller --block-size, --grad-checkpointing, --lora, or bf16 on a GPU"
        )


def _human_s(s: float) -> str:
    if s < 90:
        return f"{s:.0f}s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def available_bytes(device) -> int | None:
    """Free memory where the run will live: CUDA free memory, else the machine's available RAM."""
    if device.type == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


@dataclass(frozen=True)
class Shape:
    """What the memory of a step depends on (the knobs a fix may turn)."""
    batch: int
    grad_checkpointing: bool
    lora: bool
    amp_bytes: int


def _peak(cfg, shape: Shape, *, block: int, trainable: int, frozen_bytes: int, shards: int,
          lora_targets: list[str] | None, ddp: bool = False) -> tuple:
    if shape.lora and trainable >= cfg.n_params():
        trainable = lora_params(cfg, 8, ["q", "k", "v"])  # the default adapters, for a suggested --lora
        lora_targets = ["q", "k", "v"]
    lora = trainable < cfg.n_params()
    mem = training_memory(cfg, batch=shape.batch, block=block, mixed=shape.amp_bytes < 4,
                          trainable=trainable if lora else None, frozen_bytes=frozen_bytes,
                          grad_checkpointing=shape.grad_checkpointing, ddp=ddp, fsdp_shards=shards,
                          lora_targets=lora_targets)
    return mem, trainable


def suggest_fix(cfg, shape: Shape, fits: Callable[[int], bool], *, device_type: str, **kw) -> str | None:
    """The first change, in order of least disruption, whose peak memory ``fits``: a smaller micro-batch
    (with accumulation keeping the batch), gradient checkpointing, both, bf16 on a GPU, then LoRA."""
    tries: list[tuple[Shape, str]] = []
    b = shape.batch // 2
    while b >= 1:
        acc = f"--batch-size {b} with --grad-accum x{shape.batch // b} (the same tokens per step)"
        tries.append((Shape(b, shape.grad_checkpointing, shape.lora, shape.amp_bytes), acc))
        b //= 2
    if not shape.grad_checkpointing:
        tries.append((Shape(shape.batch, True, shape.lora, shape.amp_bytes), "--grad-checkpointing"))
        tries.append((Shape(1, True, shape.lora, shape.amp_bytes),
                      f"--grad-checkpointing with --batch-size 1 and --grad-accum x{shape.batch}"))
    if device_type == "cuda" and shape.amp_bytes == 4:
        tries.append((Shape(shape.batch, shape.grad_checkpointing, shape.lora, 2), "--dtype bf16"))
    if not shape.lora:
        tries.append((Shape(shape.batch, shape.grad_checkpointing, True, shape.amp_bytes), "--lora"))
        tries.append((Shape(1, True, True, shape.amp_bytes), f"--lora --grad-checkpointing --batch-size 1 --grad-accum x{shape.batch}"))
    for t, text in tries:
        if fits(_peak(cfg, t, **kw)[0].total):
            return f"try {text}"
    return None


def make_plan(cfg, *, trainable: int, batch: int, block: int, steps: int, tokens_per_step: int,
              device, amp_bytes: int, frozen_bytes: int = 4, grad_checkpointing: bool = False,
              shards: int = 1, measure: bool = True, lora_targets: list[str] | None = None,
              ddp: bool = False) -> Plan:
    """Peak memory per device from ``core.eval.estimate`` (``shards`` > 1: FSDP splits weights, grads
    and Adam states; ``ddp``: replicas on several processes, which hold gradient buckets besides the
    gradients); for a run that does not fit, ``Plan.fix`` names the change that would.
    ``lora_targets``: the adapted matrices of a LoRA run (None: counted as if all were adapted)."""
    params = cfg.n_params()
    shape = Shape(batch, grad_checkpointing, trainable < params, amp_bytes)
    kw = dict(block=block, trainable=trainable, frozen_bytes=frozen_bytes, shards=shards, lora_targets=lora_targets,
              ddp=ddp and shards <= 1)
    mem, _ = _peak(cfg, shape, **kw)
    precision = {4: "fp32", 2: "mixed 16-bit"}.get(amp_bytes, f"{amp_bytes * 8}-bit")
    fpt = flops_per_token(params, cfg, block, trainable if shape.lora else None)
    rate = _device_flops(device) if measure else None
    tps = rate * 0.35 / fpt if rate else None
    est = steps * tokens_per_step / tps if tps else None
    plan = Plan(params, trainable, mem.weights + mem.weight_copies, mem.grads, mem.adam, mem.activations, mem.total,
                available_bytes(device), str(device), precision, tokens_per_step, steps, fpt, tps, est)
    if not plan.fits:
        avail = plan.available_b
        plan.fix = suggest_fix(cfg, shape, lambda total: total <= 0.9 * avail, device_type=device.type, **kw)
    return plan


def pick_sharding(plan_at: Callable[[int], Plan], world: int, fsdp: bool) -> tuple[Plan, bool]:
    """(the plan, whether to shard with FSDP): as asked with --fsdp; otherwise, with several processes,
    FSDP when a full replica of the weights, gradients and Adam state would not fit one device but a
    1/``world`` shard of them would. ``plan_at(shards)`` makes the plan for that many shards."""
    plan = plan_at(world if fsdp else 1)
    if fsdp or world <= 1 or plan.fits:
        return plan, fsdp
    sharded = plan_at(world)
    return (sharded, True) if sharded.fits else (plan, False)


def _device_flops(device) -> float | None:
    """A 0.1-second matmul probe: achievable FLOP/s on this device (fp32 on CPU)."""
    import torch

    if device.type not in ("cpu", "cuda"):
        return None
    n = 512
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 0.1:
        a @ b
        reps += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def preview(settings, *, measure: bool = True) -> tuple[Plan, dict]:
    """The plan for ``settings`` without loading weights or tokenizing (the TUI's form uses this).

    Token counts are estimated from file sizes (about 4 bytes a token); returns the plan and the
    resolved numbers as a dict.
    """
    import torch

    from gptchat.core.model.device import pick_device, pick_dtype
    from gptchat.core.train.data import collect_files
    from gptchat.core.train.settings import resolve

    settings.check()
    files = collect_files(settings.data, settings.format)
    n_tokens = max(1, sum(f.stat().st_size for f in files) // 4)
    if settings.from_scratch:
        from gptchat.core.model.config import PRESETS

        cfg = PRESETS[settings.arch or "tiny"]
    else:
        from gptchat.core.weights.checkpoints import resolve as resolve_ckpt

        cfg = resolve_ckpt(settings.model or "gpt2", download=False).config
    device = pick_device(settings.device)
    amp_bytes = 4 if pick_dtype(settings.dtype, device) == torch.float32 else 2
    r = resolve(settings, n_positions=cfg.n_positions, n_params=cfg.n_params(), n_tokens=n_tokens, world=1,
                device_type=device.type)
    trainable, targets = cfg.n_params(), None
    if settings.lora:
        targets = [t.strip() for t in settings.lora_targets.split(",") if t.strip()]
        trainable = lora_params(cfg, settings.lora_rank, targets)
    plan = make_plan(cfg, trainable=trainable, batch=r.batch_size, block=r.block_size, steps=r.steps,
                     tokens_per_step=r.tokens_per_step, device=device, amp_bytes=amp_bytes,
                     grad_checkpointing=settings.grad_checkpointing, measure=measure,
                     lora_targets=targets if settings.lora else None)
    return plan, {**r.to_dict(), "est_tokens": n_tokens}
