"""The whole batched decode step in C on fp32 panels (core/model/stepn.py): the same logits, caches and tokens as
the modules, for dense and padded batches, rows leaving and joining, any number of threads."""

from __future__ import annotations

from collections import deque

import pytest
import torch

from gptchat.core.generate.batching import LiveBatch
from gptchat.core.generate.engine import Engine
from gptchat.core.generate.sampling import SamplingParams
from gptchat.core.model import native, packed, step1, stepn
from gptchat.core.train.lora import add_lora
from tests.factory import threads as using
from tests.factory import small_gpt, took

pytestmark = pytest.mark.skipif(native.kernel() is None, reason="the C kernels cannot be built here")

VOCAB = 300  # 18.75 panels of 16: the head's last panel is a part one
GREEDY = SamplingParams(greedy=True)


def _engine(dtype: str = "fp32", rounded: bool = False, **kw) -> Engine:
    """``rounded``: every weight rounded to bf16 first (an fp32 engine on a bf16 engine's weights)."""
    m = small_gpt(vocab_size=VOCAB, **kw)
    if rounded:
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(p.bfloat16().float())
    return Engine(m.to(getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[dtype])), device=torch.device("cpu"))


def _prompts(lengths, seed: int = 3) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _steps(e: Engine, prompts, n: int, monkeypatch, on: bool, feed: torch.Tensor | None = None):
    """Logits of ``n`` decode steps of a batch of ``prompts`` on the engine's packed panels (fp32's, or bf16's), as
    its decode loop runs them, and the caches afterwards. Fed back: the greedy tokens, or ``feed`` (n, B) (bf16
    logits a rounding apart can tie-break another way)."""
    monkeypatch.setenv("GPTCHAT_STEPN", "1" if on else "0")
    out = []
    with torch.inference_mode():
        b = LiveBatch(e, GREEDY, max(map(len, prompts)) + n)
        tok = b.admit([(p, n, 0) for p in prompts], max(map(len, prompts))).argmax(-1)
        fast = e.packed_linears(len(prompts))
        assert fast is not None and fast.kind == {torch.float32: "panels", torch.bfloat16: "bpanels"}[e.dtype]
        for _ in range(n):
            with fast.use():
                logits = b.decode(tok)
            out.append(logits.clone())
            tok = logits.argmax(-1) if feed is None else feed[len(out) - 1]
        caches = [(k.clone(), v.clone()) for k, v in zip(b.k, b.v)]
    return torch.stack(out), caches


SHAPES = [{}, dict(bias=False), dict(activation="relu"), dict(activation="gelu"),
          dict(scale_attn_by_inverse_layer_idx=True), dict(n_embd=96, n_head=3)]


@pytest.mark.parametrize("lengths", [(6, 6, 6), (9, 2, 5, 9)], ids=["dense", "padded"])
@pytest.mark.parametrize("kw", SHAPES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "gpt2")
def test_the_batched_step_equals_the_modules(kw, lengths, monkeypatch):
    """A dense batch (no mask, positions are slots) and a left-padded one (each row its positions and visible
    slots), every shape the model takes: the same logits (the norms' sums in another order) and caches."""
    e = _engine(**kw)
    prompts = _prompts(lengths)
    calls = took(monkeypatch, stepn, "run")
    ref, ref_cache = _steps(e, prompts, 12, monkeypatch, on=False)
    assert not any(calls)
    got, cache = _steps(e, prompts, 12, monkeypatch, on=True)
    assert calls.count(True) == 12  # every step of the second run
    assert (got - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item()), (got - ref).abs().max()
    for (k, v), (rk, rv) in zip(cache, ref_cache):
        assert (k - rk).abs().max() <= 1e-5 and (v - rv).abs().max() <= 1e-5


@pytest.mark.parametrize("threads", [1, 3])
def test_the_batched_step_splits_its_work_over_any_number_of_threads(threads, monkeypatch):
    """3 threads share 5 rows, 5 x 4 (row, head) pairs and the panels unevenly (the test machine has 2 cores)."""
    e = _engine()
    prompts = _prompts((7, 3, 7, 1, 4))
    with using(threads):
        got, _ = _steps(e, prompts, 8, monkeypatch, on=True)
    ref, _ = _steps(e, prompts, 8, monkeypatch, on=False)
    assert (got - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())


def test_a_generation_with_rows_leaving_and_joining_gives_the_modules_tokens(monkeypatch):
    """Rows finish (compacted out of the cache), waiting prompts take their places (prefilled alone, then decoded
    with the others): every step of two rows or more goes through the batched step, and the tokens are the
    modules'."""
    e = _engine()
    prompts = _prompts((8, 3, 6, 8))
    waiting = _prompts((2, 5, 4, 7), seed=4)
    runs = {}
    for on in (False, True):
        monkeypatch.setenv("GPTCHAT_STEPN", "1" if on else "0")
        calls = took(monkeypatch, stepn, "run")
        refill = deque((p, 6, 0) for p in waiting)
        rows: dict[int, list[int]] = {}
        for step in e.generate(prompts, GREEDY, [3, 9, 5, 12], refill=refill, ignore_eos=True):
            for t in step:
                rows.setdefault(t.row, []).append(t.token)
        runs[on] = rows
        assert not refill and len(rows) == 8
        assert all(calls) == on and len(calls) > 10
        monkeypatch.undo()
    assert runs[True] == runs[False]


def test_where_the_batched_step_does_not_apply(monkeypatch):
    """Outside the packed weights' block, switched off, on bf16 panels, a LoRA-adapted model: the modules run."""
    e = _engine()
    prompts = _prompts((4, 4))
    calls = took(monkeypatch, stepn, "run")
    with torch.inference_mode():
        b = LiveBatch(e, GREEDY, 10)
        tok = b.admit([(p, 4, 0) for p in prompts], 4).argmax(-1)
        assert packed.in_use(e.model) is None
        b.decode(tok)  # no packed weights in use
        fast = e.packed_linears(2)
        with fast.use():
            assert packed.in_use(e.model) is fast
            monkeypatch.setenv("GPTCHAT_STEPN", "0")
            b.decode(tok)
            monkeypatch.delenv("GPTCHAT_STEPN")
            b.decode(tok)
        assert packed.in_use(e.model) is None
    assert calls == [False, False, True]

    if native.avx512(bf16=True) and not native.amx():  # bf16 panels on AVX512-BF16 (no AMX): the modules' steps
        bf = _engine("bf16")
        calls.clear()
        list(bf.generate(prompts, GREEDY, 3, ignore_eos=True))
        assert calls and not any(calls)

    lora = _engine()
    add_lora(lora.model, ["fc"], rank=2, alpha=4.0)
    assert step1.plan(lora.model) is None
    calls.clear()
    out = list(lora.generate(prompts, GREEDY, 3, ignore_eos=True))
    assert len(out) == 3 and calls and not any(calls)


def test_a_weight_changed_in_place_is_packed_again_and_the_step_follows_it(monkeypatch):
    e = _engine()
    prompts = _prompts((5, 5, 5))
    before, _ = _steps(e, prompts, 3, monkeypatch, on=True)
    plan = e.packed_linears(3).plan
    with torch.no_grad():
        e.model.transformer.h[1].mlp.c_fc.weight.mul_(1.5)
    got, _ = _steps(e, prompts, 3, monkeypatch, on=True)
    assert e.packed_linears(3).plan is not plan
    ref, _ = _steps(e, prompts, 3, monkeypatch, on=False)
    assert (got - before).abs().max() > 1e-3  # the change shows
    assert (got - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())


def test_a_token_past_the_table_is_refused_by_the_step(monkeypatch):
    e = _engine()
    with torch.inference_mode():
        b = LiveBatch(e, GREEDY, 10)
        b.admit([(p, 4, 0) for p in _prompts((3, 3))], 3)
        with e.packed_linears(2).use(), pytest.raises(IndexError, match="not in the table of 300"):
            b.decode(torch.tensor([5, VOCAB]))


@pytest.mark.parametrize("on", [True, False])
def test_the_bench_says_how_its_batches_ran(on, monkeypatch):
    from gptchat.core.bench import engine as bench

    monkeypatch.setenv("GPTCHAT_STEPN", "1" if on else "0")
    monkeypatch.setattr(bench, "read_bandwidth", lambda *a: 20.0)  # no second of summing memory per reading
    rep = bench.run(shape="tiny", prompt_tokens=8, new_tokens=2, batch_sizes=(1, 3), reference=False, repeats=1)
    assert rep.batch_step == ("one C call" if on else "modules")
    assert f"; batched: {rep.batch_step}" in bench.format_report(rep)


@pytest.mark.skipif(not native.amx(), reason="the bf16 batched step multiplies on AMX tiles")
@pytest.mark.parametrize("lengths", [(6, 6, 6), (9, 2, 5, 9)], ids=["dense", "padded"])
@pytest.mark.parametrize("kw", [{}, dict(bias=False), dict(n_embd=96, n_head=3)],
                         ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "gpt2")
def test_the_bf16_batched_step_computes_in_fp32_on_bf16_weights(kw, lengths, monkeypatch):
    """bf16 panels on AMX: the norms, biases, tables and cache bf16, the activations fp32 between products (rounded
    to bf16 as a product's input): the logits near the fp32 engine's on the same rounded weights, nearer than the
    bf16 modules' (which round every activation), and returned in fp32; the cache it writes is bf16."""
    bf, ref_engine = _engine("bf16", rounded=True, **kw), _engine("fp32", rounded=True, **kw)
    prompts = _prompts(lengths)
    feed = torch.randint(0, VOCAB, (10, len(prompts)), generator=torch.Generator().manual_seed(6))
    calls = took(monkeypatch, stepn, "run")
    mod, _ = _steps(bf, prompts, 10, monkeypatch, on=False, feed=feed)
    ref, ref_cache = _steps(ref_engine, prompts, 10, monkeypatch, on=True, feed=feed)
    calls.clear()
    got, cache = _steps(bf, prompts, 10, monkeypatch, on=True, feed=feed)
    assert calls == [True] * 10 and got.dtype == torch.float32 and cache[0][0].dtype == torch.bfloat16
    scale = max(1.0, ref.abs().max().item())
    # measured 0.0046-0.0051 of the largest logit (the bf16 modules: 0.0070-0.0079); a misplaced bias moves them ~0.05
    assert (got - ref).abs().max() <= 1e-2 * scale, (got - ref).abs().max()
    assert (got - ref).abs().max() < (mod.float() - ref).abs().max()
    for (k, v), (rk, rv) in zip(cache, ref_cache):
        for a, b in ((k, rk), (v, rv)):
            assert (a.float() - b).abs().max() <= 0.02 * b.abs().max()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_batch_of_more_than_64_rows(dtype, monkeypatch):
    """70 rows: fp32 panels take 16 rows a pass, AMX tiles 64 rows a pass (then the last 6)."""
    if dtype == "bf16" and not native.amx():
        pytest.skip("the bf16 batched step multiplies on AMX tiles")
    e = _engine(dtype, rounded=True)
    prompts = _prompts([4, 2, 3, 4, 1] * 14, seed=5)
    feed = torch.randint(0, VOCAB, (4, 70), generator=torch.Generator().manual_seed(6))
    calls = took(monkeypatch, stepn, "run")
    ref, _ = _steps(e, prompts, 4, monkeypatch, on=False, feed=feed)
    got, _ = _steps(e, prompts, 4, monkeypatch, on=True, feed=feed)
    assert calls == [False] * 4 + [True] * 4
    tol = 1e-5 if dtype == "fp32" else 1e-2  # bf16: the modules round every activation, the step only products' inputs
    assert (got - ref.float()).abs().max() <= tol * max(1.0, ref.float().abs().max().item())
