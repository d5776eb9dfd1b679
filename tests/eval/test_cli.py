"""`gptchat eval` and `gptchat compare` on the command line: output, JSON, and one clear line per bad input."""

from __future__ import annotations

import json
import re

import pytest

from gptchat.tui.cli.main import main
from tests.factory import hf_model, save


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(save(hf_model(n_layer=1, n_embd=32, n_positions=64), tmp_path_factory.mktemp("cli") / "m"))


def _run(capsys, *args) -> tuple[int, str, str]:
    try:
        main([*map(str, args)])
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_json_and_table(model, tmp_path, capsys):
    (tmp_path / "h.txt").write_text("the cat sat on the mat. " * 30)
    (tmp_path / "ex.jsonl").write_text('{"input": "a", "output": "b"}\n{"question": "c", "answer": "d"}\n')
    code, out, err = _run(capsys, "eval", tmp_path / "h.txt", "-m", model, "--shots", "0", "--shots", "2",
                          "--examples", tmp_path / "ex.jsonl", "--device", "cpu", "--json")
    assert code == 0, err
    rows = json.loads(out)["results"]
    assert [r["shots"] for r in rows] == [0, 2] and rows[0]["tokens"] == rows[1]["tokens"]
    assert "examples took" in err and "per window" in err
    assert not re.search(r"\b(\d+)-\1\b", err), err  # "24 tokens", not "24-24 tokens"
    code, out, _ = _run(capsys, "eval", tmp_path / "h.txt", "-m", model, "--device", "cpu")
    assert code == 0 and "bits/byte" in out.splitlines()[0] and len(out.splitlines()) == 2


def test_describe_counts_examples_and_spans():
    from types import SimpleNamespace

    from gptchat.tui.cli.eval import describe

    s = SimpleNamespace(model="m", quantize="none", windows=3, window=64, stride=32, tokens=90,
                        scored_per_window=[20, 35, 35], shots=1, context_tokens=[12, 12, 12])
    assert describe(s).endswith("(20-35 per window); 1 example took 12 tokens of context per window (never scored)")
    s.shots, s.context_tokens = 2, [10, 14]
    assert "; 2 examples took 10-14 tokens" in describe(s)


@pytest.mark.parametrize("case, message", [
    ("empty", "is empty"),
    ("one-token", "at least 2"),
    ("unknown-model", "no-such-model"),
    ("shots-no-examples", "needs --examples"),
    ("examples-no-shots", "only with --shots"),
    ("examples-overflow", "examples alone"),
])
def test_bad_input_is_one_line(model, tmp_path, capsys, case, message):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "one.txt").write_text("a")
    (tmp_path / "h.txt").write_text("the cat sat on the mat. " * 30)
    (tmp_path / "long.jsonl").write_text(json.dumps({"prompt": "word " * 100, "completion": "x"}) + "\n")
    args = {
        "empty": [tmp_path / "empty.txt", "-m", model],
        "one-token": [tmp_path / "one.txt", "-m", model],
        "unknown-model": [tmp_path / "h.txt", "-m", "no-such-model"],
        "shots-no-examples": [tmp_path / "h.txt", "-m", model, "--shots", "2"],
        "examples-no-shots": [tmp_path / "h.txt", "-m", model, "--examples", tmp_path / "long.jsonl"],
        "examples-overflow": [tmp_path / "h.txt", "-m", model, "--shots", "1", "--examples", tmp_path / "long.jsonl"],
    }[case]
    code, out, err = _run(capsys, "eval", *args, "--device", "cpu")
    assert code in (1, 2) and out == ""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], err


def test_compare_scores_each_pane_under_its_model(model, capsys):
    code, out, err = _run(capsys, "compare", "the cat", "a dog", "-m", model, "-t", "raw", "-t", "zero-shot",
                          "--seed", "3", "-n", "4", "--device", "cpu", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["seed"] == 3 and len(doc["results"]) == 2
    panes = doc["results"][0]["panes"]
    assert [p["template"] for p in panes] == ["raw", "zero-shot"]
    assert all(p["mean_logprob"] is not None and p["mean_logprob"] < 0 for p in panes)
    again = _run(capsys, "compare", "the cat", "a dog", "-m", model, "-t", "raw", "-t", "zero-shot",
                 "--seed", "3", "-n", "4", "--device", "cpu", "--json")[1]
    assert json.loads(again) == doc  # same seed, same completions and scores


def test_a_panes_score_is_its_completions_mean_log_prob_in_transformers(model):
    import threading

    import torch
    from transformers import GPT2LMHeadModel

    from gptchat.core.prompting.templates import render
    from gptchat.core.session.compare import Pane, PaneDone, run_compare
    from gptchat.core.session.pool import ModelPool
    from gptchat.core.session.settings import ChatSettings

    pool = ModelPool()
    panes = [Pane(model, "raw"), Pane(model, "zero-shot")]
    s = ChatSettings(seed=5, device="cpu", dtype="fp32", max_new_tokens=6)
    done = [ev for ev in run_compare(pool, panes, "the cat", s, threading.Event(), score=True) if isinstance(ev, PaneDone)]
    hf = GPT2LMHeadModel.from_pretrained(model).eval()
    tok = pool.load(model, "cpu", "fp32").lm.tokenizer
    for ev in done:
        prompt = render(panes[ev.pane].template, {"input": "the cat"}, tokenizer=tok).ids
        ids = prompt + ev.completion.token_ids
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0, :-1].double(), -1)
        want = logp[torch.arange(len(prompt) - 1, len(ids) - 1), torch.tensor(ids[len(prompt):])].mean().item()
        assert ev.info["mean_logprob"] == pytest.approx(want, abs=1e-4)


def test_eval_on_a_terminal_draws_its_progress_on_stderr(model, tmp_path, capsys, monkeypatch):
    """At a terminal, each row's windows count up on one redrawn stderr line (rate, time left, the row's name),
    closed before the row's summary line; stdout holds the table alone."""
    import gptchat.tui.cli.eval as cli

    draws: list[tuple[int, int, str]] = []

    class Terminal(cli.Bar):
        def __init__(self, enabled: bool):
            super().__init__(True)

        def draw(self, done: int, total: int, text: str) -> None:
            draws.append((done, total, text))
            super().draw(done, total, text)

    monkeypatch.setattr(cli, "Bar", Terminal)
    (tmp_path / "h.txt").write_text("the cat sat on the mat. " * 30)
    (tmp_path / "ex.jsonl").write_text('{"input": "a", "output": "b"}\n')
    code, out, err = _run(capsys, "eval", tmp_path / "h.txt", "-m", model, "--stride", "16", "--shots", "0",
                          "--shots", "1", "--examples", tmp_path / "ex.jsonl", "--device", "cpu")
    assert code == 0, err
    total = draws[0][1]
    assert draws[0][0] == 0  # drawn (and timed) from the row's start
    assert total > 1 and [d for d, t, _ in draws if t == total][-1] == total
    assert any("+1 shots" in text for _, _, text in draws) and all("windows/s" in text for _, _, text in draws)
    assert f"\r[{'#' * cli.Bar.WIDTH}] {total}/{total} windows" in err
    assert sum(line.startswith(f"{model}: ") for line in err.split("\n")) == 2  # each row's summary on its own line
    assert "\r" not in out and "bits/byte" in out.splitlines()[0]


def test_compare_default_pane_is_generate_for_the_same_seed(model, capsys):
    """compare's default template (raw) samples as a prompt with no template does: the same seed gives generate's
    text (raw's own options, top_p 0.95, had made them differ, and hid config.toml's [sampling] from compare)."""
    code, out, err = _run(capsys, "compare", "the cat", "-m", model, "--seed", "5", "-n", "12", "--device", "cpu",
                          "--json")
    assert code == 0, err
    pane = json.loads(out)["results"][0]["panes"][0]
    for template in ([], ["-t", "raw"]):
        code, out, err = _run(capsys, "generate", "the cat", "-m", model, "--seed", "5", "-n", "12", *template,
                              "--device", "cpu", "--json")
        assert code == 0, err
        assert json.loads(out)["completion"] == pane["completion"]
