"""The training loop on real text with a nano model: it learns, resumes exactly, exports what
transformers loads, and LoRA trains only adapters that merge into the same function."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gptchat.core.errors import TrainError, UsageError
from gptchat.core.train import Settings, train
from gptchat.core.train.events import read_events
from gptchat.core.train.runs import runs_root
from tests.train.util import FAST, write_corpus


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "data", 60_000)


def test_loss_decreases_and_the_export_loads_in_transformers_with_equal_logits(corpus):
    from transformers import GPT2LMHeadModel

    from gptchat.core.weights.checkpoints import load

    res = train(Settings(data=[str(corpus)], steps=30, eval_every=10, lr=2e-3, name="learn", **FAST))
    assert res.status == "finished" and res.step == 30
    first = sum(res.losses[s] for s in range(1, 6)) / 5
    last = sum(res.losses[s] for s in range(26, 31)) / 5
    assert first > 10.0  # ln(50257) = 10.8: a random model
    assert last < first - 2.0, (first, last)
    assert res.val_losses[30] < res.val_losses[10] < 10.5
    assert res.best_val_loss == min(res.val_losses.values())

    # the run folder: events for every step, best/ and last/ complete, status final
    folder = res.run
    events = read_events(folder / "events.jsonl")
    kinds = [e["type"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("step") == 30 and kinds.count("eval") == 3
    step_ev = next(e for e in events if e["type"] == "step")
    assert {"loss", "lr", "tokens_per_s", "eta_s", "epoch"} <= set(step_ev)
    status = json.loads((folder / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == 30
    for link in ("best", "last"):
        assert (folder / link / "DONE").exists() and (folder / link / "model.safetensors").exists()
    prov = json.loads((folder / "best" / "gptchat.json").read_text())
    assert prov["from_scratch"] and prov["data"]["key"] and prov["metrics"]["val_loss"] == pytest.approx(res.best_val_loss)

    # `--model learn` resolves to best/; transformers loads it and computes the same logits
    ours, ck = load("learn")
    theirs = GPT2LMHeadModel.from_pretrained(str(ck.path)).eval()
    ids = torch.tensor([[464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]])
    with torch.no_grad():
        a, b = ours(ids), theirs(ids).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()


def test_resume_continues_the_same_loss_curve(corpus):
    # dropout draws from the global RNG, so the checkpoint's RNG state (and the dropout rate, which a
    # checkpoint's config.json does not carry) must come back exactly
    common = dict(data=[str(corpus)], steps=12, eval_every=4, batch_size=2, grad_accum=2, seed=3, dropout=0.1)
    fast = {**FAST, "batch_size": 2}
    straight = train(Settings(name="straight", **{**fast, **common}))
    first = train(Settings(name="paused", **{**fast, **common}), stop_at=6)
    assert first.status == "interrupted" and first.step == 6
    assert json.loads((first.run / "status.json").read_text())["state"] == "interrupted"
    resumed = train(resume="paused")
    assert resumed.status == "finished" and resumed.step == 12
    assert set(resumed.losses) == set(range(7, 13))
    for s in range(1, 13):
        got = first.losses[s] if s <= 6 else resumed.losses[s]
        assert got == straight.losses[s], s  # bit for bit: same batches, same RNG, same arithmetic
    assert resumed.val_losses[12] == straight.val_losses[12]
    # and the final weights agree
    from safetensors.torch import load_file

    a = load_file(str(straight.run / "last" / "model.safetensors"))
    b = load_file(str(resumed.run / "last" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0


def test_resume_refuses_unknown_runs_and_changed_data(corpus):
    with pytest.raises(TrainError, match="no run named 'ghost'"):
        train(resume="ghost")
    train(Settings(data=[str(corpus)], steps=2, eval_every=2, name="r1", **FAST), stop_at=1)
    corpus.write_text(corpus.read_text() + "\nmore text", encoding="utf-8")
    with pytest.raises(TrainError, match="data changed"):
        train(resume="r1")
    with pytest.raises(TrainError, match="exists already"):
        train(Settings(data=[str(corpus)], steps=2, name="r1", **FAST))


def test_bad_settings_are_usage_errors(corpus):
    for kw, msg in [
        (dict(steps=0), "--steps must be > 0"),
        (dict(val_fraction=1.5), "--val-fraction"),
        (dict(block_size=4096), "over GPT-2's 1024"),
        (dict(steps=3, epochs=1.0), "--steps or --epochs"),
        (dict(lr=5.0), "far too large"),
        (dict(arch="huge"), "unknown --arch"),
        (dict(name="a/b"), "--name"),
        (dict(template="zero-shot"), "--format jsonl"),
    ]:
        with pytest.raises(UsageError, match=msg):
            train(Settings(data=[str(corpus)], **{**FAST, **kw}))
    with pytest.raises(UsageError, match="--lora-targets"):
        train(Settings(data=[str(corpus)], model="x", lora=True, lora_targets="q,z"))


def test_plan_refuses_what_cannot_fit(corpus, monkeypatch):
    from gptchat.core.train import plan

    monkeypatch.setattr(plan, "available_bytes", lambda device: 64 << 20)  # a 64 MiB machine
    with pytest.raises(TrainError, match=r"needs about .* GiB .*--grad-checkpointing, --lora"):
        train(Settings(data=[str(corpus)], steps=2, name="big", **{**FAST, "arch": "tiny", "block_size": 256}))
    assert not (runs_root() / "big").exists()  # a run that cannot start leaves no folder to block its name


def test_lora_adapters_on_q_v_parts_merge_exactly():
    from gptchat.core.model.config import GPTConfig
    from gptchat.core.model.gpt import GPT
    from gptchat.core.train.lora import add_lora, plain_model

    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=100)
    model = GPT(cfg)
    model.init_weights(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = add_lora(model, ["q", "v", "fc"], rank=4, alpha=8)
    assert names and all("lora_" in n for n in names)
    assert sum(p.requires_grad for p in model.parameters()) == len(names)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    ids = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        want = model(ids)
        merged = plain_model(model)
        got = merged(ids)
    assert torch.allclose(want, got, atol=1e-5), (want - got).abs().max()
    w0, w1 = before["transformer.h.0.attn.c_attn.weight"], merged.state_dict()["transformer.h.0.attn.c_attn.weight"]
    d = cfg.n_embd
    assert not torch.equal(w0[:d], w1[:d])  # q adapted
    assert torch.equal(w0[d : 2 * d], w1[d : 2 * d])  # k untouched
    assert not torch.equal(w0[2 * d :], w1[2 * d :])  # v adapted
    assert torch.equal(before["transformer.h.1.attn.c_proj.weight"], merged.state_dict()["transformer.h.1.attn.c_proj.weight"])


def test_lora_finetune_trains_only_adapters_and_exports_merged_weights(tmp_path, corpus):
    from safetensors.torch import load_file

    from gptchat.core.weights.checkpoints import load
    from gptchat.core.train.lora import add_lora
    from tests.factory import hf_model, save

    base_dir = save(hf_model(n_layer=2, n_head=4, n_embd=64, n_positions=64, seed=1), tmp_path / "base")
    res = train(Settings(data=[str(corpus)], model=str(base_dir), lora=True, lora_rank=4, lora_targets="q,v,o",
                         steps=6, eval_every=3, block_size=32, batch_size=4, eval_batches=2, sample_tokens=0,
                         lr=1e-2, name="lora"))
    assert res.status == "finished"
    assert res.losses[6] < res.losses[1]
    base = load_file(str(base_dir / "model.safetensors"))  # HF layout: c_attn is [in, 3*out]
    out = load_file(str(res.run / "last" / "model.safetensors"))
    assert set(out) == set(base)
    d = 64
    for k in base:
        if k.endswith("attn.c_attn.weight"):
            assert not torch.equal(base[k][:, :d], out[k][:, :d])  # q
            assert torch.equal(base[k][:, d : 2 * d], out[k][:, d : 2 * d])  # k: not a target
            assert not torch.equal(base[k][:, 2 * d :], out[k][:, 2 * d :])  # v
        elif k.endswith("attn.c_proj.weight"):
            assert not torch.equal(base[k], out[k])
        else:
            assert torch.equal(base[k], out[k]), k  # frozen
    # the merged export computes what base + adapters compute
    trainer = torch.load(res.run / "last" / "trainer.pt", weights_only=True)
    live, _ = load(str(base_dir))
    add_lora(live, ["q", "v", "o"], 4, 16.0)
    with torch.no_grad():
        for n, p in live.named_parameters():
            if n in trainer["adapters"]:
                p.copy_(trainer["adapters"][n])
    exported, _ = load("lora")
    ids = torch.randint(0, 50257, (1, 20))
    with torch.no_grad():
        a, b = live(ids), exported(ids)
    assert torch.allclose(a, b, atol=1e-3, rtol=1e-4), (a - b).abs().max()
    assert not math.isnan(res.best_val_loss)


def test_lora_runs_with_the_same_seed_are_identical(tmp_path, corpus):
    from tests.factory import hf_model, save

    base_dir = save(hf_model(n_layer=1, n_head=2, n_embd=32, n_positions=64, seed=1), tmp_path / "base")
    kw = dict(data=[str(corpus)], model=str(base_dir), lora=True, lora_rank=2, steps=3, eval_every=3, block_size=32,
              batch_size=2, eval_batches=1, sample_tokens=0, lr=1e-2)
    first = train(Settings(name="lora-a", **kw))
    torch.rand(7)  # the global RNG moved on: the adapters' initial weights must not depend on it
    second = train(Settings(name="lora-b", **kw))
    assert first.losses == second.losses
    assert first.losses[3] != first.losses[1]  # the adapters did train
