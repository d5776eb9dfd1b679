"""Speed of gptchat's engine against transformers' GPT2LMHeadModel on the same weights, same process.

Benchmarks print ratios against a reference run beside them, never absolute targets: this machine's
speed varies, the ratio much less.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from gptchat.core.model.config import PRESETS
from gptchat.core.generate.sampling import SamplingParams


@dataclass
class Result:
    name: str
    unit: str
    ours: float
    reference: float | None = None

    @property
    def ratio(self) -> float | None:
        if not self.reference:
            return None
        # for seconds lower is better; for tokens/s higher is better: ratio > 1 means we are faster
        return self.reference / self.ours if self.unit == "s" else self.ours / self.reference


@dataclass
class Report:
    model: str
    device: str
    dtype: str
    threads: int
    results: list[Result] = field(default_factory=list)


def _median_times(ours: Callable[[], object], ref: Callable[[], object] | None, repeats: int):
    """Median seconds of each, the two runs alternating so that a change in background load hits both."""
    t_ours, t_ref = [], []
    for _ in range(repeats):
        for fn, out in ((ours, t_ours), (ref, t_ref)):
            if fn is None:
                continue
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return statistics.median(t_ours), (statistics.median(t_ref) if t_ref else None)


def random_checkpoint(shape: str, folder: Path, seed: int = 0) -> Path:
    """A GPT-2 of a preset shape with random weights, saved by transformers (HF format)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = PRESETS[shape]
    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                                    n_positions=cfg.n_positions, vocab_size=cfg.vocab_size))
    hf.save_pretrained(folder)
    return folder


def run(
    model: str | None = None,
    shape: str = "gpt2",
    device: str | None = None,
    dtype: str | None = None,
    prompt_tokens: int = 1000,
    new_tokens: int = 256,
    batch_sizes: tuple[int, ...] = (1, 8, 32),
    batch_new_tokens: int = 64,
    reference: bool = True,
    repeats: int = 5,
    log: Callable[[str], None] = lambda s: None,
) -> Report:
    from gptchat.core.model.device import DTYPE_NAMES
    from gptchat.core.generate.engine import Engine

    tmp = None
    if model is None:
        tmp = tempfile.TemporaryDirectory(prefix="gptchat-bench-")
        log(f"building a random-weight {shape} checkpoint (no model given)")
        model = str(random_checkpoint(shape, Path(tmp.name)))
    try:
        eng = Engine.load(model, device=device, dtype=dtype)
        report = Report(model=shape if tmp else model, device=str(eng.device),
                        dtype=DTYPE_NAMES[eng.dtype], threads=torch.get_num_threads())
        hf = _load_reference(eng) if reference else None
        greedy = SamplingParams(greedy=True)
        gen = torch.Generator().manual_seed(0)
        vocab = min(eng.model.config.vocab_size, 50257)
        prompt_tokens = min(prompt_tokens, eng.n_ctx - 1)
        long_prompt = torch.randint(0, vocab, (prompt_tokens,), generator=gen).tolist()

        def ours_prefill():
            for _ in eng.generate([long_prompt], greedy, 1):  # one token: the prefill
                pass

        log(f"prefill: {prompt_tokens}-token prompt")
        ours_prefill()  # warm-up: allocates the cache, primes the allocator and kernels
        ref = None
        if hf is not None:
            ids = torch.tensor([long_prompt], device=eng.device)
            ref = lambda: _hf_generate(hf, ids, 1)  # noqa: E731
            ref()
        t, t_ref = _median_times(ours_prefill, ref, repeats)
        report.results.append(Result(f"prefill {prompt_tokens} tokens", "s", t, t_ref))

        for bs in batch_sizes:
            n_new = new_tokens if bs == 1 else batch_new_tokens
            n_new = min(n_new, eng.n_ctx - 16)
            prompts = torch.randint(0, vocab, (bs, 16), generator=gen)
            log(f"decode: batch {bs}, {n_new} new tokens")

            def ours_decode():
                for _ in eng.generate(prompts.tolist(), greedy, n_new, ignore_eos=True):
                    pass

            ours_decode() if bs > 1 else None
            ids = prompts.to(eng.device)
            ref = (lambda: _hf_generate(hf, ids, n_new)) if hf is not None else None  # noqa: E731
            t, t_ref = _median_times(ours_decode, ref, 1 if bs > 1 else repeats)
            report.results.append(Result(f"decode batch {bs} ({n_new} new)", "tok/s", bs * n_new / t,
                                         bs * n_new / t_ref if t_ref else None))
        return report
    finally:
        if tmp is not None:
            tmp.cleanup()


def _load_reference(eng):
    from transformers import GPT2LMHeadModel

    from gptchat.core.weights.checkpoints import save_hf

    folder = eng.checkpoint.path if eng.checkpoint.format != "nanogpt" else None
    tmp = None
    if folder is None or not Path(folder).is_dir():
        tmp = tempfile.mkdtemp(prefix="gptchat-bench-ref-")
        folder = save_hf(eng.model, Path(tmp))
    hf = GPT2LMHeadModel.from_pretrained(str(folder), dtype=eng.dtype).to(eng.device).eval()
    return hf


@torch.inference_mode()
def _hf_generate(hf, ids: torch.Tensor, n_new: int):
    return hf.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n_new,
        min_new_tokens=n_new,
        do_sample=False,
        pad_token_id=50256,
    )


def format_report(rep: Report) -> str:
    lines = [f"model {rep.model}  device {rep.device}  dtype {rep.dtype}  threads {rep.threads}",
             f"{'':28} {'gptchat':>12} {'transformers':>14} {'ratio':>8}"]
    for r in rep.results:
        fmt = (lambda v: f"{v:.3f} s") if r.unit == "s" else (lambda v: f"{v:.1f} tok/s")
        ref = fmt(r.reference) if r.reference else "-"
        ratio = f"{r.ratio:.2f}x" if r.ratio else "-"
        lines.append(f"{r.name:28} {fmt(r.ours):>12} {ref:>14} {ratio:>8}")
    lines.append("ratio > 1: gptchat is faster")
    return "\n".join(lines)
