"""`gptchat eval`'s numbers against transformers' loss on the same weights and the same windows."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gptchat.core.errors import ContextOverflow, DataError, GptchatError, UsageError
from gptchat.core.eval.heldout import HeldOut, load_heldout
from gptchat.core.eval.perplexity import evaluate, plan_windows, score_ids
from gptchat.core.eval.shots import in_context
from gptchat.core.generate.loaded import open_model
from tests.factory import hf_model, save, spy

N_CTX = 64
WORDS = "the cat sat on a mat while every dog ran far into green parks".split()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    hf = hf_model(n_positions=N_CTX)
    path = save(hf, tmp_path_factory.mktemp("eval") / "m")
    return hf, open_model(str(path), device="cpu", dtype="fp32")


def _text(n_words: int, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(WORDS[i] for i in torch.randint(len(WORDS), (n_words,), generator=g).tolist())


def _reference(hf, ids, windows, prefix=lambda i: []) -> tuple[float, int]:
    """The perplexity guide's loop: one window at a time, labels -100 on context, transformers' own loss."""
    nats, n = 0.0, 0
    with torch.no_grad():
        for i, w in enumerate(windows):
            p = prefix(i)
            x = torch.tensor([p + ids[w.begin : w.end]])
            labels = x.clone()
            labels[0, : len(p) + w.first - w.begin] = -100
            k = int((labels[0, 1:] != -100).sum())
            nats += float(hf(x, labels=labels).loss) * k
            n += k
    return nats, n


@pytest.mark.parametrize("stride", [3, 32, 63])
def test_loss_equals_transformers_for_every_stride(models, stride):
    hf, lm = models
    text = HeldOut([_text(150)], "t")
    ids = text.ids(lm.tokenizer)
    s = evaluate(lm, text, stride=stride)
    nats, plan = score_ids(lm.engine, ids, stride=stride)
    ref, n = _reference(hf, ids, plan.windows)
    assert s.tokens == n == len(ids) - 1  # every token but the first, once
    assert s.loss == pytest.approx(ref / n, abs=1e-4)
    assert s.stride == stride and s.windows == len(plan.windows)


def test_a_file_shorter_than_one_window(models):
    hf, lm = models
    text = HeldOut(["the cat sat on the mat"], "t")
    ids = text.ids(lm.tokenizer)
    s = evaluate(lm, text)
    assert s.windows == 1 and s.tokens == len(ids) - 1
    ref, n = _reference(hf, ids, plan_windows(len(ids), N_CTX, N_CTX // 2))
    assert s.loss == pytest.approx(ref / n, abs=1e-4)


def test_endoftext_separates_documents_and_sums_give_the_normalisations(models, tmp_path):
    hf, lm = models
    docs = [_text(40, 1), _text(90, 2), _text(30, 3)]
    f = tmp_path / "held.txt"
    f.write_text("<|endoftext|>".join(docs))
    text = load_heldout([str(f)])
    ids = text.ids(lm.tokenizer)
    assert ids.count(lm.tokenizer.eot_id) == 2 and text.docs == docs
    s = evaluate(lm, text, stride=20)
    ref, n = _reference(hf, ids, plan_windows(len(ids), N_CTX, 20))
    assert s.loss == pytest.approx(ref / n, abs=1e-4)
    n_bytes = sum(len(d.encode()) for d in docs)
    n_words = sum(len(d.split()) for d in docs)
    assert s.bits_per_byte == pytest.approx(ref / math.log(2) / n_bytes, rel=1e-5)
    assert s.word_ppl == pytest.approx(math.exp(ref / n_words), rel=1e-4)
    assert s.ppl == pytest.approx(math.exp(ref / n), rel=1e-4)


def test_k_shot_scores_the_same_tokens_and_never_the_examples(models, tmp_path):
    hf, lm = models
    ex = tmp_path / "ex.jsonl"
    ex.write_text("".join(json.dumps({"question": f"what is {w}?", "answer": w}) + "\n" for w in WORDS))
    text = HeldOut([_text(200, 4)], "t")
    ids = text.ids(lm.tokenizer)
    zero = evaluate(lm, text)
    ctx = in_context(2, str(ex), lm.tokenizer, "few-shot-qa", seed=3)
    k = evaluate(lm, text, shots=ctx)
    assert k.tokens == zero.tokens == len(ids) - 1
    assert len(k.context_tokens) == k.windows and min(k.context_tokens) > 0
    assert sum(k.scored_per_window) == k.tokens
    nats, plan = score_ids(lm.engine, ids, shots=ctx)
    ref, n = _reference(hf, ids, plan.windows, ctx.prefix)
    assert n == k.tokens and k.loss == pytest.approx(ref / n, abs=1e-4)
    assert k.loss != pytest.approx(zero.loss, abs=1e-6)  # the examples did change the context


def test_plain_text_and_pair_rows_work_as_examples(models, tmp_path):
    _, lm = models
    (tmp_path / "ex.txt").write_text("<|endoftext|>".join(_text(10, i) for i in range(5)))
    (tmp_path / "ex.jsonl").write_text('{"prompt": "a", "completion": " b"}\n{"instruction": "c", "response": " d"}\n')
    for f, tpl in (("ex.txt", None), ("ex.jsonl", None), ("ex.jsonl", "few-shot")):
        ctx = in_context(2, str(tmp_path / f), lm.tokenizer, tpl)
        assert ctx.room > 0 and len(ctx.prefix(0)) <= ctx.room
    fs = in_context(1, str(tmp_path / "ex.jsonl"), lm.tokenizer, "few-shot")
    # the bundled demo instruction ("Write the opposite of each word.") is not shown with the user's examples
    assert "opposite" not in lm.tokenizer.decode(fs.prefix(0))
    assert "Input: " in lm.tokenizer.decode(fs.prefix(0))


def test_bad_input_is_one_clear_error(models, tmp_path):
    _, lm = models
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        load_heldout([str(tmp_path / "empty.txt")])
    with pytest.raises(GptchatError, match="at least 2"):
        evaluate(lm, HeldOut(["a"], "one.txt"))
    with pytest.raises(UsageError, match="--examples"):
        in_context(3, None, lm.tokenizer)
    (tmp_path / "long.jsonl").write_text(json.dumps({"input": _text(80), "output": "x"}) + "\n")
    ctx = in_context(1, str(tmp_path / "long.jsonl"), lm.tokenizer, "few-shot")
    with pytest.raises(ContextOverflow, match="examples alone"):
        evaluate(lm, HeldOut([_text(50)], "t"), shots=ctx)
    with pytest.raises(UsageError, match="stride"):
        evaluate(lm, HeldOut([_text(50)], "t"), stride=N_CTX)
    with pytest.raises(UsageError, match="--stride is 0; it must be at least 1"):  # not quietly the default
        evaluate(lm, HeldOut([_text(50)], "t"), stride=0)
    for window in (0, 1, -5, N_CTX + 1):  # 0 was the default, 1 and -5 a traceback, past the context clipped
        with pytest.raises(UsageError, match=f"--window is {window}; it must be 2 to {N_CTX} tokens"):
            evaluate(lm, HeldOut([_text(50)], "t"), window=window)


def test_long_text_examples_are_cut_to_fit_and_examples_with_fields_never_are(models, tmp_path):
    """Plain-text examples longer than window // (2K) tokens are cut to their opening lines, so K of them fit in
    half the window and eval scores as usual; a JSONL example is never cut (one too long stays an error)."""
    from gptchat.core.eval.shots import RAW_SEPARATOR

    _, lm = models
    tok = lm.tokenizer
    lines = [_text(6, seed) for seed in range(40)]  # ~40 lines, far over the window's 64 tokens
    (tmp_path / "docs.txt").write_text("\n".join(lines) + "\n<|endoftext|>\n" + _text(3, 99) + "\n")
    ctx = in_context(2, str(tmp_path / "docs.txt"), tok, window=N_CTX)
    assert ctx.cut == N_CTX // 4 and ctx.excerpts == 1 and ctx.room <= N_CTX // 2
    long = max(ctx._encoded, key=len)
    text = tok.decode(long)
    assert len(long) <= ctx.cut and text.endswith(RAW_SEPARATOR)
    kept = text[: -len(RAW_SEPARATOR)]
    assert ("\n".join(lines)).startswith(kept) and kept.count("\n") >= 1  # whole opening lines
    s = evaluate(lm, HeldOut([_text(120)], "t"), shots=ctx)
    assert s.tokens > 0 and max(s.context_tokens) <= N_CTX // 2
    assert in_context(2, str(tmp_path / "docs.txt"), tok).excerpts == 0  # no window given: nothing cut
    (tmp_path / "long.jsonl").write_text(json.dumps({"prompt": _text(80), "completion": "x"}) + "\n" * 2)
    assert in_context(1, str(tmp_path / "long.jsonl"), tok, window=N_CTX).cut is None


def test_head_chunks_and_batch_size_do_not_change_the_loss(models, monkeypatch):
    """Scored rows cross head chunks and windows cross batches (and the short last window gets its own)."""
    from gptchat.core.eval import perplexity

    hf, lm = models
    ids = HeldOut([_text(300, 5)], "t").ids(lm.tokenizer)
    monkeypatch.setattr(perplexity, "HEAD_ROWS", 7)
    for batch_tokens in (64, 3 * N_CTX, 10**6):
        nats, plan = score_ids(lm.engine, ids, stride=20, batch_tokens=batch_tokens)
        ref, n = _reference(hf, ids, plan.windows)
        assert plan.windows[-1].end - plan.windows[-1].begin < N_CTX  # a short last window
        assert nats / n == pytest.approx(ref / n, abs=1e-4)


def test_an_int8_head_scores_through_the_module_like_the_engine(tmp_path_factory):
    """A head that is not a plain fp32 Linear (int8 here) goes through the module: same sums as engine.score."""
    path = save(hf_model(n_positions=N_CTX), tmp_path_factory.mktemp("q8") / "m")
    lm = open_model(str(path), device="cpu", dtype="fp32", quantize="int8")
    ids = HeldOut([_text(30, 6)], "t").ids(lm.tokenizer)[:N_CTX]
    nats, plan = score_ids(lm.engine, ids)
    assert len(plan.windows) == 1
    assert nats == pytest.approx(-sum(lm.engine.score(ids)), rel=1e-5)


@pytest.mark.slow
def test_eval_bench_scores_like_transformers_and_prints_every_figure():
    """The bench runs the real eval and the guide's loop on one window; their losses agree; (a)-(c) print."""
    from gptchat.core.bench import eval as bench

    b = bench.run("tiny", rounds=1, windows=1, heldout_tokens=5000)
    assert b.loss == pytest.approx(b.hf_loss, abs=1e-4)
    assert b.window_vs_prefill > 0 and b.scored_vs_hf > 0
    assert b.rss_after_load_bytes < b.peak_rss_bytes < 64 * 2**30
    text = b.format()
    assert all(s in text for s in ("(a)", "(b)", "(c)", f"{b.scored_vs_hf:.2f}x", "the arithmetic alone allows",
                                   f"products on {bench.PRODUCTS[b.products]}"))
    assert 0 < b.arithmetic_bound < 1  # a window's head over its scored tokens: more arithmetic a token
    assert b.body_vs_prefill > b.window_vs_prefill and 0 < b.head_share < 1 and "the body alone" in text
    assert json.loads(json.dumps(b.to_dict()))["rss_limit_bytes"] == b.rss_limit_bytes


def test_log_sum_exp_in_place_over_logits_far_apart():
    """lse_ (eval's head) equals torch.logsumexp on rows spread ~400 wide (past the exp floor) and on flat rows."""
    from gptchat.core.eval.perplexity import lse_

    gen = torch.Generator().manual_seed(2)
    z = torch.cat([torch.randn(6, 3000, generator=gen) * 60, torch.randn(2, 3000, generator=gen) * 1e-3])
    assert float((z.amax(1) - z.amin(1))[:6].min()) > 4 * 87
    want = torch.logsumexp(z.double(), 1).float()
    got = lse_(z.clone())
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-5), (got - want).abs().max()


def test_a_long_eval_scores_on_the_engines_packed_weights(models, monkeypatch):
    """From PACK_FROM_TOKENS window tokens on (lowered here), fp32 eval on the CPU multiplies on a packed copy of
    the weights: the engine's panels where they beat PyTorch's GEMM at many rows (``native.gemm_beats_panels``,
    timed: both ways here), else MKL's packed copy (the head's vocabulary blocks too); either way the loss equals
    transformers'. A short eval builds no copy, nor one without room for it; with MKL packing switched off, the
    plain modules score."""
    from gptchat.core.eval import perplexity
    from gptchat.core.model import native, packed, split3

    if native.kernel() is None:
        pytest.skip("no C kernels here: no panel copy")
    hf, lm = models
    ids = HeldOut([_text(300, 8)], "t").ids(lm.tokenizer)
    fast = lm.engine.packed_linears(N_CTX)
    assert fast is not None and fast.kind == "panels"
    if not fast.built:  # a short eval leaves it unbuilt
        score_ids(lm.engine, ids[:N_CTX])
        assert not fast.built
    monkeypatch.setattr(perplexity, "PACK_FROM_TOKENS", 1)
    monkeypatch.setattr(native, "gemm_beats_panels", lambda: True)
    mkl = lm.engine.mkl_packed()
    if mkl is not None and not mkl.built:  # no room for a second copy in eval's memory budget: none is made
        monkeypatch.setattr(perplexity, "COPY_SLACK", 0)
        assert perplexity.packed_for_eval(lm.engine, len(ids)) is None and not mkl.built
        monkeypatch.undo()
        monkeypatch.setattr(perplexity, "PACK_FROM_TOKENS", 1)
        monkeypatch.setattr(native, "gemm_beats_panels", lambda: True)
    panel_calls, mkl_calls = spy(monkeypatch, native, "sgemm"), spy(monkeypatch, packed, "mkl_product")
    x3_calls = spy(monkeypatch, split3, "product")
    on_x3 = None
    if split3.usable(lm.engine.model.config.n_embd):  # with AMX, the head's blocks as three bf16 products (split3); then switched off
        on_x3, _ = score_ids(lm.engine, ids, stride=20)
        V, size = lm.engine.vocab_limit, perplexity.HEAD_BLOCK
        assert x3_calls and {c[2] for c in x3_calls} == {min(size, V - i) for i in range(0, V, size)}
        monkeypatch.setenv("GPTCHAT_BF16X3", "0")
        mkl_calls.clear()
    on_mkl, plan = score_ids(lm.engine, ids, stride=20)
    assert not panel_calls and bool(mkl_calls) == packed.mkl_packs()
    if packed.mkl_packs():
        shapes = {tuple(c[1].shape) for c in mkl_calls}  # the weights multiplied by: the body's and the head's blocks
        assert (perplexity.HEAD_BLOCK, lm.engine.model.config.n_embd) in shapes and len(shapes) >= 4
        monkeypatch.setenv("GPTCHAT_MKL_PACKED", "0")
    mkl_calls.clear()
    x3_calls.clear()
    plain, _ = score_ids(lm.engine, ids, stride=20)
    assert not x3_calls
    assert not mkl_calls and perplexity.packed_for_eval(lm.engine, len(ids)) is None
    monkeypatch.setattr(native, "gemm_beats_panels", lambda: False)
    nats, _ = score_ids(lm.engine, ids, stride=20)
    assert fast.built and panel_calls
    ref, n = _reference(hf, ids, plan.windows)
    for got in (nats, on_mkl, plain) + ((on_x3,) if on_x3 is not None else ()):
        assert got / n == pytest.approx(ref / n, abs=1e-4)
