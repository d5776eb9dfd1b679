"""gptchat_sgemm (native.sgemm): fp32 products of a few rows on weights laid out in panels of 16 outputs."""

from __future__ import annotations

import pytest
import torch

from gptchat.core.model import native

pytestmark = pytest.mark.skipif(native.kernel() is None, reason="no C kernel here (no compiler or no AVX2)")


@pytest.mark.parametrize("M,K,N", [(1, 8, 5), (2, 64, 16), (6, 768, 2304), (7, 100, 50257), (13, 1000, 33),
                                   (16, 3072, 768), (40, 520, 47)])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("layout", ["rows", "inference"])  # inference: [in, out] storage (GPT.to_inference_layout)
def test_equals_the_product(M, K, N, with_bias, layout):
    g = torch.Generator().manual_seed(M * 1000 + N)
    w, b, x = torch.randn(N, K, generator=g), torch.randn(N, generator=g), torch.randn(M, K, generator=g)
    if layout == "inference":
        w = w.t().contiguous().t()
    packed, pb = native.panels(w, b if with_bias else None)
    assert packed.shape == (-(-N // 16), K, 16) and (pb is None) == (not with_bias)
    y = native.sgemm(packed, pb, x, N)
    ref = torch.nn.functional.linear(x.double(), w.double(), b.double() if with_bias else None)
    assert y.shape == (M, N)
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=2e-5 * K ** 0.5)


def test_no_rows_is_no_work():
    packed, b = native.panels(torch.randn(20, 8), torch.randn(20))
    assert native.sgemm(packed, b, torch.empty(0, 8), 20).shape == (0, 20)


def test_leaves_memory_past_the_outputs_alone():
    """The last panel's padding columns are computed into a buffer of the kernel's own, never past y."""
    w, x = torch.randn(21, 32), torch.randn(3, 32)
    packed, _ = native.panels(w, None)
    big = torch.full((3 * 21 + 64,), 7.0)
    y = big[: 3 * 21].view(3, 21)
    assert native.kernel().gptchat_sgemm(packed.data_ptr(), None, x.data_ptr(), y.data_ptr(), 3, 21, 32, 2) == 0
    assert torch.allclose(y, x @ w.t(), atol=1e-4)
    assert torch.equal(big[3 * 21:], torch.full((64,), 7.0))


def test_packed_copies_follow_swapped_and_changed_linears():
    from torch import nn

    from gptchat.core.model import packed

    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 5))
    pl = packed.PackedLinears(net, 16, "panels")
    x = torch.randn(3, 8)

    def both():
        with torch.inference_mode():
            ref = net(x)
            with pl.use():
                return ref, net(x)

    ref, got = both()
    assert torch.allclose(got, ref, atol=1e-5)
    net[2] = nn.Linear(32, 5)  # a module swapped: its parent no longer holds the one packed
    with torch.no_grad():
        net[0].weight.mul_(2)  # a weight changed in place: packed again
    ref2, got2 = both()
    assert not torch.allclose(ref2, ref) and torch.allclose(got2, ref2, atol=1e-5)
    assert [n for n, _ in pl._linears()] == ["0", "2"] and pl._linears()[1][1] is net[2]
    with torch.no_grad():
        net[2].bias.add_(1.0)  # the panels hold a padded copy of the bias: a change to it packs again
    ref3, got3 = both()
    assert torch.allclose(ref3, ref2 + 1.0, atol=1e-5) and torch.allclose(got3, ref3, atol=1e-5)
    net[2] = nn.Sequential(nn.Linear(32, 5))  # moved one level down: the old name's copy is dropped
    both()
    assert sorted(pl._packed) == ["0", "2.0"]
