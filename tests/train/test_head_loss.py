"""The finetune loss through the tied head in chunks (evaluate.head_loss): the same loss, gradients and
optimizer step as the full-logits cross-entropy, and the training loop never keeps (B*T, V) logits."""

from __future__ import annotations

import pytest
import torch

from gptchat.core.model.config import PRESETS
from gptchat.core.model.gpt import GPT
from gptchat.core.train import Settings, train
from gptchat.core.train.evaluate import head_loss, loss_fn
from tests.train.util import FAST, write_corpus


def _model(seed: int = 0) -> GPT:
    model = GPT(PRESETS["nano"])
    model.init_weights(seed)
    return model.train()


def _data(batch: int = 2, block: int = 37, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 50257, (batch, block), generator=gen)
    y = torch.randint(0, 50257, (batch, block), generator=gen)
    y[0, :5] = -1  # ignored positions (an instruction's prompt)
    return x, y


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_chunked_loss_and_every_gradient_equal_the_full_cross_entropy():
    model, (x, y) = _model(), _data()
    full = loss_fn(model(x), y)
    full.backward()
    want = _grads(model)
    model.zero_grad(set_to_none=True)
    chunked = head_loss(model(x, return_hidden=True), model.lm_head.weight, y, chunk=10)  # 74 rows: 7 chunks and 4
    chunked.backward()
    got = _grads(model)
    assert abs(full.item() - chunked.item()) < 1e-5
    for name in want:  # the tied wte/lm_head gets both the embedding's and the head's gradient
        assert torch.allclose(want[name], got[name], atol=1e-5, rtol=0), (name, (want[name] - got[name]).abs().max())


def test_all_positions_ignored_gives_zero_loss_and_zero_gradients():
    h = torch.randn(1, 4, 8, requires_grad=True)
    w = torch.randn(20, 8, requires_grad=True)
    loss = head_loss(h, w, torch.full((1, 4), -1))
    loss.backward()
    assert loss.item() == 0.0 and not h.grad.any() and not w.grad.any()


def test_an_optimizer_step_through_the_chunked_loss_equals_the_full_logits_step():
    old, new = _model(), _model()
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.9, 0.95), fused=True) for m in (old, new)]
    for step in range(2):
        x, y = _data(seed=step)
        losses = [loss_fn(old(x), y), head_loss(new(x, return_hidden=True), new.lm_head.weight, y, chunk=16)]
        for loss, opt, m in zip(losses, opts, (old, new)):
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        assert abs(losses[0].item() - losses[1].item()) < 1e-5
    for (name, a), b in zip(old.named_parameters(), new.parameters()):
        assert torch.allclose(a, b, atol=1e-5, rtol=0), (name, (a - b).abs().max())


def test_the_training_loop_never_keeps_full_logits_for_backward(tmp_path):
    """Every tensor autograd saves during a run is far smaller than the (B*T, V) logits."""
    corpus = write_corpus(tmp_path / "data", 20_000)
    biggest = []

    def pack(t):
        biggest.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        res = train(Settings(data=[str(corpus)], steps=2, eval_every=2, name="chunked", **FAST))
    assert res.status == "finished" and biggest
    rows = FAST["batch_size"] * FAST["block_size"]
    assert max(biggest) < rows * 50257, max(biggest)  # the head gradient (V, C) is the largest


def test_head_loss_under_bf16_autocast_stays_close_to_fp32():
    model, (x, y) = _model(), _data()
    want = loss_fn(model(x), y).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = head_loss(model(x, return_hidden=True), model.lm_head.weight, y)
    assert got.dtype == torch.float32 and abs(got.item() - want) < 0.05


@pytest.mark.slow
def test_train_bench_reports_both_sides():
    from gptchat.core.bench.train import format_bench, run

    b = run("nano", batch=1, block=16, steps=1, memory=False)
    d = b.to_dict()
    assert set(d["tokens_per_s"]) == {"ours", "transformers"} and d["speed_ratio"] > 0
    assert "gptchat/transformers: speed" in format_bench(b)
    with pytest.raises(ValueError, match="1024-token window"):
        run("nano", block=1025, memory=False)


@pytest.mark.slow
def test_train_bench_measures_each_sides_peak_memory_in_a_child():
    from gptchat.core.bench.train import run

    b = run("nano", batch=1, block=16, steps=1)
    assert set(b.peak_rss_mb) == {"ours", "transformers"} and all(v > 100 for v in b.peak_rss_mb.values())
    assert b.memory_ratio == pytest.approx(b.peak_rss_mb["ours"] / b.peak_rss_mb["transformers"])



def test_logits_spread_past_the_exp_floor_keep_the_loss_and_gradients():
    """Logits ~300 apart (z - max far below EXP_FLOOR, where exp is clamped for speed): loss and gradients still
    equal the full cross-entropy's."""
    gen = torch.Generator().manual_seed(3)
    h = (torch.randn(3, 5, 16, generator=gen) * 12).requires_grad_()
    w = (torch.randn(40, 16, generator=gen) * 12).requires_grad_()
    y = torch.randint(0, 40, (3, 5), generator=gen)
    logits = h @ w.t()
    assert float((logits.amax(-1) - logits.amin(-1)).min().detach()) > 2 * 87
    full = loss_fn(logits, y)
    gh, gw = torch.autograd.grad(full, (h, w))
    chunked = head_loss(h, w, y, chunk=4)
    ch, cw = torch.autograd.grad(chunked, (h, w))
    assert chunked.item() == pytest.approx(full.item(), rel=1e-6)
    assert torch.allclose(ch, gh, atol=1e-5) and torch.allclose(cw, gw, atol=1e-5)


def test_head_loss_under_bf16_autocast_equals_autocasts_full_cross_entropy():
    """Under autocast the chunked loss makes autocast's casts itself (the products in bf16, the softmax in fp32):
    the loss and gradients of autocast's own full-logits cross-entropy, to bf16 rounding (the gradients differ
    where autocast rounds softmax / n to bf16 and the chunks round the softmax, then divide)."""
    gen = torch.Generator().manual_seed(4)
    h = torch.randn(2, 37, 32, generator=gen).requires_grad_()
    w = (torch.randn(3000, 32, generator=gen) * 0.5).requires_grad_()  # blocks of 1024 vocabulary rows and a part
    y = torch.randint(0, 3000, (2, 37), generator=gen)
    y[1, :4] = -1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = loss_fn(h @ w.t(), y)
        gh, gw = torch.autograd.grad(full, (h, w))
        chunked = head_loss(h, w, y, chunk=16)
        ch, cw = torch.autograd.grad(chunked, (h, w))
    assert ch.dtype == cw.dtype == torch.float32
    assert chunked.item() == pytest.approx(full.item(), abs=1e-5)
    for a, b in ((ch, gh), (cw, gw)):
        torch.testing.assert_close(a, b, atol=2e-3 * float(b.abs().max()), rtol=2e-2)


def test_validation_scores_through_the_chunked_head_with_the_full_cross_entropys_loss(monkeypatch, tmp_path):
    """val_loss goes through the final hidden states and head_loss's chunks (the batch's logits never exist) and
    gives the full-logits loss; chunked=False (FSDP's way) computes the logits in the forward."""
    from contextlib import nullcontext

    import numpy as np

    from gptchat.core.train import evaluate
    from gptchat.core.train.data import Dataset
    from gptchat.core.train.dist import Dist
    from tests.factory import spy

    gen = np.random.default_rng(0)
    tokens = gen.integers(0, 50257, 400).astype(np.uint16)
    mask = (gen.random(400) > 0.3).astype(np.uint8)  # some targets masked (-1), as instruction data has
    ds = Dataset("k", tmp_path, tokens, mask, {})
    model = _model().eval()
    calls = spy(monkeypatch, evaluate, "head_loss")
    args = (ds, (0, 400), 37, 3, 2, "cpu", nullcontext, Dist())
    chunked, n = evaluate.val_loss(model, *args)
    assert len(calls) == 2 and n == sum(int((evaluate.windows(ds, [s], 37)[1] != -1).sum()) for s in range(0, 222, 37))
    full, n_full = evaluate.val_loss(model, *args, chunked=False)
    assert len(calls) == 2 and n_full == n and abs(chunked - full) < 1e-5
