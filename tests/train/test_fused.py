"""The training forward's fused layer-norm steps (core/model/fused.py): the same gradients as plain
autograd, fewer bytes kept for backward, and the plain path wherever they do not apply."""

from __future__ import annotations

import copy

import pytest
import torch

from gptchat.core.model import fused
from gptchat.core.model.config import GPTConfig
from gptchat.core.model.gpt import GPT
from gptchat.core.train.lora import add_lora
from tests.factory import spy


def _model(activation="gelu_tanh", bias=True, seed=0) -> GPT:
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=64, n_positions=64, vocab_size=300, activation=activation, bias=bias)
    m = GPT(cfg)
    m.init_weights(seed)
    return m.train()


def _grads(model, x, use_fused: bool, monkeypatch) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """(loss, every parameter's gradient, how many fused backward steps ran)."""
    with monkeypatch.context() as mp:
        ran = spy(mp, fused._LNMLP, "backward")
        if not use_fused:
            mp.setattr(fused, "usable", lambda *a: False)
        loss = model(x).logsumexp(-1).mean()
        loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()], len(ran)


@pytest.mark.parametrize("activation,bias", [("gelu_tanh", True), ("gelu", False), ("relu", True)])
def test_fused_steps_give_autograds_gradients(activation, bias, monkeypatch):
    plain = _model(activation, bias)
    mine = copy.deepcopy(plain)
    x = torch.randint(0, 300, (3, 40), generator=torch.Generator().manual_seed(1))
    l0, g0, n0 = _grads(plain, x, False, monkeypatch)
    l1, g1, n1 = _grads(mine, x, True, monkeypatch)
    assert (n0, n1) == (0, 2)  # one fused MLP step a block, and only when asked for
    torch.testing.assert_close(l1, l0, atol=0, rtol=0)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def _saved_bytes(model, x, use_fused: bool, monkeypatch) -> int:
    """Bytes of the distinct tensors autograd keeps for backward during one forward."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with monkeypatch.context() as mp:
        if not use_fused:
            mp.setattr(fused, "usable", lambda *a: False)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x, return_hidden=True).sum()
    return sum(n for ptr, n in seen.items() if ptr not in params)


def test_fused_steps_keep_fewer_activations(monkeypatch):
    """Per token and block, plain autograd keeps ~17 activations of n_embd floats; fused ~10."""
    model = _model()
    x = torch.randint(0, 300, (4, 64))
    plain, mine = _saved_bytes(model, x, False, monkeypatch), _saved_bytes(model, x, True, monkeypatch)
    assert mine < 0.7 * plain, (mine, plain)  # measured 0.64 (the tiny vocab and head add to both)


@pytest.mark.parametrize("activation,bias", [("gelu_tanh", True), ("relu", False)])
def test_fused_steps_under_bf16_autocast_give_autocasts_gradients(activation, bias, monkeypatch):
    """Under autocast the steps make autocast's casts themselves: the plain modules' loss and gradients."""
    plain = _model(activation, bias)
    mine = copy.deepcopy(plain)
    x = torch.randint(0, 300, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        l0, g0, n0 = _grads(plain, x, False, monkeypatch)
        l1, g1, n1 = _grads(mine, x, True, monkeypatch)
    assert (n0, n1) == (0, 2)
    torch.testing.assert_close(l1, l0, atol=0, rtol=0)  # the same ops on the same casts (equal to the bit here)
    for a, b in zip(g1, g0):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_fused_steps_under_autocast_keep_fewer_activations_and_no_weight_casts(monkeypatch):
    """Under bf16 autocast the fused steps keep less than the plain modules, and no bf16 copy of the
    projections' weights is kept for backward (autocast's cast cache would hold one per weight)."""
    model = _model()
    x = torch.randint(0, 300, (4, 64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, mine = _saved_bytes(model, x, False, monkeypatch), _saved_bytes(model, x, True, monkeypatch)
    assert mine < 0.7 * plain, (mine, plain)  # measured 0.61


def test_plain_path_under_lora_and_inference(monkeypatch):
    calls = []
    monkeypatch.setattr(fused, "ln_mlp", lambda *a: calls.append(1))  # would break the forward if used
    x = torch.randint(0, 300, (2, 16))
    model = _model()
    add_lora(model, ["q", "v", "fc"], rank=2, alpha=4.0)
    model(x).sum().backward()  # LoRA adapters on the projections: their modules run
    model = _model()
    with torch.no_grad():
        model(x)
    assert calls == []
