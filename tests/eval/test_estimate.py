"""`gptchat estimate`: the seeds' figures, and the memory model against real training steps on CPU.

Peak memory is measured with torch's profiler (``profile_memory=True``): it records every CPU
allocation and free made through torch's allocator, with its size, in order, so the running sum is
the exact live tensor memory and its maximum the peak, like tracemalloc for tensors. RSS would also
count the allocator's cached pages, the Python heap and torch's own libraries, and moves with
whatever else the process did, so it cannot resolve a few megabytes. The model, the optimizer and
two full steps run inside the profiled window, so the second step sees the Adam moments already
allocated, as every step after the first does.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from gptchat.core.eval import estimate as est
from gptchat.core.model.config import PRESETS, GPTConfig
from gptchat.core.model.gpt import GPT
from gptchat.core.train.evaluate import head_loss, loss_fn
from gptchat.core.train.lora import add_lora


def measured_peak(cfg: GPTConfig, batch: int, block: int, grad_checkpointing=False, lora=None,
                  full_logits=False) -> int:
    """Peak live tensor bytes over building the model and two AdamW training steps, with the trainer's loss
    (the tied head and cross-entropy by chunks, core/train/loop._loss), or with the full logits (FSDP's)."""
    torch.manual_seed(0)
    idx = torch.randint(0, cfg.vocab_size, (batch, block + 1))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model = GPT(cfg).train()
        if lora:
            add_lora(model, lora, rank=8, alpha=16)
        for b in model.transformer.h:
            b.grad_checkpointing = grad_checkpointing
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        for _ in range(2):
            if full_logits:
                logits = model(idx[:, :-1])
                loss = loss_fn(logits, idx[:, 1:].contiguous())
                del logits
            else:
                loss = head_loss(model(idx[:, :-1], return_hidden=True), model.lm_head.weight, idx[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            del loss
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


SHAPES = {  # (n_layer, n_head, n_embd, vocab, batch, block, grad checkpointing)
    "activations": (4, 4, 128, 512, 8, 256, False),
    "checkpointed": (4, 4, 128, 512, 8, 256, True),
    "gpt2-vocab": (2, 4, 64, 50257, 2, 64, False),
    "gpt2-vocab-chunks": (2, 4, 64, 50257, 4, 256, False),  # 1024 tokens: the head loss in two chunks
    "weights": (4, 4, 256, 50257, 1, 32, False),
    "wide-checkpointed": (6, 8, 256, 1024, 8, 256, True),
}


@pytest.mark.parametrize("name", SHAPES)
def test_training_memory_within_15_percent_of_a_measured_step(name):
    L, h, d, V, B, T, gc = SHAPES[name]
    cfg = GPTConfig(n_layer=L, n_head=h, n_embd=d, n_positions=max(T, 64), vocab_size=V)
    mem = est.training_memory(cfg, batch=B, block=T, grad_checkpointing=gc)
    got = measured_peak(cfg, B, T, gc)
    assert mem.activations > 0.2 * mem.total or name == "weights"  # the shapes exercise the activation formula
    assert abs(mem.total - got) / got < 0.15, f"estimate {mem.total / 1e6:.1f} MB, measured {got / 1e6:.1f} MB"


def test_full_logits_memory_within_15_percent_of_a_measured_step():
    """FSDP over several devices computes the full logits (core/train/loop._chunked_head): the head then holds
    ~3 x vocab floats a token, several times the chunked loss's at this shape, and the estimate says so."""
    L, h, d, V, B, T, gc = SHAPES["gpt2-vocab-chunks"]
    cfg = GPTConfig(n_layer=L, n_head=h, n_embd=d, n_positions=T, vocab_size=V)
    full = est.training_memory(cfg, batch=B, block=T, chunked_head=False)
    chunked = est.training_memory(cfg, batch=B, block=T)
    assert full.activations > 4 * chunked.activations
    assert est.training_memory(cfg, batch=B, block=T, fsdp_shards=2).activations == full.activations
    got = measured_peak(cfg, B, T, full_logits=True)
    assert abs(full.total - got) / got < 0.15, f"estimate {full.total / 1e6:.1f} MB, measured {got / 1e6:.1f} MB"


@pytest.mark.parametrize("d", [128, 256])
def test_mixed_precision_memory_within_15_percent_of_a_measured_step(d):
    """bf16 autocast on CPU: 16-bit activations over fp32 master weights; of autocast's weight copies, the
    fused steps leave only the token table's and the attention projections' cached."""
    cfg = GPTConfig(n_layer=4, n_head=4, n_embd=d, n_positions=256, vocab_size=512)
    mem = est.training_memory(cfg, batch=8, block=256, mixed=True)
    assert mem.weight_copies == 2 * (512 * d + 4 * d * d) < 2 * cfg.n_params()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = measured_peak(cfg, 8, 256)
    assert abs(mem.total - got) / got < 0.15, f"estimate {mem.total / 1e6:.1f} MB, measured {got / 1e6:.1f} MB"


def test_checkpointing_saves_what_it_says():
    cfg = GPTConfig(n_layer=4, n_head=4, n_embd=128, n_positions=256, vocab_size=512)
    full = est.activation_bytes(cfg, 8, 256)
    ckpt = est.activation_bytes(cfg, 8, 256, grad_checkpointing=True)
    assert ckpt < 0.5 * full
    assert measured_peak(cfg, 8, 256, True) < 0.6 * measured_peak(cfg, 8, 256, False)


def test_lora_memory_within_15_percent_of_a_measured_step():
    cfg = GPTConfig(n_layer=4, n_head=4, n_embd=128, n_positions=256, vocab_size=512)
    targets = ["q", "k", "v"]
    trainable = est.lora_params(cfg, 8, targets)
    model = GPT(cfg)
    add_lora(model, targets, rank=8, alpha=16)
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    mem = est.training_memory(cfg, batch=8, block=256, trainable=trainable, lora_targets=targets)
    assert mem.grads == trainable * 4 and mem.adam == trainable * 8
    assert est.block_values(targets) == 11 < est.block_values(None)  # frozen c_proj/c_fc keep no inputs
    got = measured_peak(cfg, 8, 256, lora=targets)
    assert abs(mem.total - got) / got < 0.15, f"estimate {mem.total / 1e6:.1f} MB, measured {got / 1e6:.1f} MB"


def test_the_seeds_figures():
    assert est.weight_bytes(10**9, "fp32") == 4 * 10**9  # 4 bytes a parameter: 4 GB per billion
    assert est.weight_bytes(10**9, "bf16") == 2 * 10**9 and est.weight_bytes(10**9, "int8") == 10**9
    fp32 = est.training_memory(None, params=10**9)
    mixed = est.training_memory(None, params=10**9, mixed=True)
    assert fp32.bytes_per_param == 16 and mixed.bytes_per_param == 18  # + gradients + Adam: 16-20
    assert fp32.weights + fp32.grads + fp32.adam == 16 * 10**9
    assert est.compute_optimal_tokens(10**9) == 20 * 10**9  # 20 tokens per parameter
    # GPT-3 175B on 300B tokens: 3.14e23 FLOPs (Brown et al. 2020, table D.1)
    assert est.compute_report(175e9, 300e9)["flops"] == pytest.approx(3.14e23, rel=0.01)


def test_llama2_7b_compute():
    r = est.compute_report(7e9, 2e12, devices=["a100"])
    assert r["flops"] == pytest.approx(8.4e22)
    assert r["petaflop_s_days"] == pytest.approx(8.4e22 / 8.64e19)
    # Touvron et al. 2023 report 184,320 A100 GPU-hours for Llama 2 7B: ~41% of the 312 TFLOPS peak
    assert r["time"]["a100"]["device_hours"] == pytest.approx(184_320, rel=0.05)


def test_shapes_and_kv_cache():
    gpt2 = PRESETS["gpt2"]
    assert gpt2.n_params() == 124_439_808
    assert est.kv_cache_bytes(gpt2, batch=1) == 2 * 12 * 1024 * 768 * 4  # 75.5 MB a sequence in fp32
    assert est.kv_cache_bytes(gpt2, batch=4, precision="bf16") == 2 * est.kv_cache_bytes(gpt2, batch=1)
    fsdp = est.training_memory(gpt2, batch=1, block=128, fsdp_shards=4)
    one = est.training_memory(gpt2, batch=1, block=128)
    assert fsdp.adam == one.adam // 4 and fsdp.total < one.total
    assert est.training_memory(gpt2, batch=1, block=128, ddp=True).ddp_buckets == one.grads
    with pytest.raises(ValueError):
        est.weight_bytes(1, "fp8")
    assert est.flops_per_token(100, trainable=10) == 4 * 100 + 6 * 10  # LoRA: frozen weights get no weight grads
    assert est.flops_per_token(gpt2.n_params(), gpt2, 1024) == 6 * gpt2.n_params() + 12 * 12 * 1024 * 768


def test_cpu_probe_measures_something():
    flops = est.measure_cpu_flops(0.2, n=256)
    assert 1e8 < flops < 1e14


def test_cli_json():
    r = subprocess.run([sys.executable, "-m", "gptchat.tui", "estimate", "--params", "7e9", "--tokens", "2e12",
                        "--json", "--no-measure"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["compute"]["flops"] == pytest.approx(8.4e22)
    r = subprocess.run([sys.executable, "-m", "gptchat.tui", "estimate", "gpt2-xl", "--train", "--lora",
                        "--grad-checkpointing", "--device", "a100", "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    t = json.loads(r.stdout)["training"]
    assert t["precision"] == "bf16" and t["trainable"] < t["params"] / 100
    r = subprocess.run([sys.executable, "-m", "gptchat.tui", "estimate", "-m", "gpt2-xl", "--json", "--no-measure"],
                       capture_output=True, text=True, timeout=120)  # -m as eval, generate and batch take it
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["config"]["n_layer"] == 48
    r = subprocess.run([sys.executable, "-m", "gptchat.tui", "estimate", "gpt2", "-m", "gpt2-xl", "--no-measure"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "two models given" in r.stderr and "Traceback" not in r.stderr


def test_cli_counts_the_data_files(tmp_path):
    (tmp_path / "one.txt").write_text("the cat sat on the mat. " * 20)
    (tmp_path / "two.txt").write_text("a dog ran. " * 20)
    for given, said in (([tmp_path / "one.txt"], "(1 file)"), ([tmp_path], "(2 files)")):
        data = [a for p in given for a in ("--data", str(p))]
        r = subprocess.run([sys.executable, "-m", "gptchat.tui", "estimate", "nano", "--no-measure", *data],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and f"counted with GPT-2's tokenizer {said}" in r.stdout, r.stdout + r.stderr


def test_plan_refuses_with_the_change_that_fits(monkeypatch):
    from gptchat.core.train import plan

    gpt2, cpu = PRESETS["gpt2"], torch.device("cpu")

    def make(batch, gc=False, avail=4 << 30):
        monkeypatch.setattr(plan, "available_bytes", lambda device: avail)
        return plan.make_plan(gpt2, trainable=gpt2.n_params(), batch=batch, block=1024, steps=1,
                              tokens_per_step=8 * 1024, device=cpu, amp_bytes=4, grad_checkpointing=gc, measure=False)

    p = make(8)
    assert not p.fits and p.total_b == est.training_memory(gpt2, batch=8, block=1024).total
    assert p.fix == "try --batch-size 4 with --grad-accum x2 (the same tokens per step)"
    assert p.fix in p.advice() and "--grad-checkpointing, --lora" in p.advice()
    assert make(4).fits and not make(8).fits  # the suggestion is the largest micro-batch that fits
    tight = make(8, avail=int(2.2 * (1 << 30)))
    assert tight.fix.startswith("try --lora")
