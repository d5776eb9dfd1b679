"""`gptchat finetune` and `gptchat runs` as a user runs them: errors, Ctrl+C, kill -9, reattaching."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gptchat.core.train.events import read_events
from tests.train.util import write_corpus

FAST_ARGS = ["--from-scratch", "--arch", "nano", "--block-size", "32", "--batch-size", "4", "--sample-tokens", "0"]


class Ran:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def cli(*args) -> Ran:
    """Run the real CLI entry point in this process (as `gptchat ARGS` would), capturing its output."""
    import contextlib
    import io

    from gptchat.tui.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return Ran(code, out.getvalue(), err.getvalue())


def runs_dir() -> Path:
    from gptchat.core.paths import get_paths

    return get_paths().runs


def wait_for(cond, timeout=90.0, proc=None):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"trainer exited early: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.05)
    raise AssertionError("timed out")


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "data", 40_000)


def test_bad_input_gives_one_line_errors(tmp_path, corpus):
    latin = tmp_path / "latin.txt"
    latin.write_bytes("déjà vu".encode("latin-1"))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    binary = tmp_path / "blob.txt"
    binary.write_bytes(bytes(range(256)) * 4)
    cases = [
        ((str(tmp_path / "missing.txt"),), 1, "does not exist"),
        ((str(empty),), 1, "is empty"),
        ((str(binary),), 1, "looks like a binary file"),
        ((str(latin),), 1, "is not UTF-8 text"),
        (("--resume", "nope"), 1, "no run named 'nope'"),
        ((), 2, "give training data"),
        ((str(corpus), "--lr", "-1"), 2, "--lr must be > 0"),
        ((str(corpus), "--val-fraction", "0"), 2, "--val-fraction"),
        ((str(corpus), "--from-scratch", "--model", "gpt2"), 2, "--from-scratch"),
        ((str(corpus), "--lora", "--lora-targets", "q,x"), 2, "--lora-targets"),
        ((str(corpus), "--format", "csv"), 2, "--format must be text or jsonl"),
        (("--resume", "x", "--lr", "1e-4"), 2, "--resume reuses the run's settings"),
        ((str(corpus),), 1, "gpt2"),  # the default base model is not on this offline machine
    ]
    for args, code, msg in cases:
        r = cli("finetune", *args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == code, (args, r.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: ") and msg in lines[0], (args, r.stderr)


def test_runs_lists_nothing_then_a_finished_run_that_chat_and_generate_can_use(corpus):
    r = cli("runs", "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == []
    r = cli("finetune", str(corpus), *FAST_ARGS, "--steps", "4", "--eval-every", "2", "--name", "tiny-run")
    assert r.returncode == 0, r.stderr
    assert "plan:" in r.stderr and "val loss" in r.stderr and "finished at step 4" in r.stderr
    listed = json.loads(cli("runs", "--json").stdout)
    assert [(x["name"], x["state"], x["step"]) for x in listed] == [("tiny-run", "finished", 4)]
    assert listed[0]["best_val_loss"] is not None and listed[0]["base"] == "scratch:nano"
    table = cli("runs").stdout
    assert "tiny-run" in table and "finished" in table and "4/4" in table
    r = cli("generate", "--model", "tiny-run", "def", "-n", "5", "--seed", "1", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["model"] == "tiny-run"
    # resuming a finished run with nothing new to do says so in one line, touching nothing (it printed a plan and
    # "finished at step 4"); --steps is the total to reach, so one at or below the step reached is refused
    events = (runs_dir() / "tiny-run" / "events.jsonl").read_bytes()
    r = cli("finetune", "--resume", "tiny-run")
    assert (r.returncode, r.stderr.strip()) == (0, "run tiny-run has finished at step 4: nothing to do (--steps N, "
                                                   "above 4, trains it further)")
    r = cli("finetune", "--resume", "tiny-run", "--steps", "3")
    assert r.returncode == 2 and "--steps 3: run 'tiny-run' is at step 4 already" in r.stderr, r.stderr
    assert (runs_dir() / "tiny-run" / "events.jsonl").read_bytes() == events
    # a run.json damaged by hand: the listing says "broken" (it showed a finished run of gpt2), --resume says why
    (runs_dir() / "tiny-run" / "run.json").write_text("{not json")
    listed = json.loads(cli("runs", "--json").stdout)
    assert [(x["name"], x["state"], x["base"]) for x in listed] == [("tiny-run", "broken", "?")]
    r = cli("finetune", "--resume", "tiny-run", "--steps", "9")
    assert r.returncode == 1 and "run.json is unreadable" in r.stderr, r.stderr


def test_a_jsonl_file_trains_as_prompt_completion_pairs_without_format(tmp_path):
    """--format defaults from the data: .jsonl files (or a folder of only them) are prompt/completion pairs, loss
    on the completions (they were trained as plain text, braces and keys included, unless --format jsonl was
    given); anything else is text, and --format text still trains a .jsonl file's lines as text."""
    from gptchat.core.train.data import guess_format

    pairs = tmp_path / "qa.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"What is {i} plus {i}?", "completion": f" {2 * i}"}) + "\n"
                             for i in range(300)))
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "a.jsonl").write_text(pairs.read_text())
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.jsonl").write_text(pairs.read_text())
    (tmp_path / "mixed" / "b.txt").write_text("text\n")
    assert [guess_format([p]) for p in (pairs, tmp_path / "only", tmp_path / "mixed", tmp_path / "mixed" / "b.txt")] \
        == ["jsonl", "jsonl", "text", "text"]
    assert guess_format([pairs, tmp_path / "mixed" / "b.txt"]) == "text"
    for args, fmt in [((), "jsonl"), (("--format", "text"), "text")]:
        name = f"qa-{fmt}"
        r = cli("finetune", str(pairs), *FAST_ARGS, "--steps", "1", "--name", name, *args)
        assert r.returncode == 0, r.stderr
        start = next(e for e in read_events(runs_dir() / name / "events.jsonl") if e["type"] == "start")
        assert start["settings"]["format"] == fmt
        assert ("(prompt/completion pairs, loss on the completions)" in r.stderr) == (fmt == "jsonl"), r.stderr


@pytest.mark.slow
def test_ctrl_c_saves_and_resume_finishes(corpus):
    proc = subprocess.Popen([sys.executable, "-m", "gptchat.tui", "finetune", str(corpus), *FAST_ARGS, "--steps", "400",
                             "--eval-every", "3", "--name", "intr"], stderr=subprocess.PIPE, text=True)
    run = runs_dir() / "intr"
    wait_for(lambda: (run / "last" / "DONE").exists(), proc=proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "continue with: gptchat finetune --resume intr" in stderr
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "interrupted"
    stopped = status["step"]
    assert int((run / "last" / "DONE").read_text()) == stopped  # saved at the step it stopped
    r = cli("finetune", "--resume", "intr", "--steps", str(stopped + 2))
    assert r.returncode == 0, r.stderr
    steps = [e["step"] for e in read_events(run / "events.jsonl") if e["type"] == "step"]
    assert steps == list(range(1, stopped + 3))
    assert json.loads((run / "status.json").read_text())["state"] == "finished"


@pytest.mark.slow
def test_kill_9_during_a_checkpoint_write_leaves_the_previous_one_loadable(corpus):
    from gptchat.core.weights.checkpoints import load

    env = dict(os.environ, GPTCHAT_TRAIN_SAVE_DELAY="1.0")  # hold each write open for a second
    proc = subprocess.Popen([sys.executable, "-m", "gptchat.tui", "finetune", str(corpus), *FAST_ARGS, "--steps", "400",
                             "--eval-every", "2", "--name", "killed"], env=env, stderr=subprocess.PIPE, text=True)
    run = runs_dir() / "killed"
    # a checkpoint is complete, and the next one is half-written (files there, no DONE yet)
    wait_for(lambda: (run / "last" / "DONE").exists(), proc=proc)
    # while it runs: `runs` shows it running with its pid, and a second trainer is refused
    listed = {x["name"]: x for x in json.loads(cli("runs", "--json").stdout)}
    assert listed["killed"]["state"] == "running" and listed["killed"]["pid"] == proc.pid
    r = cli("finetune", "--resume", "killed")
    assert r.returncode == 1 and "is already running" in r.stderr
    wait_for(lambda: any(p.name.endswith(".tmp") and (p / "model.safetensors").exists() for p in run.glob(".ckpt-*")),
             proc=proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert any(p.name.endswith(".tmp") for p in run.glob(".ckpt-*"))  # the kill really hit a write
    done_step = int((run / "last" / "DONE").read_text())
    model, ck = load("killed")  # the previous checkpoint, complete
    assert ck.path.resolve() in {(run / "best").resolve(), (run / "last").resolve()}
    listed = {x["name"]: x for x in json.loads(cli("runs", "--json").stdout)}
    assert listed["killed"]["state"] == "dead"
    r = cli("finetune", "--resume", "killed", "--steps", str(done_step + 1))
    assert r.returncode == 0, r.stderr
    assert not any(p.name.endswith(".tmp") for p in run.glob(".ckpt-*"))  # leftovers cleaned
    assert int((run / "last" / "DONE").read_text()) == done_step + 1
