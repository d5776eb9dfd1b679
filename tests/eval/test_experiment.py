"""`gptchat experiment` end to end in subprocesses: killed mid-way, it resumes without redoing cells;
under torchrun its finetunes use DDP; the same JSONL file drives finetuning, --examples and the experiment."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gptchat.core.eval.study import study_state
from gptchat.core.eval.shots import in_context
from gptchat.core.generate.loaded import open_model
from gptchat.core.paths import get_paths
from gptchat.core.prompting.templates import list_templates, load_examples, render
from gptchat.core.train import data, list_runs
from gptchat.core.train.events import read_events
from gptchat.tui.cli.main import main
from tests.factory import hf_model, save

# a corpus the model can only get better at: one sentence, again and again
PAIRS = [{"prompt": "The red fox", "completion": " jumps over the lazy dog." * (3 + i % 4)} for i in range(40)]


@pytest.fixture
def corpus(tmp_path):
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    return f


def _cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "gptchat.tui", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_one_jsonl_file_drives_finetune_data_and_examples(corpus, tmp_path):
    path = save(hf_model(n_layer=1, n_embd=32, n_positions=64), tmp_path / "m")
    lm = open_model(str(path), device="cpu", dtype="fp32")
    ds = data.prepare([corpus], lm.tokenizer, fmt="jsonl")
    assert ds.n_tokens > 0 and ds.mask is not None
    for template in (None, "few-shot", "one-shot", "few-shot-qa"):
        ctx = in_context(1, str(corpus), lm.tokenizer, template)
        assert "lazy dog" in lm.tokenizer.decode(ctx.prefix(0))
    # --examples for every bundled template that shows examples: the pair maps onto its two fields
    templates, _ = list_templates()
    for tpl in [t for t in templates if t.takes_examples]:
        pool = load_examples(corpus, tpl.example_fields)
        r = render(tpl, {tpl.input_variable: "x"}, tokenizer=lm.tokenizer, examples=pool, shots=1)
        assert "lazy dog" in r.text and r.examples_used, tpl.name


@pytest.mark.slow
def test_experiment_resumes_after_sigkill_and_finetuning_lowers_the_loss(corpus, tmp_path, capsys):
    a = save(hf_model(n_layer=1, n_embd=32, n_positions=64, seed=1), tmp_path / "a")
    b = save(hf_model(n_layer=1, n_embd=32, n_positions=64, seed=2), tmp_path / "b")
    args = ["experiment", corpus, "--name", "study", "--models", f"{a},{b}", "--finetune-steps", "20",
            "--lr", "3e-3", "--batch-size", "4", "--block-size", "32", "--device", "cpu", "--json"]
    cells = get_paths().data / "experiments" / "study" / "cells"
    first = _cli(*args)
    deadline = time.monotonic() + 120
    while not (cells / "base-a.json").exists():  # wait for the first finished cell, then kill mid-study
        assert first.poll() is None, first.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    assert study_state("study")["state"] == "killed"  # "running", but its process is gone
    done = {p.name: p.stat().st_mtime_ns for p in cells.glob("*.json")}
    assert "base-a.json" in done and len(done) < 4

    second = _cli(*args)
    out, errs = second.communicate(timeout=300)
    assert second.returncode == 0, errs
    assert study_state("study")["state"] == "finished"
    assert "a: cached" in errs
    for name, mtime in done.items():
        assert (cells / name).stat().st_mtime_ns == mtime  # finished cells were not redone
    rows = {r["row"]: r for r in json.loads(out)["rows"]}
    assert set(rows) == {"base-a", "finetuned-a", "base-b", "finetuned-b"}
    assert rows["finetuned-a"]["loss"] < rows["base-a"]["loss"] - 1.0
    assert rows["finetuned-b"]["loss"] < rows["base-b"]["loss"] - 1.0
    assert all(len(r["samples"]) >= 1 for r in rows.values()) and rows["finetuned-a"]["curve"]

    with pytest.raises(SystemExit) as e:  # in process: --show computes nothing
        main(["experiment", "--show", "study", "--markdown", str(tmp_path / "r.md")])
    assert e.value.code in (0, None)
    assert "finetuned" in capsys.readouterr().out
    report = (tmp_path / "r.md").read_text()
    assert report.count("<svg") == 2 and "<polyline" in report and "| * |" in report
    assert {"study-finetuned-a", "study-finetuned-b"} <= {r["name"] for r in list_runs()}  # ordinary runs


def test_at_a_terminal_each_rows_scoring_counts_up_its_windows(corpus, tmp_path, capsys, monkeypatch):
    """In process, stderr a terminal: while a row scores, its windows count up on one redrawn line named after the
    row; every log line of the study starts on a line of its own."""
    import gptchat.tui.cli.experiment as cli

    class Terminal(cli.Bar):
        def __init__(self, enabled: bool):
            super().__init__(True)

    monkeypatch.setattr(cli, "Bar", Terminal)
    a = save(hf_model(n_layer=1, n_embd=32, n_positions=64, seed=1), tmp_path / "a")
    with pytest.raises(SystemExit) as e:
        main(["experiment", str(corpus), "--name", "bars", "--models", str(a), "--device", "cpu"])
    assert e.value.code in (0, None)
    err = capsys.readouterr().err
    lines = err.split("\n")
    drawn = [ln for ln in lines if "\r[" in ln]
    assert len(drawn) == 1 and drawn[0].rstrip().endswith(f" s left  {a}")  # one row: one bar line, redrawn
    assert "] 0/" in drawn[0]  # drawn from the row's start
    total = drawn[0].rsplit("\r[", 1)[1].split("] ", 1)[1].split("/")[0]
    assert f"] {total}/{total} windows" in drawn[0]
    assert all(ln.startswith("experiment: ") for ln in lines if ln and "\r[" not in ln), err


@pytest.mark.slow
def test_under_torchrun_the_finetunes_use_ddp_and_rank_0_alone_scores_and_reports(corpus, tmp_path):
    """Two gloo processes: every finetune runs on both (each in a process group of its own: torchrun's
    rendezvous cannot be joined twice, which failed the second finetune before), rank 0 alone scores
    and prints, and the other rank exits cleanly."""
    a = save(hf_model(n_layer=1, n_embd=32, n_positions=64, seed=1), tmp_path / "a")
    b = save(hf_model(n_layer=1, n_embd=32, n_positions=64, seed=2), tmp_path / "b")
    gptchat = Path(sys.executable).parent / "gptchat"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python",
           str(gptchat), "experiment", str(corpus), "--name", "ddp", "--models", f"{a},{b}", "--finetune-steps", "4",
           "--lr", "3e-3", "--batch-size", "4", "--block-size", "32", "--device", "cpu", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    table = json.loads(r.stdout)  # one report: a second rank printing its own would not parse
    assert table["state"] == "finished" and not table["missing"]
    rows = {row["row"]: row for row in table["rows"]}
    assert set(rows) == {"base-a", "finetuned-a", "base-b", "finetuned-b"}
    assert rows["finetuned-a"]["world"] == rows["finetuned-b"]["world"] == 2
    assert rows["base-a"]["world"] == 1  # scored, not trained
    for run in ("ddp-finetuned-a", "ddp-finetuned-b"):
        events = read_events(get_paths().runs / run / "events.jsonl")
        assert [e["world"] for e in events if e["type"] == "start"] == [2]
        assert max(e["step"] for e in events if e["type"] == "step") == 4
    assert r.stderr.count(": scoring ") == 4  # each row scored once, by rank 0


def test_bad_input_is_one_line_and_leaves_no_study_folder(corpus, tmp_path, capsys):
    """A missing --heldout file or finetune settings `gptchat finetune` would refuse stop the study before its
    folder exists (they had left a folder whose spec then blocked the corrected command: 'exists with other
    settings')."""
    from gptchat.core.eval.study import folder

    cases = [(["--heldout", tmp_path / "nope.txt"], "nope.txt does not exist"),
             (["--finetune-steps", "2", "--lr", "-1"], "--lr must be > 0"),
             (["--finetune-steps", "2", "--batch-size", "0"], "--batch-size must be > 0"),
             (["--finetune-steps", "2", "--block-size", "4096"], "--block-size 4096 is over")]
    for i, (args, message) in enumerate(cases):
        with pytest.raises(SystemExit) as e:
            main(["experiment", str(corpus), "--name", f"bad{i}", "--models", "gpt2", *map(str, args)])
        err = capsys.readouterr().err
        assert e.value.code != 0 and message in err and "Traceback" not in err, err
        assert not folder(f"bad{i}").exists()
