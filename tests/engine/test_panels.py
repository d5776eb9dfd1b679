"""gptchat_sgemm (native.sgemm): fp32 products of a few rows on weights laid out in panels of 16 outputs."""

from __future__ import annotations

import pytest
import torch

from gptchat.core.model import native
from tests.factory import spy

pytestmark = pytest.mark.skipif(native.kernel() is None, reason="no C kernel here (no compiler or no AVX2)")


@pytest.mark.parametrize("M,K,N", [(1, 8, 5), (2, 64, 16), (6, 768, 2304), (7, 100, 50257), (13, 1000, 33),
                                   (16, 3072, 768), (25, 64, 48), (40, 520, 47)])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("layout", ["rows", "inference"])  # inference: [in, out] storage (GPT.to_inference_layout)
@pytest.mark.parametrize("wide", ["1", "0"], ids=["avx512", "avx2"])  # 12 rows' sums in zmm a pass, or 6 in ymm pairs
def test_equals_the_product(M, K, N, with_bias, layout, wide, monkeypatch):
    monkeypatch.setenv("GPTCHAT_WIDE", wide)
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
    assert native.kernel().gptchat_sgemm(packed.data_ptr(), None, x.data_ptr(), y.data_ptr(), 3, 21, 32, 2,
                                             int(native.wide())) == 0
    assert torch.allclose(y, x @ w.t(), atol=1e-4)
    assert torch.equal(big[3 * 21:], torch.full((64,), 7.0))


@pytest.mark.parametrize("kind", ["panels", "mkl"])
def test_packed_copies_follow_swapped_and_changed_linears(kind):
    from torch import nn

    from gptchat.core.model import packed

    if kind == "mkl" and not packed.mkl_packs():
        pytest.skip("this PyTorch has no MKL packing")
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 5))
    pl = packed.PackedLinears(net, 16, kind)
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


def _mkl_packs() -> bool:
    from gptchat.core.model import packed

    return packed.mkl_packs()


@pytest.mark.skipif(not _mkl_packs(), reason="this PyTorch has no MKL packing")
@pytest.mark.parametrize("M", [1, 7, 100, 1024, 1500])
@pytest.mark.parametrize("layout", ["rows", "inference"])
def test_mkl_packed_weights_equal_the_product_at_any_rows(M, layout):
    """MKL's pack is made for one row count (the engine's window) and multiplies right at any: 1 row to more than
    it was made for, on the model's inference layout (weights [in, out] in memory) as on plain rows, a batch
    dimension kept; PyTorch's GEMM gives the same sums (bit for bit at 100 rows and more, measured)."""
    from torch import nn

    from gptchat.core.model import packed

    gen = torch.Generator().manual_seed(M)
    lin = nn.Linear(200, 96)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(96, 200, generator=gen))
        if layout == "inference":
            lin.weight.data = lin.weight.data.t().contiguous().t()
    x = torch.randn(1, M, 200, generator=gen)
    pl = packed.PackedLinears(nn.Sequential(lin), 1024, "mkl")
    with torch.inference_mode():
        ref = torch.nn.functional.linear(x, lin.weight, lin.bias)
        with pl.use():
            got = lin(x)
    assert got.shape == (1, M, 96) and torch.allclose(got, ref, rtol=1e-5, atol=1e-4), (got - ref).abs().max()


@pytest.mark.skipif(not _mkl_packs(), reason="this PyTorch has no MKL packing")
def test_mkl_packed_weights_leave_the_head_to_its_blocks_and_training_to_the_module():
    """The "mkl" copy packs every Linear but the head (eval multiplies by it in vocabulary blocks, packed by
    ``blocks`` and again when the head's weight changes); with autograd on, a Linear computes as its module does."""
    from torch import nn

    from gptchat.core.model import packed

    net = nn.Module()
    net.body, net.lm_head = nn.Linear(16, 16), nn.Linear(16, 300, bias=False)
    pl = packed.PackedLinears(net, 64, "mkl")
    pl.refresh()
    assert sorted(pl._packed) == ["body"]
    x = torch.randn(64, 16)
    first = pl.blocks(net.lm_head.weight, 128, 64)
    assert [b.shape[0] for _, b in first] == [128, 128, 44] and pl.blocks(net.lm_head.weight, 128, 64) is first
    with torch.inference_mode():
        z = torch.cat([packed.mkl_product(p, b, None, x) for p, b in first], 1)
    assert torch.allclose(z, x @ net.lm_head.weight.t(), atol=1e-5)
    with torch.no_grad():
        net.lm_head.weight.mul_(2)
    assert pl.blocks(net.lm_head.weight, 128, 64) is not first
    with pl.use():
        y = net.body(x.requires_grad_())
        y.sum().backward()
    assert x.grad is not None and net.body.weight.grad is not None


def test_panels_of_two_mb_or_more_are_packed_into_one_block_of_huge_pages():
    """The panels packed in one refresh share one block starting on a 2 MB boundary (hugepages.block), one after
    another; a weight changed later is packed on its own, and every product still equals the module's."""
    from torch import nn

    from gptchat.core.model import hugepages, packed

    net = nn.Sequential(nn.Linear(256, 1040), nn.Linear(1040, 300))  # 1.1 + 1.3 MB of panels
    pl = packed.PackedLinears(net, 16, "panels")
    pl.refresh()
    (a, _), (b, _) = pl._packed["0"], pl._packed["1"]
    assert a.data_ptr() % hugepages.HUGE == 0 and b.data_ptr() == a.data_ptr() + a.numel() * 4
    with torch.no_grad():
        net[1].weight.mul_(2)
    x = torch.randn(5, 256)
    with torch.inference_mode():
        ref = net(x)
        with pl.use():
            got = net(x)
    assert pl._packed["0"][0] is a and torch.allclose(got, ref, atol=1e-4)
    assert packed._huge_room([nn.Linear(8, 16)]) is None  # under one page: ordinary memory


def test_many_rows_leave_the_panels_where_pytorchs_gemm_is_faster(monkeypatch):
    """A call of more than MANY_ROWS rows (a batch's prompts) goes to the module's own product where
    ``native.gemm_beats_panels`` says PyTorch's GEMM is the faster at many rows; a decode step's rows stay."""
    from torch import nn

    from gptchat.core.model import packed

    net = nn.Sequential(nn.Linear(8, 32))
    pl = packed.PackedLinears(net, 16, "panels")
    for beats in (True, False):
        for rows in (16, packed.MANY_ROWS + 1):
            monkeypatch.setattr(native, "gemm_beats_panels", lambda b=beats: b)
            calls = spy(monkeypatch, native, "sgemm")
            x = torch.randn(rows, 8)
            with torch.inference_mode(), pl.use():
                got = net(x)
            assert torch.allclose(got, x @ net[0].weight.t() + net[0].bias, atol=1e-5)
            assert len(calls) == (0 if beats and rows > packed.MANY_ROWS else 1), (beats, rows)
            monkeypatch.undo()


def _bf16_panels_here():
    if not native.avx512(bf16=True):
        pytest.skip("the bf16 panels need AVX512-BF16 and a compiler that knows it")


@pytest.mark.parametrize("M,K,N", [(1, 8, 5), (3, 64, 16), (4, 768, 2304), (7, 100, 50257), (16, 3072, 768),
                                   (17, 520, 47), (64, 768, 70)])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("tiles", [False, True], ids=["avx512-bf16", "amx"])
def test_bf16_panels_equal_the_product_to_bf16_rounding(M, K, N, with_bias, tiles, monkeypatch):
    _bf16_panels_here()
    if tiles and not native.amx():
        pytest.skip("no AMX here (or Linux did not grant its tiles)")
    monkeypatch.setattr(native, "amx", lambda: tiles)
    kernels = spy(monkeypatch, native.kernel(), "gptchat_amx_bgemm")
    g = torch.Generator().manual_seed(M * 1000 + N)
    w, b, x = (torch.randn(N, K, generator=g).bfloat16(), torch.randn(N, generator=g).bfloat16(),
               torch.randn(M, K, generator=g).bfloat16())
    y = native.bgemm(native.bpanels(w), b if with_bias else None, x, N)
    exact = torch.nn.functional.linear(x.double(), w.double(), b.double() if with_bias else None)
    assert y.dtype == torch.bfloat16 and y.shape == (M, N)
    # fp32 sums of exact bf16 products, rounded once: within half a bf16 unit of the exact result (+ sum rounding)
    assert ((y.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-5 * K ** 0.5).all()
    assert len(kernels) == (1 if tiles and K % 32 == 0 else 0)  # AMX takes inputs in tiles of 32


def test_the_bf16_panels_go_on_amx_tiles_where_there_are_some(monkeypatch):
    from gptchat.core.model import packed

    if not native.avx512(bf16=True):
        pytest.skip("the bf16 panels need AVX512-BF16 and a compiler that knows it")
    assert isinstance(native.amx.__wrapped__(), bool)  # asks the CPU, the compiler and Linux
    for amx_cpu, tiles, kinds in ((False, False, {"bpanels"}), (True, True, {"bpanels"}),
                                  (True, False, {"onednn", None})):  # oneDNN's, where this PyTorch has it
        monkeypatch.setattr(packed, "cpu_amx_bf16", lambda a=amx_cpu: a)
        monkeypatch.setattr(native, "amx", lambda t=tiles: t)
        assert packed.kind("cpu", torch.bfloat16) in kinds, (amx_cpu, tiles)


def test_bf16_batched_decode_runs_on_the_bf16_panels(monkeypatch):
    """A bf16 engine's batched steps through the modules (GPTCHAT_STEPN=0; the one-call step on AMX is
    test_stepn's) go through gptchat_bgemm, and decode the tokens oneDNN's packed weights decode (greedy, a tiny
    trained-shape model: the same tokens)."""
    _bf16_panels_here()
    from gptchat.core.generate.engine import Engine
    from gptchat.core.generate.sampling import SamplingParams
    from gptchat.core.model import packed
    from gptchat.core.model.config import GPTConfig
    from gptchat.core.model.gpt import GPT

    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, n_positions=64, vocab_size=300))
    model.init_weights(3)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
    runs = {}
    for kind in ("bpanels", "onednn"):
        monkeypatch.undo()  # the previous round's spy and kind
        calls = spy(monkeypatch, native, "bgemm")
        monkeypatch.setattr(packed, "kind", lambda *a, k=kind: k)
        monkeypatch.setenv("GPTCHAT_STEPN", "0")
        m = GPT(model.config)
        m.load_state_dict(model.state_dict())
        eng = Engine(m.to(torch.bfloat16))
        runs[kind] = [[t.token for t in step] for step in eng.generate(prompts, SamplingParams(greedy=True), 6,
                                                                       ignore_eos=True)]
        assert (len(calls) > 0) == (kind == "bpanels")
    assert runs["bpanels"] == runs["onednn"]


@pytest.mark.parametrize("wide", ["1", "0"], ids=["avx512-rows", "avx2-rows"])  # bf16's rows in AVX-512 where there is
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,K", [(50257, 768), (9001, 24), (8192, 1600), (8195, 40)])
def test_one_row_through_a_wide_weight_equals_the_product(N, K, dtype, wide, monkeypatch):
    monkeypatch.setenv("GPTCHAT_WIDE", wide)
    g = torch.Generator().manual_seed(N)
    w, x = torch.randn(N, K, generator=g).to(dtype), torch.randn(1, 1, K, generator=g).to(dtype)
    assert native.can_rows(x, w) and not native.can_rows(torch.randn(2, K).to(dtype), w)
    y = native.rows(w, x)
    exact = torch.nn.functional.linear(x.double(), w.double())
    assert y.shape == (1, 1, N) and y.dtype == dtype
    rel = 1e-6 if dtype == torch.float32 else 2 ** -8  # fp32 sums; bf16 rounded once at the end
    assert ((y.double() - exact).abs() <= exact.abs() * rel + 1e-5 * K ** 0.5).all()


def test_a_prefills_last_row_head_runs_on_the_row_kernel(monkeypatch):
    """A one-row forward through a vocabulary-wide head goes to native.rows; its logits are the full forward's."""
    from gptchat.core.model.config import GPTConfig
    from gptchat.core.model.gpt import GPT

    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, n_positions=64, vocab_size=9000)).eval()
    model.init_weights(1)
    x = torch.randint(0, 9000, (1, 12), generator=torch.Generator().manual_seed(0))
    calls = spy(monkeypatch, native, "rows")
    with torch.no_grad():
        full = model(x)
        last = model(x, tail=1)
    assert len(calls) == 1  # the tail's one row, not the full forward's twelve
    torch.testing.assert_close(last, full[:, -1:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("M,K,N", [(2, 768, 2304), (3, 37, 8), (8, 3072, 768), (9, 64, 520), (24, 100, 1032)])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_a_few_rows_on_the_inference_layout_equal_the_product(M, K, N, with_bias, threads):
    """gptchat_fewrows: each thread a block of input rows (K not a multiple of 4 or of the threads), more than 8 rows
    512 columns at a time (N not a multiple of 512), the bias added once."""
    g = torch.Generator().manual_seed(M * 100 + K)
    w, b, x = torch.randn(K, N, generator=g), torch.randn(N, generator=g), torch.randn(M, K, generator=g)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert native.can_few_rows(x, w)
        y = native.few_rows(w, b if with_bias else None, x)
    finally:
        torch.set_num_threads(before)
    ref = x.double() @ w.double() + (b.double() if with_bias else 0)
    assert y.shape == (M, N)
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=2e-5 * K ** 0.5)


def test_a_short_prefill_runs_on_the_few_rows_kernel(monkeypatch):
    """Prompts of 2 to FEW_ROWS tokens through a model in the inference layout go to native.few_rows, and give the
    logits of the rows layout's PyTorch products; one row, more rows, or gradients wanted stay on PyTorch's."""
    from gptchat.core.model.config import GPTConfig
    from gptchat.core.model.gpt import GPT

    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=64, n_positions=64, vocab_size=500)
    ref = GPT(cfg).eval()
    ref.init_weights(2)
    model = GPT(cfg).eval()
    model.load_state_dict(ref.state_dict())
    model.to_inference_layout()
    calls = spy(monkeypatch, native, "few_rows")
    for T in (2, 7, native.FEW_ROWS):
        x = torch.randint(0, 500, (1, T), generator=torch.Generator().manual_seed(T))
        with torch.no_grad():
            torch.testing.assert_close(model(x), ref(x), atol=1e-4, rtol=0)
    assert len(calls) == 3 * 2 * 4  # three prompts, two blocks, four products each
    calls.clear()
    with torch.no_grad():
        model(torch.randint(0, 500, (1, native.FEW_ROWS + 1)))
    model.train()
    model(torch.randint(0, 500, (1, 5))).sum().backward()
    assert calls == []


def test_the_few_rows_kernel_can_be_switched_off(monkeypatch):
    x, w = torch.randn(4, 64), torch.randn(64, 32)
    assert native.can_few_rows(x, w)
    monkeypatch.setenv("GPTCHAT_FEW_ROWS", "0")
    assert not native.can_few_rows(x, w)
