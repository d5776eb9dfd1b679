"""Engine.generate with per-row limits, finished rows compacted out and refills; the batch file helpers.

Greedy rows are checked against transformers' GPT-2 run one prompt at a time, so a batching bug
(padding, positions, the compacted cache, the packed weights) cannot hide behind our own code.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.factory import hf_model, save


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from gptchat.core.generate.engine import Engine

    hf = hf_model(seed=21)
    eng = Engine.load(str(save(hf, tmp_path_factory.mktemp("m"))), device="cpu", dtype="fp32")
    return hf, eng


def _prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 30, (n,), generator=g).tolist()
    return [torch.randint(0, 50257, (k,), generator=g).tolist() for k in lens]


def _rows(eng, prompts, params, limits, **kw):
    got = {i: [] for i in range(len(prompts))}
    done = {}
    for step in eng.generate(prompts, params, limits, **kw):
        for rt in step:
            assert rt.row not in done, "a finished row produced another token"
            got[rt.row].append(rt.token)
            if rt.done:
                done[rt.row] = True
    assert len(done) == len(prompts)
    return got


@pytest.mark.parametrize("kind", ["panels", "panels-modules", "onednn", None])
def test_greedy_rows_equal_transformers_one_at_a_time(pair, monkeypatch, kind):
    """panels: the decode steps of two rows or more in one C call (stepn.py); panels-modules: that switched off,
    the modules computing with the panels."""
    from gptchat.core.generate.sampling import SamplingParams
    from gptchat.core.model import native, packed, stepn

    hf, eng = pair
    if kind and kind.startswith("panels") and native.kernel() is None:
        pytest.skip("no C kernel here (no compiler or no AVX2)")
    kind, modules = (kind or "").split("-")[0] or None, kind == "panels-modules"
    monkeypatch.setattr(eng, "_packed", packed.PackedLinears(eng.model, 16, kind) if kind else None)
    monkeypatch.setenv("GPTCHAT_ONEDNN", "1" if kind else "0")
    monkeypatch.setenv("GPTCHAT_STEPN", "0" if modules else "1")
    products, steps = [], []  # the rows of each product on the panels, of each batched step that ran
    if kind == "panels":
        sgemm, run = native.sgemm, stepn.run

        def step(model, idx, *a):
            out = run(model, idx, *a)
            steps.extend([idx.shape[0]] if out is not None else [])
            return out

        monkeypatch.setattr(native, "sgemm", lambda *a: products.append(a[2].shape[0]) or sgemm(*a))
        monkeypatch.setattr(stepn, "run", step)
    prompts = _prompts(9)
    limits = [1 + (5 * i) % 17 for i in range(9)]  # rows finish at different steps: the batch compacts
    got = _rows(eng, prompts, SamplingParams(greedy=True), limits)
    for i, p in enumerate(prompts):
        with torch.inference_mode():
            ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=limits[i], do_sample=False, pad_token_id=50256, eos_token_id=50256)
        ref = ref[0, len(p):].tolist()
        assert got[i] == ref[: len(got[i])] and len(got[i]) == len(ref), i
    if kind == "panels":  # the nine rows' decode steps went through the batched step, or the modules' products
        assert (max(products), steps) == (9, []) if modules else (products, max(steps)) == ([], 9)


def test_sampled_rows_depend_only_on_their_seed(pair):
    from gptchat.core.generate.sampling import SamplingParams

    _, eng = pair
    prompts = _prompts(6, seed=1)
    params = SamplingParams(temperature=1.0, top_k=50, repetition_penalty=1.2)
    seeds = [100 + i for i in range(6)]
    got = _rows(eng, prompts, params, [12] * 6, seeds=seeds)
    for i in (0, 3, 5):
        alone = _rows(eng, [prompts[i]], params, 12, seeds=[seeds[i]])[0]
        assert got[i] == alone


@pytest.mark.parametrize("greedy", [True, False])
def test_refill_gives_finished_places_to_waiting_prompts(pair, greedy):
    from collections import deque

    from gptchat.core.generate.sampling import SamplingParams

    hf, eng = pair
    prompts = sorted(_prompts(10, seed=2), key=len, reverse=True)  # longest first, as run_group does
    limits = [2 + (7 * i) % 13 for i in range(10)]
    seeds = [50 + i for i in range(10)]
    params = SamplingParams(greedy=True) if greedy else SamplingParams(temperature=0.9, top_k=30)
    refill = deque(zip(prompts[3:], limits[3:], seeds[3:]))
    got, done = {}, set()
    for step in eng.generate(prompts[:3], params, limits[:3], seeds=seeds[:3], refill=refill):
        assert len(step) <= 3  # never more rows than the batch size
        for rt in step:
            assert rt.row not in done
            got.setdefault(rt.row, []).append(rt.token)
            if rt.done:
                done.add(rt.row)
    assert not refill and sorted(got) == list(range(10)) and done == set(range(10))
    for i, p in enumerate(prompts):  # row numbers: the first batch, then refills in deque order
        assert got[i] == _rows(eng, [p], params, limits[i], seeds=[seeds[i]])[0], i
        if greedy and i % 3 == 0:
            with torch.inference_mode():
                out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                  max_new_tokens=limits[i], do_sample=False, pad_token_id=50256)
            assert got[i] == out[0, len(p):].tolist()[: len(got[i])]


@pytest.mark.parametrize("limits", [[3, 9], [9, 3], [4, 4]])
def test_a_dense_batch_that_compacts_or_takes_refills_keeps_each_rows_positions(pair, limits):
    """While dense, next positions are not written step by step (LiveBatch._write_positions): a batch that
    leaves that state (a row compacted out, ragged prompts admitted) must still give each row the tokens
    it gives alone."""
    from collections import deque

    from gptchat.core.generate.sampling import SamplingParams

    _, eng = pair
    g = torch.Generator().manual_seed(7)
    first = [torch.randint(0, 50257, (6,), generator=g).tolist() for _ in range(2)]  # one length: dense
    later = [torch.randint(0, 50257, (k,), generator=g).tolist() for k in (2, 11, 5)]
    params = SamplingParams(greedy=True)
    refill = deque((p, 5, 0) for p in later)
    got: dict = {}
    for step in eng.generate(first, params, limits, refill=refill):
        for rt in step:
            got.setdefault(rt.row, []).append(rt.token)
    assert not refill and sorted(got) == list(range(5))
    for i, p in enumerate(first + later):
        assert got[i] == _rows(eng, [p], params, limits[i] if i < 2 else 5)[0], i


def test_drop_and_window(pair):
    from gptchat.core.generate.sampling import SamplingParams

    _, eng = pair
    long = [7] * (eng.n_ctx - 3)  # room for 3 tokens in its own window, whatever the batch
    drop = set()
    got = {0: [], 1: [], 2: []}
    for step in eng.generate([[5, 6], long, [9]], SamplingParams(greedy=True), [10, 10, 10], drop=drop):
        for rt in step:
            got[rt.row].append(rt.token)
        drop.add(0)  # the caller stops row 0 after its first token (a stop string, say)
    assert len(got[0]) == 1 and len(got[1]) <= 3 and 1 <= len(got[2]) <= 10


def test_scan_cuts_a_partial_last_record_and_rejects_garbage(tmp_path):
    from gptchat.core.batch import io as bio
    from gptchat.core.errors import BatchOutputError

    out = tmp_path / "o.jsonl"
    good = b"".join(bio.encode({"id": str(i), "model": "m", "template": None, "shots": None}, "jsonl") for i in range(3))
    out.write_bytes(good + b'{"id": "3", "mo')
    assert [c.key[0] for c in bio.scan(out, "jsonl")] == ["0", "1", "2"]
    assert out.read_bytes() == good
    out.write_bytes(b'not json\n' + good)
    with pytest.raises(BatchOutputError, match="record 1 cannot be read"):
        bio.scan(out, "jsonl")
    csvf = tmp_path / "o.csv"
    rec = {"id": "a", "model": "m", "completion": 'two\nlines, "quoted"', "sampling": {}, "timings": {}}
    w = bio.Writer.open(csvf, "csv", append=False)
    w.write(rec)
    w.close()
    whole = csvf.read_bytes()
    csvf.write_bytes(whole + b'b,m,,,,,,,,,,,,,,"open quote\n')
    assert [c.key[0] for c in bio.scan(csvf, "csv")] == ["a"] and csvf.read_bytes() == whole


def test_read_rows_formats_and_errors():
    from gptchat.core.batch.io import read_rows
    from gptchat.core.errors import BatchInputError

    rows = read_rows("-", '{"id": 7, "prompt": "a", "top_p": 0.5, "stop": "x"}\n\n{"prompt": "b"}\n')
    assert [(r.id, r.line, r.prompt, r.overrides) for r in rows] == [
        ("7", 1, "a", {"top_p": 0.5, "stop": ["x"]}), ("3", 3, "b", {})]
    with pytest.raises(BatchInputError, match="stdin:3: id .3. is used by an earlier row"):
        read_rows("-", '{"id": 3, "prompt": "a"}\n\n{"prompt": "b"}\n')
    with pytest.raises(BatchInputError, match=r"in.jsonl:2: 'temperature' must be a number"):
        read_rows("in.jsonl", '{"prompt": "a"}\n{"prompt": "b", "temperature": "hot"}\n')
    with pytest.raises(BatchInputError, match="cannot tell the input format"):
        read_rows("in.csv", "a,b\n")
    assert [r.prompt for r in read_rows("-", "plain text\n{not json\n")] == ["plain text", "{not json"]
    assert json.dumps([r.variables for r in read_rows("x.jsonl", '{"q": "a", "n": 2}\n', templated=True)]) == \
        '[{"q": "a", "n": "2"}]'


def test_batch_bench_matches_transformers_batched(tmp_path, capsys):
    """The benchmark's own check: our batch pipeline and transformers' batched generate agree."""
    from gptchat.core.bench import batch as batch_bench

    model = save(hf_model(seed=22), tmp_path / "m")
    res = batch_bench.main(["--model", str(model), "--prompts", "6", "--batch-size", "4", "--new-tokens", "5",
                            "--repeats", "1"])
    assert res["same_output"] is True and res["ours_tok_s"] > 0 and res["transformers_tok_s"] > 0
    assert "ratio" in capsys.readouterr().out


def test_unwritten_cache_slots_are_never_read(pair, monkeypatch):
    """The grown KV cache is left unwritten (LiveBatch._grown) but where a masked read could meet it before a write:
    with its fresh memory poisoned with NaN, ragged prompts and refills (rows admitted after others, left of
    their prompts masked) give the same tokens as before, and a compiled step's cache (read whole) is finite."""
    from collections import deque

    from gptchat.core.generate.batching import LiveBatch
    from gptchat.core.generate.sampling import SamplingParams

    _, eng = pair
    params = SamplingParams(greedy=True)
    prompts = sorted(_prompts(6, seed=9), key=len, reverse=True)
    limits = [3 + i for i in range(6)]

    def run():
        got = {}
        for step in eng.generate(prompts[:2], params, limits[:2], refill=deque(zip(prompts[2:], limits[2:], [0] * 4))):
            for rt in step:
                got.setdefault(rt.row, []).append(rt.token)
        return got

    want = run()
    real = torch.Tensor.new_empty
    monkeypatch.setattr(torch.Tensor, "new_empty",
                        lambda self, *shape, **kw: real(self, *shape, **kw).fill_(float("nan")))
    assert run() == want
    for compiled in (False, True):
        monkeypatch.setattr(eng, "compile", compiled)
        b = LiveBatch(eng, params, 40)
        with torch.inference_mode():
            b.admit([(prompts[0], 5, 0)], len(prompts[0]))
        written = b.k[0][:, :, : len(prompts[0])]
        assert not written.isnan().any()  # the prompt's slots: written by the prefill
        assert b.k[0].isnan().any() != compiled  # the rest: left unwritten, but zeroed for a compiled step


def test_generates_prefill_writes_its_cache_view_in_the_kernel(pair, monkeypatch):
    """generate's prefill writes the new rows' slots of the batch's cache (a view: LiveBatch's rows and slots) from
    the attention kernel (flash.forward given the cache), and its tokens are those of the plain modules and
    PyTorch's attention (no fused paths): a dense pair of prompts, and one alone."""
    from gptchat.core.generate.sampling import SamplingParams
    from gptchat.core.model import flash
    from tests.factory import spy, threads

    _, eng = pair
    if not flash.usable_forward(torch.zeros(1, 2, 3 * eng.model.config.n_embd), eng.model.config.n_head):
        pytest.skip("no AVX-512 attention kernel here")
    params = SamplingParams(greedy=True)
    g = torch.Generator().manual_seed(12)
    pairs = [torch.randint(0, 50257, (80,), generator=g).tolist() for _ in range(2)]
    alone = [torch.randint(0, 50257, (100,), generator=g).tolist()]
    calls = spy(monkeypatch, flash, "forward")
    with threads(2):
        got = [_rows(eng, ps, params, [6] * len(ps)) for ps in (pairs, alone)]
        assert len(calls) == 2 * eng.model.config.n_layer and all(len(c) == 6 and c[5] is not None for c in calls)
        monkeypatch.setenv("GPTCHAT_FLASH", "0")
        monkeypatch.setenv("GPTCHAT_ACCUMULATE", "0")
        assert [_rows(eng, ps, params, [6] * len(ps)) for ps in (pairs, alone)] == got
