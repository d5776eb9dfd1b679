"""Speed of gptchat's engine against transformers' GPT2LMHeadModel on the same weights, same process.

Benchmarks print ratios against a reference run beside them, never absolute targets: this machine's
speed varies, the ratio much less. Batch-1 decode also gets its ceiling: it reads every weight once
per token, so it cannot beat (read bandwidth, measured here in the same run) / (bytes of weights). The
bandwidth is read at the start, just before each timed batch-1 decode run and after the last; the
ceiling column shows the median of those readings (a single reading at the start put the same decode
speed anywhere between 63% and 94% of the ceiling on a VM whose bandwidth drifted within minutes), and
the fraction reached is the median over runs of each run's speed against the mean of the readings just
before and after it (the same VM's memory changed phase between runs: 31-58 GB/s within one bench).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from gptchat.core.bench import quality
from gptchat.core.bench.ceilings import (paired_fraction, prefill_flops, product_rate, read_bandwidth,
                                         streamed_weights, weight_bytes_per_token)
from gptchat.core.model.config import PRESETS
from gptchat.core.model import hugepages, intmm, step1, stepn
from gptchat.core.model.quant import NATIVE_ROWS, QuantLinear
from gptchat.core.generate import sampling
from gptchat.core.generate.options import DEFAULTS
from gptchat.core.generate.sampling import SamplingParams


@dataclass
class Result:
    name: str
    unit: str
    ours: float
    reference: float | None = None
    ceiling: float | None = None  # batch-1 decode: tok/s the read bandwidth allows; prefill: s at the product rate
    paired: float | None = None  # the median over runs of each run's fraction of the ceiling beside it

    @property
    def ratio(self) -> float | None:
        if not self.reference:
            return None
        # for seconds lower is better; for tokens/s higher is better: ratio > 1 means we are faster
        return self.reference / self.ours if self.unit in ("s", "ms") else self.ours / self.reference

    @property
    def fraction(self) -> float | None:
        return self.paired if self.paired is not None else self._of_ceiling(self.ours)

    @property
    def reference_fraction(self) -> float | None:
        """transformers' figure against the same ceiling (prefill: how far its products' rate leaves it)."""
        return self._of_ceiling(self.reference)

    def _of_ceiling(self, value: float | None) -> float | None:
        if not (self.ceiling and value):
            return None
        return self.ceiling / value if self.unit == "s" else value / self.ceiling  # seconds: lower is better


@dataclass
class Report:
    model: str
    device: str
    dtype: str
    threads: int
    quantize: str = "none"
    cpu: str = ""
    cpu_flags: list[str] = field(default_factory=list)
    load: tuple[float, float, float] = (0.0, 0.0, 0.0)  # os.getloadavg() at the start
    bandwidth_gbs: float = 0.0  # read bandwidth, measured in this run (the median of bandwidth_samples)
    bandwidth_samples: list[float] = field(default_factory=list)  # at the start, before each batch-1 decode run, after
    weight_bytes: int = 0  # bytes of weights one batch-1 decode step reads
    prefill_gflop: float = 0.0  # arithmetic of the timed prefill (prefill_flops)
    product_gflops: float = 0.0  # the best rate of PyTorch's products at the prefill's shapes, this run (product_rate)
    prefill_int8: bool = False  # that rate is PyTorch's int8 GEMM's (an int8 model's products may go there)
    results: list[Result] = field(default_factory=list)
    quality: dict | None = None  # quality.Quality against fp32, for int8 and bf16
    omp_wait_policy: str = field(default_factory=lambda: os.environ.get("OMP_WAIT_POLICY", "default")
                                 + (f" (GOMP_SPINCOUNT {os.environ['GOMP_SPINCOUNT']})" if "GOMP_SPINCOUNT" in os.environ else ""))
    compile: dict | None = None  # --compile: warm_up_s, and compiled batch-1 decode against eager (same run)
    int8_kernel: str | None = None  # --quantize int8: "avx2" (core/model/native.py; and intmm.describe()) or "fbgemm"
    decode_step: str = ""  # batch-1 decode: "one C call" (core/model/step1.py) or "modules"
    batch_step: str = ""  # batched decode: "one C call" (core/model/stepn.py) or "modules"; "" without batches
    huge_pages: float | None = None  # the share of those weights' bytes in 2 MB pages (hugepages.share)


def _decode_ceiling(report: "Report") -> float:
    """Batch-1 tok/s the median bandwidth reading allows for the bytes a step reads."""
    return report.bandwidth_gbs * 1e9 / report.weight_bytes


def _median_times(ours: Callable[[], object], ref: Callable[[], object] | None, repeats: int,
                  before: Callable[[], object] | None = None):
    """Median seconds of each, the two runs alternating so that a change in background load hits both, and
    ours' seconds run by run. ``before``: run, untimed, just before each of ours (a bandwidth reading beside
    each decode run)."""
    t_ours, t_ref = [], []
    for _ in range(repeats):
        for fn, out in ((ours, t_ours), (ref, t_ref)):
            if fn is None:
                continue
            if fn is ours and before is not None:
                before()
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return statistics.median(t_ours), (statistics.median(t_ref) if t_ref else None), t_ours


def cpu_description() -> tuple[str, list[str]]:
    """The CPU's model name and the flags that matter for these kernels."""
    from gptchat.core.model.device import cpu_flags

    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile", "avx_vnni")
    return name, [f for f in wanted if f in cpu_flags()]


def random_checkpoint(shape: str, folder: Path, seed: int = 0) -> Path:
    """A GPT-2 of a preset shape with random weights in HF format: transformers' config files, the weights
    by write_safetensors, in the page cache as a download leaves them (large writes, large folios) rather than
    as safetensors' save_file does (small ones), so that the bench times the mapping a user's model gets
    (see readers._advise_huge)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from gptchat.core.weights.checkpoints import write_safetensors

    cfg = PRESETS[shape]
    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                                    n_positions=cfg.n_positions, vocab_size=cfg.vocab_size))
    folder.mkdir(parents=True, exist_ok=True)
    hf.config.save_pretrained(folder)
    hf.generation_config.save_pretrained(folder)
    weights = {k: t for k, t in hf.state_dict().items() if k != "lm_head.weight"}  # tied, as transformers saves it
    write_safetensors(folder / ".model.safetensors.tmp", weights, {"format": "pt"})
    os.replace(folder / ".model.safetensors.tmp", folder / "model.safetensors")
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
    quantize: str = "none",
    log: Callable[[str], None] = lambda s: None,
    compile: bool = False,
) -> Report:
    from gptchat.core.model.device import DTYPE_NAMES
    from gptchat.core.generate.engine import Engine

    tmp = None
    if model is None:
        tmp = tempfile.TemporaryDirectory(prefix="gptchat-bench-")
        log(f"building a random-weight {shape} checkpoint (no model given)")
        model = str(random_checkpoint(shape, Path(tmp.name)))
    try:
        if quantize == "int8":  # quantized tensor by tensor while loading, as generate and chat do
            from gptchat.core.generate.loaded import open_model

            eng = open_model(model, device=device, quantize=quantize).engine
        else:
            eng = Engine.load(model, device=device, dtype=dtype, quantize=quantize)
        cpu, flags = cpu_description()
        report = Report(model=shape if tmp else model, device=str(eng.device), dtype=DTYPE_NAMES[eng.dtype],
                        threads=torch.get_num_threads(), quantize=quantize, cpu=cpu, cpu_flags=flags,
                        load=os.getloadavg(), weight_bytes=weight_bytes_per_token(eng.model))
        kernels = {"avx2" if m.native else "fbgemm" for m in eng.model.modules() if isinstance(m, QuantLinear)}
        report.int8_kernel = ",".join(sorted(kernels)) or None
        if "avx2" in kernels and intmm.describe(NATIVE_ROWS):
            report.int8_kernel += f" ({intmm.describe(NATIVE_ROWS)})"
        report.decode_step = "one C call" if step1.plan(eng.model) is not None else "modules"
        log("read bandwidth: summing a 512 MB buffer for a second")
        report.bandwidth_gbs = read_bandwidth()
        report.bandwidth_samples = [report.bandwidth_gbs]
        # transformers reads a nanoGPT file through a copy saved from our model: not from an int8 one
        copyable = quantize == "none" or eng.checkpoint.format != "nanogpt"
        hf = _load_reference(eng) if reference and copyable else None
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
        t, t_ref, _ = _median_times(ours_prefill, ref, repeats)
        report.huge_pages = hugepages.share(streamed_weights(eng.model))  # after use: the pages are in
        cfg = eng.model.config
        report.prefill_gflop = prefill_flops(cfg, prompt_tokens) / 1e9
        # an int8 prompt's products may go to PyTorch's int8 GEMM (beyond NATIVE_ROWS where it won its timing; from
        # intmm.FEW rows where timed faster in use): the ceiling is then the better of its rate and fp32's
        rate = product_rate(cfg, prompt_tokens, eng.dtype, eng.device)
        if (eng.quantize == "int8" and intmm.available() and prompt_tokens >= intmm.FEW
                and (prompt_tokens <= NATIVE_ROWS or intmm.wins(prompt_tokens))):
            rate8 = product_rate(cfg, prompt_tokens, eng.dtype, eng.device, int8=True)
            report.prefill_int8, rate = rate8 > rate, max(rate, rate8)
        report.product_gflops = rate / 1e9
        report.results.append(Result(f"prefill {prompt_tokens} tokens", "s", t, t_ref,
                                     report.prefill_gflop / report.product_gflops))

        for bs in batch_sizes:
            n_new = min(new_tokens if bs == 1 else batch_new_tokens, eng.n_ctx - 16)
            log(f"decode: batch {bs}, {n_new} new tokens")
            report.results.append(_bench_decode(eng, hf, report, torch.randint(0, vocab, (bs, 16), generator=gen),
                                                greedy, n_new, repeats))
        if max(batch_sizes, default=1) > 1:
            report.batch_step = "one C call" if stepn.built(eng.packed_linears(max(batch_sizes))) else "modules"
        log("sampling: the default settings on random logits")
        _bench_sampler(report, vocab, eng.device, repeats)
        if compile:
            _bench_compiled(eng, report, torch.randint(0, vocab, (1, 16), generator=gen).tolist(),
                            min(new_tokens, eng.n_ctx - 16), repeats, log)
        hf = None  # freed before the quality figure (gpt2-xl in fp32 is 6 GB)
        mode = quantize if quantize != "none" else ("bf16" if eng.dtype == torch.bfloat16 else None)
        if mode is not None:
            log(f"quality: {mode} against fp32 logits on a fixed prompt set")
            report.quality = _quality(mode, None if tmp else model)
        return report
    finally:
        if tmp is not None:
            tmp.cleanup()


def _bench_decode(eng, hf, report: Report, prompts: torch.Tensor, greedy, n_new: int, repeats: int) -> Result:
    """Decode of ``prompts`` (B, 16) for n_new tokens, ours and transformers' alternating; batch 1 also gets its
    ceiling: the bandwidth read again just before each timed run and after the last (this VM's swung 18-27 GB/s,
    and later 31-58, within minutes), the ceiling the median of all readings, the fraction paired run by run."""
    bs = prompts.shape[0]

    def ours_decode():
        for _ in eng.generate(prompts.tolist(), greedy, n_new, ignore_eos=True):
            pass

    ours_decode() if bs > 1 else None
    ids = prompts.to(eng.device)
    ref = (lambda: _hf_generate(hf, ids, n_new)) if hf is not None else None  # noqa: E731
    reading = (lambda: report.bandwidth_samples.append(read_bandwidth(0.3))) if bs == 1 else None  # noqa: E731
    first = len(report.bandwidth_samples)
    t, t_ref, runs = _median_times(ours_decode, ref, repeats, before=reading)
    ceiling = paired = None
    if bs == 1:
        reading()
        report.bandwidth_gbs = statistics.median(report.bandwidth_samples)
        ceiling = _decode_ceiling(report)
        paired = paired_fraction(runs, report.bandwidth_samples[first:], n_new, report.weight_bytes)
    return Result(f"decode batch {bs} ({n_new} new)", "tok/s", bs * n_new / t, bs * n_new / t_ref if t_ref else None,
                  ceiling, paired)


def _bench_compiled(eng, report: Report, prompts, n_new: int, repeats: int, log) -> None:
    """Batch-1 decode with the compiled step against the eager one, alternating in this run."""
    log("compile: compiling the decode step (warm-up), then compiled against eager batch-1 decode")
    eng.compile = True
    try:
        warm = eng.warm_up()
    except Exception as e:  # noqa: BLE001 -- a compiler failure is a figure to report, not a crash
        eng.compile = False
        report.compile = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
        return

    def run_with(flag: bool):
        def fn():
            eng.compile = flag
            for _ in eng.generate(prompts, SamplingParams(greedy=True), n_new, ignore_eos=True):
                pass
        return fn

    t_c, t_e, _ = _median_times(run_with(True), run_with(False), repeats)
    eng.compile = False
    ceiling = _decode_ceiling(report)
    report.results.append(Result(f"decode batch 1 compiled ({n_new})", "tok/s", n_new / t_c, None, ceiling))
    report.compile = {"warm_up_s": warm, "compiled_tok_s": n_new / t_c, "eager_tok_s": n_new / t_e,
                      "compiled_vs_eager": t_e / t_c}


def _quality(mode: str, model: str | None) -> dict:
    """``mode`` against fp32: on the given checkpoint, or (random weights say nothing) a tiny trained one."""
    from dataclasses import asdict

    from gptchat.core.weights.checkpoints import load

    if model is None:
        return asdict(quality.compare(quality.tiny_trained_model(), mode))
    fp32, _ = load(model, device="cpu", dtype=torch.float32)
    return asdict(quality.compare(fp32, mode, name=model))


def _load_reference(eng):
    from transformers import GPT2LMHeadModel

    from gptchat.core.weights.checkpoints import save_hf

    folder = eng.checkpoint.path if eng.checkpoint.format != "nanogpt" else None
    if folder is not None and Path(folder).is_dir():
        return GPT2LMHeadModel.from_pretrained(str(folder), dtype=eng.dtype).to(eng.device).eval()
    # transformers reads only HF folders: a nanoGPT file goes through a copy, removed once it is loaded
    with tempfile.TemporaryDirectory(prefix="gptchat-bench-ref-") as tmp:
        folder = save_hf(eng.model, Path(tmp))
        return GPT2LMHeadModel.from_pretrained(str(folder), dtype=eng.dtype).to(eng.device).eval()


@torch.inference_mode()
def _bench_sampler(report: Report, vocab: int, device, repeats: int, draws: int = 20) -> None:
    """One sampling step at the default settings (temperature, top-k), for a batch of 1 and of 16 rows with a
    generator each, against the same filters followed by softmax and torch.multinomial, the draw transformers'
    generate makes (its top-k and temperature warpers are the same two operations)."""
    params = SamplingParams(temperature=DEFAULTS["temperature"], top_k=DEFAULTS["top_k"], top_p=DEFAULTS["top_p"])
    for bs in (1, 16):
        logits = (torch.randn(bs, vocab, generator=torch.Generator().manual_seed(bs)) * 3).to(device)
        gens = [sampling.make_generator(i, device) for i in range(bs)]

        def ours():
            for _ in range(draws):
                sampling.sample(logits, params, gens)

        def ref():
            for _ in range(draws):
                x = sampling.top_k_filter(sampling.apply_temperature(logits, params.temperature), params.top_k)
                torch.multinomial(torch.softmax(x, dim=-1), 1)

        ours()
        t, t_ref, _ = _median_times(ours, ref, repeats)
        report.results.append(Result(f"sampling step, batch {bs}", "ms", t / draws * 1e3, t_ref / draws * 1e3))


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
    quant = f"  quantize {rep.quantize}" if rep.quantize != "none" else ""
    lines = [f"model {rep.model}  device {rep.device}  dtype {rep.dtype}{quant}  threads {rep.threads}",
             f"cpu {rep.cpu or '?'} ({' '.join(rep.cpu_flags) or 'no flags read'})  load {' '.join(f'{x:.2f}' for x in rep.load)}  "
             f"OMP_WAIT_POLICY {rep.omp_wait_policy}",
             f"read bandwidth {rep.bandwidth_gbs:.1f} GB/s"
             + (f" (median of {len(rep.bandwidth_samples)} readings, {min(rep.bandwidth_samples):.1f}-"
                f"{max(rep.bandwidth_samples):.1f})" if len(rep.bandwidth_samples) > 1 else "")
             + f"; a decode step reads {rep.weight_bytes / 1e6:.0f} MB of weights"
             + (f", {rep.huge_pages:.0%} of them in 2 MB pages" if rep.huge_pages is not None else ""),
             f"{'':28} {'gptchat':>12} {'transformers':>14} {'ratio':>8} {'ceiling':>12} {'of ceiling':>10}"]
    for r in rep.results:
        fmt = {"s": lambda v: f"{v:.3f} s", "ms": lambda v: f"{v:.2f} ms"}.get(r.unit, lambda v: f"{v:.1f} tok/s")
        ref = fmt(r.reference) if r.reference else "-"
        ratio = f"{r.ratio:.2f}x" if r.ratio else "-"
        ceiling = fmt(r.ceiling) if r.ceiling else "-"
        frac = f"{r.fraction:.0%}" if r.fraction else "-"
        lines.append(f"{r.name:28} {fmt(r.ours):>12} {ref:>14} {ratio:>8} {ceiling:>12} {frac:>10}")
    lines.append("ratio > 1: gptchat is faster; ceiling: read bandwidth / bytes of weights per token (prefill: below)"
                 + (f"; batch-1 decode step: {rep.decode_step}" if rep.decode_step else "")
                 + (f"; batched: {rep.batch_step}" if rep.batch_step else ""))
    pre = next((r for r in rep.results if r.name.startswith("prefill") and r.ceiling), None)
    if pre is not None:
        theirs = f", transformers {pre.reference_fraction:.0%}" if pre.reference_fraction else ""
        kind = "int8 products (two byte rows a row)" if rep.prefill_int8 else "products"
        lines.append(f"prefill ceiling: its {rep.prefill_gflop:.0f} GFLOP at the best rate of PyTorch's own {kind} "
                     f"at its shapes in this run ({rep.product_gflops:.0f} GFLOP/s): gptchat {pre.fraction:.0%}{theirs}")
    if any(r.paired is not None for r in rep.results):
        lines.append("of ceiling (batch 1): the median over runs of each run's speed against the ceiling of the "
                     "readings just before and after it")
    if any(r.unit == "ms" for r in rep.results):
        lines.append("sampling step: default temperature and top-k on random logits, a generator a row; beside it the "
                     "same filters, softmax and torch.multinomial (transformers' draw)")
    if rep.quantize != "none":
        lines.append(f"transformers runs the same weights in fp32 (it has no CPU {rep.quantize}): ratios are "
                     f"gptchat {rep.quantize} against transformers fp32"
                     + (f"; int8 kernel: {rep.int8_kernel}" if rep.int8_kernel else ""))
    if rep.compile:
        c = rep.compile
        lines.append(f"compile: failed ({c['error']})" if "error" in c else
                     f"compile: warm-up {c['warm_up_s']:.1f} s; batch-1 decode compiled {c['compiled_tok_s']:.1f} "
                     f"tok/s against eager {c['eager_tok_s']:.1f} (same run, alternating): {c['compiled_vs_eager']:.2f}x")
    if rep.quality:
        q = rep.quality
        lines.append(f"quality {q['mode']} vs fp32 ({q['model']}, {q['positions']} positions): mean |logit diff| "
                     f"{q['mean_abs_logit_diff']:.4f} (max {q['max_abs_logit_diff']:.3f}, fp32 logit std "
                     f"{q['logit_std']:.2f}), greedy agreement {q['greedy_agreement']:.1%}")
    return "\n".join(lines)
