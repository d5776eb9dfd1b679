"""A model ready to use: the engine, its tokenizer and where it came from (what front ends hold)."""

from __future__ import annotations

import ctypes
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from gptchat.core.errors import DeviceError
from gptchat.core.model import quant
from gptchat.core.model.gpt import GPT
from gptchat.core.weights.checkpoints import Checkpoint, iter_tensors, resolve, skip_init
from gptchat.core.generate.engine import Engine
from gptchat.core.text.tokenizer import Tokenizer, load_tokenizer


@dataclass
class LoadedModel:
    engine: Engine
    tokenizer: Tokenizer
    checkpoint: Checkpoint
    load_s: float

    @property
    def name(self) -> str:
        return self.checkpoint.name

    def describe(self) -> dict:
        from gptchat.core.model.device import DTYPE_NAMES

        e = self.engine
        return {
            "model": self.checkpoint.name,
            "path": str(self.checkpoint.path),
            "format": self.checkpoint.format,
            "params": self.checkpoint.config.n_params(),
            "device": str(e.device),
            "dtype": DTYPE_NAMES.get(e.dtype, str(e.dtype)),
            "quantize": e.quantize,
            "n_ctx": e.n_ctx,
            "tokenizer": self.tokenizer.source,
        }


def open_model(spec: str | None, device: str | None = None, dtype: str | None = None, download: bool = True,
               quantize: str | None = None, compile: bool | None = None) -> LoadedModel:
    """``compile``: see Engine.load; when on, the step is compiled here (its time is in load_s)."""
    t0 = time.perf_counter()
    if quantize == "int8":
        engine = _load_int8(spec, device, download)
    else:
        engine = Engine.load(spec, device=device, dtype=dtype, download=download, quantize=quantize, compile=compile)
    engine.warm_up()
    tok = load_tokenizer(engine.checkpoint.folder, engine.model.config.vocab_size)
    return LoadedModel(engine, tok, engine.checkpoint, time.perf_counter() - t0)


def _load_int8(spec: str | None, device: str | None, download: bool) -> Engine:
    """Engine.load for int8, quantizing each tensor as it streams from disk (quant.StreamQuantizer):
    the fp32 model never exists whole, so peak memory stays near the int8 model's."""
    from gptchat.core.model.device import pick_device, set_threads

    dev = pick_device(device)
    if dev.type != "cpu":
        raise DeviceError("--quantize int8 runs on the CPU only; use --device cpu")
    set_threads()
    ck = resolve(spec, download=download)
    stream = quant.StreamQuantizer(str(ck.path))
    with skip_init(), _large_buffers_returned():  # skip_init: no nn.init on meta (see checkpoints.skip_init)
        model = GPT.from_state_dict(ck.config, iter_tensors(ck, mapped=False), device=dev, dtype=torch.float32,
                                    source=str(ck.path), transform=stream)
        model = stream.install(model)
    return Engine(model, ck, dev, torch.float32, quantize="int8")


@contextmanager
def _large_buffers_returned():
    """Within the block, glibc gives every buffer over 1 MB its own mapping, returned to the system
    when freed; afterwards the heap's free memory is handed back. Why: int8 loading reads each float
    tensor, quantizes it and frees it, and glibc's default (its mmap threshold rises to the largest
    block freed so far) kept those freed tensors in the heap, in pieces later allocations did not fit:
    peak RSS of the 124M model's int8 load 499-784 MB across runs, 443-481 MB with this. Elsewhere
    than glibc: nothing changes."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        tune, trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        yield
        return
    M_MMAP_THRESHOLD = -3
    tune(M_MMAP_THRESHOLD, 1 << 20)
    try:
        yield
    finally:
        tune(M_MMAP_THRESHOLD, 32 << 20)  # glibc's own ceiling for the threshold it would have risen to
        trim(0)
