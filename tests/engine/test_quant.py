"""int8 weights (every Linear and the tied head): quality against fp32 on a trained model, and the engine.

Tolerances, measured on the trained byte-level model of core/bench/quality.py (fp32 logits' std
2.06): mean |logit - fp32 logit| below 0.02 and greedy agreement at least 97% (measured: the AVX2
kernel 0.0036 and 99.2% of 384 positions, fbgemm's 7-bit activations 0.0101 and 98.4%; see quant.py). Random weights are not used for quality: their near-flat logits make any argmax a coin toss.
"""

from __future__ import annotations

import pytest
import torch

from gptchat.core.bench import quality
from gptchat.core.generate.engine import Engine
from gptchat.core.generate.sampling import SamplingParams
from gptchat.core.model import intmm, quant
from tests.cli.test_batch import cli  # `gptchat ARGS` in-process: (exit code, stdout, stderr)
from tests.factory import hf_model, save, spy

pytestmark = pytest.mark.skipif(not quant.available(), reason="this PyTorch has no fbgemm int8 kernels")


@pytest.fixture(scope="module")
def trained():
    return quality.tiny_trained_model()


def test_int8_tracks_fp32_on_a_trained_model(trained):
    q = quality.compare(trained, "int8")
    assert q.logit_std > 1.0, "the model did not train: its logits are flat"
    assert q.mean_abs_logit_diff < 0.02, q
    assert q.greedy_agreement >= 0.97, q
    assert q.positions == 8 * 48


def test_quantize_rows_round_trips_within_half_a_step():
    w = torch.randn(64, 32) * torch.linspace(0.01, 3, 64)[:, None]  # rows of very different scales
    q, scale = quant.quantize_rows(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-6).all()


def test_every_linear_and_the_head_are_quantized(trained):
    import copy

    m = quant.quantize_model(copy.deepcopy(trained))
    assert not any(isinstance(x, torch.nn.Linear) for x in m.modules())
    assert isinstance(m.lm_head, quant.QuantLinear)
    w = trained.transformer.wte.weight
    assert m.lm_head.dequantize().shape == (256, 64)
    assert (m.lm_head.dequantize() - w).abs().max() <= w.abs().amax() / 254 + 1e-6  # half a step of the widest row
    assert quant.is_quantized(m) and not quant.is_quantized(trained)
    with pytest.raises(ValueError, match="unknown quantization"):
        quant.quantize_model(copy.deepcopy(trained), "int4")


def test_engine_decodes_int8_like_fp32(tmp_path):
    folder = save(hf_model(seed=5), tmp_path / "m")
    full = Engine.load(str(folder), device="cpu", dtype="fp32")
    low = Engine.load(str(folder), device="cpu", quantize="int8")
    assert low.quantize == "int8" and quant.is_quantized(low.model)
    prompt = list(range(300, 320))
    steps = [[t.token for t in step] for step in low.generate([prompt, prompt[:7]], SamplingParams(greedy=True), 6)]
    assert len(steps) == 6 and all(len(s) == 2 for s in steps)
    with torch.inference_mode():
        a = full.prefill(torch.tensor([prompt]), None, None)
        b = low.prefill(torch.tensor([prompt]), None, None)
    # random factory weights (std 0.3) make large logits; int8 follows them closely in relative terms
    assert torch.corrcoef(torch.stack([a[0], b[0]]))[0, 1] > 0.99


def test_quantlinear_rows_do_not_depend_on_their_batch():
    torch.manual_seed(0)
    lin = quant.QuantLinear.from_float(torch.randn(96, 64) * 0.1, torch.randn(96))
    x = torch.randn(9, 64) * torch.logspace(-3, 3, 9)[:, None]  # rows six orders of magnitude apart
    x[4] = x[4].abs()  # a row with no negative entry
    x[7] = 0.0  # and one of zeros
    with torch.inference_mode():
        together = lin(x.view(3, 3, 64)).view(9, 96)
        for i in range(9):
            assert torch.equal(lin(x[i : i + 1])[0], together[i]), i  # bit for bit


def test_quantlinear_matches_fp32_within_its_stated_error():
    # 7-bit activations x int8 weights: the error, relative to the output's mean size, stays below
    # 2% (measured 0.8-1.2% over these shapes)
    torch.manual_seed(1)
    for n_out, n_in in ((96, 64), (768, 768), (256, 3072)):
        w, b, x = torch.randn(n_out, n_in) * 0.05, torch.randn(n_out) * 0.1, torch.randn(5, n_in)
        lin = quant.QuantLinear.from_float(w, b)
        with torch.inference_mode():
            y, ref = lin(x), torch.nn.functional.linear(x, w, b)
        assert (y - ref).abs().mean() < 0.02 * ref.abs().mean(), (n_out, n_in)
        assert torch.allclose(lin.dequantize(), w, atol=w.abs().amax().item() / 254 + 1e-6)


def test_a_prompt_decodes_the_same_alone_and_in_a_batch(trained):
    import copy

    eng = Engine(copy.deepcopy(trained), quantize="int8", vocab_limit=256, eos_id=None)
    prompts = [p[:n] for p, n in zip(quality.prompt_set(256, n=5).tolist(), (36, 7, 23, 30, 12))]
    greedy = SamplingParams(greedy=True)

    def run(batch):
        out = {i: [] for i in range(len(batch))}
        for step in eng.generate(batch, greedy, 8, ignore_eos=True):
            for t in step:
                out[t.row].append(t.token)
        return [out[i] for i in range(len(batch))]

    together = run(prompts)
    assert together == [run([p])[0] for p in prompts]
    assert len({tuple(t) for t in together}) > 1  # the rows are not all alike


def test_int8_loads_tensor_by_tensor_into_the_same_model(tmp_path):
    import copy

    from gptchat.core.errors import CheckpointError
    from gptchat.core.generate.loaded import open_model
    from gptchat.core.weights.checkpoints import load

    hf = hf_model(seed=3)
    for fmt in ("safetensors", "nanogpt"):  # nanoGPT files carry the tied head as a tensor of its own
        path = save(hf, tmp_path / fmt, fmt=fmt)
        streamed = open_model(str(path), device="cpu", quantize="int8").engine.model
        assert isinstance(streamed.transformer.wte, quant.QuantEmbedding)  # no float copy of wte kept
        assert not any(isinstance(m, (torch.nn.Linear, torch.nn.Embedding)) and m is not streamed.transformer.wpe
                       for m in streamed.modules())
        after = quant.quantize_model(copy.deepcopy(load(str(path), device="cpu")[0]))
        ids = torch.tensor([[5, 300, 7000, 11, 50256, 42]])
        with torch.inference_mode():
            assert torch.equal(streamed(ids), after(ids)), fmt
    sd = torch.load(tmp_path / "nanogpt" / "ckpt.pt", weights_only=True)
    sd["model"]["_orig_mod.lm_head.weight"] = sd["model"]["_orig_mod.lm_head.weight"] * 1.5  # untied
    torch.save(sd, tmp_path / "nanogpt" / "ckpt.pt")
    with pytest.raises(CheckpointError, match="lm_head.weight differs from wte"):
        open_model(str(tmp_path / "nanogpt" / "ckpt.pt"), device="cpu", quantize="int8")


def test_head_loss_equals_the_full_cross_entropy_and_its_gradients():
    from gptchat.core.train.evaluate import head_loss, loss_fn

    torch.manual_seed(0)
    h = torch.randn(2, 37, 16, requires_grad=True)
    w = torch.randn(100, 16, requires_grad=True)
    y = torch.randint(0, 100, (2, 37))
    y[0, :5] = -1  # ignored positions
    full = loss_fn(h @ w.t(), y)
    full.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    chunked = head_loss(h, w, y, chunk=10)  # 74 rows: 7 full chunks and a short one
    chunked.backward()
    assert torch.allclose(full, chunked, atol=1e-5)
    assert torch.allclose(gh, h.grad, atol=1e-6) and torch.allclose(gw, w.grad, atol=1e-6)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return save(hf_model(seed=7), tmp_path_factory.mktemp("q") / "m")


def test_batch_quantize_int8_writes_every_row_from_the_int8_model(small, tmp_path, capfd):
    import json

    from gptchat.core.generate.loaded import open_model
    from gptchat.core.generate.text import GenOptions, complete

    prompts = ["Hello there", "The capital of France is", "1, 2, 3,"]
    src = tmp_path / "p.txt"
    src.write_text("\n".join(prompts) + "\n")
    # the rows run batched; each must equal the same prompt completed alone
    code, out, err = cli(capfd, "batch", src, "-m", small, "--greedy", "-n", "6", "--device", "cpu",
                          "--quantize", "int8")
    assert code == 0, err
    recs = sorted((json.loads(line) for line in out.splitlines()), key=lambda r: r["id"])  # stdout: as finished
    assert [r["id"] for r in recs] == ["1", "2", "3"] and all(r["quantize"] == "int8" for r in recs)
    low = open_model(str(small), device="cpu", quantize="int8")
    for r, p in zip(recs, prompts):
        ref = complete(low.engine, low.tokenizer, low.tokenizer.encode(p), GenOptions(SamplingParams(greedy=True), 6))
        assert (r["completion"], r["completion_tokens"]) == (ref.text, ref.completion_tokens), p
    code, out, err = cli(capfd, "batch", src, "-m", small, "--greedy", "-n", "2", "--device", "cpu")
    assert code == 0, err
    assert all("quantize" not in json.loads(line) for line in out.splitlines())  # fp32 records are as before
    code, out, err = cli(capfd, "batch", src, "-m", small, "--device", "cpu", "--quantize", "int4")
    assert code != 0 and out == "" and "int4" in err


def test_eval_scores_the_int8_model_through_its_quantized_head(small, tmp_path, capfd):
    import json

    (tmp_path / "h.txt").write_text("the cat sat on the mat. " * 30)
    runs = {}
    for q in ("none", "int8"):
        code, out, err = cli(capfd, "eval", tmp_path / "h.txt", "-m", small, "--device", "cpu", "--quantize", q,
                              "--json")
        assert code == 0, err
        runs[q] = json.loads(out)["results"][0]
    assert runs["int8"]["quantize"] == "int8" and runs["none"]["quantize"] == "none"
    assert runs["int8"]["tokens"] == runs["none"]["tokens"]
    # random factory weights: int8 follows fp32's loss to within a few percent, and is not the same number
    assert abs(runs["int8"]["loss"] - runs["none"]["loss"]) < 0.05 * runs["none"]["loss"]
    assert runs["int8"]["loss"] != runs["none"]["loss"]


def test_compare_runs_the_panes_on_int8_weights(small, capfd):
    import json

    runs = {}
    for q in ("none", "int8"):
        code, out, err = cli(capfd, "compare", "The capital of France is", "-m", small, "--device", "cpu", "--seed", "3",
                              "--max-new-tokens", "4", "--quantize", q, "--json")
        assert code == 0, err
        doc = json.loads(out)
        assert doc["quantize"] == q
        runs[q] = doc["results"][0]["panes"][0]["mean_logprob"]
    # the same seed and prompt: int8 scores its reply close to fp32's, and not identically
    assert runs["int8"] != runs["none"] and abs(runs["int8"] - runs["none"]) < 0.1 * abs(runs["none"]) + 0.05
    code, out, err = cli(capfd, "compare", "hi", "-m", small, "--device", "cpu", "--quantize", "int4")
    assert code != 0 and "int4" in err


# -- the AVX2 kernel (core/model/native.py) and the fbgemm fallback ---------------------------------------------------


def _fbgemm_linear(q, scale, bias, monkeypatch):
    """A QuantLinear on fbgemm's kernel, as built where the AVX2 kernel cannot be had."""
    from gptchat.core.model import native

    with monkeypatch.context() as m:
        m.setattr(native, "kernel", lambda: None)
        return quant.QuantLinear(q, scale, bias)


@pytest.mark.skipif(quant.native.kernel() is None, reason="the AVX2 int8 kernel cannot be built here")
def test_the_avx2_kernel_computes_exact_integer_products(monkeypatch):
    monkeypatch.setenv("GPTCHAT_INTMM", "0")  # 17 rows too on the C kernel (tests/engine/test_intmm.py: the other way)
    # reference in float64: x rounded per row to int16 (scale max|x| / 32639), products and sums exact,
    # then the two scales and the bias; the kernel's only rounding is its fp32 sum of int32 partials
    torch.manual_seed(2)
    for n_out, n_in in ((5, 40), (96, 64), (50, 3072), (7, 33)):  # rows not a multiple of 4, inputs of 32
        w, b = torch.randn(n_out, n_in) * 0.05, torch.randn(n_out)
        q, scale = quant.quantize_rows(w)
        for bias in (b, None):
            lin = quant.QuantLinear(q, scale, bias)
            assert lin.native
            for rows in (1, 2, 3, 17):
                x = torch.randn(rows, n_in) * torch.logspace(-2, 2, rows)[:, None]
                xs = x.abs().amax(dim=1, keepdim=True) / 32639
                x16 = torch.round(x * (1 / xs)).double()  # fp32 x times the reciprocal, half to even, as the kernel
                ref = (x16 @ q.double().t()) * xs.double() * scale.double()
                if bias is not None:
                    ref = ref + bias.double()
                with torch.inference_mode():
                    y = lin(x)
                err = ((y.double() - ref).abs() / ref.abs().amax(dim=1, keepdim=True)).max().item()
                assert err < 1e-6, (n_out, n_in, rows, bias is None, err)
            assert torch.equal(lin.dequantize(), q.float() * scale[:, None])


@pytest.mark.skipif(quant.native.kernel() is None, reason="the AVX2 int8 kernel cannot be built here")
@pytest.mark.parametrize("bias", [False, True])
def test_many_rows_go_through_dequantized_panels_and_the_table_reads_the_head(bias, monkeypatch):
    monkeypatch.setenv("GPTCHAT_INTMM", "0")  # the fp32 ways (the int8 GEMM's: tests/engine/test_intmm.py)
    torch.manual_seed(3)
    w = torch.randn(300, 40) * 0.05  # 300 outputs: 18 panels of 16 and a short one; 40 inputs: a padded group
    q, scale = quant.quantize_rows(w)
    b = torch.randn(300) if bias else None
    lin = quant.QuantLinear(q, scale, b)
    x = torch.randn(quant.NATIVE_ROWS + 5, 40)
    with torch.inference_mode():
        y = lin(x)
        ref = x @ (q.float() * scale[:, None]).t()
        assert torch.allclose(y, ref + (b if bias else 0), atol=1e-5)
        # the kernel on the first rows of the same call agrees with the panels within int16 rounding
        assert torch.allclose(lin(x[:3]), y[:3], atol=1e-4 * y.abs().max().item())
        table = quant.QuantEmbedding(q, scale, lin)
        idx = torch.tensor([[0, 299, 5], [3, 4, 7]])
        assert torch.equal(table(idx), (q.float() * scale[:, None])[idx])
        assert not hasattr(table, "q")  # the head's packed rows are the only copy
        fb = _fbgemm_linear(q, scale, None, monkeypatch)
        assert not fb.native and torch.allclose(fb(x), ref, atol=0.02 * ref.abs().mean().item() * 10)
        assert torch.equal(quant.QuantEmbedding(q, scale, fb)(idx), table(idx))  # fbgemm: the table keeps q


@pytest.mark.skipif(quant.native.kernel() is None, reason="the AVX2 int8 kernel cannot be built here")
@pytest.mark.parametrize("bias", [False, True])
def test_many_rows_take_whichever_way_was_timed_faster_and_both_give_the_product(bias, monkeypatch):
    """PyTorch's GEMM on blocks of dequantized weights (outputs past a block of GEMM_BLOCK, a short last block)
    and the panel kernel give the dequantized weight's product; ``_many_rows`` takes the one
    ``native.gemm_beats_panels`` chose, which it times once a process."""
    monkeypatch.setenv("GPTCHAT_INTMM", "0")  # where the int8 GEMM is not taken
    gen = torch.Generator().manual_seed(8)
    n, k = quant.GEMM_BLOCK + 37, 72
    q, scale = quant.quantize_rows(torch.randn(n, k, generator=gen) * 0.05)
    b = torch.randn(n, generator=gen) if bias else None
    lin = quant.QuantLinear(q, scale, b)
    x = torch.randn(quant.NATIVE_ROWS + 40, k, generator=gen)
    ref = torch.nn.functional.linear(x.double(), (q.double() * scale.double()[:, None]), None if b is None else b.double())
    with torch.inference_mode():
        for way in (lin._through_gemm, lin._through_panels):
            y = way(x)
            assert y.shape == (x.shape[0], n) and torch.allclose(y.double(), ref, atol=1e-5, rtol=1e-5), way.__name__
        assert isinstance(quant.native.gemm_beats_panels(), bool)
        assert quant.native.gemm_beats_panels.cache_info().currsize == 1  # timed once
        for faster in (True, False):
            monkeypatch.setattr(quant.native, "gemm_beats_panels", lambda f=faster: f)
            calls = spy(monkeypatch, quant.QuantLinear, "_through_gemm" if faster else "_through_panels")
            lin(x)
            assert len(calls) == 1


def test_without_a_compiler_int8_falls_back_to_fbgemm_and_says_why(tmp_path, monkeypatch, caplog):
    import logging

    from gptchat.core.model import native

    monkeypatch.setenv("GPTCHAT_KERNELS", str(tmp_path / "kernels"))
    monkeypatch.setenv("CC", "false")  # a "compiler" that fails every build
    monkeypatch.setattr(native.shutil, "which", lambda cc: "/bin/false" if cc == "false" else None)
    with caplog.at_level(logging.INFO, logger=native.log.name):
        assert native.kernel.__wrapped__() is None
    reasons = [r.getMessage() for r in caplog.records]
    expected = "no AVX2/FMA" if not {"avx2", "fma"} <= native.cpu_flags() else "the build failed"
    assert any(expected in r for r in reasons), reasons
    assert not any(tmp_path.rglob("*.so"))  # nothing half-built left in the cache
    monkeypatch.setenv("GPTCHAT_NATIVE", "0")
    assert native.kernel.__wrapped__() is None


@pytest.mark.skipif(quant.native.kernel() is None, reason="the C kernels cannot be built here")
def test_one_query_attention_equals_pytorchs():
    import torch.nn.functional as F

    from gptchat.core.model import native

    torch.manual_seed(4)
    for rows, n, hs in ((1, 1, 64), (1, 257, 64), (3, 40, 16), (2, 1024, 64)):
        cache_k, cache_v = torch.randn(2, rows, 12, 1100, hs).unbind(0)  # slots beyond n are never read
        k, v = cache_k[:, :, :n], cache_v[:, :, :n]
        q = torch.randn(rows, 1, 3, 12, hs).permute(2, 0, 3, 1, 4)[0] * 3  # strided, as c_attn's view gives it
        assert native.can_attend(q, k, v)
        ref = F.scaled_dot_product_attention(q, k, v, scale=0.125).transpose(1, 2).reshape(rows, 1, 12 * hs)
        assert torch.allclose(native.attend(q, k, v, 0.125), ref, atol=1e-5), (rows, n, hs)
        # bf16 caches (a bf16 model's batched decode): widened as read, fp32 sums, the output rounded to bf16
        qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
        assert native.can_attend(qb, kb, vb) and not native.can_attend(qb, k, v)
        got = native.attend(qb, kb, vb, 0.125)
        ref = F.scaled_dot_product_attention(qb.float(), kb.float(), vb.float(), scale=0.125)
        ref = ref.transpose(1, 2).reshape(got.shape)
        assert got.dtype == torch.bfloat16 and ((got.float() - ref).abs() <= ref.abs() * 2**-8 + 1e-5).all()
        # a padded batch's rows: each sees its own slots (its first always), fp32 and bf16 caches under fp32 queries
        vis = torch.rand(rows, n) < 0.6
        vis[:, 0] = True
        mask = vis[:, None, None, :]
        assert native.can_attend(q, k, v, mask) and native.can_attend(q, kb, vb, mask)
        assert not native.can_attend(q, k, v, mask[..., :-1] if n > 1 else mask.float())
        for kk, vv in ((k, v), (kb, vb)):
            ref = F.scaled_dot_product_attention(q, kk.float(), vv.float(), attn_mask=mask, scale=0.125)
            ref = ref.transpose(1, 2).reshape(rows, 1, 12 * hs)
            got = native.attend(q, kk, vv, 0.125, mask)
            assert got.dtype == torch.float32 and torch.allclose(got, ref, atol=1e-5), (rows, n, hs, kk.dtype)
    assert not native.can_attend(q[..., :12], k[..., :12], v[..., :12])  # head size not a multiple of 8
    assert not native.can_attend(q.double(), k.double(), v.double())


def test_bench_says_which_int8_kernel_ran(monkeypatch):
    from gptchat.core.bench import engine as bench
    from gptchat.core.model import native

    readings = iter([10.0, 20.0, 40.0])  # at the start, before the batch-1 decode run, after it
    monkeypatch.setattr(bench, "read_bandwidth", lambda *a: next(readings))
    monkeypatch.setattr(bench, "_quality", lambda *a, **k: None)  # nor the quality measurement
    rep = bench.run(shape="tiny", prompt_tokens=8, new_tokens=2, batch_sizes=(1,), reference=False, repeats=1,
                    quantize="int8")
    described = f" ({intmm.describe(quant.NATIVE_ROWS)})" if intmm.describe(quant.NATIVE_ROWS) else ""
    assert rep.int8_kernel == ("avx2" + described if native.kernel() is not None else "fbgemm")
    assert rep.bandwidth_samples == [10.0, 20.0, 40.0] and rep.bandwidth_gbs == 20.0  # the ceiling's: their median
    b1 = next(r for r in rep.results if r.name.startswith("decode batch 1"))
    assert b1.ceiling == 20.0e9 / rep.weight_bytes
    # the fraction: the one run against the mean of the readings around it (30 GB/s), not the median ceiling
    assert b1.fraction == b1.paired == pytest.approx(b1.ours * rep.weight_bytes / 30.0e9)
    assert "read bandwidth 20.0 GB/s (median of 3 readings, 10.0-40.0)" in bench.format_report(rep)
    assert "of ceiling (batch 1): the median over runs" in bench.format_report(rep)
    assert f"int8 kernel: {rep.int8_kernel}" in bench.format_report(rep)
    assert rep.decode_step == ("one C call" if native.kernel() is not None else "modules")
    assert f"batch-1 decode step: {rep.decode_step}" in bench.format_report(rep)
    # the prefill against its arithmetic at the best rate of PyTorch's products at its shapes, measured here
    pre = rep.results[0]
    assert pre.name == "prefill 8 tokens" and rep.product_gflops > 0
    assert pre.ceiling == pytest.approx(rep.prefill_gflop / rep.product_gflops)
    assert pre.fraction == pre.ceiling / pre.ours
    assert "prefill ceiling: its" in bench.format_report(rep)
    # the sampler is timed against softmax + torch.multinomial on the same logits, whatever the reference flag
    drawn = {r.name: r for r in rep.results if r.name.startswith("sampling step")}
    assert sorted(drawn) == ["sampling step, batch 1", "sampling step, batch 16"]
    assert all(r.unit == "ms" and r.ours > 0 and r.reference > 0 and r.ratio for r in drawn.values())
    assert " ms " in bench.format_report(rep)


def test_the_prefill_arithmetic_is_what_pytorch_counts(monkeypatch):
    """ceilings.prefill_flops against torch's FLOP counter on real forwards that compute the last ``tail``
    positions' logits (the last layer's rest on those only): their products as counted, plus causal attention
    (query i sees i + 1 keys), 4 C operations a key and query."""
    from torch.utils.flop_counter import FlopCounterMode

    from gptchat.core.bench.ceilings import prefill_flops
    from gptchat.core.model.config import GPTConfig
    from gptchat.core.model.gpt import GPT

    cfg = GPTConfig(n_layer=3, n_head=4, n_embd=64, n_positions=128, vocab_size=300)
    T, C, L = 50, cfg.n_embd, cfg.n_layer
    for tail in (1, 7):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            GPT(cfg).eval()(torch.randint(0, 300, (1, T)), tail=tail)
        counted = counter.get_flop_counts()["Global"]
        products = sum(n for op, n in counted.items() if str(op) in ("aten.addmm", "aten.mm"))
        attention = (L - 1) * sum(4 * C * (i + 1) for i in range(T)) + sum(4 * C * (i + 1) for i in range(T - tail, T))
        assert products + attention == prefill_flops(cfg, T, tail), tail


def test_bench_pairs_each_decode_run_with_the_readings_around_it():
    from gptchat.core.bench.ceilings import paired_fraction

    # 100 tokens a run, 100 MB a token: runs of 1, 2 and 4 s between readings of 10, 30, 10 and 10 GB/s
    assert paired_fraction([1.0, 2.0, 4.0], [10.0, 30.0, 10.0, 10.0], 100, 10**8) == pytest.approx(0.25)
    # (0.5 against 20 GB/s, 0.25 against 20, 0.25 against 10: the median)


@pytest.mark.parametrize("int8_rate", [300e9, 50e9])
def test_an_int8_prefill_ceiling_is_the_faster_of_the_fp32_and_int8_products(int8_rate, monkeypatch):
    """A prompt of intmm.FEW rows or more may go to PyTorch's int8 GEMM: the bench's prefill ceiling is the
    better rate of the two kinds of products (here given, as if measured), and says which."""
    from gptchat.core.bench import engine as bench

    if not intmm.available():
        pytest.skip("no int8 GEMM in this PyTorch, or no C kernel")
    monkeypatch.setattr(bench, "read_bandwidth", lambda *a: 20.0)
    monkeypatch.setattr(bench, "_quality", lambda *a, **k: None)
    monkeypatch.setattr(bench, "product_rate", lambda *a, int8=False, **k: int8_rate if int8 else 100e9)
    rep = bench.run(shape="tiny", prompt_tokens=intmm.FEW, new_tokens=2, batch_sizes=(1,), reference=False,
                    repeats=1, quantize="int8")
    assert rep.product_gflops == max(int8_rate, 100e9) / 1e9 and rep.prefill_int8 == (int8_rate > 100e9)
    assert ("int8 products (two byte rows a row)" in bench.format_report(rep)) == rep.prefill_int8
