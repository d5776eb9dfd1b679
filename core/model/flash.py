"""Causal self-attention from slot 0 on the CPU in gptchat's C kernel (qkernel.c, ``gptchat_attn_fwd``/``_bwd``):
training's forward and backward, and the forward of prefills and eval windows; fp32 on CPUs with AVX-512 and
bf16 on those with AVX512-BF16 too.

Why: a 124M finetune step (4 x 1024 tokens) on a 2-core Zen 4 spent 13% of its time (fp32) and 20% (bf16
autocast) in PyTorch's CPU flash attention, whose products ran at about half (fp32) and a quarter (bf16) of
the speed PyTorch's own matrix products reach there. The kernel packs its operands in panels of 16 outputs
(fp32 FMA, or the CPU's bf16 pair dot product), keeps what PyTorch's kernel keeps for backward (q, k, v, the
output and each row's log-sum-exp) and, in bf16, rounds P and dS to bf16 for their products as PyTorch's
does. It takes c_attn's output (B, T, 3C) whole and returns (B, T, C), the layout c_proj reads, so no
head-major copies are made either way. Measured there, forward + backward a layer: fp32 50 + 128 ms against
66 + 197, bf16 32 + 66 against 67 + 137; the step 1.42x -> 1.57x transformers' in fp32, 1.40x -> 1.57x in bf16
(``python -m gptchat.core.bench.train [--bf16]``).
Inference (no gradients) takes the same forward, for the last ``tail`` queries if asked: against the AVX2
kernel it replaced there (native.attend_causal, which reads the cache), a 124M layer's prefill of 1000 tokens
took 11.4 against 15.8 ms fp32, 7.5 against 14.7 bf16; four 1024-token eval windows 55 against 96 fp32. (Then
each row's maximum in sixteen lanes, the normalisation as P is stored: 9.8 ms fp32, 5.8 bf16. Then P left
as e^(s - max) and each row of the output divided by its sum instead, one pass over P fewer, and a row block's last
32-48 keys in one product: on a 2-core Xeon, fp32, 1000 tokens 7.75 -> 7.6 ms, 4 x 1024 34.5 -> 33.5 ms.)
A prefill's forward also writes the layer's KV cache (slots [0, T), as the keys and values are packed) and adds
c_attn's bias to q, k and v as it reads them (Block._accumulate's layers compute qkv without it): PyTorch's copy
of k and v into the cache and addmm's copy of the bias into every row of qkv were ~14 ms of a 1000-token 124M
fp32 prefill; on the 2-core Xeon, alternating in one process, 15 runs each: 0.666 -> 0.654 s, the logits and the
cache bit for bit the same. The cache may be a view (generate's: the new rows and the slots their prompts end at
in the batch's cache): generate's 1000-token prefill 0.645 -> 0.641 s once views were taken too.
``GPTCHAT_FLASH=0`` turns it off (PyTorch's kernel in training, the AVX2 one otherwise).
On CPUs with AMX, bf16 attention is left to PyTorch (``pytorch_faster``): its products run on AMX tiles.
"""

from __future__ import annotations

import torch

from gptchat.core.model import native
from gptchat.core.model.device import cpu_amx_bf16, switched_off

NEEDS = {torch.float32: native.AVX512, torch.bfloat16: native.AVX512 | {"avx512_bf16"}}  # CPU flags by dtype


def pytorch_faster(dtype: torch.dtype) -> bool:
    """True for bf16 on a CPU with AMX: PyTorch's CPU attention (its products through oneDNN, on AMX tiles)
    beats both of gptchat's kernels there, whose bf16 products are AVX512-BF16 pair dot products. Measured
    on a 2-core Xeon with AMX, a 124M layer: a 1000-token prefill 9.6 ms here against 4.5 ms PyTorch's (the
    AVX2 kernel is slower still), training forward + backward (4 x 1024) 157 against 123 ms; fp32 stays
    here (8.2 against 10.9 ms; 149 against 199)."""
    return dtype == torch.bfloat16 and cpu_amx_bf16()


def _fits(qkv: torch.Tensor, n_head: int) -> bool:
    C = qkv.shape[-1] // 3
    return (qkv.dtype in NEEDS and qkv.device.type == "cpu" and qkv.dim() == 3 and C % n_head == 0
            and not pytorch_faster(qkv.dtype)
            and (C // n_head) % 16 == 0 and not torch.compiler.is_compiling() and not switched_off("GPTCHAT_FLASH")
            and native.avx512(qkv.dtype == torch.bfloat16))


def usable(qkv: torch.Tensor, n_head: int) -> bool:
    """``attention`` applies: fp32 or bf16 activations wanting gradients on the CPU, head size a multiple of 16,
    a CPU with AVX-512 (and AVX512-BF16 but no AMX for bf16), the kernel built, not inside torch.compile, and
    not switched off (``GPTCHAT_FLASH=0``)."""
    return qkv.requires_grad and torch.is_grad_enabled() and _fits(qkv, n_head)


def usable_forward(qkv: torch.Tensor, n_head: int) -> bool:
    """``forward`` applies: as ``usable`` but no gradients wanted, and (B, nh) pairs enough to keep every thread
    busy (the kernel gives each pair to one thread; the AVX2 kernel deals out query blocks)."""
    return (not (qkv.requires_grad and torch.is_grad_enabled()) and qkv.shape[0] * n_head >= 2 * torch.get_num_threads()
            and _fits(qkv, n_head))


def _bf(t: torch.Tensor) -> int:
    return int(t.dtype == torch.bfloat16)


def fills(cache, qkv: torch.Tensor) -> bool:
    """``forward`` can write the keys and values of ``qkv`` (B, T, 3C) into ``cache`` (a KVCache: k and v
    (B, nh, slots, hs), views of a larger cache allowed) itself: the same dtype and batch, room for T slots, and
    each head's slots rows of hs, the two alike."""
    k, v = cache.k, cache.v
    B, T, C3 = qkv.shape
    return (k.dtype == v.dtype == qkv.dtype and k.device == qkv.device and k.shape[0] == B and k.shape[2] >= T
            and k.shape[1] * k.shape[3] * 3 == C3 and k.shape == v.shape and k.stride() == v.stride()
            and k.stride()[2:] == (k.shape[3], 1))


def _forward(qkv: torch.Tensor, n_head: int, scale: float, tail: int, bias: torch.Tensor | None = None,
             cache=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The last ``tail`` queries' outputs (B, tail, C) of contiguous ``qkv``, and every row's log-sum-exp;
    ``bias``, ``cache`` as ``forward``'s."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    if bias is not None and (qkv.dtype != torch.float32 or bias.dtype != torch.float32):
        qkv, bias = qkv + bias, None  # the kernel adds fp32 biases only (bf16 would be rounded twice)
    bias = None if bias is None else bias.contiguous()  # held here while the kernel reads it
    out, lse = qkv.new_empty(B, tail, C), torch.empty(B, n_head, T)
    kc, vc, sb, sh = (None, None, 0, 0) if cache is None else (cache.k.data_ptr(), cache.v.data_ptr(), *cache.k.stride()[:2])
    rc = native.kernel().gptchat_attn_fwd(qkv.data_ptr(), out.data_ptr(), lse.data_ptr(), B, T, tail, C, n_head,
                                          C // n_head, scale, None if bias is None else bias.data_ptr(),
                                          kc, vc, sb, sh, torch.get_num_threads(), _bf(qkv))
    if rc:
        raise MemoryError("attention kernel: no memory for its scratch buffers")
    return out, lse


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv: torch.Tensor, n_head: int, scale: float) -> torch.Tensor:
        qkv = qkv.contiguous()
        out, lse = _forward(qkv, n_head, scale, qkv.shape[1])
        ctx.save_for_backward(qkv, out, lse)
        ctx.n_head, ctx.scale = n_head, scale
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        qkv, out, lse = ctx.saved_tensors
        B, T, C3 = qkv.shape
        C = C3 // 3
        grad = grad.to(qkv.dtype).contiguous()
        dqkv = torch.empty_like(qkv)
        if native.kernel().gptchat_attn_bwd(qkv.data_ptr(), out.data_ptr(), grad.data_ptr(), lse.data_ptr(),
                                            dqkv.data_ptr(), B, T, C, ctx.n_head, C // ctx.n_head, ctx.scale,
                                            torch.get_num_threads(), _bf(qkv)):
            raise MemoryError("attention kernel: no memory for its scratch buffers")
        return dqkv, None, None


def attention(qkv: torch.Tensor, n_head: int, scale: float) -> torch.Tensor:
    """Causal attention from position 0 of c_attn's output ``qkv`` (B, T, 3C): (B, T, C). See ``usable``."""
    return _Attention.apply(qkv, n_head, scale)


def forward(qkv: torch.Tensor, n_head: int, scale: float, tail: int | None = None, bias: torch.Tensor | None = None,
            cache=None) -> torch.Tensor:
    """Causal attention from position 0 of ``qkv`` (B, T, 3C), no gradients: (B, tail or T, C), the last
    ``tail`` queries' outputs. See ``usable_forward``. ``bias``: c_attn's bias where ``qkv`` was computed without
    it (added as q, k and v are read: no pass of its own over qkv). ``cache``: a KVCache that ``fills`` allows,
    whose slots [0, T) get the keys and values (biased) as they are packed: no copy of its own either."""
    T = qkv.shape[1]
    return _forward(qkv.contiguous(), n_head, scale, T if tail is None else min(tail, T), bias, cache)[0]
