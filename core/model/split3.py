"""fp32 products as three bf16 products on AMX tiles ("bf16x3"): eval's head on CPUs with AMX.

Each of x and w is split into its bf16 rounding and the bf16 rounding of what that leaves (hi + lo, ~16 of
fp32's 24 bits), and x w ~ x_hi w_hi + x_hi w_lo + x_lo w_hi (the x_lo w_lo term and the bits past lo are
~2^-16 of each term): one bf16 product of three times the inputs, [x_hi, x_hi, x_lo] by [w_hi, w_lo, w_hi],
summed in fp32 on AMX tiles (qkernel.c's gptchat_amx_gemm32). On a 2-core Xeon with AMX, 512 rows through GPT-2's
head (50257 x 768) in vocabulary blocks of 2048, each block's log-sum-exp taken after it: 89 ms against 134 ms for
MKL's fp32 product on packed blocks; the row log-sum-exps 4-7e-5 from fp64's, MKL's 1e-5 (random weights at 0.1
and hidden states at 2, logits to ~31). Eval uses it for the log-sum-exp only: the target's logit stays an fp32
dot product, and a loss averages thousands of these errors of either sign: `gptchat eval` of 400 KB of the Python
docs with a 16M model trained on their tutorial, 4.8997913 against 4.8997916 nats (GPTCHAT_BF16X3=0), 6740 against
5391 tokens/s; the eval bench (124M, random weights) 0.86x -> 0.94x the prefill's tokens/s.
AMX multiplied at ~2 TFLOP/s here (512 x 2048 x 2304; two rows of tiles by two panels a chunk, 1.77 before), a
third of its peak, still 2x fp32's FMAs at three times the products.

The packed copy is 3x the head's columns in bf16: 231 MB for GPT-2's 50257 x 768 (MKL's packed fp32 blocks it
replaces: 154 MB). ``GPTCHAT_BF16X3=0`` turns it off.
"""

from __future__ import annotations

import torch

from gptchat.core.model import native
from gptchat.core.model.device import switched_off


def usable(width: int) -> bool:
    """Products over ``width`` inputs can go this way: AMX tiles are there (native.amx), the products are not
    switched off (``GPTCHAT_BF16X3=0``), and 3 x width is whole chunks of 32 (the tiles')."""
    return (width % 32 == 0 and not switched_off("GPTCHAT_BF16X3") and native.kernel() is not None
            and native.amx())


def _split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    hi = t.to(torch.bfloat16)
    return hi, (t - hi.float()).to(torch.bfloat16)


def pack(w: torch.Tensor) -> torch.Tensor:
    """An fp32 weight (N, K) -> the bf16 panels of [w_hi, w_lo, w_hi] (N, 3K) that ``product`` multiplies by."""
    hi, lo = _split(w.detach().float())
    return native.bpanels(torch.cat([hi, lo, hi], 1))


def inputs(x: torch.Tensor) -> torch.Tensor:
    """fp32 rows (M, K) -> [x_hi, x_hi, x_lo] (M, 3K) bf16, the rows ``product`` takes."""
    hi, lo = _split(x.float())
    return torch.cat([hi, hi, lo], 1)


def product(panels: torch.Tensor, x3: torch.Tensor, n: int, room: torch.Tensor | None = None) -> torch.Tensor:
    """x w^T (M, n) fp32 from ``inputs(x)`` and ``pack(w)`` of a w of ``n`` rows: a view of an (M, n rounded up to
    16) buffer, made in ``room`` (fp32, flat, large enough) where given. x3's width a multiple of 32."""
    m, k = x3.shape
    n16 = -(-n // 16) * 16
    y = torch.empty(m, n16) if room is None else room[: m * n16].view(m, n16)
    if native.kernel().gptchat_amx_gemm32(panels.data_ptr(), x3.contiguous().data_ptr(), y.data_ptr(), m, n, k,
                                          torch.get_num_threads()):
        raise ValueError(f"bf16x3 product: inputs of width {k} (a multiple of 32 is needed)")
    return y[:, :n]
