"""bf16 training attention in C (core/model/flash.py): outputs and gradients as close to fp32 attention as
PyTorch's own bf16 kernel gets, used by the model's bf16 training forward and nowhere else."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gptchat.core.model import flash, native
from gptchat.core.model.config import GPTConfig
from gptchat.core.model.device import cpu_flags
from gptchat.core.model.gpt import GPT

pytestmark = pytest.mark.skipif(not (flash.NEEDS <= cpu_flags() and native.kernel() is not None),
                                reason="the bf16 attention kernel needs AVX512-BF16 and a C compiler")


def _sdpa(qkv: torch.Tensor, nh: int, scale: float) -> torch.Tensor:
    B, T, C3 = qkv.shape
    q, k, v = qkv.view(B, T, 3, nh, C3 // 3 // nh).permute(2, 0, 3, 1, 4).unbind(0)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale).transpose(1, 2).reshape(B, T, -1)


def _run(fn, qkv: torch.Tensor, g: torch.Tensor, nh: int, scale: float):
    x = qkv.detach().clone().requires_grad_()
    y = fn(x, nh, scale)
    y.backward(g.to(y.dtype))
    return y.detach().float(), x.grad.float()


@pytest.mark.parametrize("B,T,nh,hs", [(1, 1, 1, 16), (2, 5, 2, 16), (2, 67, 3, 32), (1, 130, 2, 64),
                                       (3, 64, 2, 64), (1, 300, 4, 48)])
def test_bf16_attention_is_as_close_to_fp32_as_pytorchs_bf16_kernel(B, T, nh, hs):
    gen = torch.Generator().manual_seed(T)
    qkv = (torch.randn(B, T, 3 * nh * hs, generator=gen) * 1.5).bfloat16()
    g = torch.randn(B, T, nh * hs, generator=gen).bfloat16()
    scale = 1 / math.sqrt(hs)
    y32, g32 = _run(_sdpa, qkv.float(), g.float(), nh, scale)  # the truth: fp32 on the same bf16 numbers
    y_pt, g_pt = _run(_sdpa, qkv, g, nh, scale)
    y, gr = _run(flash.attention, qkv, g, nh, scale)
    assert torch.isfinite(gr).all() and gr.abs().sum() > 0
    for ours, theirs, truth in ((y, y_pt, y32), (gr, g_pt, g32)):
        err, err_pt = (ours - truth).abs(), (theirs - truth).abs()
        assert err.mean() <= 1.5 * err_pt.mean() + 1e-4, (err.mean(), err_pt.mean())
        assert err.max() <= 2 * err_pt.max() + 2e-3, (err.max(), err_pt.max())


def test_a_wrong_key_order_would_show():
    """The test above can fail: attention that sees one key too many (the next query's) is far off."""
    B, T, nh, hs = 1, 40, 2, 32
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, T, 3 * nh * hs, generator=gen).bfloat16()
    y = flash.attention(qkv.requires_grad_(), nh, 0.2).detach().float()
    q, k, v = qkv.detach().float().view(B, T, 3, nh, hs).permute(2, 0, 3, 1, 4).unbind(0)
    mask = torch.ones(T, T, dtype=torch.bool).tril(1)  # one key past the diagonal
    wrong = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.2).transpose(1, 2).reshape(B, T, -1)
    right = _sdpa(qkv.detach().float(), nh, 0.2)
    assert (y - right).abs().max() < 0.05 < (y - wrong).abs().max()


def _model(seed=0) -> GPT:
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=64, n_positions=128, vocab_size=300)
    m = GPT(cfg)
    m.init_weights(seed)
    return m.train()


def test_bf16_autocast_training_uses_the_kernel_with_pytorchs_gradients(monkeypatch):
    calls = []
    real = flash._Attention.backward

    def counted(ctx, g):
        calls.append(1)
        return real(ctx, g)

    mine, plain = _model(), _model()
    x = torch.randint(0, 300, (3, 100), generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(flash._Attention, "backward", staticmethod(counted))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mine(x).float().logsumexp(-1).mean().backward()
        with monkeypatch.context() as mp:
            mp.setattr(flash, "usable", lambda *a: False)
            plain(x).float().logsumexp(-1).mean().backward()
    assert len(calls) == 2  # once a layer
    for a, b in zip(mine.parameters(), plain.parameters()):
        assert (a.grad - b.grad).norm() <= 0.02 * b.grad.norm() + 1e-6


def test_not_used_for_fp32_inference_dropout_or_when_switched_off(monkeypatch):
    calls = []
    monkeypatch.setattr(flash, "attention", lambda *a: calls.append(1))  # would break the forward if used
    x = torch.randint(0, 300, (2, 16))
    _model()(x).sum().backward()  # fp32 training: PyTorch's attention
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        _model().eval()(x)  # inference
    m = _model()
    for mod in m.modules():
        if hasattr(mod, "dropout") and isinstance(mod.dropout, float):
            mod.dropout = 0.1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m(x).float().sum().backward()  # attention dropout: PyTorch's
        monkeypatch.setenv("GPTCHAT_BF16_ATTENTION", "0")
        _model()(x).float().sum().backward()
    assert calls == []
