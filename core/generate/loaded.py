"""A model ready to use: the engine, its tokenizer and where it came from (what front ends hold)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from gptchat.core.weights.checkpoints import Checkpoint
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
               quantize: str | None = None) -> LoadedModel:
    t0 = time.perf_counter()
    engine = Engine.load(spec, device=device, dtype=dtype, download=download, quantize=quantize)
    tok = load_tokenizer(engine.checkpoint.folder, engine.model.config.vocab_size)
    return LoadedModel(engine, tok, engine.checkpoint, time.perf_counter() - t0)
