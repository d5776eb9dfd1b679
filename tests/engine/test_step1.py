"""The whole batch-1 decode step in C (core/model/step1.py): the same logits and cache as the modules."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch

from gptchat.core.generate.engine import Engine
from gptchat.core.generate.sampling import SamplingParams
from gptchat.core.model import flash, native, quant, step1
from gptchat.core.model.gpt import GPT
from gptchat.core.model.trial import Trial
from gptchat.core.train.lora import add_lora
from tests.factory import hf_model, save, small_gpt, spy, took
from tests.factory import threads as using

pytestmark = pytest.mark.skipif(native.kernel() is None, reason="the C kernels cannot be built here")


_model = small_gpt


def _decode(m: GPT, ids: list[int], prompt: int, monkeypatch, on: bool):
    """Logits of every decode step after a ``prompt``-token prefill, and the caches afterwards."""
    monkeypatch.setenv("GPTCHAT_STEP1", "1" if on else "0")
    out = []
    with torch.inference_mode():
        m.setup_cache(1, 64)
        if prompt:
            m(torch.tensor([ids[:prompt]]), start=0, kv_len=prompt)
        for i in range(prompt, len(ids)):
            out.append(m(torch.tensor([[ids[i]]]), start=i, kv_len=i + 1)[0, -1])
        caches = [(b.attn.kv_cache.k[:, :, : len(ids)].clone(), b.attn.kv_cache.v[:, :, : len(ids)].clone())
                  for b in m.transformer.h]
    return torch.stack(out), caches


SHAPES = [{}, dict(bias=False), dict(activation="relu"), dict(activation="gelu"),
          dict(scale_attn_by_inverse_layer_idx=True), dict(n_embd=96, n_head=3)]


def _case_id(case) -> str:
    kw, int8, kv_bf16 = case
    shape = ",".join(f"{k}={v}" for k, v in kw.items()) or "gpt2"
    return f"{shape}-{'int8' if int8 else 'fp32'}" + ("-bf16-cache" if kv_bf16 else "")


# every shape over fp32 caches; two over bf16 ones (an int8 engine's cache; fp32 weights read it alike)
STEP_CASES = [(kw, int8, False) for kw in SHAPES for int8 in (False, True)] + [
    (kw, int8, True) for kw in (SHAPES[0], SHAPES[-1]) for int8 in (True, False)]


@pytest.mark.parametrize("case", STEP_CASES, ids=_case_id)
def test_the_step_equals_the_modules(case, monkeypatch):
    """Over fp32 caches, and over bf16 ones: written rounded, read widened, by the step as by the modules
    (prefill, and the steps where it is off)."""
    kw, int8, kv_bf16 = case
    m = _model(**kw)
    m = quant.quantize_model(m) if int8 else m.to_inference_layout()
    m.kv_dtype = torch.bfloat16 if kv_bf16 else None
    assert step1.plan(m) is not None and step1.plan(m).kind == (step1.INT8 if int8 else step1.FP32)
    ids = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    calls = took(monkeypatch, step1, "run")
    for prompt in (0, 7):  # slot 0 (a one-token prompt) too
        calls.clear()
        ref, ref_cache = _decode(m, ids, prompt, monkeypatch, on=False)
        got, cache = _decode(m, ids, prompt, monkeypatch, on=True)
        assert sum(calls) == len(ids) - prompt  # every step of the second run, none of the first
        # fp32: the same sums in another order. int8: a layer norm or GELU a rounding apart moves an
        # activation's int16 code by one now and then (measured: 1e-4 of logits ~2 in size)
        tol = 1e-3 if int8 else 1e-5
        # a bf16 cache: a key or value a rounding apart now and then (one bf16 step, 2^-8 relative)
        tol_logits, tol_cache = (5e-3, 2e-2) if kv_bf16 else (tol, tol)
        assert (got - ref).abs().max() <= tol_logits * max(1.0, ref.abs().max().item()), (got - ref).abs().max()
        for (k, v), (rk, rv) in zip(cache, ref_cache):
            assert k.dtype == (torch.bfloat16 if kv_bf16 else torch.float32)
            assert (k - rk).abs().max() <= tol_cache and (v - rv).abs().max() <= tol_cache


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("kind", ["fp32", "int8", "bf16"])
def test_the_step_splits_its_work_over_any_number_of_threads(kind, threads, monkeypatch):
    """Each thread's share of a product is read as several streams: with 3 threads the shares of 64 and 256 inputs
    or outputs are not multiples of 4, which leaves rows over (the test machine has 2 cores)."""
    if kind == "bf16":
        m, ref_model = _bf16_pair()
    else:
        m = _model()
        m = quant.quantize_model(m) if kind == "int8" else m.to_inference_layout()
        ref_model = m
    ids = torch.randint(0, 300, (20,), generator=torch.Generator().manual_seed(5)).tolist()
    with using(threads):
        got, _ = _decode(m, ids, 4, monkeypatch, on=True)
        ref, _ = _decode(ref_model, ids, 4, monkeypatch, on=False)
    tol = {"fp32": 1e-5, "int8": 1e-3, "bf16": 5e-3}[kind]
    assert (got - ref).abs().max() <= tol * max(1.0, ref.abs().max().item())


def test_where_the_step_does_not_apply(monkeypatch):
    m = _model().to_inference_layout()
    assert step1.plan(m) is not None
    monkeypatch.setenv("GPTCHAT_STEP1", "0")
    assert step1.plan(m) is None
    monkeypatch.delenv("GPTCHAT_STEP1")
    assert step1.plan(_model()) is None  # the training layout ([out, in] rows)
    assert step1.plan(_model(n_embd=48, n_head=4).to_inference_layout()) is None  # head size 12: not a multiple of 8
    bf16 = _model().to(torch.bfloat16)
    bf16.transformer.h[1].mlp.c_fc.weight.data = bf16.transformer.h[1].mlp.c_fc.weight.data.t().contiguous().t()
    assert step1.plan(bf16) is None  # bf16 is read in [out, in] rows only
    half = _model().to_inference_layout()
    half.transformer.h[1].mlp.c_fc.to(torch.bfloat16)
    assert step1.plan(half) is None  # kinds mixed
    lora = _model().to_inference_layout()
    assert step1.plan(lora) is not None  # built, then changed: a LoRA adapter on every MLP input product
    add_lora(lora, ["fc"], rank=4, alpha=8.0)
    with torch.no_grad():
        for p in lora.parameters():
            if p.requires_grad:  # the adapters' B starts at zero: make them count
                p.normal_(0.0, 0.1)
    assert step1.plan(lora) is None
    ids = list(range(1, 12))
    got, _ = _decode(lora, ids, 3, monkeypatch, on=True)
    ref, _ = _decode(lora, ids, 3, monkeypatch, on=False)
    assert torch.allclose(got, ref)  # the modules ran both, adapters included
    monkeypatch.delenv("GPTCHAT_STEP1")
    with torch.inference_mode():
        m.setup_cache(2, 16)  # two rows: the modules
        assert step1.run(m, torch.tensor([[1]]), 0, 1) is None
        m.setup_cache(1, 16)
        assert step1.run(m, torch.tensor([[1]]), 3, 2) is None  # reading fewer slots than written: a mask's job
        assert step1.run(m, torch.tensor([[1]]), 16, 17) is None  # past the cache
        assert step1.run(m, torch.tensor([[1]]), 3, 4) is not None
        hidden = m(torch.tensor([[1]]), start=4, kv_len=5, return_hidden=True)  # eval's kind of call: no head
        assert hidden.shape == (1, 1, 64)
        monkeypatch.setenv("GPTCHAT_STEP1", "0")
        assert torch.allclose(hidden, m(torch.tensor([[1]]), start=4, kv_len=5, return_hidden=True), atol=1e-5)


def test_replaced_weights_rebuild_the_plan(monkeypatch):
    m = _model().to_inference_layout()
    first = step1.plan(m)
    assert step1.plan(m) is first  # kept between calls
    fresh = _model().to_inference_layout()
    with torch.no_grad():
        for p in fresh.parameters():
            p.mul_(1.5)
    m.load_state_dict(fresh.state_dict(), assign=True)
    m.lm_head.weight = m.transformer.wte.weight
    m.to_inference_layout()
    assert step1.plan(m) is not first
    ids = list(range(1, 12))
    got, _ = _decode(m, ids, 3, monkeypatch, on=True)
    ref, _ = _decode(copy.deepcopy(m), ids, 3, monkeypatch, on=False)
    assert torch.allclose(got, ref, atol=1e-4)


@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
def test_the_token_lookup_runs_in_the_step(int8, monkeypatch):
    """The token's row and its position's are read in C (no PyTorch op between two steps), as the modules read them;
    a token outside the table is refused as nn.Embedding refuses it."""
    m = _model()
    m = quant.quantize_model(m) if int8 else m.to_inference_layout()
    assert step1.plan(m).emb is not None
    with torch.inference_mode():
        for tok in (0, 299, 17):  # the table's first and last rows
            hidden = []
            for on in ("0", "1"):
                monkeypatch.setenv("GPTCHAT_STEP1", on)
                m.setup_cache(1, 16)
                hidden.append(m(torch.tensor([[tok]]), start=0, kv_len=1, return_hidden=True))
            assert (hidden[0] - hidden[1]).abs().max() <= (1e-3 if int8 else 1e-5)

        def boom(*a, **kw):
            raise AssertionError("the lookup ran in PyTorch")

        monkeypatch.setattr(m.transformer.wte, "forward", boom)
        monkeypatch.setattr(m.transformer.wpe, "forward", boom)
        m.setup_cache(1, 16)
        assert m(torch.tensor([[5]]), start=0, kv_len=1).shape == (1, 1, 300)
        for bad in (300, -1):
            with pytest.raises(IndexError):
                m(torch.tensor([[bad]]), start=1, kv_len=2)


def _bf16_pair(**kw) -> tuple[GPT, GPT]:
    """A bf16 model, and the fp32 model of the same weights (each rounded to bf16) in the inference layout."""
    m32 = _model(**kw)
    with torch.no_grad():
        for p in m32.parameters():
            p.copy_(p.bfloat16().float())
    return copy.deepcopy(m32).to(torch.bfloat16).to_inference_layout(), m32.to_inference_layout()


# widths whose rows end in 8 or 16 inputs past a multiple of 32 (the AVX-512 rows' last steps)
BF16_SHAPES = SHAPES + [dict(n_embd=72, n_head=9), dict(n_embd=80, n_head=5)]


@pytest.mark.parametrize("wide", ["1", "0"], ids=["avx512-rows", "avx2-rows"])
@pytest.mark.parametrize("kw", BF16_SHAPES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "gpt2")
def test_the_bf16_step_computes_in_fp32_on_bf16_weights(kw, wide, monkeypatch):
    """bf16 weights, norms, biases, tables and caches, widened as they are read: the step's logits equal the fp32
    modules' on the same (rounded) weights but for the cache's rounding to bf16, and are nearer them than the bf16
    modules' (which round every activation); the cache it writes is bf16, as the modules' is. Rows read in
    AVX-512 where the CPU has it, and in AVX2."""
    monkeypatch.setenv("GPTCHAT_WIDE", wide)
    assert native.wide() == (wide == "1" and native.avx512(bf16=False))
    m16, m32 = _bf16_pair(**kw)
    p = step1.plan(m16)
    assert p is not None and p.kind == step1.BF16 and p.emb is not None and p.head_rows == 1
    assert p.wide == native.wide()  # the rows this test means the step to read
    assert all(lin.weight.is_contiguous() for blk in m16.transformer.h for lin in (blk.attn.c_attn, blk.mlp.c_proj))
    ids = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    calls = took(monkeypatch, step1, "run")
    for prompt in (0, 7):
        calls.clear()
        mod, _ = _decode(m16, ids, prompt, monkeypatch, on=False)
        ref, ref_cache = _decode(m32, ids, prompt, monkeypatch, on=False)
        got, cache = _decode(m16, ids, prompt, monkeypatch, on=True)
        assert sum(calls) == len(ids) - prompt and got.dtype == torch.float32 and cache[0][0].dtype == torch.bfloat16
        scale = max(1.0, ref.abs().max().item())
        # measured 0.0016-0.0031 of the largest logit (the cache's rounding); a misplaced bias moves them ~0.05
        assert (got - ref).abs().max() <= 5e-3 * scale, (got - ref).abs().max()
        assert (got - ref).abs().max() < (mod.float() - ref).abs().max()
        for (k, v), (rk, rv) in zip(cache, ref_cache):
            for a, b in ((k, rk), (v, rv)):  # measured up to 0.35% of the largest entry (0.75% after a bf16 prefill)
                assert (a.float() - b).abs().max() <= (0.006 if prompt == 0 else 0.012) * b.abs().max()
    with torch.inference_mode():
        m16.setup_cache(1, 16)
        hidden = m16(torch.tensor([[5]]), start=0, kv_len=1, return_hidden=True)
        assert hidden.dtype == torch.bfloat16 and hidden.shape == (1, 1, m16.config.n_embd)  # as the modules return it
        with pytest.raises(IndexError):
            m16(torch.tensor([[300]]), start=1, kv_len=2)


def test_a_bf16_engine_decodes_batch_1_through_the_step_without_packed_copies(monkeypatch):
    m16, m32 = _bf16_pair()
    calls = took(monkeypatch, step1, "run")
    eng = Engine(m16)
    greedy = SamplingParams(greedy=True)
    got = [t.token for step in eng.generate([[1, 2, 3]], greedy, 12, ignore_eos=True) for t in step]
    assert len(got) == 12 and sum(calls) == 11 and eng._packed is None  # the step reads the model's own weights
    ref = [t.token for step in Engine(m32).generate([[1, 2, 3]], greedy, 12, ignore_eos=True) for t in step]
    assert got == ref


@pytest.mark.parametrize("rows", [True, False], ids=["head in its own rows", "head transposed"])
def test_the_fp32_head_is_read_in_either_order(rows, monkeypatch):
    m = _model().to_inference_layout()
    wte = m.transformer.wte.weight
    assert wte.is_contiguous()  # the inference layout leaves the tied table in its own [V, C] order here
    if not rows:
        wte.data = wte.data.t().contiguous().t()  # the order it has where the C kernels are not at hand
    p = step1.plan(m)
    assert p.head is not None and p.head_rows == int(rows)
    ids = torch.randint(0, 300, (20,), generator=torch.Generator().manual_seed(4)).tolist()
    got, _ = _decode(m, ids, 5, monkeypatch, on=True)
    ref, _ = _decode(m, ids, 5, monkeypatch, on=False)
    assert (got - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())


def test_the_plan_follows_new_caches_and_keeps_no_dropped_one():
    m = _model().to_inference_layout()
    with torch.inference_mode():
        m.setup_cache(1, 16)
        first = step1.run(m, torch.tensor([[1]]), 0, 1)
        old = weakref.ref(m.transformer.h[0].attn.kv_cache)
        m.drop_cache()
        gc.collect()
        assert old() is None  # the plan held it weakly
        m.setup_cache(1, 16)  # new buffers: read through new pointers
        assert torch.equal(step1.run(m, torch.tensor([[1]]), 0, 1), first)
        assert m.transformer.h[0].attn.kv_cache.k[0, :, 0].abs().sum() > 0  # written into the new cache


def test_replaced_tables_rebuild_the_plan(monkeypatch):
    m = _model().to_inference_layout()
    first = step1.plan(m)
    with torch.no_grad():
        m.transformer.wpe.weight = torch.nn.Parameter(m.transformer.wpe.weight * 2)
    assert step1.plan(m) is not first  # a table replaced: its pointer is not read any more
    ids = list(range(1, 12))
    got, _ = _decode(m, ids, 3, monkeypatch, on=True)
    ref, _ = _decode(m, ids, 3, monkeypatch, on=False)
    assert torch.allclose(got, ref, atol=1e-4)
    monkeypatch.setenv("GPTCHAT_STEP1", "1")
    second = step1.plan(m)
    m.transformer.wte = quant.QuantEmbedding(*quant.quantize_rows(m.transformer.wte.weight.detach()))
    third = step1.plan(m)
    assert third is not second and third.emb is None  # int8 rows of its own: looked up by the module
    got, _ = _decode(m, ids, 3, monkeypatch, on=True)
    ref, _ = _decode(m, ids, 3, monkeypatch, on=False)
    assert torch.allclose(got, ref, atol=1e-4)


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_the_engine_decodes_through_the_step(quantize, tmp_path, monkeypatch):
    folder = save(hf_model(seed=7), tmp_path / "m")
    greedy = SamplingParams(greedy=True)
    runs = {}
    for on in (False, True):
        monkeypatch.setenv("GPTCHAT_STEP1", "1" if on else "0")
        eng = Engine.load(str(folder), device="cpu", dtype="fp32", quantize=quantize)
        assert eng.kv_dtype == (torch.bfloat16 if quantize == "int8" else torch.float32)  # int8: a bf16 cache
        calls = took(monkeypatch, step1, "run")
        runs[on] = [t.token for step in eng.generate([[464, 2068, 7586]], greedy, 24, ignore_eos=True) for t in step]
        assert sum(calls) == (23 if on else 0)  # every decode step after the prefill, when on
        monkeypatch.undo()
    assert runs[True] == runs[False]


@pytest.mark.parametrize("wide", ["1", "0"])
def test_the_activation_kernel_equals_pytorchs(wide, monkeypatch):
    """wide: tanh GELU sixteen lanes at a time where the CPU has AVX-512 (else as with "0": eight)."""
    import torch.nn.functional as F

    monkeypatch.setenv("GPTCHAT_WIDE", wide)
    x = torch.cat([torch.linspace(-30, 30, 6001), torch.randn(10007) * 3])  # tails, and not a multiple of 8
    refs = {"gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "gelu": F.gelu, "relu": F.relu}
    for kind, ref in refs.items():
        h = x.clone()
        assert native.can_activate(h)
        assert native.activate_(h, kind) is h
        assert (h - ref(x)).abs().max() <= 2e-6 * max(1.0, x.abs().max().item()), kind
    assert not native.can_activate(x.clone().requires_grad_())  # autograd keeps PyTorch's
    assert not native.can_activate(x.view(2, -1).t())  # not contiguous
    xb = x.bfloat16()
    for kind, ref in refs.items():  # bf16: computed in fp32 on the bf16 values, stored rounded to nearest even
        h = xb.clone()
        assert native.can_activate(h) and native.activate_(h, kind) is h and h.dtype == torch.bfloat16
        want = ref(xb.float())
        assert ((h.float() - want).abs() <= want.abs() * 2**-8 + 2e-6 * 30).all(), kind
        assert kind == "relu" or (h.float() - want).abs().max() > 0  # rounded (relu is exact)
    assert not native.can_activate(x.half())
    g = torch.Generator().manual_seed(6)
    for width in (3072, 100, 7):  # rows that straddle the kernel's chunks of 8192 at every offset
        h0, b = torch.randn(11, width, generator=g) * 3, torch.randn(width, generator=g)
        for kind, ref in refs.items():  # with a bias: act(h + bias), one pass
            h = h0.clone()
            assert native.activate_(h, kind, b) is h
            assert (h - ref(h0 + b)).abs().max() <= 2e-6 * 30, (width, kind)
    with pytest.raises(ValueError):
        native.activate_(xb.clone(), "gelu", torch.zeros(xb.shape[-1]))  # bf16 h takes no bias


def test_causal_attention_equals_pytorchs():
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(5)
    for B, T, nh, hs, slots in ((1, 1000, 12, 64, 1024), (2, 37, 3, 16, 40), (1, 5, 4, 24, 8), (3, 130, 2, 64, 130),
                                (1, 2, 1, 8, 2)):
        qkv = torch.randn(B, T, 3 * nh * hs, generator=g) * 2
        q, k, v = qkv.view(B, T, 3, nh, hs).permute(2, 0, 3, 1, 4).unbind(0)  # strided, as c_attn's view gives it
        cache_k, cache_v = torch.full((2, B, nh, slots, hs), float("nan")).unbind(0)  # slots past T never read
        cache_k[:, :, :T], cache_v[:, :, :T] = k, v
        assert native.can_attend_causal(q, cache_k, cache_v)
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3).transpose(1, 2).reshape(B, T, nh * hs)
        got = native.attend_causal(q, cache_k, cache_v, 0.3)
        assert (got - ref).abs().max() <= 2e-5, (B, T, nh, hs)
        # bf16 (a bf16 model's prefill): the sums in fp32 on the bf16 values, the output rounded to bf16
        qb, kb, vb = q.bfloat16(), cache_k.bfloat16(), cache_v.bfloat16()
        assert native.can_attend_causal(qb, kb, vb) and not native.can_attend_causal(qb, cache_k, cache_v)
        got = native.attend_causal(qb, kb, vb, 0.3)
        ref = F.scaled_dot_product_attention(qb.float(), kb[:, :, :T].float(), vb[:, :, :T].float(), is_causal=True,
                                             scale=0.3).transpose(1, 2).reshape(got.shape)
        assert got.dtype == torch.bfloat16 and ((got.float() - ref).abs() <= ref.abs() * 2**-8 + 1e-5).all()
    assert not native.can_attend_causal(q.clone().requires_grad_(), cache_k, cache_v)
    assert not native.can_attend_causal(q[:, :, :1], cache_k, cache_v)  # one query: ``attend``'s


@pytest.mark.parametrize("flash_on", [True, False])
def test_a_prefill_runs_the_causal_kernel_and_matches_the_modules(monkeypatch, flash_on):
    """Every layer's attention in C: the AVX-512 kernel (flash.forward) where it applies, else the AVX2 one; the
    logits of PyTorch's attention either way."""
    if flash_on and not native.avx512(False):
        pytest.skip("the AVX-512 attention needs AVX-512 and a C compiler")
    monkeypatch.setenv("GPTCHAT_FLASH", "1" if flash_on else "0")
    m = _model().to_inference_layout()
    ids = torch.randint(0, 300, (2, 50), generator=torch.Generator().manual_seed(6))
    calls = spy(monkeypatch, flash if flash_on else native, "forward" if flash_on else "attend_causal")
    with torch.inference_mode(), using(2):  # 2 x 4 (row, head) pairs keep 2 threads busy
        got = m(ids)
        monkeypatch.setenv("GPTCHAT_FLASH", "0")
        monkeypatch.setattr(native, "can_attend_causal", lambda *a: False)
        ref = m(ids)
    assert len(calls) == 3  # every layer
    assert (got - ref).abs().max() <= 1e-4


def test_an_int8_engine_caches_in_bf16_unless_switched_off(tmp_path, monkeypatch):
    """GPTCHAT_KV_BF16=0 keeps an int8 engine's cache fp32; batched decode reads either (its rows' tokens equal
    their tokens alone, on the same cache type)."""
    folder = save(hf_model(seed=7), tmp_path / "m")
    greedy = SamplingParams(greedy=True)
    prompts = [[464, 2068, 7586], [50, 51, 52, 53, 54, 55]]
    for switch, want in (("1", torch.bfloat16), ("0", torch.float32)):
        monkeypatch.setenv("GPTCHAT_KV_BF16", switch)
        eng = Engine.load(str(folder), device="cpu", dtype="fp32", quantize="int8")
        assert eng.kv_dtype == want
        alone = [[t.token for step in eng.generate([p], greedy, 12, ignore_eos=True) for t in step] for p in prompts]
        assert eng.model.transformer.h[0].attn.kv_cache.k.dtype == want
        rows: dict[int, list[int]] = {0: [], 1: []}
        for step in eng.generate(prompts, greedy, 12, ignore_eos=True):
            for t in step:
                rows[t.row].append(t.token)
        assert [rows[0], rows[1]] == alone


def test_a_generation_checks_its_plan_once_and_a_later_change_is_seen(monkeypatch):
    """Inside a generation (the engine's lock held) the weights stay put: the plan is checked on entry, not on
    every step; a weight replaced between two generations rebuilds it."""
    m = _model().to_inference_layout()
    eng = Engine(m)
    greedy = SamplingParams(greedy=True)
    calls, checks = took(monkeypatch, step1, "run"), spy(monkeypatch, step1.Plan, "current")
    first = [t.token for step in eng.generate([[1, 2, 3]], greedy, 12, ignore_eos=True) for t in step]
    assert sum(calls) == 11 and len(checks) <= 1  # at most the entry's check (none where the plan is new)
    assert step1._held == {}  # let go once the generation ended
    fresh = _model()
    with torch.no_grad():
        for p in fresh.parameters():
            p.mul_(-1.0)
    m.load_state_dict(fresh.state_dict(), assign=True)
    m.lm_head.weight = m.transformer.wte.weight
    m.to_inference_layout()
    second = [t.token for step in eng.generate([[1, 2, 3]], greedy, 12, ignore_eos=True) for t in step]
    monkeypatch.setenv("GPTCHAT_STEP1", "0")
    ref = [t.token for step in eng.generate([[1, 2, 3]], greedy, 12, ignore_eos=True) for t in step]
    assert second == ref and second != first


@pytest.mark.parametrize("kind", ["fp32", "int8", "bf16"])
def test_the_step_picks_greedys_token_as_torch_argmax_would(kind, monkeypatch):
    """Inside ``held`` the step also takes the argmax of the first ``pick_below`` logits, each thread over its own
    block: equal to torch.argmax, ties to the first index and a NaN counting as the largest, with 1-3 threads;
    a generation's greedy tokens then come from it."""
    m = _bf16_pair()[0] if kind == "bf16" else _model()
    m = quant.quantize_model(m) if kind == "int8" else m.to_inference_layout()
    table = m.transformer.wte.weight if kind != "int8" else None

    def step_and_pick(slot, below):
        with torch.inference_mode(), step1.held(m, pick_below=below):
            out = step1.run(m, torch.tensor([[7]]), slot, slot + 1)
            return out[0, -1, :below].float(), step1.picked(m, out[0, -1:, :below].view(1, -1))

    for threads in (1, 2, 3):
        with using(threads), torch.inference_mode():
            m.setup_cache(1, 16)
            for slot, below in ((0, 300), (1, 257), (2, 3)):
                logits, pick = step_and_pick(slot, below)
                assert pick is not None and pick.tolist() == [int(torch.argmax(logits))]
    if table is not None:  # a tie with the winner at row 0, then a NaN past it: the first of each
        with torch.inference_mode():
            m.setup_cache(1, 16)
            win = int(torch.argmax(step_and_pick(0, 300)[0]))
            with torch.no_grad():
                table[0] = table[win]
            m.setup_cache(1, 16)
            logits, pick = step_and_pick(0, 300)
            assert logits[0] == logits.max() and pick.tolist() == [0]
            with torch.no_grad():
                table[299] = float("nan")
            m.setup_cache(1, 16)
            logits, pick = step_and_pick(0, 300)
            assert pick.tolist() == [299] == [int(torch.argmax(logits))]
    assert step1.picked(m, torch.zeros(1, 300)) is None  # outside ``held``: nothing to offer


def test_a_greedy_generation_takes_the_steps_pick(monkeypatch):
    from gptchat.core.generate import engine as engine_module

    m = _model().to_inference_layout()
    eng = Engine(m)
    greedy_calls = spy(monkeypatch, engine_module, "greedy")
    got = [t.token for step in eng.generate([[1, 2, 3]], SamplingParams(greedy=True), 12, ignore_eos=True) for t in step]
    assert len(greedy_calls) == 1  # the prefill's token; the eleven steps' from the step itself
    monkeypatch.setenv("GPTCHAT_STEP1", "0")
    ref = [t.token for step in eng.generate([[1, 2, 3]], SamplingParams(greedy=True), 12, ignore_eos=True) for t in step]
    assert got == ref


def test_a_trial_keeps_the_candidate_its_calls_timed_fastest_in_the_median():
    chosen = []
    tuner = Trial((256, 2048), rounds=3, on_choice=chosen.append)
    # the warm-up round (slow for either) is not counted; then 2048 is faster in the median, not in every call
    times = {256: [9.0, 7.0, 6.0, 7.5], 2048: [9.0, 6.5, 6.4, 6.2]}
    for i in range(4):
        for d in (256, 2048):
            assert tuner.timing and tuner.next() == d
            tuner.record(d, times[d][i])
    assert tuner.chosen == 2048 and not tuner.timing and tuner.next() == 2048 and chosen == [2048]
    assert tuner.times == {256: [7.0, 6.0, 7.5], 2048: [6.5, 6.4, 6.2]}
    tuner.record(256, 0.1)  # decided: later calls change nothing
    assert tuner.chosen == 2048 and chosen == [2048]


def test_a_trial_call_runs_each_candidate_in_turn_timed_then_the_chosen_one_untimed():
    import statistics
    import time

    slow = {"a": 0.004, "b": 0.0}
    tuner, ran = Trial(("a", "b"), rounds=2), []
    for _ in range(6):  # the warm-up round, then two timed rounds
        assert tuner.call(lambda way: ran.append(way) or time.sleep(slow[way]) or way.upper()) in ("A", "B")
    assert ran == ["a", "b"] * 3 and all(t >= 0.004 for t in tuner.times["a"]) and len(tuner.times["b"]) == 2
    assert tuner.chosen == min("ab", key=lambda w: statistics.median(tuner.times[w]))  # "b" unless under heavy load
    assert tuner.call(lambda way: way.upper()) == tuner.chosen.upper() and len(tuner.times["b"]) == 2  # untimed now


def test_an_int8_step_gives_the_same_logits_at_any_prefetch_distance(monkeypatch):
    m = quant.quantize_model(_model())
    ids = torch.randint(0, 300, (12,), generator=torch.Generator().manual_seed(4)).tolist()
    tuner = Trial((256, 2048))
    tuner.chosen = 256  # no timing in this test: the distances are set by hand
    monkeypatch.setattr(step1, "_prefetch", tuner)
    calls = took(monkeypatch, step1, "run")
    runs = []
    try:
        for ahead in (256, 2048, 0):
            native.set_prefetch(ahead)
            runs.append(_decode(m, ids, 3, monkeypatch, on=True)[0])
    finally:
        native.set_prefetch(256)
    assert all(calls) and len(calls) == 3 * 9
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


def test_an_int8_engines_first_steps_pick_the_prefetch_distance(tmp_path, monkeypatch):
    set_to = spy(monkeypatch, native, "set_prefetch")
    tuner = Trial((256, 2048), rounds=2, on_choice=native.set_prefetch)
    monkeypatch.setattr(step1, "_prefetch", tuner)
    eng = Engine.load(str(save(hf_model(seed=6), tmp_path / "m")), device="cpu", quantize="int8")
    try:
        for _ in eng.generate([[5, 6, 7]], SamplingParams(greedy=True), 8, ignore_eos=True):
            pass
        assert tuner.chosen in (256, 2048) and all(len(t) == 2 for t in tuner.times.values())
        assert [a[0] for a in set_to] == [256, 2048] * 3 + [tuner.chosen]  # each timed step its own, then the pick
    finally:
        native.set_prefetch(256)
