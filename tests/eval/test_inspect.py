"""`gptchat inspect`: probabilities against transformers, and the filters against what the sampler draws."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from gptchat.core.generate import sampling
from gptchat.core.generate.inspect import EOT, inspect_model, next_token, score_text, window
from gptchat.core.generate.loaded import open_model
from gptchat.core.generate.sampling import SamplingParams, make_generator, sample
from tests.factory import hf_model, save

TEXT = "The capital of France is Paris, and the capital of Spain is"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    ref = hf_model(n_layer=2, n_head=4, n_embd=64, n_positions=128, seed=5)
    path = save(ref, tmp_path_factory.mktemp("ck") / "tiny")
    return ref, path


@pytest.fixture(scope="module")
def lm(tiny):
    return open_model(str(tiny[1]), device="cpu", dtype="fp32", download=False)


def test_probabilities_equal_transformers_softmax(tiny, lm):
    ref, _ = tiny
    ids = window(lm.tokenizer.encode(TEXT), lm.engine.n_ctx)
    assert ids[0] == EOT
    tokens = score_text(lm.engine.logits(ids), ids, lm.tokenizer, top=5)
    with torch.no_grad():
        probs = torch.softmax(ref(torch.tensor([ids])).logits[0, :-1].double(), dim=-1)  # (T-1, V)
    want = probs.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    got = torch.tensor([t.prob for t in tokens], dtype=torch.float64)
    assert len(tokens) == len(ids) - 1
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # a random model finds the text itself unlikely: compare its log-probabilities too, tightly
    got_lp = torch.tensor([t.logprob for t in tokens], dtype=torch.float64)
    torch.testing.assert_close(got_lp, want.log(), atol=2e-4, rtol=0)
    assert probs.max(-1).values.min() > 500 / probs.shape[-1], "near-uniform rows would make the comparison meaningless"
    for t, row in zip(tokens, probs):
        assert t.rank == int((row > row[t.id]).sum()) + 1
        ref_top = row.topk(5)
        assert [a.id for a in t.top] == ref_top.indices.tolist()
        torch.testing.assert_close(torch.tensor([a.prob for a in t.top], dtype=torch.float64), ref_top.values,
                                   atol=1e-5, rtol=0)


PARAMS = [
    SamplingParams(temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.3),
    SamplingParams(temperature=0.5, top_p=0.3),
    SamplingParams(top_k=3),
    SamplingParams(temperature=0),
]


@pytest.mark.parametrize("params", PARAMS, ids=["all", "temp-top_p", "top_k", "greedy"])
def test_final_stage_is_what_the_sampler_samples_from(lm, params):
    ids = lm.tokenizer.encode(TEXT)
    # the model's logits over the first 512 tokens: the same filters, and thousands of draws stay cheap
    logits = lm.engine.logits([EOT] + ids)[-1, :512]
    ctx = [i for i in ids if i < 512] + [int(logits.argmax())]  # the penalty must touch a likely token
    view = next_token(logits, ctx, params, lm.tokenizer, top=50)
    final = {a.id: a.prob for a in view.final}
    seen = torch.zeros(1, logits.shape[-1], dtype=torch.bool)
    seen[0, ctx] = True
    # the sampler's own draws, each row with its own generator as in the engine: frequencies match the view
    n = 3000
    draws = sample(logits[None].expand(n, -1), params, [make_generator(s) for s in range(n)], seen.expand(n, -1))
    counts = torch.bincount(draws, minlength=logits.shape[-1]).double() / n
    assert len(set(draws.tolist())) <= view.stages[-1].kept
    for tid, p in list(final.items())[:10]:
        assert abs(counts[tid].item() - p) < 4.5 * (p * (1 - p) / n) ** 0.5 + 2e-3, (tid, counts[tid].item(), p)
    if view.stages[-1].kept <= 50:
        assert set(draws.tolist()) <= set(final) and abs(sum(final.values()) - 1) < 1e-4


def test_filters_remove_what_they_say(lm):
    ids = lm.tokenizer.encode(TEXT)
    logits = lm.engine.logits([EOT] + ids)[-1]
    view = next_token(logits, ids, PARAMS[0], lm.tokenizer, top=10)
    names = [s.name for s in view.stages]
    assert names == ["logits", "repetition_penalty", "temperature", "top_k", "top_p"]
    by = {s.name: s for s in view.stages}
    assert by["logits"].kept == logits.shape[-1]
    assert by["top_k"].kept == 20 and by["top_k"].removed_count == logits.shape[-1] - 20
    assert by["top_p"].kept + by["top_p"].removed_count == 20
    assert by["top_p"].removed_mass <= 0.1 + 1e-6  # top_p 0.9 keeps at least 90% of the mass


def test_inspect_follows_the_sampler_when_it_changes(lm, monkeypatch):
    """Breaks if sample or inspect stop sharing sampling.filter_stages: change it, and both must follow."""
    ids = lm.tokenizer.encode(TEXT)
    logits = lm.engine.logits([EOT] + ids)[-1]
    params = SamplingParams(temperature=0.8)
    real = sampling.filter_stages

    def only_token_7(x, p, seen=None):
        stages = real(x, p, seen)
        keep = torch.full_like(x, float("-inf"))
        keep[..., 7] = 0.0
        return stages + [("test", keep)]

    monkeypatch.setattr(sampling, "filter_stages", only_token_7)
    assert sample(logits[None], params, [make_generator(1)]).tolist() == [7]
    view = next_token(logits, ids, params, lm.tokenizer)
    assert [(a.id, round(a.prob, 6)) for a in view.final] == [(7, 1.0)]


def test_inspect_model_json_shape(lm):
    out = inspect_model(lm, lm.tokenizer.encode(TEXT), SamplingParams(top_k=5), top=3)
    json.dumps(out)
    assert len(out["tokens"]) == len(lm.tokenizer.encode(TEXT))
    assert out["perplexity"] > 1 and all(len(t["top"]) == 3 for t in out["tokens"])


def test_cli_json(tiny):
    path = tiny[1]
    r = subprocess.run([sys.executable, "-m", "gptchat.tui", "inspect", TEXT, "--model", str(path), "--model",
                        str(path), "--top", "3", "--top-k", "5", "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [m["model"] for m in doc["models"]] == [doc["models"][0]["model"]] * 2
    assert doc["models"][0]["tokens"] == doc["models"][1]["tokens"]
    assert doc["models"][0]["next"]["stages"][-1]["kept"] == 5


def test_tui_inspect_view_scores_the_reply(lm):
    import asyncio

    from textual.app import App
    from textual.widgets import Static

    from gptchat.tui.app.screens.inspect import InspectView
    from tests.tui.helpers import wait_for

    context, reply = lm.tokenizer.encode("The capital of France is"), lm.tokenizer.encode(" Paris, of course")

    class Host(App):
        def on_mount(self) -> None:
            self.push_screen(InspectView(lm, context, reply, SamplingParams(top_k=5), top=3))

    async def go():
        async with Host().run_test(size=(120, 60)) as pilot:
            shown = lambda: str(pilot.app.screen.query_one("#inspect-text", Static).render())  # noqa: E731
            await wait_for(pilot, lambda: "perplexity" in shown(), 60, "the scored reply")
            text = shown()
            await pilot.press("escape")
            await wait_for(pilot, lambda: not isinstance(pilot.app.screen, InspectView), 10, "the view to close")
            return text

    text = asyncio.run(go())
    assert f"over {len(reply)} tokens" in text  # the reply only: the prompt is its context
    assert "' Paris'" in text and "top_k: 5 kept" in text


def test_cli_text_file_errors_say_what_is_wrong(tiny, tmp_path):
    """--text names the file's problem (it had said "cannot read it as UTF-8 text (FileNotFoundError)")."""
    (tmp_path / "bin.dat").write_bytes(b"\x00\x01binary")
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    cases = {"nope.txt": "No such file", "bin.dat": "binary file", "latin.txt": "iconv", ".": "Is a directory"}
    for name, said in cases.items():
        r = subprocess.run([sys.executable, "-m", "gptchat.tui", "inspect", "--text", str(tmp_path / name), "--model",
                            str(tiny[1])], capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and said in r.stderr and "Traceback" not in r.stderr, (name, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
