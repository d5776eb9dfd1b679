"""Finetune speed and memory: gptchat's training step against a plain transformers loop.

    python -m gptchat.core.bench.train --block 1024 --batch 4      # 124M, the issue's figure
    python -m gptchat.core.bench.train --shape tiny --batch 4 --block 128 --steps 5

Both sides get the same random init shape, the same token batches, the same AdamW (lr 6e-5,
betas 0.9/0.95, eps 1e-8, weight decay 0.1 on 2-D weights; fused where torch has it), clipping at
1.0, no dropout. transformers runs its standard loop (``GPT2LMHeadModel(input_ids=x, labels=x)``:
the full (B, T, V) logits, shifted inside); gptchat runs the finetune loop's step (core/train/loop.py:
the final hidden states, then ``evaluate.head_loss``, the tied head and cross-entropy fused in chunks,
so the full logits never exist). Both score block - 1 positions per sequence alike, since labels=x
shifts out the last one and we score it against the next drawn token.

Speed: the two models live in one process and their steps alternate (ours, theirs, ours, ...) so
background load hits both alike; the first step of each is a warm-up, the figure is each side's
median tokens/s, and the ratio ours/theirs. Memory: each side trains alone in a child process for
two steps and reports its peak resident set (VmHWM: weights, gradients, Adam state, activations).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch

SIDES = ("ours", "transformers")


@dataclass
class TrainBench:
    shape: str
    params: int
    batch: int
    block: int
    steps: int
    threads: int
    precision: str  # "fp32" or "bf16 autocast"
    fused_adamw: bool
    grad_checkpointing: bool
    compiled: bool
    attn: str  # transformers' attention implementation
    load: float  # 1-minute load average when the run ended
    tokens_per_s: dict[str, float] = field(default_factory=dict)  # side -> median tokens/s
    peak_rss_mb: dict[str, float] = field(default_factory=dict)  # side -> peak resident set of its child
    compile_s: float | None = None  # the first compiled step's extra time (compile itself)
    notes: list[str] = field(default_factory=list)

    @property
    def speed_ratio(self) -> float:
        return self.tokens_per_s["ours"] / self.tokens_per_s["transformers"]

    @property
    def memory_ratio(self) -> float | None:
        if len(self.peak_rss_mb) < 2:
            return None
        return self.peak_rss_mb["ours"] / self.peak_rss_mb["transformers"]

    def to_dict(self) -> dict:
        return {**asdict(self), "speed_ratio": self.speed_ratio, "memory_ratio": self.memory_ratio}


def format_bench(b: TrainBench) -> str:
    lines = [f"{b.shape} ({b.params / 1e6:.0f}M), batch {b.batch} x block {b.block}, {b.precision}, "
             f"{b.threads} threads, AdamW {'fused' if b.fused_adamw else 'foreach'}"
             f"{', grad checkpointing' if b.grad_checkpointing else ''}{', compiled' if b.compiled else ''}, "
             f"{b.steps} timed steps a side, load {b.load:.2f}; transformers attention: {b.attn}"]
    lines += [f"  note: {n}" for n in b.notes]
    for side, label in (("ours", "gptchat"), ("transformers", "transformers")):
        rss = b.peak_rss_mb.get(side)
        mem = f", peak RSS {rss:7.0f} MB" if rss is not None else ""
        lines.append(f"  {label:<13} {b.tokens_per_s[side]:8.1f} tokens/s{mem}")
    ratio = f"  gptchat/transformers: speed {b.speed_ratio:.2f}x"
    if b.memory_ratio is not None:
        ratio += f", peak memory {b.memory_ratio:.2f}x"
    if b.compile_s is not None:
        ratio += f" (compile: {b.compile_s:.0f} s, not in the speed)"
    return "\n".join(lines + [ratio])


# -- the two sides ----------------------------------------------------------------------------------


def _opt(model, fused: bool):
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=6e-5, betas=(0.9, 0.95), eps=1e-8, fused=fused, foreach=None if fused else True)


def _build(side: str, shape: str, seed: int, grad_checkpointing: bool, compiled: bool):
    """(the model, what runs it forward) for one side; the same init shape on both."""
    from gptchat.core.model.config import PRESETS

    cfg = PRESETS[shape]
    if side == "ours":
        from gptchat.core.model.gpt import GPT

        model = GPT(cfg)
        model.init_weights(seed)
        for block in model.transformer.h:
            block.grad_checkpointing = grad_checkpointing
    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        keep = {k: v for k, v in cfg.to_hf().items() if k not in ("architectures", "torch_dtype")}
        model = GPT2LMHeadModel(GPT2Config(**keep, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    model.train()
    return model, (torch.compile(model) if compiled else model)


def _step(side: str, model, fwd, opt, x, y) -> float:
    if side == "ours":
        from gptchat.core.train.evaluate import head_loss

        loss = head_loss(fwd(x, return_hidden=True), model.lm_head.weight, y)
    else:  # the standard transformers way: labels = inputs, shifted inside the model
        loss = fwd(input_ids=x, labels=x).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def _batches(shape: str, batch: int, block: int, n: int, seed: int):
    """``n`` (x, y) pairs of (batch, block) tokens: y is x shifted by one, with one more token drawn."""
    from gptchat.core.model.config import PRESETS

    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        b = torch.randint(0, PRESETS[shape].vocab_size, (batch, block + 1), generator=gen)
        out.append((b[:, :-1].contiguous(), b[:, 1:].contiguous()))
    return out


# -- speed: alternating steps in one process ---------------------------------------------------------


def _speed(a, amp) -> tuple[dict[str, float], float | None, str]:
    built = {side: _build(side, a.shape, a.seed, a.grad_checkpointing, a.compile) for side in SIDES}
    opts = {side: _opt(built[side][0], a.fused) for side in SIDES}
    times: dict[str, list[float]] = {side: [] for side in SIDES}
    first: dict[str, float] = {}
    for i, (x, y) in enumerate(_batches(a.shape, a.batch, a.block, a.steps + 1, a.seed)):
        for side in SIDES:
            model, fwd = built[side]
            t0 = time.perf_counter()
            with amp():
                _step(side, model, fwd, opts[side], x, y)
            dt = time.perf_counter() - t0
            if i:
                times[side].append(dt)
            else:
                first[side] = dt
    tps = {side: a.batch * a.block / statistics.median(ts) for side, ts in times.items()}
    compile_s = None
    if a.compile:  # the warm-up step's extra time over a timed one: compiling forward and backward
        compile_s = max(first["ours"] - statistics.median(times["ours"]), 0.0)
    attn = getattr(built["transformers"][0].config, "_attn_implementation", "?")
    return tps, compile_s, attn


# -- memory: each side alone in a child process ------------------------------------------------------


def _child(a, amp) -> None:
    """Train ``a.peak_of``'s side alone for two steps, then print its peak resident set (MB) as JSON."""
    model, fwd = _build(a.peak_of, a.shape, a.seed, a.grad_checkpointing, a.compile)
    opt = _opt(model, a.fused)
    for x, y in _batches(a.shape, a.batch, a.block, 2, a.seed):
        with amp():
            _step(a.peak_of, model, fwd, opt, x, y)
    from gptchat.core.session.pool import peak_rss

    print(json.dumps({"peak_rss_mb": peak_rss() / 2**20}))


def _peaks(argv: list[str]) -> dict[str, float]:
    out = {}
    for side in SIDES:
        cmd = [sys.executable, "-m", "gptchat.core.bench.train", *argv, "--peak-of", side]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"the {side} memory run failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
        out[side] = json.loads(r.stdout.strip().splitlines()[-1])["peak_rss_mb"]
    return out


# -- entry points ------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m gptchat.core.bench.train", description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="gpt2", help="a preset: nano, tiny, mini, distilgpt2, gpt2, ... (default gpt2 = 124M)")
    ap.add_argument("--batch", type=int, default=4, help="sequences a step (default 4)")
    ap.add_argument("--block", type=int, default=1024, help="tokens a sequence (default 1024)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps a side (default 3, after one warm-up)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--foreach", dest="fused", action="store_false", help="foreach AdamW on both sides, not fused")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast on both sides (CPUs with native bf16)")
    ap.add_argument("--grad-checkpointing", action="store_true", help="gptchat recomputes each block in backward")
    ap.add_argument("--compile", action="store_true", help="torch.compile both models (compile time reported apart)")
    ap.add_argument("--no-memory", dest="memory", action="store_false", help="skip the two peak-memory child runs")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    ap.add_argument("--peak-of", choices=SIDES, help=argparse.SUPPRESS)  # the memory child
    return ap


def _precision(bf16: bool) -> tuple[bool, list[str]]:
    """(use bf16, notes): bf16 only where the CPU multiplies it natively; said once, in the notes."""
    from gptchat.core.model.device import cpu_native_bf16

    if bf16 and not cpu_native_bf16():
        return False, ["--bf16: this CPU has no native bf16 (AVX512-BF16 or AMX), where bf16 is slower than fp32; "
                       "measured in fp32"]
    return bf16, []


def run(shape: str = "gpt2", batch: int = 4, block: int = 1024, steps: int = 3, *, seed: int = 0, fused: bool = True,
        bf16: bool = False, grad_checkpointing: bool = False, compile: bool = False, memory: bool = True) -> TrainBench:
    """Measure both sides (the arguments are the command line's options)."""
    from gptchat.core.model.config import PRESETS

    if shape not in PRESETS:
        raise ValueError(f"unknown --shape {shape!r}; use one of {', '.join(PRESETS)}")
    cfg = PRESETS[shape]
    if not 2 <= block <= cfg.n_positions:
        raise ValueError(f"--block {block}: use 2 to {shape}'s {cfg.n_positions}-token window")
    if batch < 1 or steps < 1:
        raise ValueError("--batch and --steps must be at least 1")
    bf16, notes = _precision(bf16)
    a = argparse.Namespace(shape=shape, batch=batch, block=block, steps=steps, seed=seed, fused=fused,
                           grad_checkpointing=grad_checkpointing, compile=compile)
    tps, compile_s, attn = _speed(a, _amp(bf16))
    argv = ["--shape", shape, "--batch", str(batch), "--block", str(block), "--seed", str(seed)]
    argv += [flag for flag, on in (("--foreach", not fused), ("--bf16", bf16), ("--compile", compile),
                                   ("--grad-checkpointing", grad_checkpointing)) if on]
    peaks = _peaks(argv) if memory else {}
    return TrainBench(shape, cfg.n_params(), batch, block, steps, torch.get_num_threads(),
                      "bf16 autocast" if bf16 else "fp32", fused, grad_checkpointing, compile, attn,
                      os.getloadavg()[0], tps, peaks, compile_s, notes)


def _amp(bf16: bool):
    return (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else nullcontext


def main(argv: list[str] | None = None) -> None:
    a = _parser().parse_args(argv)
    if a.peak_of:
        return _child(a, _amp(_precision(a.bf16)[0]))
    try:
        b = run(a.shape, a.batch, a.block, a.steps, seed=a.seed, fused=a.fused, bf16=a.bf16,
                grad_checkpointing=a.grad_checkpointing, compile=a.compile, memory=a.memory)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps(b.to_dict(), indent=2) if a.json else format_bench(b))


if __name__ == "__main__":
    main()
