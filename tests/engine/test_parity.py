"""Our logits against transformers' GPT2LMHeadModel on the same weights, for every format and shape."""

from __future__ import annotations

import pytest
import torch

from gptchat.core.weights.checkpoints import load, resolve
from tests.factory import FORMATS, hf_model, save

SHAPES = {
    "2L-4H-64d": dict(n_layer=2, n_head=4, n_embd=64, n_positions=128),
    "3L-6H-96d-ctx64": dict(n_layer=3, n_head=6, n_embd=96, n_positions=64),
    "1L-1H-32d": dict(n_layer=1, n_head=1, n_embd=32, n_positions=256),
}


def _logits_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape
    assert ref.std() > 1.0, "reference logits too flat for the comparison to mean anything"
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", SHAPES)
def test_logits_match_transformers(tmp_path, fmt, shape):
    ref = hf_model(**SHAPES[shape], seed=len(shape))
    path = save(ref, tmp_path / "ck", fmt)
    ours, ck = load(str(path))
    assert ck.format == ("nanogpt" if fmt == "nanogpt" else "hf-sharded" if "sharded" in fmt else
                         "hf-bin" if fmt == "bin" else "hf-safetensors")
    x = torch.randint(0, 50257, (3, SHAPES[shape]["n_positions"]), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _logits_close(ours(x), ref(x).logits)


def test_nanogpt_without_bias_and_padded_vocab(tmp_path):
    ref = hf_model(n_layer=2, n_head=2, n_embd=48, vocab_size=50304, zero_bias=True, seed=3)
    path = save(ref, tmp_path / "nano", "nanogpt")
    ours, ck = load(str(path))
    assert ck.config.bias is False and ck.config.vocab_size == 50304
    assert not any(n.endswith("bias") for n, _ in ours.named_parameters())
    x = torch.randint(0, 50304, (2, 40))
    with torch.no_grad():
        _logits_close(ours(x), ref(x).logits)


@pytest.mark.parametrize("activation", ["gelu_new", "gelu", "relu"])
def test_activation_functions(tmp_path, activation):
    ref = hf_model(activation=activation, seed=5)
    ours, _ = load(str(save(ref, tmp_path / "m")))
    x = torch.randint(0, 50257, (1, 50))
    with torch.no_grad():
        _logits_close(ours(x), ref(x).logits)


def test_exact_gelu_would_be_caught(tmp_path):
    """The parity check is sharp enough to see GPT-2's tanh GELU replaced by exact GELU."""
    ref = hf_model(seed=6)
    ours, _ = load(str(save(ref, tmp_path / "m")))
    for block in ours.transformer.h:
        block.mlp.act, block.mlp.kind = torch.nn.GELU(), "gelu"  # the module, and the name the C kernels go by
    x = torch.randint(0, 50257, (1, 50))
    with torch.no_grad(), pytest.raises(AssertionError):
        _logits_close(ours(x), ref(x).logits)


def test_square_attn_c_proj_is_transposed(tmp_path):
    """attn.c_proj is square: loading it untransposed would keep the shape and break the logits."""
    ref = hf_model(seed=7)
    ours, _ = load(str(save(ref, tmp_path / "m")))
    w_ref = ref.transformer.h[0].attn.c_proj.weight  # Conv1D: [in, out]
    torch.testing.assert_close(ours.transformer.h[0].attn.c_proj.weight, w_ref.t())


def test_loaded_on_requested_dtype_without_meta_leftovers(tmp_path):
    ref = hf_model(seed=8)
    ours, _ = load(str(save(ref, tmp_path / "m")), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in ours.parameters())
    assert ours.lm_head.weight is ours.transformer.wte.weight  # still tied after assign=True


def test_inference_layout_keeps_logits(tmp_path):
    ref = hf_model(seed=9)
    ours, _ = load(str(save(ref, tmp_path / "m")))
    x = torch.randint(0, 50257, (2, 30))
    with torch.no_grad():
        before = ours(x)
        ours.to_inference_layout()
        assert not ours.transformer.h[0].mlp.c_fc.weight.is_contiguous()
        torch.testing.assert_close(ours(x), before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tail", [1, 7, 29])
def test_tail_rows_equal_the_full_forward(tmp_path, tail):
    """``tail``: the last block runs on the last rows only (prefill, eval); their outputs are the full
    forward's, with plain causal attention, a padding mask and a chunk after a cached prefix."""
    ours, _ = load(str(save(hf_model(seed=12), tmp_path / "m")))
    x = torch.randint(0, 50257, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = ours(x)
        out = ours(x, tail=tail)
        assert out.shape == (2, tail, full.shape[-1])
        torch.testing.assert_close(out, full[:, -tail:], atol=1e-5, rtol=0)
        hidden = ours(x, return_hidden=True)
        torch.testing.assert_close(ours(x, return_hidden=True, tail=tail), hidden[:, -tail:], atol=1e-5, rtol=0)
        # row 0 left-padded by 4: a mask keeps its queries off the padding
        valid = torch.ones(2, 30, dtype=torch.bool)
        valid[0, :4] = False
        mask = (torch.ones(30, 30, dtype=torch.bool).tril()[None] & valid[:, None, :])[:, None]
        mask |= torch.eye(30, dtype=torch.bool)  # padding queries see themselves (no empty rows)
        pos = (valid.cumsum(1) - 1).clamp(min=0)
        torch.testing.assert_close(ours(x, pos, mask, tail=tail), ours(x, pos, mask)[:, -tail:], atol=1e-5, rtol=0)
        # a chunk after a cached prefix of 10 tokens
        ours.setup_cache(2, 40)
        ours(x[:, :10], start=0, kv_len=10)
        chunk = ours(x[:, 10:], start=10, kv_len=30, tail=min(tail, 20))
        ours.drop_cache()
        torch.testing.assert_close(chunk, full[:, -min(tail, 20):], atol=1e-5, rtol=0)


def test_sniff_reports_size_and_params(tmp_path):
    ref = hf_model(seed=10)
    ck = resolve(str(save(ref, tmp_path / "m")))
    assert ck.config.n_params() == sum(p.numel() for p in ref.parameters())
    assert ck.size_bytes == (tmp_path / "m" / "model.safetensors").stat().st_size


def _ops(fn) -> set[str]:
    """The aten ops ``fn()`` runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: set[str] = set()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with Record():
        fn()
    return seen


@pytest.mark.parametrize("parts", [2, 3])
def test_one_row_products_split_by_thread_keep_logits(tmp_path, parts):
    """A batch-1 decode step's products are split into blocks of input rows (gpt.Linear); the logits
    are those of the plain product, and longer inputs keep the plain product."""
    from gptchat.core.model.gpt import Linear, split_parts

    ref = hf_model(n_layer=2, n_head=3, n_embd=96, n_positions=64, seed=11)
    ours, _ = load(str(save(ref, tmp_path / "m")))
    ours.to_inference_layout()
    lins = [m for m in ours.modules() if isinstance(m, Linear)]
    assert len(lins) == 2 * 4 + 1
    x = torch.randint(0, 50257, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ours.setup_cache(1, 64)
        ours(x[:, :-1], kv_len=19)
        one_row = lambda: ours.decode_step(x[:, -1:], torch.tensor(19))  # noqa: E731
        for m in lins:
            m.parts = 1
        plain, plain_ops = one_row(), _ops(one_row)
        for m in lins:
            m.parts = parts
        split, split_ops = one_row(), _ops(one_row)
        whole = _ops(lambda: ours(x))
    assert "bmm" in split_ops and "bmm" not in plain_ops and "bmm" not in whole
    torch.testing.assert_close(split, plain, atol=5e-5, rtol=0)  # another order of the same sums
    torch.testing.assert_close(split, ref(x).logits[:, -1], atol=1e-4, rtol=0)
    assert split_parts(768, 2) == 2 and split_parts(768, 5) == 4 and split_parts(50, 4) == 1
    assert split_parts(3072, 1) == 1


def test_split_products_follow_the_threads_and_can_be_turned_off(tmp_path, monkeypatch):
    from gptchat.core.model.gpt import Linear

    path = save(hf_model(seed=12), tmp_path / "m")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        on = load(str(path))[0].to_inference_layout()
        monkeypatch.setenv("GPTCHAT_SPLIT_K", "0")
        off = load(str(path))[0].to_inference_layout()
    finally:
        torch.set_num_threads(threads)
    assert {m.parts for m in on.modules() if isinstance(m, Linear)} == {2}
    assert {m.parts for m in off.modules() if isinstance(m, Linear)} == {1}


def test_many_rows_accumulate_into_the_residual(tmp_path, monkeypatch):
    """Prefill-sized inputs (>= gpt.ACCUMULATE_FROM rows, fp32 CPU inference) take Block._accumulate: the output
    projections add into the residual stream in place, c_fc's bias goes into the GELU's pass. Its logits are
    transformers' (1e-4) and the unfused blocks' (5e-5: the same sums in another order); under autograd the
    ordinary modules run."""
    from gptchat.core.model import gpt, native

    if native.kernel() is None:
        pytest.skip("no C kernel here (the GELU with a bias is in it)")
    ref = hf_model(seed=4)
    ours, _ = load(str(save(ref, tmp_path / "m")))
    ours.to_inference_layout()
    calls = []
    real = gpt.Block._accumulate
    monkeypatch.setattr(gpt.Block, "_accumulate", lambda self, *a: calls.append(1) or real(self, *a))
    x = torch.randint(0, 50257, (2, gpt.ACCUMULATE_FROM), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        fused = ours(x)
        assert len(calls) == ours.config.n_layer
        _logits_close(fused, ref(x).logits)
        monkeypatch.setenv("GPTCHAT_ACCUMULATE", "0")
        torch.testing.assert_close(fused, ours(x), atol=5e-5, rtol=0)
        assert len(calls) == ours.config.n_layer
        monkeypatch.delenv("GPTCHAT_ACCUMULATE")
        ours(x[:, : gpt.ACCUMULATE_FROM // 2 - 1])  # too few rows: the modules
        assert len(calls) == ours.config.n_layer
    ours(x).sum().backward()  # autograd: the modules, and gradients reach the projections
    assert len(calls) == ours.config.n_layer and ours.transformer.h[0].mlp.c_proj.weight.grad is not None
