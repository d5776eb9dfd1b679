"""Causal self-attention for bf16 training on the CPU: forward and backward in gptchat's C kernel
(qkernel.c, ``gptchat_attn_train_fwd``/``_bwd``), on CPUs with AVX512-BF16.

Why: under bf16 autocast a 124M finetune step (4 x 1024 tokens) on a 2-core Zen 4 spent a fifth of its
time in PyTorch's CPU flash attention, 72 ms forward and 129 ms backward a layer, where its products of
the same bf16 numbers ran at ~400 GFLOP/s and attention reached 89 and 124. The kernel multiplies bf16
pairs into fp32 sums with the CPU's bf16 dot-product instruction, keeps what PyTorch's kernel keeps for
backward (q, k, v, the output and each row's log-sum-exp) and rounds P and dS to bf16 for their products
as PyTorch's does. It takes c_attn's output (B, T, 3C) whole and returns (B, T, C), the layout c_proj
reads, so no head-major copies are made either way.
"""

from __future__ import annotations

import torch

from gptchat.core.model import native
from gptchat.core.model.device import cpu_flags, switched_off

NEEDS = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"}


def usable(qkv: torch.Tensor, n_head: int) -> bool:
    """The kernel applies: bf16 activations wanting gradients on the CPU, head size a multiple of 16, a CPU
    with AVX512-BF16, the kernel built, not inside torch.compile, and not switched off
    (``GPTCHAT_BF16_ATTENTION=0``)."""
    C = qkv.shape[-1] // 3
    return (qkv.dtype == torch.bfloat16 and qkv.device.type == "cpu" and qkv.requires_grad and qkv.dim() == 3
            and C % n_head == 0 and (C // n_head) % 16 == 0 and torch.is_grad_enabled()
            and not torch.compiler.is_compiling() and not switched_off("GPTCHAT_BF16_ATTENTION")
            and NEEDS <= cpu_flags() and native.kernel() is not None)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv: torch.Tensor, n_head: int, scale: float) -> torch.Tensor:
        B, T, C3 = qkv.shape
        C = C3 // 3
        qkv = qkv.contiguous()
        out = qkv.new_empty(B, T, C)
        lse = torch.empty(B, n_head, T)
        if native.kernel().gptchat_attn_train_fwd(qkv.data_ptr(), out.data_ptr(), lse.data_ptr(), B, T, C, n_head,
                                                  C // n_head, scale, torch.get_num_threads()):
            raise MemoryError("bf16 attention kernel: no memory for its scratch buffers")
        ctx.save_for_backward(qkv, out, lse)
        ctx.n_head, ctx.scale = n_head, scale
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        qkv, out, lse = ctx.saved_tensors
        B, T, C3 = qkv.shape
        C = C3 // 3
        grad = grad.to(torch.bfloat16).contiguous()
        dqkv = torch.empty_like(qkv)
        if native.kernel().gptchat_attn_train_bwd(qkv.data_ptr(), out.data_ptr(), grad.data_ptr(), lse.data_ptr(),
                                                  dqkv.data_ptr(), B, T, C, ctx.n_head, C // ctx.n_head, ctx.scale,
                                                  torch.get_num_threads()):
            raise MemoryError("bf16 attention kernel: no memory for its scratch buffers")
        return dqkv, None, None


def attention(qkv: torch.Tensor, n_head: int, scale: float) -> torch.Tensor:
    """Causal attention from position 0 of c_attn's output ``qkv`` (B, T, 3C): (B, T, C). See ``usable``."""
    return _Attention.apply(qkv, n_head, scale)
