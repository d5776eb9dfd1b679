"""What the machine allows, measured or counted in the same run as the figures set against it: the read
bandwidth and the bytes of weights a batch-1 decode step reads (its ceiling), the arithmetic of a prefill or an
eval window and the rate of PyTorch's own products at its shapes (theirs).
"""

from __future__ import annotations

import functools
import statistics
import time

import torch

from gptchat.core.model import hugepages
from gptchat.core.model.quant import QuantLinear


def paired_fraction(runs_s: list[float], readings: list[float], tokens: int, weight_bytes: int) -> float:
    """The median over runs of (the run's tokens/s) / (the ceiling from the mean of the bandwidth readings
    just before and just after it): ``readings`` holds one before each run and one after the last."""
    return statistics.median(tokens / t * weight_bytes / ((a + b) / 2 * 1e9)
                             for t, a, b in zip(runs_s, readings, readings[1:]))


def read_bandwidth(seconds: float = 1.0, megabytes: int = 512) -> float:
    """Read bandwidth in GB/s: the median of repeated sums over a buffer larger than any L3 cache, in 2 MB
    pages where the system gives them, as the int8 weights are (the same sums over 4 KB pages measured the
    same on a 2-core AMD EPYC)."""
    buf = hugepages.block(megabytes * 2**20).view(torch.float32).fill_(1.0)
    buf.sum()  # pages touched and threads started before timing
    times: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 3:
        t0 = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - t0)
    return buf.numel() * 4 / statistics.median(times) / 1e9


def prefill_flops(cfg, tokens: int, tail: int = 1) -> float:
    """Arithmetic of a forward of ``tokens`` positions that computes logits for the last ``tail`` (a prefill:
    one; an eval window: the tokens it scores), as the engine runs it: each layer's four products (24 C^2 a
    position: c_attn 3 C^2, c_proj C^2, the MLP's 8 C^2, two operations a multiply-add) and causal attention
    (scores and weighted values, 4 C a key each query sees), except in the last layer, which needs every
    position's keys and values (c_attn) but the rest for the last ``tail`` only; then ``tail`` rows of the head."""
    C, T = cfg.n_embd, tokens
    seen_by_tail = tail * T - tail * (tail - 1) // 2  # keys seen by the last ``tail`` queries
    last = 6 * C * C * T + 4 * C * seen_by_tail + 18 * C * C * tail
    return (cfg.n_layer - 1) * (24 * C * C * T + 2 * C * T * (T + 1)) + last + 2 * C * cfg.vocab_size * tail


def product_rate(cfg, rows: int, dtype: torch.dtype, device, seconds: float = 0.6, int8: bool = False) -> float:
    """FLOP/s: the best median of PyTorch's own products (F.linear, as nn.Linear calls it) of ``rows`` x C
    through a layer's four weight shapes in ``dtype``, measured now: what a prefill's products can reach on
    this machine (a 2-core Zen 4 gave 135-195 GFLOP/s in fp32 and ~410-420 in bf16 across the four).
    ``int8``: PyTorch's int8 GEMM instead (torch._int_mm, as core/model/intmm.py calls it: two byte rows a row),
    counted as the rows' own multiply-adds."""
    import torch.nn.functional as F

    C = cfg.n_embd
    if int8:
        x = {k: torch.randint(-127, 128, (2 * rows, k), dtype=torch.int8) for k in (C, 4 * C)}
    else:
        x = {k: torch.randn(rows, k, dtype=dtype, device=device) for k in (C, 4 * C)}
    best = 0.0
    for n, k in ((3 * C, C), (C, C), (4 * C, C), (C, 4 * C)):
        if int8:
            w = torch.randint(-127, 128, (n, k), dtype=torch.int8).t()
            product = functools.partial(torch._int_mm, x[k], w)
        else:
            product = functools.partial(F.linear, x[k], torch.randn(n, k, dtype=dtype, device=device))
        product()  # warm-up
        times: list[float] = []
        end = time.perf_counter() + seconds / 4
        while time.perf_counter() < end or len(times) < 3:
            _sync(device)
            t0 = time.perf_counter()
            product()
            _sync(device)
            times.append(time.perf_counter() - t0)
        best = max(best, 2 * rows * n * k / statistics.median(times))
    return best


def _sync(device) -> None:
    kind = torch.device(device).type
    if kind == "cuda":
        torch.cuda.synchronize(device)
    elif kind == "mps":
        torch.mps.synchronize()


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one batch-1 decode step reads: everything but the embedding tables, of which
    a token reads one row (the tied head's table is counted, once, as the head)."""
    tables = {id(model.transformer.wpe.weight)}
    wte = getattr(model.transformer.wte, "weight", None)  # None: int8 rows (QuantEmbedding), looked up
    if getattr(model.lm_head, "weight", None) is not wte:
        tables.add(id(wte))
    total = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in tables)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += m.nbytes()
    return total


def streamed_weights(model) -> list:
    """The tensors behind weight_bytes_per_token: the parameters and int8 products' packed groups."""
    packed = (getattr(m, "packed", None) for m in model.modules() if isinstance(m, QuantLinear))
    return list(model.parameters()) + [t for t in packed if t is not None]
