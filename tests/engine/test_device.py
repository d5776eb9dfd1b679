"""Automatic device and dtype choice, overrides, and half precision on the CPU."""

from __future__ import annotations

import pytest
import torch

from gptchat.core.model import device as device_mod
from gptchat.core.model.device import cpu_native_bf16, pick_device, pick_dtype, set_threads, usable_cores
from gptchat.core.errors import DeviceError
from gptchat.core.generate.loaded import open_model
from gptchat.core.generate.sampling import SamplingParams
from gptchat.core.generate.text import GenOptions, complete
from tests.factory import hf_model, save


def test_auto_picks_what_this_machine_has():
    dev = pick_device(None)
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert dev.type == expected
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32


CPU_BF16 = torch.bfloat16 if cpu_native_bf16() else torch.float32  # no native bf16: fp32, said once


@pytest.mark.parametrize("spec,dtype", [("fp32", torch.float32), ("fp16", torch.float16), ("bf16", CPU_BF16),
                                        ("bfloat16", CPU_BF16), ("half", torch.float16)])
def test_dtype_overrides(spec, dtype):
    assert pick_dtype(spec, torch.device("cpu")) == dtype


def test_bf16_without_native_support_falls_back_to_fp32_once(monkeypatch, caplog):
    monkeypatch.setattr(device_mod, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    monkeypatch.setattr(device_mod, "_said", False)
    with caplog.at_level("WARNING", logger="gptchat"):
        assert pick_dtype("bf16", torch.device("cpu")) == torch.float32
        assert pick_dtype("bf16", torch.device("cpu")) == torch.float32
    assert len([r for r in caplog.records if "native bf16" in r.getMessage()]) == 1
    monkeypatch.setattr(device_mod, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert pick_dtype("bf16", torch.device("cpu")) == torch.bfloat16


def test_threads_follow_the_affinity_mask(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        assert set_threads() == usable_cores() >= 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("spec", ["tpu", "cuda:x", "gpu"])
def test_unknown_devices(spec):
    with pytest.raises(DeviceError):
        pick_device(spec)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_missing_is_explained():
    with pytest.raises(DeviceError, match="CUDA is not available"):
        pick_device("cuda")


def test_unknown_dtype():
    with pytest.raises(DeviceError, match="fp32, fp16 or bf16"):
        pick_dtype("int8", torch.device("cpu"))


@pytest.mark.skipif(not cpu_native_bf16(), reason="bf16 on the CPU needs native support (else fp32 is used)")
def test_bf16_generation_on_cpu_tracks_fp32(tmp_path):
    folder = save(hf_model(seed=31), tmp_path / "m")
    full = open_model(str(folder), dtype="fp32")
    half = open_model(str(folder), dtype="bf16")
    assert next(half.engine.model.parameters()).dtype == torch.bfloat16
    ids = full.tokenizer.encode("The quick brown fox")
    with torch.no_grad():
        a = full.engine.prefill(torch.tensor([ids]), None, None).float()
        b = half.engine.prefill(torch.tensor([ids]), None, None).float()
    # bf16 keeps ~3 significant digits: the logits agree closely, not exactly
    assert torch.corrcoef(torch.stack([a[0], b[0]]))[0, 1] > 0.99
    comp = complete(half.engine, half.tokenizer, ids, GenOptions(SamplingParams(greedy=True), max_new_tokens=8))
    assert comp.completion_tokens >= 1


def test_the_c_kernels_build_wherever_they_can(tmp_path):
    """On Linux x86-64 with AVX2/FMA and a C compiler (CI's machines), qkernel.c compiles and the library
    loads: a compile error must fail here with the compiler's words, not quietly skip every kernel test while
    the engine falls back to PyTorch."""
    import platform
    import sys
    from pathlib import Path

    from gptchat.core.model import native
    from gptchat.core.model.device import cpu_flags

    if (not sys.platform.startswith("linux") or platform.machine().lower() not in ("x86_64", "amd64")
            or not {"avx2", "fma"} <= cpu_flags() or native._compiler() is None):
        pytest.skip("the C kernels are for Linux on x86-64 with AVX2/FMA and a C compiler")
    native._build(native._compiler(), Path(native.__file__).with_name("qkernel.c"), True, tmp_path)  # raises
    assert native.switched_off("GPTCHAT_NATIVE") or native.kernel() is not None
