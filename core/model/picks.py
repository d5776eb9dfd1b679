"""Picking tokens from CPU logits in gptchat's C kernels (qkernel.c): greedy's argmax and top-k draws.

PyTorch's one-row reductions are slow on the CPU (its ``topk`` over 50257 logits ~90 us, ``argmax`` ~44 us on a
2-core Zen 4; 16 rows' argmax 1.2 ms on a 2-core Xeon), and a decode step does nothing else between products.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from gptchat.core.model import native

TOP_K_MAX = 256  # the most tokens gptchat_sample_topk keeps (TOPK_MAX in qkernel.c)


@functools.lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL | None:
    lib = native.kernel()
    if lib is None:
        return None
    P, L, I = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    lib.gptchat_sample_topk.argtypes = [P, L, L, L, L, ctypes.c_double, ctypes.c_double, P, P, I]
    lib.gptchat_sample_topk.restype = I
    lib.gptchat_argmax.argtypes, lib.gptchat_argmax.restype = [P, L, L, L, I, P, I], None
    return lib


def argmax(logits: torch.Tensor) -> torch.Tensor | None:
    """torch.argmax(logits, -1) (the first of equal values, the first NaN where there is one) for CPU logits
    (B, V) of fp32 or bf16 with unit stride along V; None where the kernel cannot take them."""
    lib = _lib()
    if (lib is None or logits.device.type != "cpu" or logits.dtype not in (torch.float32, torch.bfloat16)
            or logits.dim() != 2 or logits.stride(1) != 1 or logits.shape[1] == 0):
        return None
    B, V = logits.shape
    out = torch.empty(B, dtype=torch.long)
    lib.gptchat_argmax(logits.data_ptr(), B, V, logits.stride(0), int(logits.dtype == torch.bfloat16),
                       out.data_ptr(), min(torch.get_num_threads(), B))
    return out


def can_sample_top_k(logits: torch.Tensor, k: int) -> bool:
    """``sample_top_k`` applies: fp32 CPU logits (B, V) with unit stride along V, 1 < k < V, k <= TOP_K_MAX, the
    kernel built."""
    return (logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2
            and logits.stride(1) == 1 and 1 < k <= TOP_K_MAX and k < logits.shape[1] and _lib() is not None)


def sample_top_k(logits: torch.Tensor, k: int, temperature: float, top_p: float,
                 u: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(tokens (B,), rows left): each row's token drawn from its ``k`` best logits after temperature and top-p with
    its uniform ``u`` (B,) float64, or -1 for a row the caller must draw from its whole row (gptchat_sample_topk)."""
    B, V = logits.shape
    u = u.to(torch.float64).contiguous()
    out = torch.empty(B, dtype=torch.long)
    left = _lib().gptchat_sample_topk(logits.data_ptr(), B, V, logits.stride(0), k, temperature, top_p,
                                      u.data_ptr(), out.data_ptr(), torch.get_num_threads())
    return out, left
