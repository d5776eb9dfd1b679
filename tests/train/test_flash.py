"""Causal attention in C (core/model/flash.py): outputs and gradients as close to exact attention as
PyTorch's own kernel gets in the same dtype (fp32, bf16), used by the model's training forward; the same
forward, for the last queries only if asked, in prefills and eval windows."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gptchat.core.model import flash, native
from gptchat.core.model.config import GPTConfig
from gptchat.core.model.gpt import GPT
from tests.factory import spy, threads


def _skip(dtype: torch.dtype) -> None:
    if not native.avx512(dtype == torch.bfloat16):
        pytest.skip(f"the {dtype} training attention kernel needs {sorted(flash.NEEDS[dtype])} and a C compiler")


def _sdpa(qkv: torch.Tensor, nh: int, scale: float) -> torch.Tensor:
    B, T, C3 = qkv.shape
    q, k, v = qkv.view(B, T, 3, nh, C3 // 3 // nh).permute(2, 0, 3, 1, 4).unbind(0)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale).transpose(1, 2).reshape(B, T, -1)


def _run(fn, qkv: torch.Tensor, g: torch.Tensor, nh: int, scale: float):
    x = qkv.detach().clone().requires_grad_()
    y = fn(x, nh, scale)
    y.backward(g.to(y.dtype))
    return y.detach().double(), x.grad.double()


DTYPES = [torch.float32, torch.bfloat16]
# (mean, max) error allowed over PyTorch's kernel's in the same dtype, each against fp64 on the same numbers
# (fp32's floor, 3e-7: a (1, 1) row's dq and dk are dP - D, two fp32 sums of the same products in different
# orders, exactly 0 in fp64: an ulp or two of O(1) values, where PyTorch's sums may happen to cancel exactly)
SLACK = {torch.float32: (3.0, 3e-7, 1e-4), torch.bfloat16: (1.5, 1e-4, 4e-2)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,nh,hs", [(1, 1, 1, 16), (2, 5, 2, 16), (2, 67, 3, 32), (1, 130, 2, 64),
                                       (3, 64, 2, 64), (1, 300, 4, 48)])
def test_attention_is_as_close_to_exact_as_pytorchs_kernel(B, T, nh, hs, dtype):
    _skip(dtype)
    gen = torch.Generator().manual_seed(T)
    qkv = (torch.randn(B, T, 3 * nh * hs, generator=gen) * 1.5).to(dtype)
    g = torch.randn(B, T, nh * hs, generator=gen).to(dtype)
    scale = 1 / math.sqrt(hs)
    y64, g64 = _run(_sdpa, qkv.double(), g.double(), nh, scale)  # the truth: fp64 on the same numbers
    y_pt, g_pt = _run(_sdpa, qkv, g, nh, scale)
    y, gr = _run(flash.attention, qkv, g, nh, scale)
    assert torch.isfinite(gr).all() and gr.abs().sum() > 0
    times, plus, most = SLACK[dtype]
    for ours, theirs, truth in ((y, y_pt, y64), (gr, g_pt, g64)):
        err, err_pt = (ours - truth).abs(), (theirs - truth).abs()
        assert err.mean() <= times * err_pt.mean() + plus, (err.mean(), err_pt.mean())
        assert err.max() <= most, (err.max(), err_pt.max())


def test_a_wrong_key_order_would_show():
    """The test above can fail: attention that sees one key too many (the next query's) is far off."""
    _skip(torch.bfloat16)
    B, T, nh, hs = 1, 40, 2, 32
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, T, 3 * nh * hs, generator=gen).bfloat16()
    y = flash.attention(qkv.requires_grad_(), nh, 0.2).detach().float()
    q, k, v = qkv.detach().float().view(B, T, 3, nh, hs).permute(2, 0, 3, 1, 4).unbind(0)
    mask = torch.ones(T, T, dtype=torch.bool).tril(1)  # one key past the diagonal
    wrong = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.2).transpose(1, 2).reshape(B, T, -1)
    right = _sdpa(qkv.detach().float(), nh, 0.2)
    assert (y - right).abs().max() < 0.05 < (y - wrong).abs().max()


@pytest.mark.parametrize("dtype", DTYPES)
def test_scores_hundreds_apart_stay_exact(dtype):
    """Sharp attention (a row's scores spread over hundreds, past exp's range) is computed against each row's
    true maximum, whichever key holds it (the last few of a row included): finite, as exact as above."""
    _skip(dtype)
    gen = torch.Generator().manual_seed(9)
    for T in (37, 100):
        qkv = (torch.randn(2, T, 3 * 2 * 32, generator=gen) * 12).to(dtype)
        with torch.inference_mode():
            got = flash.forward(qkv, 2, 0.5).double()
        want = _sdpa(qkv.double(), 2, 0.5)
        assert torch.isfinite(got).all()
        assert (got - want).abs().max() <= (1e-3 if dtype == torch.float32 else 0.5), T


def _model(seed=0) -> GPT:
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=64, n_positions=128, vocab_size=300)
    m = GPT(cfg)
    m.init_weights(seed)
    return m.train()


@pytest.mark.parametrize("dtype", DTYPES)
def test_training_uses_the_kernel_with_pytorchs_gradients(dtype, monkeypatch):
    """fp32 training, and bf16 autocast: a call a layer, the gradients of PyTorch's attention (to rounding).
    (bf16 on a CPU with AMX is PyTorch's by default, below: the kernel is held to the same here.)"""
    _skip(dtype)
    monkeypatch.setattr(flash, "pytorch_faster", lambda dt: False)
    mine, plain = _model(), _model()
    x = torch.randint(0, 300, (3, 100), generator=torch.Generator().manual_seed(1))
    calls = spy(monkeypatch, flash._Attention, "backward")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        mine(x).float().logsumexp(-1).mean().backward()
        with monkeypatch.context() as mp:
            mp.setattr(flash, "usable", lambda *a: False)
            plain(x).float().logsumexp(-1).mean().backward()
    assert len(calls) == 2  # once a layer
    close = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(mine.parameters(), plain.parameters()):
        assert (a.grad - b.grad).norm() <= close * b.grad.norm() + 1e-7


def test_not_used_for_inference_dropout_or_when_switched_off(monkeypatch):
    """(``attention``, the autograd one: inference takes ``forward``, below)"""
    calls = []
    monkeypatch.setattr(flash, "attention", lambda *a: calls.append(1))  # would break the forward if used
    x = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        _model().eval()(x)  # inference
    m = _model()
    for mod in m.modules():
        if hasattr(mod, "dropout") and isinstance(mod.dropout, float):
            mod.dropout = 0.1
    m(x).sum().backward()  # attention dropout: PyTorch's
    monkeypatch.setenv("GPTCHAT_FLASH", "0")
    _model()(x).sum().backward()
    assert calls == []


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_inference_forward_is_the_training_one_for_any_tail(dtype):
    """``forward`` (no gradients) gives ``attention``'s outputs, of the last ``tail`` queries when asked: the
    same kernel, the query blocks starting at T - tail instead of 0."""
    _skip(dtype)
    gen = torch.Generator().manual_seed(3)
    for B, T, nh, hs in ((2, 130, 2, 32), (1, 67, 3, 64), (3, 5, 1, 16)):
        qkv = torch.randn(B, T, 3 * nh * hs, generator=gen).to(dtype)
        whole = flash.attention(qkv.clone().requires_grad_(), nh, 0.3).detach()
        with torch.inference_mode():
            assert torch.equal(flash.forward(qkv, nh, 0.3), whole)
            for tail in (1, 2, T // 2, T - 1, T):
                got = flash.forward(qkv, nh, 0.3, tail)
                assert got.shape == (B, tail, nh * hs) and torch.equal(got, whole[:, -tail:]), (T, tail)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_forward_adds_the_bias_and_fills_the_cache(dtype):
    """``forward(qkv, bias=b, cache=c)`` gives ``forward(qkv + b)`` exactly, of any tail, and writes the keys and
    values of qkv + b into the cache's slots [0, T), head-major, and nothing else (its other slots keep their NaN);
    without a cache the same outputs. bf16's bias is added before the kernel (rounded once, as c_attn's is)."""
    from gptchat.core.model.kv_cache import KVCache

    _skip(dtype)
    gen = torch.Generator().manual_seed(6)
    for B, T, nh, hs in ((2, 70, 2, 32), (1, 5, 3, 16)):
        qkv = torch.randn(B, T, 3 * nh * hs, generator=gen).to(dtype)
        bias = torch.randn(3 * nh * hs, generator=gen).to(dtype)
        biased = qkv + bias
        k, v = biased.view(B, T, 3, nh, hs).permute(2, 0, 3, 1, 4)[1:]
        with torch.inference_mode():
            for tail in (None, 1, T):
                cache = KVCache(B, nh, T + 9, hs, dtype, "cpu")
                cache.k.fill_(float("nan")), cache.v.fill_(float("nan"))
                want = flash.forward(biased, nh, 0.3, tail)
                assert torch.equal(flash.forward(qkv, nh, 0.3, tail, bias, cache), want)
                assert torch.equal(cache.k[:, :, :T], k) and torch.equal(cache.v[:, :, :T], v)
                assert cache.k[:, :, T:].isnan().all() and cache.v[:, :, T:].isnan().all()
                assert torch.equal(flash.forward(qkv, nh, 0.3, tail, bias), want)
            # a view of a larger cache (generate's: the new rows of a batch, the slots their prompts end at)
            big = KVCache(B + 2, nh, T + 20, hs, dtype, "cpu")
            big.k.fill_(float("nan")), big.v.fill_(float("nan"))
            view = KVCache(0, nh, 0, hs, dtype, "cpu")
            view.k, view.v = big.k[1 : B + 1, :, 7 : T + 7], big.v[1 : B + 1, :, 7 : T + 7]
            assert flash.fills(view, qkv)
            assert torch.equal(flash.forward(qkv, nh, 0.3, None, bias, view), flash.forward(biased, nh, 0.3))
            assert torch.equal(view.k, k) and torch.equal(view.v, v)
            assert big.k.isnan().sum() == big.k.numel() - k.numel() and big.v.isnan().sum() == big.v.numel() - v.numel()
            assert flash.fills(KVCache(B, nh, T, hs, dtype, "cpu"), qkv)
            for wrong in (KVCache(B, nh, T - 1, hs, dtype, "cpu"), KVCache(B + 1, nh, T, hs, dtype, "cpu"),
                          KVCache(B, nh, T, hs, torch.float16, "cpu")):
                assert not flash.fills(wrong, qkv)
            slots_apart = torch.empty(B, T, nh, hs, dtype=dtype).permute(0, 2, 1, 3)  # a head's slots nh * hs apart
            wrong.k, wrong.v = slots_apart, slots_apart.clone()
            assert not flash.fills(wrong, qkv)


@pytest.mark.parametrize("bias", [True, False])
def test_a_prefill_writes_the_cache_in_the_kernel(monkeypatch, bias):
    """A prefill with a KV cache takes ``forward`` with the cache and c_attn's bias (where it has one) in every
    layer (the last one's qkv with queries for its tail's rows only: Block._tail_qkv, the rest poisoned with NaN
    here): the cache's slots and the logits of the prefill and of the next steps are those of the plain modules (no
    fused path, PyTorch's attention), and of the fused paths with the kernel refused the cache (``fills``) or
    switched off. With and without biases (nanoGPT's bias=False)."""
    from gptchat.core.model import gpt

    _skip(torch.float32)
    m = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, n_positions=128, vocab_size=300, bias=bias))
    m.init_weights(0)
    m.eval()
    gen = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for name, b in m.named_parameters():
            if name.endswith("bias"):  # GPT-2's initialisation leaves them zero
                b.copy_(torch.randn(b.shape, generator=gen) * 0.5)
            elif "c_attn" in name:  # at 0.02 the scores are all ~0: any query would give the same mean of the values
                b.mul_(20)
    m.to_inference_layout()
    x = torch.randint(0, 300, (2, 70), generator=gen)
    real = gpt.Block._tail_qkv

    def poisoned(self, x, tail):
        qkv = real(self, x, tail)
        qkv[:, :-tail, : qkv.shape[-1] // 3] = float("nan")
        return qkv

    monkeypatch.setattr(gpt.Block, "_tail_qkv", poisoned)
    calls = spy(monkeypatch, flash, "forward")

    def run():
        m.drop_cache()
        m.setup_cache(2, 80)
        out = [m(x, last_only=True)]
        for s in range(3):
            out.append(m(x[:, s : s + 1], start=70 + s))
        return torch.cat(out, 1), torch.stack([b.attn.kv_cache.k[:, :, :73] for b in m.transformer.h])

    with torch.inference_mode(), threads(2):
        got = run()
        assert len(calls) == m.config.n_layer and all((c[4] is not None) == bias and c[5] is not None for c in calls)
        with monkeypatch.context() as mp:
            mp.setattr(flash, "fills", lambda *a: False)
            refused = run()
        assert [len(c) for c in calls[m.config.n_layer:]] == [4] * m.config.n_layer  # bias added, cache written: before
        monkeypatch.setenv("GPTCHAT_FLASH", "0")
        pytorchs = run()
        monkeypatch.setenv("GPTCHAT_ACCUMULATE", "0")
        want = run()
    for other in (got, refused, pytorchs):
        torch.testing.assert_close(other[1], want[1], atol=2e-5, rtol=0)  # keys up to ~40: an ulp or so
        torch.testing.assert_close(other[0], want[0], atol=1e-5, rtol=0)


def test_a_prefill_takes_the_forward_with_its_tail(monkeypatch):
    """A model's inference forward runs ``forward`` once a layer (only the last layer's asked tail, cut in the
    kernel) and gives PyTorch attention's logits; a training forward, a single query, and a batch whose
    (row, head) pairs cannot keep the threads busy do not take it."""
    _skip(torch.float32)
    m = _model().eval()
    x = torch.randint(0, 300, (2, 70), generator=torch.Generator().manual_seed(4))
    calls = spy(monkeypatch, flash, "forward")
    with torch.inference_mode(), threads(2):  # 2 x 2 (row, head) pairs keep 2 threads busy
        got = m(x, tail=9)
        monkeypatch.setenv("GPTCHAT_FLASH", "0")
        ref = m(x, tail=9)
    assert len(calls) == 2 and calls[-1][3] == 9 and got.shape == (2, 9, 300)
    assert (got - ref).abs().max() <= 1e-4
    monkeypatch.delenv("GPTCHAT_FLASH")
    qkv = torch.randn(1, 8, 3 * 64)
    with torch.inference_mode(), threads(2):
        assert flash.usable_forward(qkv, 4)
        assert not flash.usable_forward(qkv, 1)  # one (row, head) pair for two threads: the AVX2 kernel's
    with threads(2):
        assert not flash.usable_forward(qkv.requires_grad_(), 4)  # training: ``attention``


def test_bf16_is_left_to_pytorch_where_the_cpu_has_amx(monkeypatch):
    """On a CPU with AMX, bf16 attention (training, prefill) goes to PyTorch's kernel and the model's logits are
    its; fp32 stays in C. Elsewhere bf16 takes the kernel."""
    _skip(torch.bfloat16)
    x = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(5))
    qkv = torch.randn(2, 8, 3 * 64).bfloat16()
    for amx in (True, False):
        monkeypatch.setattr(flash, "cpu_amx_bf16", lambda a=amx: a)
        assert flash.pytorch_faster(torch.bfloat16) == amx and not flash.pytorch_faster(torch.float32)
        with threads(2):
            assert flash.usable_forward(qkv, 4) != amx and flash.usable_forward(qkv.float(), 4)
            assert flash.usable(qkv.clone().requires_grad_(), 4) != amx
        calls = spy(monkeypatch, flash, "forward")
        kernels = spy(monkeypatch, native, "attend_causal")
        m = _model().eval().to(torch.bfloat16)
        with torch.inference_mode(), threads(2):
            got = m(x).float()
            monkeypatch.setenv("GPTCHAT_FLASH", "0")
            monkeypatch.setattr(native, "can_attend_causal", lambda *a: False)
            ref = m(x).float()  # PyTorch's attention
        monkeypatch.undo()
        assert (len(calls) == 0 and len(kernels) == 0) if amx else len(calls) == 2
        assert torch.equal(got, ref) if amx else (got - ref).abs().max() <= 0.1
