"""int8 and bf16 weights moved into one block of 2 MB pages after loading (core/model/hugepages.py); checkpoint
files written and mapped so that fp32 weights come in 2 MB pages without a copy (checkpoints.write_safetensors)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from gptchat.core.generate.engine import Engine
from gptchat.core.generate.sampling import SamplingParams
from gptchat.core.model import hugepages, native, quant
from tests.factory import hf_model, save

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _thp_mode() -> str | None:
    """The bracketed mode of Linux's transparent huge pages ("always", "madvise", "never"), or None."""
    try:
        text = THP.read_text()
    except OSError:
        return None
    return text[text.index("[") + 1 : text.index("]")] if "[" in text else None


def _eligible(ptr: int) -> bool | None:
    """THPeligible of the mapping holding ``ptr`` in /proc/self/smaps (None: not reported)."""
    found = [f for lo, hi, f in hugepages.mappings() or [] if lo <= ptr < hi and "THPeligible" in f]
    return found[0]["THPeligible"] == 1 if found else None


def test_a_block_starts_on_a_2mb_boundary_and_is_advised():
    b = hugepages.block(5 * hugepages.HUGE + 123)
    assert b.dtype == torch.uint8 and b.numel() == 5 * hugepages.HUGE + 123
    assert b.data_ptr() % hugepages.HUGE == 0
    if sys.platform.startswith("linux") and _thp_mode() in ("madvise", "always"):
        assert _eligible(b.data_ptr()) is not False


def test_rehome_copies_each_tensor_into_one_block_in_place_of_the_original():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (1000, 768), dtype=torch.int8, generator=g)
    f = torch.randn(300, 1025, generator=g)
    p = torch.nn.Parameter(torch.randn(2000, 512, generator=g), requires_grad=False)
    skipped = torch.randn(64, 64, generator=g).t()  # not contiguous: stays
    d = {"a": a, "f": f, "p": p, "s": skipped, "none": None}
    moved = hugepages.rehome([(d, "a"), (d, "f"), (d, "p"), (d, "s"), (d, "none"), (d, "absent")])
    assert moved == sum((t.numel() * t.element_size() + 63) // 64 * 64 for t in (a, f, p))
    assert d["s"] is skipped and d["none"] is None and "absent" not in d
    for name, old in (("a", a), ("f", f), ("p", p)):
        assert d[name] is not old and torch.equal(d[name], old) and d[name].dtype == old.dtype
    assert isinstance(d["p"], torch.nn.Parameter) and not d["p"].requires_grad
    start = d["a"].data_ptr()
    assert start % hugepages.HUGE == 0  # one block, in order, each 64-byte aligned
    assert d["f"].data_ptr() == start + (a.numel() + 63) // 64 * 64
    assert d["p"].data_ptr() == d["f"].data_ptr() + (f.numel() * 4 + 63) // 64 * 64
    assert hugepages.rehome([({"x": torch.zeros(10)}, "x")]) == 0  # under one page: left where it is


@pytest.mark.skipif(native.kernel() is None, reason="the C kernels cannot be built here")
def test_an_int8_engine_decodes_from_its_weights_in_the_block(tmp_path):
    folder = save(hf_model(seed=5), tmp_path / "m")
    eng = Engine.load(str(folder), device="cpu", quantize="int8")
    mods = [m for m in eng.model.modules() if isinstance(m, quant.QuantLinear)]
    ptrs = sorted((m.packed.data_ptr(), m.packed.numel()) for m in mods)
    assert ptrs[0][0] % hugepages.HUGE == 0
    assert all(b[0] == a[0] + (a[1] + 63) // 64 * 64 for a, b in zip(ptrs, ptrs[1:]))  # one block, back to back
    got = [t.token for out in eng.generate([[1, 2, 3]], SamplingParams(greedy=True), 12, ignore_eos=True) for t in out]
    for m in mods:  # the same weights, each in an allocation of its own
        m._buffers["packed"] = m.packed.clone()
    ref = [t.token for out in eng.generate([[1, 2, 3]], SamplingParams(greedy=True), 12, ignore_eos=True) for t in out]
    assert got == ref


@pytest.mark.skipif(native.kernel() is None, reason="the C kernels cannot be built here")
def test_a_bf16_engine_streams_its_weights_from_the_block_with_the_head_still_tied(tmp_path):
    folder = save(hf_model(seed=6), tmp_path / "m")
    eng = Engine.load(str(folder), device="cpu", dtype="bf16")
    m = eng.model
    assert m.lm_head.weight is m.transformer.wte.weight  # still one tensor: the table and the head
    lins = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)]
    ptrs = sorted(mod.weight.data_ptr() for mod in lins)
    assert ptrs[0] % hugepages.HUGE == 0
    nbytes = sum((mod.weight.numel() * 2 + 63) // 64 * 64 for mod in lins)
    assert ptrs[-1] - ptrs[0] < nbytes  # one block
    assert m.transformer.wpe.weight.data_ptr() not in ptrs  # one row a token: left where it is
    got = [t.token for out in eng.generate([[1, 2, 3]], SamplingParams(greedy=True), 12, ignore_eos=True) for t in out]
    ref_eng = Engine.load(str(folder), device="cpu", dtype="bf16")
    for mod in ref_eng.model.modules():  # the same weights, each in an allocation of its own
        if isinstance(mod, torch.nn.Linear):
            mod.weight.data = mod.weight.data.clone()
    assert ref_eng.model.lm_head.weight is ref_eng.model.transformer.wte.weight  # .data replaced: still tied
    again = ref_eng.generate([[1, 2, 3]], SamplingParams(greedy=True), 12, ignore_eos=True)
    ref = [t.token for out in again for t in out]
    assert got == ref


def test_write_safetensors_round_trips_every_dtype_across_its_write_chunks(tmp_path):
    from safetensors import safe_open

    from gptchat.core.weights.checkpoints import write_safetensors

    g = torch.Generator().manual_seed(1)
    tensors = {
        "big": torch.randn(5 << 20, generator=g),  # 20 MB: crosses the 16 MB writes
        "bf": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "half": torch.randn(7, generator=g).to(torch.float16),
        "t": torch.randn(4, 6, generator=g).t(),  # not contiguous
        "mask": torch.rand(9, generator=g) > 0.5,
        "ids": torch.arange(-3, 4, dtype=torch.int64),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }
    write_safetensors(tmp_path / "w.safetensors", tensors, {"format": "pt", "n": 3})
    with safe_open(str(tmp_path / "w.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt", "n": "3"}
        assert set(f.keys()) == set(tensors)
        for k, t in tensors.items():
            got = f.get_tensor(k)
            assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), k


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="2 MB file pages are Linux's")
def test_a_checkpoint_gptchat_writes_is_mapped_in_2mb_pages_where_the_kernel_caches_large_folios(tmp_path):
    import dataclasses
    import mmap

    from gptchat.core.model.config import PRESETS
    from gptchat.core.model.gpt import GPT
    from gptchat.core.weights.checkpoints import save_hf
    from gptchat.core.weights.readers import read_safetensors, safetensors_header

    probe = tmp_path / "probe"  # one aligned 8 MB write: does this kernel and filesystem cache it in 2 MB folios?
    probe.write_bytes(bytes(8 << 20))
    with open(probe, "rb") as f:
        view = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        t = torch.frombuffer(view, dtype=torch.uint8)
        t[::4096].sum()
        if not hugepages.share([t]):
            pytest.skip("this kernel or filesystem does not map file pages in 2 MB")
    del t
    view.close()
    model = GPT(dataclasses.replace(PRESETS["gpt2"], n_layer=4, vocab_size=1024))  # 114 MB in 2-9 MB tensors
    model.init_weights(seed=0)
    folder = save_hf(model, tmp_path / "m")
    path = folder / "model.safetensors"
    keep = list(read_safetensors(path, *safetensors_header(path)))
    for _, t in keep:
        t.sum()  # fault every page in, as a decode step does
    assert hugepages.share([t for _, t in keep]) > 0.95  # safetensors' save_file: 68%; transformers' save_pretrained: 0
