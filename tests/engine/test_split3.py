"""split3: fp32 products as three bf16 products on AMX tiles (qkernel.c's gptchat_amx_gemm32), eval's head."""

from __future__ import annotations

import pytest
import torch

from gptchat.core.model import split3

pytestmark = pytest.mark.skipif(not split3.usable(32), reason="no AMX tiles here (or GPTCHAT_BF16X3=0)")


@pytest.mark.parametrize("M,N,K", [(1, 16, 32), (5, 17, 64), (16, 48, 96), (33, 100, 128), (64, 2048, 768),
                                   (65, 31, 768), (130, 1105, 768), (512, 64, 256)])
def test_the_product_is_within_fp32s_reach(M, N, K):
    """Every entry within 2^-14 of the sum of its terms' magnitudes from the exact product (bf16 alone: 2^-8), far
    nearer than one bf16 product; the padding the kernel writes past N never shows."""
    g = torch.Generator().manual_seed(M * 7 + N)
    x, w = torch.randn(M, K, generator=g) * 3, torch.randn(N, K, generator=g) * 0.1
    room = torch.full((M * (-(-N // 16) * 16),), float("nan"))
    y = split3.product(split3.pack(w), split3.inputs(x), N, room)
    exact = x.double() @ w.double().t()
    scale = x.double().abs() @ w.double().abs().t()
    assert y.shape == (M, N) and y.dtype == torch.float32 and not y.isnan().any()
    err = ((y.double() - exact).abs() / scale).max().item()
    bf16 = ((x.bfloat16().double() @ w.bfloat16().double().t() - exact).abs() / scale).max().item()
    assert err < 2**-14 and err * 30 < bf16, (err, bf16)
    assert torch.equal(split3.product(split3.pack(w), split3.inputs(x), N), y)  # its own buffer: the same sums


def test_inputs_not_a_multiple_of_32_wide_are_refused():
    assert not split3.usable(40) and split3.usable(768)
    x, w = torch.randn(3, 40), torch.randn(20, 40)
    with pytest.raises(ValueError, match="multiple of 32"):
        split3.product(split3.pack(w), split3.inputs(x), 20)
