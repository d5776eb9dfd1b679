"""Speed of `gptchat eval` against the engine's prefill and transformers' perplexity-guide loop.

    python -m gptchat.core.bench.eval --shape gpt2 --tokens 65536 [--device cuda] [--stride 512]

Random weights of a preset shape, random token ids (speed does not depend on the text). Three
figures on the same windows: eval's scored tokens/s and window tokens/s (tokens through the model,
context included), the engine's prefill tokens/s on one 1024-token prompt, and the scored tokens/s of
the loop in Hugging Face's perplexity guide (one window per forward, full logits, its own loss), with
the two losses side by side. Ratios > 1 mean eval is faster.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch

from gptchat.core.bench.engine import random_checkpoint
from gptchat.core.eval.perplexity import score_ids
from gptchat.core.generate.loaded import open_model


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak(device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _prefill_rate(engine, n: int = 1024, repeats: int = 3) -> float:
    x = torch.randint(0, 50000, (1, min(n, engine.n_ctx)))
    engine.prefill(x, None, None)  # warm-up
    _sync(engine.device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        engine.prefill(x, None, None)
    _sync(engine.device)
    engine.model.drop_cache()
    return repeats * x.shape[1] / (time.perf_counter() - t0)


def _reference(folder: Path, ids: list[int], plan, device, dtype) -> tuple[float, float]:
    """The perplexity guide's loop on the same windows: (scored tokens/s, mean loss)."""
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(str(folder), dtype=dtype).to(device).eval()
    nats = n = 0
    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for w in plan.windows:
            x = torch.tensor([ids[w.begin : w.end]], device=device)
            labels = x.clone()
            labels[0, : w.first - w.begin] = -100
            k = w.n_scored
            nats += float(hf(x, labels=labels).loss) * k
            n += k
    _sync(device)
    return n / (time.perf_counter() - t0), nats / n


def run(shape: str, tokens: int, device: str | None, dtype: str | None, stride: int | None, reference: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        folder = random_checkpoint(shape, Path(tmp) / "m")
        lm = open_model(str(folder), device=device, dtype=dtype)
        e = lm.engine
        ids = torch.randint(0, 50000, (tokens,), generator=torch.Generator().manual_seed(0)).tolist()
        weights = sum(p.numel() * p.element_size() for p in e.model.parameters())
        score_ids(e, ids[: 4 * e.n_ctx], stride=stride)  # warm-up
        if e.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(e.device)
        _sync(e.device)
        t0 = time.perf_counter()
        nats, plan = score_ids(e, ids, stride=stride)
        _sync(e.device)
        secs = time.perf_counter() - t0
        scored = sum(w.n_scored for w in plan.windows)
        forwarded = sum(w.end - w.begin for w in plan.windows)
        out = {"shape": shape, "device": str(e.device), "dtype": str(e.dtype), "tokens": tokens,
               "window": plan.window, "stride": plan.stride, "windows": len(plan.windows), "loss": nats / scored,
               "eval_scored_tok_s": scored / secs, "eval_window_tok_s": forwarded / secs,
               "peak_mem_bytes": _peak(e.device), "weights_bytes": weights,
               "prefill_tok_s": _prefill_rate(e)}
        out["window_vs_prefill"] = out["eval_window_tok_s"] / out["prefill_tok_s"]
        if reference:
            ref_rate, ref_loss = _reference(folder, ids, plan, e.device, e.dtype)
            out.update(hf_scored_tok_s=ref_rate, hf_loss=ref_loss, scored_vs_hf=out["eval_scored_tok_s"] / ref_rate)
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="gpt2")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--device")
    ap.add_argument("--dtype")
    ap.add_argument("--stride", type=int)
    ap.add_argument("--no-reference", action="store_true")
    a = ap.parse_args()
    print(json.dumps(run(a.shape, a.tokens, a.device, a.dtype, a.stride, not a.no_reference), indent=2))


if __name__ == "__main__":
    main()
