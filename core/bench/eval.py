"""Speed and memory of `gptchat eval` against the engine's prefill and transformers' perplexity-guide loop.

    python -m gptchat.core.bench.eval [--shape gpt2] [--rounds 3] [--windows 4] [--stride 512] [--json]

Random weights of a preset shape and random token ids (speed does not depend on the text). Each round
scores the same ``windows`` sliding windows three ways, one after the other, so that a change in
background load hits all three: our eval (score_windows, the code `gptchat eval` runs), the engine's
prefill of one 1000-token prompt, and the loop of Hugging Face's perplexity guide on the same weights
(GPT2LMHeadModel, one window per forward, labels -100 on the context, its own loss). The figures are
medians over rounds of the per-round ratios:

(a) eval's window tokens/s (context included) over the prefill's tokens/s; target >= 0.9;
(b) eval's scored tokens/s over the guide loop's; target >= 1.5;
(c) the peak RSS of a child process that opens the model and scores one batch of windows of a
    ``heldout_tokens``-token text (1 MB of English is about 250k GPT-2 tokens) and never builds the
    transformers model; target < 1.5 x the fp32 weights + 1 GB.

The rounds take windows from the middle of the text (each scores ``stride`` tokens, as all but the
first of a long text do). The engine's packed weights are built in the warm-up, as a long eval builds them at
its start (perplexity.PACK_FROM_TOKENS): the rounds time a long eval's steady pace.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from gptchat.core.bench.ceilings import prefill_flops
from gptchat.core.bench.engine import random_checkpoint
from gptchat.core.eval.perplexity import (PACK_FROM_TOKENS, batch_tokens_for, head_products, packed_for_eval,
                                          plan_windows, score_windows)
from gptchat.core.generate.loaded import open_model
from gptchat.core.session.pool import peak_rss as process_peak_rss, process_rss

TARGET_VS_PREFILL = 0.9
TARGET_VS_HF = 1.5
RSS_WEIGHTS_FACTOR, RSS_SLACK = 1.5, 10**9  # peak RSS < 1.5 x fp32 weights + 1 GB
PREFILL_TOKENS = 1000
PRODUCTS = {"plain": "PyTorch's GEMM", "panels": "gptchat's panel copy", "mkl": "MKL's packed copy"}
HEADS = {"plain": "in blocks of the plain weight", "mkl": "in MKL-packed blocks",
         "bf16x3": "in blocks of three bf16 products on AMX tiles"}
HELDOUT_TOKENS = 250_000  # about 1 MB of English text in GPT-2 tokens


@dataclass
class EvalBench:
    shape: str
    device: str
    dtype: str
    threads: int
    cores: int
    load: tuple[float, float]  # 1-minute load average at the start and at the end
    window: int
    stride: int
    rounds: int
    windows_per_round: int
    batch_tokens: int
    eval_window_tok_s: float  # medians over rounds
    eval_scored_tok_s: float
    prefill_tok_s: float
    window_vs_prefill: float  # median of the per-round ratios
    loss: float
    weights_bytes: int  # fp32 bytes of the weights
    hf_scored_tok_s: float | None = None
    scored_vs_hf: float | None = None
    hf_loss: float | None = None
    peak_rss_bytes: int | None = None  # of the child process
    rss_after_load_bytes: int | None = None
    heldout_tokens: int = 0
    arithmetic_bound: float = 0.0  # (a) at equal FLOP rates: prefill arithmetic a token / eval's a window token
    body_vs_prefill: float = 0.0  # window tokens/s through the model's body alone over the prefill's (medians)
    head_share: float = 0.0  # of eval's time, the head and the loss
    products: str = "plain"  # what eval multiplies on: "plain" (PyTorch's GEMM), "panels" or "mkl" (packed copies)
    head: str = "plain"  # and its head: "plain", "mkl" (packed blocks) or "bf16x3" (three bf16 products on AMX)

    @property
    def rss_limit_bytes(self) -> int:
        return int(RSS_WEIGHTS_FACTOR * self.weights_bytes + RSS_SLACK)

    def to_dict(self) -> dict:
        return {**asdict(self), "rss_limit_bytes": self.rss_limit_bytes, "targets": {
            "window_vs_prefill": TARGET_VS_PREFILL, "scored_vs_hf": TARGET_VS_HF, "peak_rss_bytes": self.rss_limit_bytes}}

    def format(self) -> str:
        def verdict(ok: bool) -> str:
            return "met" if ok else "MISSED"

        gb = 1e9
        lines = [
            f"eval bench: {self.shape} (random weights), {self.device} {self.dtype}, {self.threads} threads on "
            f"{self.cores} cores, load {self.load[0]:.1f} -> {self.load[1]:.1f}; {self.rounds} rounds of "
            f"{self.windows_per_round} windows of {self.window} tokens, stride {self.stride}, batches of "
            f"{self.batch_tokens} tokens; products on {PRODUCTS[self.products]}, the head {HEADS[self.head]}",
            f"(a) window tokens/s: eval {self.eval_window_tok_s:.1f}, engine prefill ({PREFILL_TOKENS} tokens) "
            f"{self.prefill_tok_s:.1f}: {self.window_vs_prefill:.2f}x (target >= {TARGET_VS_PREFILL}x: "
            f"{verdict(self.window_vs_prefill >= TARGET_VS_PREFILL)})",
            f"    the arithmetic alone allows {self.arithmetic_bound:.2f}x at the prefill's FLOP rate (a window also "
            f"computes the head for each token it scores, the prefill for its last only): eval ran at "
            f"{self.window_vs_prefill / self.arithmetic_bound:.2f} of the prefill's FLOP rate; the body alone (every "
            f"window token through the blocks) {self.body_vs_prefill:.2f}x the prefill's tokens/s, the head and the loss "
            f"{self.head_share:.0%} of eval's time",
        ]
        if self.scored_vs_hf is not None:
            lines += [
                f"(b) scored tokens/s: eval {self.eval_scored_tok_s:.1f}, transformers' perplexity-guide loop "
                f"{self.hf_scored_tok_s:.1f}: {self.scored_vs_hf:.2f}x (target >= {TARGET_VS_HF}x: "
                f"{verdict(self.scored_vs_hf >= TARGET_VS_HF)})",
                f"    loss: eval {self.loss:.6f}, transformers {self.hf_loss:.6f} (difference "
                f"{abs(self.loss - self.hf_loss):.1e})",
            ]
        if self.peak_rss_bytes is not None:
            lines.append(
                f"(c) peak RSS of eval in a child process ({self.heldout_tokens} held-out tokens): "
                f"{self.peak_rss_bytes / gb:.2f} GB (after loading the model {self.rss_after_load_bytes / gb:.2f} GB); "
                f"limit 1.5 x {self.weights_bytes / gb:.2f} GB weights + 1 GB = {self.rss_limit_bytes / gb:.2f} GB: "
                f"{self.peak_rss_bytes / self.rss_limit_bytes:.2f} of it ({verdict(self.peak_rss_bytes < self.rss_limit_bytes)})")
        return "\n".join(lines)


def _peak_child(folder: str, heldout_tokens: int, n_windows: int, stride: int | None, batch_tokens: int, out) -> None:
    """In a fresh process: open the model, hold a held-out text's ids, score ``n_windows`` windows of it."""
    lm = open_model(folder, device="cpu", dtype="fp32")
    after_load = process_rss()
    e = lm.engine
    ids = torch.randint(0, 50000, (heldout_tokens,), generator=torch.Generator().manual_seed(1)).tolist()
    ws = plan_windows(len(ids), e.n_ctx, stride or e.n_ctx // 2)
    n_windows = max(n_windows, -(-PACK_FROM_TOKENS // e.n_ctx))  # enough that eval packs its weights, as a long one does
    score_windows(e, ids, ws[1 : 1 + n_windows], batch_tokens=batch_tokens)
    out.put((after_load, process_peak_rss()))


def peak_rss(folder: Path, heldout_tokens: int, n_windows: int, stride: int | None, batch_tokens: int) -> tuple[int, int]:
    """(RSS after loading, peak RSS) of eval in a child process (RSS peaks are per process)."""
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_peak_child, args=(str(folder), heldout_tokens, n_windows, stride, batch_tokens, q))
    p.start()
    res = q.get()
    p.join()
    return res


def _arithmetic_bound(cfg, windows, prefill_tokens: int) -> float:
    """(a)'s ceiling if eval and prefill ran at the same FLOP rate: the prefill's arithmetic a token over the
    windows' a window token (their heads over every scored token; the loss's log-sum-exp not counted)."""
    tokens = sum(w.end - w.begin for w in windows)
    per_window = sum(prefill_flops(cfg, w.end - w.begin, w.n_scored) for w in windows) / tokens
    return prefill_flops(cfg, prefill_tokens) / prefill_tokens / per_window


def _hf_loop(hf, ids: list[int], windows) -> tuple[float, int]:
    """The perplexity guide's loop: (sum of -log p, scored tokens)."""
    nats, n = 0.0, 0
    with torch.no_grad():
        for w in windows:
            x = torch.tensor([ids[w.begin : w.end]])
            labels = x.clone()
            labels[0, : w.first - w.begin] = -100
            nats += float(hf(x, labels=labels).loss) * w.n_scored
            n += w.n_scored
    return nats, n


def _timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def run(shape: str = "gpt2", rounds: int = 3, windows: int = 4, stride: int | None = None, batch_tokens: int | None = None,
        reference: bool = True, memory: bool = True, heldout_tokens: int = HELDOUT_TOKENS,
        log: Callable[[str], None] = lambda s: None) -> EvalBench:
    """Measure (a), (b) and (c) of the module docstring on CPU in fp32."""
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        folder = random_checkpoint(shape, Path(tmp) / "m")
        lm = open_model(str(folder), device="cpu", dtype="fp32")
        e = lm.engine
        stride = stride or e.n_ctx // 2
        batch_tokens = batch_tokens or batch_tokens_for(e)
        n_ids = (1 + rounds * windows) * stride + e.n_ctx
        ids = torch.randint(0, 50000, (n_ids,), generator=torch.Generator().manual_seed(0)).tolist()
        plan = plan_windows(n_ids, e.n_ctx, stride)
        chunks = [plan[1 + r * windows : 1 + (r + 1) * windows] for r in range(rounds)]
        prompt = torch.randint(0, 50000, (1, min(PREFILL_TOKENS, e.n_ctx)))
        hf = None
        if reference:
            from transformers import GPT2LMHeadModel

            hf = GPT2LMHeadModel.from_pretrained(str(folder), dtype=torch.float32).eval()
        log("warm-up")
        fast = packed_for_eval(e, PACK_FROM_TOKENS)  # what a long eval packs at its start: once here
        if fast is not None:
            fast.refresh()
        products = fast.kind if fast is not None else "plain"
        head = head_products(e.model, fast) or "plain"
        score_windows(e, ids, chunks[0][:1], batch_tokens=batch_tokens)
        e.prefill(prompt, None, None)
        if hf is not None:
            _hf_loop(hf, ids, chunks[0][:1])
        ours, pre, ref, nats, hf_nats, split = [], [], [], 0.0, 0.0, []
        for r, ws in enumerate(chunks):
            spent = [0.0, 0.0]
            s, n = _timed(lambda: score_windows(e, ids, ws, batch_tokens=batch_tokens, spent=spent))
            split.append(spent)
            nats += n
            ours.append(s)
            pre.append(_timed(lambda: e.prefill(prompt, None, None))[0])
            e.model.drop_cache()
            if hf is not None:
                s, (n, _) = _timed(lambda: _hf_loop(hf, ids, ws))
                hf_nats += n
                ref.append(s)
            log(f"round {r + 1}/{rounds}: eval {ours[-1]:.1f} s, prefill {pre[-1]:.1f} s"
                + (f", transformers {ref[-1]:.1f} s" if ref else ""))
        hf = None  # freed before the memory child runs
        win = sum(w.end - w.begin for w in chunks[0])
        scored = sum(w.n_scored for w in chunks[0])
        n_scored = sum(w.n_scored for ws in chunks for w in ws)
        med = statistics.median
        b = EvalBench(
            shape=shape, device=str(e.device), dtype=str(e.dtype).replace("torch.", ""),
            threads=torch.get_num_threads(), cores=len(os.sched_getaffinity(0)), load=(load0, 0.0),
            window=e.n_ctx, stride=stride, rounds=rounds, windows_per_round=windows, batch_tokens=batch_tokens,
            eval_window_tok_s=med(win / s for s in ours), eval_scored_tok_s=med(scored / s for s in ours),
            prefill_tok_s=med(prompt.shape[1] / s for s in pre),
            window_vs_prefill=med((win / s) / (prompt.shape[1] / p) for s, p in zip(ours, pre)),
            body_vs_prefill=med((win / body) / (prompt.shape[1] / p) for (body, _), p in zip(split, pre)),
            head_share=med(head / s for (_, head), s in zip(split, ours)),
            loss=nats / n_scored, weights_bytes=sum(p.numel() * 4 for p in e.model.parameters()),
            arithmetic_bound=_arithmetic_bound(e.model.config, chunks[0], prompt.shape[1]), products=products,
            head=head,
        )
        if ref:
            b.hf_scored_tok_s = med(scored / s for s in ref)
            b.scored_vs_hf = med(h / s for s, h in zip(ours, ref))
            b.hf_loss = hf_nats / n_scored
        lm = e = None
        if memory:
            log("peak RSS in a child process")
            b.rss_after_load_bytes, b.peak_rss_bytes = peak_rss(folder, heldout_tokens, windows, stride, batch_tokens)
            b.heldout_tokens = heldout_tokens
    b.load = (load0, os.getloadavg()[0])
    return b


def main() -> None:
    import sys

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="gpt2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--windows", type=int, default=4, help="windows per round (one batch at the default batch size)")
    ap.add_argument("--stride", type=int)
    ap.add_argument("--batch-tokens", type=int, help="tokens per forward (default: what gptchat eval uses)")
    ap.add_argument("--heldout-tokens", type=int, default=HELDOUT_TOKENS)
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    b = run(a.shape, a.rounds, a.windows, a.stride, a.batch_tokens, not a.no_reference, not a.no_memory,
            a.heldout_tokens, log=lambda s: print(f"bench: {s}", file=sys.stderr, flush=True))
    print(json.dumps(b.to_dict(), indent=2) if a.json else b.format())


if __name__ == "__main__":
    main()
