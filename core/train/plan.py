"""Memory and time plan before launch: will the run fit, and how long will it take?

Memory per device = weights + gradients + two Adam moments (fp32, trainable parameters only) +
activations. Activations follow Korthikanti et al. (2022): a transformer block keeps about
``34 * T * d`` bytes per sequence at 16-bit (twice that at fp32) when attention runs as a fused
kernel (SDPA: no T x T matrix is stored), plus the logits (B*T*V, three copies in fp32 for the
softmax and its gradient). Gradient checkpointing keeps one block input per layer plus one block's
working set. The estimate is deliberately a little pessimistic.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

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
            f" + activations {g(self.activations_b)} = {g(self.total_b)} of {avail} available",
        ]
        if self.est_seconds is not None:
            out.append(
                f"  time: {self.steps} steps x {self.tokens_per_step} tokens, about "
                f"{self.est_tokens_per_s:,.0f} tokens/s -> ~{_human_s(self.est_seconds)} (a rough guess until the first steps)"
            )
        return out

    def advice(self) -> str:
        return (
            f"training needs about {self.total_b / GIB:.1f} GiB but {self.device} has "
            f"{(self.available_b or 0) / GIB:.1f} GiB available; try a smaller --batch-size (with --grad-accum to "
            "keep the batch), a smaller --block-size, --grad-checkpointing, --lora, or bf16 on a GPU"
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


def make_plan(cfg, *, trainable: int, batch: int, block: int, steps: int, tokens_per_step: int,
              device, amp_bytes: int, frozen_bytes: int = 4, grad_checkpointing: bool = False,
              shards: int = 1, measure: bool = True) -> Plan:
    """Estimate memory per device (``shards`` > 1: FSDP splits weights, grads and Adam states)."""
    params = cfg.n_params()
    d, L, V, T, B = cfg.n_embd, cfg.n_layer, cfg.vocab_size, block, batch
    master = trainable * 4 + (params - trainable) * frozen_bytes
    weights = master + (params * amp_bytes if amp_bytes < 4 else 0)  # autocast keeps 16-bit copies
    grads = trainable * 4
    adam = trainable * 8
    if shards > 1:
        weights, grads, adam = weights // shards, grads // shards, adam // shards
    per_block = 34 * T * d * B * amp_bytes // 2
    acts = (L * T * d * B * amp_bytes + per_block) if grad_checkpointing else L * per_block
    acts += 3 * B * T * V * 4 + B * T * d * 4 * 2  # logits, softmax grad; embeddings
    total = int(weights + grads + adam + acts)
    precision = {4: "fp32", 2: "mixed 16-bit"}.get(amp_bytes, f"{amp_bytes * 8}-bit")
    # training costs ~6 FLOPs per parameter per token, plus attention's 12 * L * T * d
    fpt = 6.0 * params + 12.0 * L * T * d
    rate = _device_flops(device) if measure else None
    tps = rate * 0.35 / fpt if rate else None
    est = steps * tokens_per_step / tps if tps else None
    return Plan(params, trainable, int(weights), int(grads), int(adam), int(acts), total, available_bytes(device),
                str(device), precision, tokens_per_step, steps, fpt, tps, est)


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
    trainable = cfg.n_params()
    if settings.lora:  # rank x (in + out) per adapted matrix per layer
        per = {"q": 2 * cfg.n_embd, "k": 2 * cfg.n_embd, "v": 2 * cfg.n_embd, "o": 2 * cfg.n_embd,
               "fc": 5 * cfg.n_embd, "proj": 5 * cfg.n_embd}
        targets = [t.strip() for t in settings.lora_targets.split(",") if t.strip()]
        trainable = cfg.n_layer * settings.lora_rank * sum(per.get(t, 0) for t in targets)
    plan = make_plan(cfg, trainable=trainable, batch=r.batch_size, block=r.block_size, steps=r.steps,
                     tokens_per_step=r.tokens_per_step, device=device, amp_bytes=amp_bytes,
                     grad_checkpointing=settings.grad_checkpointing, measure=measure)
    return plan, {**r.to_dict(), "est_tokens": n_tokens}
