"""The per-row text layer (RowText, stream_rows) over the one decode loop, and finetune samples."""

from __future__ import annotations

import copy
import threading
from collections import deque
from contextlib import nullcontext

import pytest
import torch

from gptchat.core.generate.engine import Engine
from gptchat.core.generate.loaded import open_model
from gptchat.core.generate.sampling import SamplingParams
from gptchat.core.generate.text import GenOptions, RowRequest, RowText, complete, stream_rows
from gptchat.core.model.config import GPTConfig
from gptchat.core.model.gpt import GPT
from gptchat.core.train.evaluate import sample
from tests.factory import hf_model, save

GREEDY = SamplingParams(greedy=True)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return open_model(str(save(hf_model(seed=31), tmp_path_factory.mktemp("tiny"))))


def _ids(engine, prompts, n, params=GREEDY, **kw):
    out = [[] for _ in prompts]
    for step in engine.generate(prompts, params, n, **kw):
        for rt in step:
            out[rt.row].append(rt.token)
    return out


def _row(lm, ids=(1, 2, 3), max_new=8, stop=(), n_ctx=None):
    return RowText(lm.tokenizer, RowRequest(list(ids), max_new, 7, tuple(stop)), n_ctx or lm.engine.n_ctx, 50256)


def test_finish_reasons(lm):
    tok = lm.tokenizer
    a, b = tok.encode(" cat")[0], tok.encode(" dog")[0]
    eos = _row(lm)
    eos.push(a, False)
    eos.push(50256, True)
    length = _row(lm, max_new=2)
    length.push(a, False)
    length.push(b, True)
    window = _row(lm, ids=range(1, 11), max_new=5, n_ctx=12)  # room for 2 of the 5 tokens asked for
    window.push(a, False)
    window.push(b, True)
    stop = _row(lm, stop=(" dog",))
    stop.push(a, False)
    stop.push(b, False)
    cancelled = _row(lm)
    cancelled.push(a, False)
    assert not cancelled.finished
    for row in (eos, length, window, stop, cancelled):
        row.finish()
    got = {r.completion.finish_reason: r.completion for r in (eos, length, window, stop, cancelled)}
    assert sorted(got) == ["cancelled", "eos", "length", "stop", "window"]
    assert got["eos"].token_ids == [a] and got["eos"].text == " cat"
    assert got["stop"].text == " cat" and got["stop"].token_ids == [a, b]
    assert got["window"].notes and "lowered from 5 to 2" in got["window"].notes[0]
    assert got["length"].text == " cat dog" and got["cancelled"].text == " cat"
    assert got["eos"].seed == 7 and got["eos"].prompt_tokens == 3


def test_stop_split_across_tokens_is_never_printed(lm):
    tok = lm.tokenizer
    pieces = [tok.encode(p) for p in ("Hello", "\nUs", "er", ": hi")]
    row = _row(lm, max_new=20, stop=("\nUser:",))
    printed = [row.push(t, False) for ids in pieces for t in ids]
    row.finish()
    assert "".join(printed) == "Hello" and row.completion.text == "Hello"
    assert row.completion.finish_reason == "stop"
    assert not any("\n" in p for p in printed)  # the stop's start was held back, never shown


def test_utf8_split_across_tokens(lm):
    tok = lm.tokenizer
    ids = tok.encode(" 日本語 🦙")
    assert len(ids) == 10  # each character is split over two or three byte tokens
    row = _row(lm, max_new=20)
    printed = [row.push(t, False) for t in ids]
    row.finish()
    assert all("\ufffd" not in p for p in printed)  # no half characters shown
    assert printed[:3] == [" ", "", "日"]  # the space at once, the character once whole
    assert "".join(printed) == " 日本語 🦙" == row.completion.text


def test_rows_equal_each_alone_with_own_stops_windows_and_seeds(lm):
    e = lm.engine
    params = SamplingParams(temperature=0.9, top_k=40)
    reqs = [RowRequest(list(range(200, 200 + e.n_ctx - 4)), 30, 1),  # a window of 4, whatever the batch
            RowRequest([5, 6, 7], 12, 2, (" the",)), RowRequest([9], 12, 3)]
    events = list(stream_rows(e, lm.tokenizer, params, reqs))
    done = {ev.row: ev.completion for ev in events if ev.completion is not None}
    for i, q in enumerate(reqs):
        shown = "".join(ev.text for ev in events if ev.row == i)
        alone = complete(e, lm.tokenizer, q.ids, GenOptions(params, q.max_new_tokens, q.seed, q.stop))
        assert done[i].text == alone.text == shown and done[i].token_ids == alone.token_ids
        assert done[i].finish_reason == alone.finish_reason
    assert done[0].completion_tokens <= 4


def test_waiting_rows_take_finished_places_and_cancel_finishes_the_rest(lm):
    e = lm.engine
    reqs = [RowRequest([1, 2, 3, 4, 5], n, 0) for n in (2, 9)]
    waiting = deque(RowRequest([7, 8], 6, 0) for _ in range(3))
    done = {ev.row: ev.completion for ev in stream_rows(e, lm.tokenizer, GREEDY, reqs, waiting=waiting, ignore_eos=True)
            if ev.completion is not None}
    assert not waiting and sorted(done) == [0, 1, 2, 3, 4]
    assert [done[i].completion_tokens for i in range(5)] == [2, 9, 6, 6, 6]
    cancel = threading.Event()
    events = []
    for ev in stream_rows(e, lm.tokenizer, GREEDY, reqs, cancel, ignore_eos=True):
        events.append(ev)
        cancel.set()
    reasons = [ev.completion.finish_reason for ev in events if ev.completion is not None]
    assert sorted(reasons) == ["cancelled", "cancelled"]


def test_equal_length_batch_then_refills_equal_each_alone(lm):
    e = lm.engine  # four rows of one length run unmasked (and packed), then shorter refills join
    g = torch.Generator().manual_seed(4)
    first = torch.randint(0, 50257, (4, 12), generator=g).tolist()
    later = [torch.randint(0, 50257, (n,), generator=g).tolist() for n in (9, 3, 12)]
    limits = [3, 10, 10, 10, 8, 8, 8]
    got = {}
    for step in e.generate(first, GREEDY, limits[:4], refill=deque((p, m, 0) for p, m in zip(later, limits[4:]))):
        for rt in step:
            got.setdefault(rt.row, []).append(rt.token)
    for i, p in enumerate(first + later):
        assert got[i] == _ids(e, [p], limits[i])[0], i


def _training_model(seed=3):
    torch.manual_seed(seed)
    net = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, n_positions=64))
    net.init_weights(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(8)  # logits that vary a lot between tokens
    return net.train()


def test_finetune_sample_equals_the_engine_and_leaves_the_model_training():
    net = _training_model()
    ref = Engine(copy.deepcopy(net))  # the inference engine on the same weights
    strides = [p.stride() for p in net.parameters()]
    prompt = [464, 3139, 286, 4881]
    for seed in (0, 5):
        ours = sample(net, prompt, 20, 64, 50257, 50256, torch.device("cpu"), nullcontext, seed=seed)
        theirs = _ids(ref, [prompt], 20, SamplingParams(temperature=0.8, top_k=40), seeds=[seed])[0]
        theirs = theirs[: theirs.index(50256)] if 50256 in theirs else theirs
        assert ours == theirs and len(ours) > 0
    assert net.training and [p.stride() for p in net.parameters()] == strides  # training layout kept
    assert all(blk.attn.kv_cache is None for blk in net.transformer.h)  # the cache does not leak into training
    loss = net(torch.tensor([prompt])).float().logsumexp(-1).mean()
    loss.backward()  # no inference tensors left behind
    assert net.transformer.wte.weight.grad is not None


def test_finetune_sample_slides_past_its_block():
    net = _training_model(seed=4)
    out = sample(net, [1, 2, 3, 4, 5, 6], 30, 16, 50257, 50256, torch.device("cpu"), nullcontext, seed=1)
    assert len(out) == 30  # three windows of a 16-token block, not cut at the first


def test_finetune_sample_under_bf16_autocast():
    net = _training_model(seed=5)
    amp = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731  (what amp_context gives on a bf16 CPU run)
    out = sample(net, [1, 2, 3], 8, 64, 50257, 50256, torch.device("cpu"), amp, seed=2)
    assert 0 < len(out) <= 8 and all(0 <= t < 50257 for t in out)
    assert net.training and all(blk.attn.kv_cache is None for blk in net.transformer.h)
