"""Generation over the KV cache against full recomputation and transformers, batching, stops, windows."""

from __future__ import annotations

import threading

import pytest
import torch

from gptchat.core.generate.engine import Engine
from gptchat.core.errors import ContextOverflow
from gptchat.core.generate.loaded import open_model
from gptchat.core.generate.sampling import SamplingParams
from gptchat.core.generate.text import GenOptions, StopMatcher, complete, stream
from tests.factory import hf_model, save

GREEDY = SamplingParams(greedy=True)


@pytest.fixture(scope="module")
def ref_and_lm(tmp_path_factory):
    ref = hf_model(n_layer=2, n_head=4, n_embd=64, n_positions=128, seed=11)
    folder = save(ref, tmp_path_factory.mktemp("tiny"))
    return ref, open_model(str(folder))


@pytest.fixture(scope="module")
def lm(ref_and_lm):
    return ref_and_lm[1]


def _ids(engine, prompts, n, params=GREEDY, **kw):
    """Each row's tokens from the one decode loop (rows in prompt order)."""
    out = [[] for _ in prompts]
    for step in engine.generate(prompts, params, n, **kw):
        for rt in step:
            out[rt.row].append(rt.token)
    return out


def _greedy_ids(engine, prompts, n):
    return _ids(engine, prompts, n, ignore_eos=True)


def test_cached_decode_equals_full_recomputation(ref_and_lm):
    ref, lm = ref_and_lm
    e = lm.engine
    prompt = list(range(100, 120))
    ids = torch.tensor([prompt])
    logits = e.prefill(ids, None, None)
    seq = list(prompt)
    for step in range(30):
        with torch.no_grad():
            full = ref(torch.tensor([seq])).logits[0, -1]
        torch.testing.assert_close(logits[0], full, atol=1e-4, rtol=0)
        tok = int(logits[0].argmax())
        seq.append(tok)
        with torch.inference_mode():  # one cached decode step at slot len(seq) - 1
            logits = e.model(torch.tensor([[tok]]), None, None, start=len(seq) - 1, kv_len=len(seq))[:, -1]


def test_greedy_matches_transformers_generate(ref_and_lm):
    ref, lm = ref_and_lm
    prompt = [464, 3139, 286, 4881, 318]
    ours = _greedy_ids(lm.engine, [prompt], 40)[0]
    with torch.no_grad():
        theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=40, min_new_tokens=40, do_sample=False,
                              pad_token_id=50256, attention_mask=torch.ones(1, 5, dtype=torch.long))
    assert ours == theirs[0, 5:].tolist()


def test_batched_greedy_equals_each_prompt_alone(lm):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [300], [1000, 2000, 3000], list(range(40, 90)), [7, 7, 7, 7]]
    batched = _greedy_ids(lm.engine, prompts, 25)
    for p, b in zip(prompts, batched):
        assert _greedy_ids(lm.engine, [p], 25)[0] == b


def test_batched_logits_match_unbatched(lm):
    e = lm.engine
    from gptchat.core.generate.batching import left_pad, prefill_mask

    prompts = [[1, 2, 3], list(range(10, 30))]
    ids, pos, valid = left_pad(prompts, 50256)
    batch = e.prefill(ids, pos, prefill_mask(valid))
    for i, p in enumerate(prompts):
        alone = e.prefill(torch.tensor([p]), None, None)
        torch.testing.assert_close(batch[i], alone[0], atol=1e-4, rtol=0)


def test_same_seed_same_text_and_different_seed_differs(lm):
    prompt = lm.tokenizer.encode("The meaning of life is")
    opts = lambda s: GenOptions(SamplingParams(temperature=1.0), max_new_tokens=30, seed=s)  # noqa: E731
    a = complete(lm.engine, lm.tokenizer, prompt, opts(1234))
    b = complete(lm.engine, lm.tokenizer, prompt, opts(1234))
    c = complete(lm.engine, lm.tokenizer, prompt, opts(999))
    assert a.token_ids == b.token_ids and a.text == b.text and a.seed == 1234
    assert a.token_ids != c.token_ids


def test_sampled_row_does_not_depend_on_batch(lm):
    params = SamplingParams(temperature=0.9, top_k=50)
    prompts = [[11, 12, 13], [400, 401, 402]]
    rows = _ids(lm.engine, prompts, 20, params, seeds=[5, 77], ignore_eos=True)
    alone = _ids(lm.engine, [prompts[1]], 20, params, seeds=[77], ignore_eos=True)[0]
    assert rows[1] == alone and len(alone) == 20


def test_eos_ends_the_completion(lm):
    prompt = lm.tokenizer.encode("Once upon a time")
    base = _greedy_ids(lm.engine, [prompt], 12)[0]
    e = lm.engine
    old = e.eos_id
    e.eos_id = base[5]  # pretend the 6th greedy token is <|endoftext|>
    try:
        first = base.index(base[5])
        comp = complete(e, lm.tokenizer, prompt, GenOptions(GREEDY, max_new_tokens=12))
    finally:
        e.eos_id = old
    assert comp.finish_reason == "eos"
    assert comp.token_ids == base[:first]
    assert comp.text == lm.tokenizer.decode(base[:first])


def test_stop_string_is_never_printed(lm):
    prompt = lm.tokenizer.encode("Hello")
    full = complete(lm.engine, lm.tokenizer, prompt, GenOptions(GREEDY, max_new_tokens=40))
    text = full.text
    assert len(text) > 20
    stop = text[10:16]  # a piece from the middle, usually spanning a token boundary
    cut = text.find(stop)
    chunks = list(stream(lm.engine, lm.tokenizer, prompt, GenOptions(GREEDY, max_new_tokens=40, stop=(stop,))))
    printed = "".join(c.text for c in chunks)
    assert printed == text[:cut]
    assert chunks[-1].completion.finish_reason == "stop"
    assert chunks[-1].completion.text == text[:cut]


@pytest.mark.parametrize("pieces,stops,expected", [
    (["Hello\nUs", "er: hi"], ["\nUser:"], "Hello"),
    (["ab", "c", "d"], ["cd"], "ab"),
    (["a\nU", "nder"], ["\nUser:"], "a\nUnder"),  # a false start is released once it diverges
    (["x", "y", "END", "z"], ["END", "yE"], "x"),  # the earliest stop wins
    (["plain text"], [], "plain text"),
])
def test_stop_matcher(pieces, stops, expected):
    m = StopMatcher(stops)
    out = []
    for p in pieces:
        piece = m.push(p)
        out.append(piece)
        for s in stops:  # nothing printed so far ends with the start of a stop string
            joined = "".join(out)
            assert not any(joined.endswith(s[:k]) and not expected.startswith(joined) for k in range(1, len(s)))
    out.append(m.flush())
    assert "".join(out) == expected


def test_prompt_too_long_for_the_window(lm):
    with pytest.raises(ContextOverflow, match="window is 128"):
        complete(lm.engine, lm.tokenizer, list(range(1, 200)), GenOptions(GREEDY, max_new_tokens=5))


def test_max_new_tokens_is_kept_inside_the_window(lm):
    prompt = list(range(1000, 1120))  # 120 of 128 positions
    comp = complete(lm.engine, lm.tokenizer, prompt, GenOptions(GREEDY, max_new_tokens=50))
    assert comp.completion_tokens <= 8
    assert comp.notes and "lowered from 50 to 8" in comp.notes[0]
    if comp.finish_reason != "eos":
        assert comp.finish_reason == "window" and comp.completion_tokens == 8


def test_cancel_stops_between_tokens(lm):
    cancel = threading.Event()
    got = []
    for chunk in stream(lm.engine, lm.tokenizer, [1, 2, 3], GenOptions(GREEDY, max_new_tokens=100), cancel,
                        ignore_eos=True):
        if chunk.token_id is not None:
            got.append(chunk.token_id)
            if len(got) == 3:
                cancel.set()
        if chunk.completion:
            comp = chunk.completion
    assert comp.finish_reason == "cancelled"
    assert comp.completion_tokens <= 4


def test_score_matches_transformers(ref_and_lm):
    ref, lm = ref_and_lm
    ids = [464, 3139, 286, 4881, 318, 6342, 13]
    ours = lm.engine.score(ids)
    with torch.no_grad():
        logp = torch.log_softmax(ref(torch.tensor([ids])).logits[0, :-1], -1)
    theirs = logp.gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1).tolist()
    assert ours == pytest.approx(theirs, abs=1e-4)
    assert lm.engine.score([5]) == []


def test_padded_vocab_ids_are_never_sampled(tmp_path):
    ref = hf_model(n_layer=1, n_head=2, n_embd=32, vocab_size=50304, seed=2)
    with torch.no_grad():
        w = ref.transformer.wte.weight
        w[50257:] = 50 * w[:47].mean(0) + 50 * torch.randn(47, w.shape[1])  # huge logits on padding rows
    e = Engine.load(str(save(ref, tmp_path / "padded", "nanogpt")))
    for params in (GREEDY, SamplingParams(temperature=1.0)):
        toks = sum(_ids(e, [[1, 2, 3], [4]], 30, params, seeds=[1, 2], ignore_eos=True), [])
        assert len(toks) == 60 and max(toks) < 50257


def test_no_full_collection_starts_by_itself_while_any_generation_runs(lm):
    """A full collection walks every object the process has, holding the GIL a decode step needs: while a
    generation runs the oldest generation's threshold is out of reach; young collections go on; the caller's
    thresholds come back when the last of two overlapping generations (two threads) ends, and when one is
    abandoned."""
    import gc

    other_engine = open_model(str(lm.checkpoint.folder), device="cpu").engine
    started, release = threading.Event(), threading.Event()

    def other():
        for i, _ in enumerate(other_engine.generate([[4, 5]], GREEDY, 3, ignore_eos=True)):
            if i == 0:
                started.set()
                release.wait(30)

    before = gc.get_threshold()
    gc.set_threshold(700, 10, 7)
    try:
        a = lm.engine.generate([[1, 2, 3]], GREEDY, 4, ignore_eos=True)
        next(a)
        during = gc.get_threshold()
        t = threading.Thread(target=other)
        t.start()
        assert started.wait(30)
        for _ in a:
            pass
        still = gc.get_threshold()  # the other thread's generation is running
        release.set()
        t.join(30)
        after = gc.get_threshold()
        abandoned = lm.engine.generate([[1, 2, 3]], GREEDY, 50, ignore_eos=True)
        next(abandoned)
        abandoned.close()  # a consumer that stops early (a stop string, Esc)
        closed = gc.get_threshold()
    finally:
        release.set()
        gc.set_threshold(*before)
    assert during[:2] == (700, 10) and during[2] > 10**6
    assert still == during and after == (700, 10, 7) and closed == (700, 10, 7)
