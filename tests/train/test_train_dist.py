"""Scale-out computes one thing: one process with --grad-accum 2, DDP and FSDP on two gloo processes
(torchrun, CPU) give the same losses and weights, for a full finetune and for LoRA; a SIGKILLed FSDP
run resumes exactly; what FSDP exports is an ordinary Hugging Face folder."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
from safetensors.torch import load_file

from gptchat.core.model.config import PRESETS
from gptchat.core.model.device import cpu_native_bf16
from gptchat.core.model.gpt import GPT
from gptchat.core.train import Settings, train
from gptchat.core.train.dist import Dist, mixed_precision, wrap
from gptchat.core.train.events import read_events
from gptchat.core.train.plan import Plan, pick_sharding
from tests.factory import hf_model, save
from tests.train.util import write_corpus

W = 2  # processes; the single process accumulates W micro-batches to see the same sequences a step
TOL = 1e-5
COMMON = {"block_size": 32, "batch_size": 2, "sample_tokens": 0, "seed": 5}  # eval_batches: the default, as the CLI


def _cli(settings: dict) -> list[str]:
    out = []
    for k, v in settings.items():
        flag = "--" + k.replace("_", "-")
        out += [flag] if v is True else [] if v is False else [flag, str(v)]
    return out


def _torchrun(args: list[str], wait: bool = True):
    gptchat = Path(sys.executable).parent / "gptchat"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(W), "--no-python",
           str(gptchat), "finetune", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("finished at step") == 1  # rank 0 alone reports
    return r


def _run_dir(name: str) -> Path:
    from gptchat.core.paths import get_paths

    return get_paths().runs / name


def _history(name: str) -> tuple[dict[int, float], dict[int, float], list[dict]]:
    """(step -> train loss, step -> val loss, events); a resumed step's later value wins."""
    events = read_events(_run_dir(name) / "events.jsonl")
    losses = {e["step"]: e["loss"] for e in events if e["type"] == "step"}
    vals = {e["step"]: e["val_loss"] for e in events if e["type"] == "eval"}
    return losses, vals, events


def _max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _assert_same_run(name: str, single, steps: int) -> None:
    """The torchrun run ``name`` has the single process's per-step losses, val losses and final weights."""
    losses, vals, events = _history(name)
    assert next(e for e in events if e["type"] == "start")["world"] == W
    assert sorted(losses) == list(range(1, steps + 1))
    for s in losses:
        assert losses[s] == pytest.approx(single.losses[s], abs=TOL), (name, s)
    assert sorted(vals) == sorted(single.val_losses)
    for s in vals:
        assert vals[s] == pytest.approx(single.val_losses[s], abs=TOL), (name, s)
    a = load_file(str(_run_dir(name) / "last" / "model.safetensors"))
    assert _max_diff(a, load_file(str(single.run / "last" / "model.safetensors"))) < TOL, name


def _assert_hf_equal(folder: Path) -> None:
    """transformers loads the exported folder and computes our logits."""
    from transformers import GPT2LMHeadModel

    from gptchat.core.weights.checkpoints import load_model, sniff

    ours = load_model(sniff(folder), dtype=torch.float32)
    theirs = GPT2LMHeadModel.from_pretrained(str(folder)).eval()
    ids = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(ids).float() - theirs(ids).logits).abs().max().item()
    assert diff < 1e-4, (folder, diff)


def _baseline(tmp_path, run: dict):
    """(the corpus, the one-process run with W micro-batches a step that the torchrun runs must equal)."""
    corpus = write_corpus(tmp_path / "data", 40_000)
    return corpus, train(Settings(data=[str(corpus)], grad_accum=W, name="one", **run))


@pytest.mark.slow
def test_one_process_ddp_and_fsdp_compute_the_same_run(tmp_path):
    """Issue 13: FSDP skipped gradient clipping (it clipped the parameters it had replaced) and drifted."""
    run = {**COMMON, "from_scratch": True, "arch": "nano", "steps": 6, "eval_every": 3}
    corpus, single = _baseline(tmp_path, run)
    _torchrun([str(corpus), *_cli(run), "--name", "ddp"])
    _torchrun([str(corpus), *_cli(run), "--fsdp", "--name", "fsdp"])
    for name in ("ddp", "fsdp"):
        _assert_same_run(name, single, 6)
    for link in ("best", "last"):
        _assert_hf_equal(_run_dir("fsdp") / link)
    # only rank 0 wrote: one events file, the checkpoints of one process
    ckpts = lambda n: sorted(p.name for p in _run_dir(n).glob("ckpt-*"))  # noqa: E731
    assert ckpts("fsdp") == ckpts("ddp") == ckpts("one")


@pytest.mark.slow
def test_lora_under_ddp_and_fsdp_matches_one_process(tmp_path):
    base = save(hf_model(n_positions=64), tmp_path / "base")
    run = {**COMMON, "model": str(base), "lora": True, "lora_targets": "q,v,fc", "steps": 4, "eval_every": 4}
    corpus, single = _baseline(tmp_path, run)
    _torchrun([str(corpus), *_cli(run), "--name", "ddp"])
    _torchrun([str(corpus), *_cli(run), "--fsdp", "--name", "fsdp"])
    for name in ("ddp", "fsdp"):
        _assert_same_run(name, single, 4)
    # the adapters saved for resume are whole tensors (gathered from the shards), equal to the single run's
    fsdp, one = (torch.load(_run_dir(n) / "last" / "trainer.pt", weights_only=False)["adapters"]
                 for n in ("fsdp", "one"))
    assert _max_diff(fsdp, one) < TOL
    _assert_hf_equal(_run_dir("fsdp") / "last")


def _kill_tree(pid: int) -> None:
    """SIGKILL torchrun and its workers at once, as a node failure would (children first)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo, tree = [pid], []
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    for p in reversed(tree):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_sigkilled_fsdp_run_resumes_with_the_losses_of_an_unbroken_run(tmp_path):
    steps = 16
    run = {**COMMON, "from_scratch": True, "arch": "nano", "steps": steps, "eval_every": 4}
    corpus, single = _baseline(tmp_path, run)

    proc = _torchrun([str(corpus), *_cli(run), "--fsdp", "--name", "fsdp"], wait=False)
    events_file = _run_dir("fsdp") / "events.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:  # wait for the first checkpoint
        if events_file.exists() and any(e["type"] == "checkpoint" and e["kind"] == "last" and e["step"] >= 4
                                        for e in read_events(events_file)):
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read()[-2000:]
    _kill_tree(proc.pid)
    proc.wait(timeout=30)
    _, _, before = _history("fsdp")
    assert not any(e["type"] == "done" for e in before)
    saved = max(e["step"] for e in before if e["type"] == "checkpoint" and e["kind"] == "last")
    assert saved < steps

    _torchrun(["--resume", "fsdp"])
    _, _, events = _history("fsdp")
    starts = [i for i, e in enumerate(events) if e["type"] == "start"]
    assert len(starts) == 2 and events[starts[1]]["resumed"]
    resumed = [e for e in events[starts[1]:] if e["type"] == "step"]
    assert resumed[0]["step"] == saved + 1 and resumed[-1]["step"] == steps  # from the last complete checkpoint on
    _assert_same_run("fsdp", single, steps)


@pytest.mark.slow
@pytest.mark.skipif(not cpu_native_bf16(), reason="--dtype bf16 on a CPU without native bf16 trains in fp32")
def test_fsdp_bf16_computes_in_bf16_and_keeps_fp32_master_weights(tmp_path):
    run = {**COMMON, "from_scratch": True, "arch": "nano", "steps": 3, "eval_every": 3}
    corpus, single = _baseline(tmp_path, run)
    _torchrun([str(corpus), *_cli(run), "--fsdp", "--dtype", "bf16", "--name", "bf16"])
    losses, _, _ = _history("bf16")
    assert losses[1] == pytest.approx(single.losses[1], abs=0.05)  # bf16 compute: close, not equal
    assert losses[1] != pytest.approx(single.losses[1], abs=TOL)
    w = load_file(str(_run_dir("bf16") / "last" / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in w.values())
    # fp32 master weights: Adam's small updates are kept, which bf16 weights could not hold
    h = next(t for k, t in w.items() if k.endswith("h.0.mlp.c_fc.weight"))
    assert (h.to(torch.bfloat16).float() != h).any()


def test_fsdp_wrap_replaces_parameters_keeps_the_tie_and_shapes(tmp_path):
    """Issue 13's suspects on one in-process gloo rank: FSDP2 swaps every parameter for a sharded one
    (so a list taken before wrapping gets no gradient: the clipping bug), keeps wte/lm_head one
    parameter, keeps logical shapes (weight decay groups by them), and clips by the global norm."""
    tdist.init_process_group("gloo", store=tdist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model = GPT(PRESETS["nano"])
        model.init_weights(0)
        ref = copy.deepcopy(model)
        before = list(model.parameters())
        # Dist only says "wrap"; fully_shard shards over the default group, here of one rank
        net, raw = wrap(model, Dist(0, 0, 2), torch.device("cpu"), fsdp=True)
        after = list(raw.parameters())
        assert raw.lm_head.weight is raw.transformer.wte.weight and len(after) == len(before)
        assert [q.shape for q in after] == [q.shape for q in ref.parameters()]
        assert not any(a is b for a, b in zip(after, before))
        x = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
        for m in (net, ref):
            m(x).float().logsumexp(-1).mean().backward()
        assert all(q.grad is None for q in before) and all(q.grad is not None for q in after)
        norm = torch.nn.utils.clip_grad_norm_(after, 1e-3).full_tensor()
        ref_norm = torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 1e-3)
        assert norm.item() == pytest.approx(ref_norm.item(), rel=1e-5)  # the global norm, not a shard's
        assert _max_diff({n: q.grad.full_tensor() for n, q in raw.named_parameters()},
                         {n: q.grad for n, q in ref.named_parameters()}) < 1e-7
    finally:
        tdist.destroy_process_group()


def test_fsdp_mixed_precision_policy_keeps_fp32_masters_and_reductions():
    bf16 = mixed_precision(torch.bfloat16)
    assert (bf16.param_dtype, bf16.reduce_dtype) == (torch.bfloat16, torch.float32)
    for dtype in (torch.float32, torch.float16):  # fp32: nothing to cast; fp16: autocast over fp32 parameters
        policy = mixed_precision(dtype)
        assert (policy.param_dtype, policy.reduce_dtype) == (None, None)


def _plan(total: int, available: int) -> Plan:
    return Plan(1, 1, total, 0, 0, 0, total, available, "cuda:0", "fp32", 1, 1, 1.0, None, None)


def test_memory_plan_shards_with_fsdp_only_when_a_replica_would_not_fit():
    plans = {1: _plan(100, 100), 4: _plan(25, 100)}  # a replica needs 100 of 100 (fits = 90% at most)
    plan, fsdp = pick_sharding(plans.__getitem__, 4, fsdp=False)
    assert fsdp and plan.total_b == 25
    assert pick_sharding(plans.__getitem__, 1, fsdp=False) == (plans[1], False)  # one process: nothing to shard
    small = {1: _plan(50, 100), 4: _plan(13, 100)}
    assert pick_sharding(small.__getitem__, 4, fsdp=False) == (small[1], False)  # DDP when a replica fits
    assert pick_sharding(small.__getitem__, 4, fsdp=True) == (small[4], True)  # --fsdp is kept
    huge = {1: _plan(1000, 100), 4: _plan(250, 100)}
    assert pick_sharding(huge.__getitem__, 4, fsdp=False) == (huge[1], False)  # sharding does not help: the advice
