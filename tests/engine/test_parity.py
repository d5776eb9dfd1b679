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
        block.mlp.act = torch.nn.GELU()
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


def test_sniff_reports_size_and_params(tmp_path):
    ref = hf_model(seed=10)
    ck = resolve(str(save(ref, tmp_path / "m")))
    assert ck.config.n_params() == sum(p.numel() for p in ref.parameters())
    assert ck.size_bytes == (tmp_path / "m" / "model.safetensors").stat().st_size
