"""Training throughput: gptchat's training step against a plain transformers loop, side by side.

    python -m gptchat.core.bench.train                 # 124M shapes, micro-batch 1 x 256 tokens
    python -m gptchat.core.bench.train --shape tiny --batch 4 --block 128 --steps 5

Both sides get the same random init shape, the same token batches, the same AdamW (lr 6e-5,
betas 0.9/0.95, eps 1e-8, weight decay 0.1 on 2-D weights, fused), clipping at 1.0, fp32 on CPU.
The steps alternate (ours, theirs, ours, ...) so background load hits both alike; the first step
of each is a warm-up and not timed. Prints tokens/s for both and the ratio ours/theirs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _opt(model, fused: bool):
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=6e-5, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def _ours_step(model, opt, x, y):
    from gptchat.core.train.evaluate import loss_fn

    loss = loss_fn(model(x), y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def _hf_step(model, opt, x, y):
    # the standard transformers way: labels = inputs, the model shifts them internally
    ids = torch.cat([x, y[:, -1:]], dim=1)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def run(shape: str = "gpt2", batch: int = 1, block: int = 256, steps: int = 3, fused: bool = True, seed: int = 0) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    from gptchat.core.model.config import PRESETS
    from gptchat.core.model.gpt import GPT

    cfg = PRESETS[shape]
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
    times = {"ours": [], "transformers": []}
    for i, b in enumerate(batches):
        x, y = b[:, :-1].contiguous(), b[:, 1:].contiguous()
        for name, fn, m, o in (("ours", _ours_step, ours, o_opt), ("transformers", _hf_step, theirs, h_opt)):
            t0 = time.perf_counter()
            fn(m, o, x, y)
            if i > 0:
                times[name].append(time.perf_counter() - t0)
    tokens = batch * block
    out = {"shape": shape, "params": cfg.n_params(), "batch": batch, "block": block, "steps": steps,
           "threads": torch.get_num_threads(), "attn": getattr(theirs.config, "_attn_implementation", "?")}
    for name, ts in times.items():
        out[f"{name}_tokens_per_s"] = tokens / statistics.median(ts)
    out["ratio"] = out["ours_tokens_per_s"] / out["transformers_tokens_per_s"]
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m gptchat.core.bench.train", description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="gpt2", help="a preset: nano, tiny, mini, distilgpt2, gpt2, ... (default gpt2 = 124M)")
    ap.add_argument("--batch", type=int, default=1, help="micro-batch (default 1)")
    ap.add_argument("--block", type=int, default=256, help="tokens per sequence (default 256)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per side (default 3, plus one warm-up)")
    ap.add_argument("--no-fused", action="store_true", help="use the default (foreach) AdamW on both sides")
    a = ap.parse_args(argv)
    r = run(a.shape, a.batch, a.block, a.steps, fused=not a.no_fused)
    print(f"{r['shape']} ({r['params'] / 1e6:.0f}M), micro-batch {r['batch']} x {r['block']} tokens, "
          f"{r['threads']} threads, transformers attention: {r['attn']}")
    print(f"  gptchat:      {r['ours_tokens_per_s']:8.1f} tokens/s")
    print(f"  transformers: {r['transformers_tokens_per_s']:8.1f} tokens/s")
    print(f"  ratio gptchat/transformers: {r['ratio']:.2f}")


if __name__ == "__main__":
    main()
