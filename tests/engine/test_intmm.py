"""int8 products through PyTorch's int8 GEMM (core/model/intmm.py): the C kernel's integer sums, and when they
are taken."""

from __future__ import annotations

import pytest
import torch

from gptchat.core.model import intmm, quant
from tests.factory import spy

pytestmark = pytest.mark.skipif(not quant.available() or not intmm.available(),
                                reason="no C kernel or no torch._int_mm in this PyTorch")


def _reference(x, q, scale, bias):
    """float64: each row rounded to int16 as the kernels do (max |x| -> 32639, fp32 x times the fp32 reciprocal,
    half to even; a row of zeros at scale 1), products and sums exact, then the row's scale, the output's scale and the bias."""
    xs = x.abs().amax(dim=1, keepdim=True) / 32639
    xs[xs == 0] = 1.0  # a row of zeros: scale 1, as the kernels take it
    x16 = torch.round(x * (1 / xs)).double()
    ref = (x16 @ q.double().t()) * xs.double() * scale.double()
    return ref if bias is None else ref + bias.double()


def test_the_int8_gemm_sums_the_same_integers_as_the_c_kernel(monkeypatch):
    gen = torch.Generator().manual_seed(11)
    # outputs past one unpacked block and not a multiple of 4; inputs not a multiple of 32; rows past one GEMM call
    for n_out, n_in, rows in ((5, 40, 16), (intmm.BLOCK + 37, 72, intmm.CHUNK + 9), (50, 3072, 17), (7, 33, 40)):
        q, scale = quant.quantize_rows(torch.randn(n_out, n_in, generator=gen) * 0.05)
        x = torch.randn(rows, n_in, generator=gen) * torch.logspace(-3, 3, rows)[:, None]  # rows far apart in size
        x[1] = x[1].abs()  # a row whose largest |x| is positive: its byte h reaches 127
        x[2] = -x[2].abs()
        x[3] = 0.0
        for bias in (torch.randn(n_out, generator=gen), None):
            ref = _reference(x, q, scale, bias)
            lin = quant.QuantLinear(q, scale, bias)
            with torch.inference_mode():
                y = intmm.product(lin.packed, lin.scale, lin.bias, x, n_out)
                monkeypatch.setenv("GPTCHAT_INTMM", "0")
                by_kernel = lin(x[:16]) if rows <= quant.NATIVE_ROWS else None
                monkeypatch.delenv("GPTCHAT_INTMM")
            err = ((y.double() - ref).abs() / ref.abs().amax(dim=1, keepdim=True).clamp(min=1e-30)).max().item()
            assert err < 1e-6, (n_out, n_in, rows, bias is None, err)
            assert torch.equal(y[3], torch.zeros(n_out) if bias is None else bias)
            if by_kernel is not None:  # the same integers: only the fp32 sums' rounding differs
                assert torch.allclose(y[:16], by_kernel, rtol=1e-6, atol=1e-6 * by_kernel.abs().max().item())


def test_calls_of_a_few_rows_take_the_way_their_own_calls_timed_faster(monkeypatch):
    gen = torch.Generator().manual_seed(12)
    q, scale = quant.quantize_rows(torch.randn(64, 32, generator=gen))
    lin = quant.QuantLinear(q, scale, torch.randn(64, generator=gen))
    products = spy(monkeypatch, intmm, "product")
    kernel = spy(monkeypatch, quant.native, "gemm")
    monkeypatch.setattr(intmm, "_few", {})
    x = torch.randn(intmm.FEW, 32, generator=gen)
    with torch.inference_mode():
        lin(x[: intmm.FEW - 1])  # too few rows: the C kernel, untimed
        assert (len(products), len(kernel)) == (0, 1) and not intmm._few
        ways = []
        for _ in range(10):  # a warm-up round and four more of the two ways, in turn
            before = len(products)
            y = lin(x)
            ways.append("gemm" if len(products) > before else "kernel")
        assert ways == ["kernel", "gemm"] * 5
        trial = intmm._few[(64, 32, intmm.FEW)]
        assert trial.chosen in ("kernel", "gemm") and all(len(t) == 4 for t in trial.times.values())
        before = (len(products), len(kernel))
        assert torch.allclose(lin(x), y, rtol=1e-6, atol=1e-6)  # the same integer sums either way
        took = "gemm" if len(products) > before[0] else "kernel"
        assert took == trial.chosen and len(products) + len(kernel) == sum(before) + 1
        lin(torch.randn(intmm.FEW + 1, 32, generator=gen))  # another number of rows: timed on its own
        assert (64, 32, intmm.FEW + 1) in intmm._few
        monkeypatch.setenv("GPTCHAT_INTMM", "0")  # the switch: the C kernel, untimed
        calls = len(kernel)
        lin(torch.randn(intmm.FEW + 2, 32, generator=gen))
        assert len(kernel) == calls + 1 and (64, 32, intmm.FEW + 2) not in intmm._few


def test_products_of_many_rows_take_the_int8_gemm_only_where_it_was_timed_faster(monkeypatch):
    gen = torch.Generator().manual_seed(12)
    q, scale = quant.quantize_rows(torch.randn(64, 32, generator=gen))
    lin = quant.QuantLinear(q, scale, torch.randn(64, generator=gen))
    assert isinstance(intmm._beats(), bool) and intmm._beats.cache_info().currsize == 1  # timed once a process
    products = spy(monkeypatch, intmm, "product")
    fp32 = spy(monkeypatch, quant.QuantLinear, "_through_gemm")
    monkeypatch.setattr(quant.native, "gemm_beats_panels", lambda: True)
    with torch.inference_mode():
        for beats in (True, False):
            monkeypatch.setattr(intmm, "_beats", lambda b=beats: b)
            before = (len(products), len(fp32))
            lin(torch.randn(quant.NATIVE_ROWS + 1, 32, generator=gen))
            assert (len(products) - before[0], len(fp32) - before[1]) == ((1, 0) if beats else (0, 1))
        monkeypatch.setattr(intmm, "_beats", lambda: True)
        monkeypatch.setenv("GPTCHAT_INTMM", "0")  # the switch
        lin(torch.randn(quant.NATIVE_ROWS + 1, 32, generator=gen))
        assert len(products) == 1 and not intmm.wins(1000)


def test_the_bench_rates_int8_prefills_at_the_int8_gemms_own_speed():
    from gptchat.core.bench.ceilings import product_rate
    from gptchat.core.model.config import PRESETS

    cfg = PRESETS["tiny"]
    rate = product_rate(cfg, 64, torch.float32, "cpu", seconds=0.02, int8=True)
    assert 1e6 < rate < 1e15  # FLOP/s of the rows' own multiply-adds, however fast this machine is
