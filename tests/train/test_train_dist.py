"""Data parallel: two gloo processes under torchrun match one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from gptchat.core.train import Settings, train
from gptchat.core.train.events import read_events
from tests.train.util import FAST, install_vocab, write_corpus


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_with_accumulation(tmp_path):
    from gptchat.core.paths import get_paths

    install_vocab()
    corpus = write_corpus(tmp_path / "data", 40_000)
    steps = 5
    gptchat = Path(sys.executable).parent / "gptchat"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python",
           str(gptchat), "finetune", str(corpus), "--from-scratch", "--arch", "nano", "--block-size", "32",
           "--batch-size", "2", "--steps", str(steps), "--eval-every", "5", "--sample-tokens", "0", "--name", "ddp", "--seed", "5"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr.count("finished at step") == 1  # rank 0 alone reports

    # one process, 2 micro-batches of 2 = the same 4 sequences per step
    single = train(Settings(data=[str(corpus)], steps=steps, eval_every=5, seed=5, grad_accum=2, name="one",
                            **{**FAST, "batch_size": 2, "eval_batches": 8}))
    runs = get_paths().runs
    events = read_events(runs / "ddp" / "events.jsonl")
    start = next(e for e in events if e["type"] == "start")
    assert start["world"] == 2
    ddp_losses = {e["step"]: e["loss"] for e in events if e["type"] == "step"}
    assert sorted(ddp_losses) == list(range(1, steps + 1))
    for s in range(1, steps + 1):
        assert ddp_losses[s] == pytest.approx(single.losses[s], abs=2e-5), s
    ddp_val = next(e for e in events if e["type"] == "eval")["val_loss"]
    assert ddp_val == pytest.approx(single.val_losses[steps], abs=2e-5)
    a = load_file(str(runs / "ddp" / "last" / "model.safetensors"))
    b = load_file(str(single.run / "last" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    # only rank 0 wrote: one events file, one set of checkpoints
    assert sorted(p.name for p in (runs / "ddp").glob("ckpt-*")) == [f"ckpt-{steps:08d}"]
