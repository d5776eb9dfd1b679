"""Crash tests: a real `gptchat finetune` process SIGKILLed (or Ctrl+C'd twice) at chosen moments,
then `--resume`: every resume works and the losses equal those of a run that was never stopped.

Resume is bit-exact by design (batches and learning rate are pure functions of the step; the
checkpoint holds weights, optimizer and RNG states), so every step's loss in the killed run's
events, from every attempt, must equal the uninterrupted reference run's.
(Batch kill-and-resume lives in tests/cli/test_batch.py::test_resume_after_kill.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from gptchat.core.train import Settings, train
from gptchat.core.train.events import read_events
from tests.train.test_train_cli import FAST_ARGS, cli, runs_dir, wait_for
from tests.train.util import FAST, write_corpus

pytestmark = pytest.mark.slow

STEPS = 12
PLAN = ["--steps", str(STEPS), "--eval-every", "4", "--save-minutes", "0"]  # checkpoints at 4, 8, 12
SAVE_DELAY = "1.0"  # every checkpoint write held open this long: a wide window to kill in


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "data", 40_000)


def start(*args, delay=SAVE_DELAY) -> subprocess.Popen:
    env = dict(os.environ, GPTCHAT_TRAIN_SAVE_DELAY=delay)
    return subprocess.Popen([sys.executable, "-m", "gptchat.tui", "finetune", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill(proc) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def events(run, kind="step"):
    return [e for e in read_events(run / "events.jsonl") if e["type"] == kind]


def done_step(run) -> int | None:
    try:
        return int((run / "last" / "DONE").read_text())
    except OSError:
        return None


def tmp_ckpt(run, step: int) -> bool:
    return (run / f".ckpt-{step:08d}.tmp" / "model.safetensors").exists()


def reference(corpus) -> dict[int, float]:
    """The uninterrupted run's loss per step, rounded as the event log rounds it."""
    r = cli("finetune", str(corpus), *FAST_ARGS, *PLAN, "--name", "straight")
    assert r.returncode == 0, r.stderr
    return {e["step"]: e["loss"] for e in events(runs_dir() / "straight")}


def test_sigkill_before_the_first_checkpoint_during_a_save_and_after_one_then_resume_matches(corpus):
    ref = reference(corpus)
    run = runs_dir() / "crash"
    kills = []

    # 1. before the first checkpoint: steps are logged, nothing saved yet
    proc = start(str(corpus), *FAST_ARGS, *PLAN, "--name", "crash")
    wait_for(lambda: len(events(run)) >= 1, proc=proc)
    kill(proc)
    assert done_step(run) is None
    kills.append("before the first checkpoint")
    # the name is not a dead end: starting it again points at --resume, which starts it over
    r = cli("finetune", str(corpus), *FAST_ARGS, *PLAN, "--name", "crash")
    assert r.returncode == 1 and "--resume crash" in r.stderr

    # 2. during a save: step 4 is saved, step 8's checkpoint is half-written
    proc = start("--resume", "crash")
    wait_for(lambda: done_step(run) == 4 and tmp_ckpt(run, 8), proc=proc)
    kill(proc)
    assert done_step(run) == 4 and tmp_ckpt(run, 8)
    kills.append("during the save of step 8")
    listed = {x["name"]: x for x in json.loads(cli("runs", "--json").stdout)}
    assert listed["crash"]["state"] == "dead" and listed["crash"]["step"] == 4  # the step resume uses

    # 3. after a checkpoint: step 8 saved, steps past it logged, step 12 not saved yet
    proc = start("--resume", "crash")
    n_before = len(events(run))
    wait_for(lambda: done_step(run) == 8 and any(e["step"] > 8 for e in events(run)[n_before:]), proc=proc)
    kill(proc)
    assert done_step(run) == 8
    kills.append("after the checkpoint of step 8")

    r = cli("finetune", "--resume", "crash")
    assert r.returncode == 0, r.stderr
    assert json.loads((run / "status.json").read_text())["state"] == "finished" and done_step(run) == STEPS
    starts = events(run, "start")
    assert [e["resumed"] for e in starts] == [False, False, True, True]  # the second start began over
    assert any("starting it over" in e["message"] for e in events(run, "warning"))
    got = events(run)
    assert {e["step"] for e in got} == set(range(1, STEPS + 1))
    assert [(e["step"], e["loss"]) for e in got if e["loss"] != ref[e["step"]]] == []  # every attempt, every step
    assert got[-1]["step"] == STEPS and len(kills) == 3


def test_double_ctrl_c_during_a_save_is_held_then_a_third_aborts_and_runs_shows_the_resume_step(corpus):
    run = runs_dir() / "twice"
    proc = start(str(corpus), *FAST_ARGS, *PLAN, "--name", "twice", delay="2.0")
    wait_for(lambda: done_step(run) == 4 and tmp_ckpt(run, 8), proc=proc)

    def notices():
        return [e["message"] for e in events(run, "notice")]

    proc.send_signal(signal.SIGINT)  # stop after this step (the save goes on)
    wait_for(lambda: len(notices()) == 1, proc=proc)
    proc.send_signal(signal.SIGINT)  # during the save: held back, with a message
    wait_for(lambda: len(notices()) == 2, proc=proc)
    assert "stopping after this step" in notices()[0] and "press Ctrl+C again within" in notices()[1]
    assert proc.poll() is None and tmp_ckpt(run, 8)
    proc.send_signal(signal.SIGINT)  # within the grace time: abort the save
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "stopped without saving" in stderr and "continue with: gptchat finetune --resume twice" in stderr
    assert "Traceback" not in stderr
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "interrupted" and status["step"] == 4 == done_step(run)
    listed = {x["name"]: x for x in json.loads(cli("runs", "--json").stdout)}
    assert listed["twice"]["step"] == 4
    r = cli("finetune", "--resume", "twice", "--steps", "6")
    assert r.returncode == 0, r.stderr
    last_start = max(i for i, e in enumerate(read_events(run / "events.jsonl")) if e["type"] == "start")
    resumed = [e["step"] for e in read_events(run / "events.jsonl")[last_start:] if e["type"] == "step"]
    assert resumed == [5, 6]


def test_a_failed_start_leaves_no_folder_and_a_run_without_checkpoint_resumes_by_starting_over(corpus):
    def boom(ev):
        if ev["type"] == "step":
            raise RuntimeError("killed in the first step")

    common = dict(data=[str(corpus)], steps=3, eval_every=3, save_minutes=0, **FAST)
    with pytest.raises(RuntimeError):
        train(Settings(name="nock", **common), on_event=boom)
    folder = runs_dir() / "nock"
    assert (folder / "run.json").exists() and not (folder / "last").exists()
    res = train(resume="nock")
    assert res.status == "finished" and res.step == 3
    straight = train(Settings(name="ref", **common))
    assert res.losses == straight.losses  # started over from step 0, same settings, same numbers

    # a folder without run.json (an older version's failed start) does not block its name
    left = runs_dir() / "left"
    left.mkdir(parents=True)
    (left / "events.jsonl").write_text('{"type": "error", "message": "x"}\n')
    warned = []
    res = train(Settings(name="left", **{**common, "steps": 1}), on_event=lambda e: warned.append(e))
    assert res.status == "finished"
    assert any(e["type"] == "warning" and "replacing folder 'left'" in e["message"] for e in warned)
    assert [e["type"] for e in read_events(left / "events.jsonl")][0] == "warning"


def test_time_based_saves_and_save_every(corpus):
    saved = []
    common = dict(data=[str(corpus)], steps=4, eval_every=4, **FAST)
    train(Settings(name="often", save_every=2, save_minutes=0, **common),
          on_event=lambda e: saved.append(e["step"]) if e["type"] == "checkpoint" and e["kind"] == "last" else None)
    assert saved == [2, 4]
    saved.clear()
    res = train(Settings(name="timed", save_minutes=1e-6, **common),
                on_event=lambda e: saved.append(e["step"]) if e["type"] == "checkpoint" and e["kind"] == "last" else None)
    assert saved == [1, 2, 3, 4]  # a save at the top of each step once the time has passed
    meta = json.loads((res.run / "run.json").read_text())
    assert meta["settings"]["save_minutes"] == 1e-6 and meta["resolved"]["save_every"] == 4
