"""Training throughput: gptchat's training step against a plain transformers loop, side by side.

    python -m gptchat.core.bench.train                 # 124M shapes, micro-batch 1 x 256 tokens
    python -m gptchat.core.bench.train --shape tiny --batch 4 --block 128 --steps 5

Both sides get the same random init shape, the same token batches, the same AdamW (lr 6e-5,
betas 0.9/0.95, eps 1e-8, weight decay 0.1 on 2-D weights, fused), clipping at 1.0, fp32 on CPU.
The steps alternate (ours, theirs, ours, ...) so background load hits both alike; the first step
of each is a warm-up and not timed. Prints tokens/s for both and the ratio ours/theirs, and each
side's peak memory during a step (the most the process's resident set grew above its size before
the step, sampled every millisecond). gptchat's loss never builds the (B*T, V) fp32 logits
(evaluate.head_loss: the head and cross-entropy fused, in chunks); transformers' does.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from contextlib import nullcontext

import torch


def _opt(model, fused: bool):
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=6e-5, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Peak:
    """The most the resident set grows above its size at entry, sampled every millisecond."""

    def __enter__(self):
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._watch, daemon=True)
        self._t.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss())

    @property
    def grown(self) -> int:
        return self.peak - self.base


def _ours_step(model, opt, x, y):
    from gptchat.core.train.evaluate import head_loss

    loss = head_loss(model(x, return_hidden=True), model.lm_head.weight, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def _hf_step(model, opt, x, y):
    # the standard transformers way: labels = inputs, the model shifts them internally (so it scores
    # block-1 positions to our block: inputs of block+1 tokens would pass a 1024-token window)
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def run(shape: str = "gpt2", batch: int = 1, block: int = 256, steps: int = 3, fused: bool = True, seed: int = 0,
        bf16: bool = False) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    from gptchat.core.model.config import PRESETS
    from gptchat.core.model.gpt import GPT

    cfg = PRESETS[shape]
    if block > cfg.n_positions:
        raise ValueError(f"--block {block} is longer than {shape}'s {cfg.n_positions}-token window")
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else nullcontext
    ours = GPT(cfg)
    ours.init_weights(seed)
    ours.train()
    hf_cfg = GPT2Config(**{k: v for k, v in cfg.to_hf().items() if k not in ("architectures", "torch_dtype")},
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    theirs = GPT2LMHeadModel(hf_cfg)
    theirs.train()
    o_opt, h_opt = _opt(ours, fused), _opt(theirs, fused)
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, cfg.vocab_size, (batch, block + 1), generator=gen) for _ in range(steps + 1)]
    times: dict[str, list[float]] = {"ours": [], "transformers": []}
    peak = {"ours": 0, "transformers": 0}
    for i, b in enumerate(batches):
        x, y = b[:, :-1].contiguous(), b[:, 1:].contiguous()
        for name, fn, m, o in (("ours", _ours_step, ours, o_opt), ("transformers", _hf_step, theirs, h_opt)):
            with _Peak() as p, amp():
                t0 = time.perf_counter()
                fn(m, o, x, y)
                dt = time.perf_counter() - t0
            if i > 0:  # the first step also allocates the optimizer state: not a step's memory
                times[name].append(dt)
                peak[name] = max(peak[name], p.grown)
    tokens = batch * block
    out = {"shape": shape, "params": cfg.n_params(), "batch": batch, "block": block, "steps": steps,
           "threads": torch.get_num_threads(), "attn": getattr(theirs.config, "_attn_implementation", "?"),
           "precision": "bf16 autocast" if bf16 else "fp32"}
    for name, ts in times.items():
        out[f"{name}_tokens_per_s"] = tokens / statistics.median(ts)
        out[f"{name}_step_peak_mb"] = peak[name] / 2**20
    out["ratio"] = out["ours_tokens_per_s"] / out["transformers_tokens_per_s"]
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m gptchat.core.bench.train", description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="gpt2", help="a preset: nano, tiny, mini, distilgpt2, gpt2, ... (default gpt2 = 124M)")
    ap.add_argument("--batch", type=int, default=1, help="micro-batch (default 1)")
    ap.add_argument("--block", type=int, default=256, help="tokens per sequence (default 256)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per side (default 3, plus one warm-up)")
    ap.add_argument("--no-fused", action="store_true", help="use the default (foreach) AdamW on both sides")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast on both sides (CPUs with native bf16)")
    a = ap.parse_args(argv)
    r = run(a.shape, a.batch, a.block, a.steps, fused=not a.no_fused, bf16=a.bf16)
    print(f"{r['shape']} ({r['params'] / 1e6:.0f}M), micro-batch {r['batch']} x {r['block']} tokens, {r['precision']}, "
          f"{r['threads']} threads, transformers attention: {r['attn']}, load {os.getloadavg()[0]:.2f}")
    print(f"  gptchat:      {r['ours_tokens_per_s']:8.1f} tokens/s, step peak +{r['ours_step_peak_mb']:.0f} MB")
    print(f"  transformers: {r['transformers_tokens_per_s']:8.1f} tokens/s, step peak +{r['transformers_step_peak_mb']:.0f} MB")
    print(f"  ratio gptchat/transformers: {r['ratio']:.2f}; peak memory ratio "
          f"{r['ours_step_peak_mb'] / max(r['transformers_step_peak_mb'], 1e-9):.2f}")


if __name__ == "__main__":
    main()
