"""`gptchat bench`: engine speed against transformers on the same weights, in the same process;
``--suite`` adds start-up, eval, finetune and the chat app's figures (each module's own benchmark)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from gptchat.tui.cli.common import CompileOpt, DeviceOpt, DtypeOpt, JsonOpt, QuantizeOpt, err, print_json


def bench(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="A checkpoint to measure. Default: random weights of --shape.")] = None,
    shape: Annotated[str, typer.Option(help="Preset shape for random weights: gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2, tiny, mini.")] = "gpt2",
    prompt_tokens: Annotated[int, typer.Option(help="Prompt length for the prefill measurement.")] = 1000,
    new_tokens: Annotated[int, typer.Option(help="New tokens for the batch-1 decode measurement.")] = 256,
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated decode batch sizes.")] = "1,8,32",
    batch_new_tokens: Annotated[int, typer.Option(help="New tokens per row for batches larger than 1.")] = 64,
    repeats: Annotated[int, typer.Option(help="Repeats for prefill and batch-1 decode (the median is reported).")] = 5,
    reference: Annotated[bool, typer.Option("--reference/--no-reference", help="Also run transformers' generate on the same weights.")] = True,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    quantize: QuantizeOpt = None,
    compile: CompileOpt = None,
    suite: Annotated[bool, typer.Option("--suite", help="Also measure start-up, eval, finetune and the chat app (minutes; the finetune side alone ~10 min for gpt2 on 2 cores).")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Measure prefill and decode speed against transformers on the same weights.

    Batch-1 decode is also shown against its ceiling (the read bandwidth, measured in the same run,
    over the bytes of weights a token reads). With --quantize int8 or --dtype bf16 the quality
    against fp32 is measured too. With --compile the compiled batch-1 decode step is measured against
    the eager one in the same run, and its compile (warm-up) time is printed.

    With --suite every other benchmark runs after it on the same shape, --repeats rounds each: start-up to
    the first token, eval against the engine's prefill and transformers' perplexity loop, a finetune step
    against a transformers training loop (speed and peak memory), and the chat app's decode rate and
    model-ready time; --json then holds all of them, keyed engine, startup, eval, finetune, app.

    Examples: gptchat bench --shape gpt2 --batch-sizes 1,8,32 ; gptchat bench --quantize int8 --json ;
    gptchat bench --suite --json
    """
    from gptchat.core.model.config import PRESETS
    from gptchat.core.errors import UsageError

    if shape not in PRESETS:
        raise UsageError(f"unknown --shape {shape!r}; choose one of {', '.join(PRESETS)}")
    try:
        sizes = tuple(int(s) for s in batch_sizes.split(",") if s.strip())
    except ValueError:
        raise UsageError(f"--batch-sizes must be numbers separated by commas, got {batch_sizes!r}") from None
    if not sizes or min(sizes) < 1 or min(prompt_tokens, new_tokens, batch_new_tokens, repeats) < 1:
        raise UsageError("batch sizes, token counts and repeats must be >= 1")

    import tempfile
    from contextlib import nullcontext
    from pathlib import Path

    from gptchat.core.bench import engine as B
    from gptchat.core.bench.startup import random_checkpoint

    log = lambda s: err(f"bench: {s}")  # noqa: E731
    own = suite and model is None  # one checkpoint for every part (with GPT-2's vocabulary files)
    with tempfile.TemporaryDirectory(prefix="gptchat-bench-") if own else nullcontext() as tmp:
        if own:
            log(f"building a random-weight {shape} checkpoint (no model given)")
            model = str(random_checkpoint(Path(tmp) / "model", shape))
        rep = B.run(model=model, shape=shape, device=device, dtype=dtype, prompt_tokens=prompt_tokens,
                    new_tokens=new_tokens, batch_sizes=sizes, batch_new_tokens=batch_new_tokens,
                    reference=reference, repeats=repeats, quantize=quantize or "none", log=log,
                    compile=bool(compile))
        out = {"engine": _engine_dict(rep)}
        texts = [B.format_report(rep)]
        if suite:
            _suite(model, shape, repeats, reference, log, out, texts)
    if json_out:
        print_json(out if suite else out["engine"])
    else:
        print("\n\n".join(texts))


def _engine_dict(rep) -> dict:
    from dataclasses import asdict

    d = asdict(rep)
    for r, row in zip(rep.results, d["results"]):
        row["ratio"], row["fraction_of_ceiling"] = r.ratio, r.fraction
        row["reference_fraction_of_ceiling"] = r.reference_fraction
    return d


def _suite(model: str, shape: str, rounds: int, reference: bool, log, out: dict, texts: list[str]) -> None:
    """The other benchmarks, in turn, on ``model`` (or random weights of ``shape`` where they build their own)."""
    from gptchat.core.bench import eval as E, startup as S, train as T
    from gptchat.core.model.config import PRESETS
    from gptchat.tui.app import bench as A

    log("start-up: fresh processes to the first token")
    r = S.run(model, rounds=rounds, log=lambda s: log(f"start-up: {s}"))
    out["startup"] = r.to_dict()
    texts.append(S.format_startup(r))
    log(f"eval: random {shape} weights against the engine's prefill and transformers' perplexity loop")
    e = E.run(shape, rounds=rounds, reference=reference, log=lambda s: log(f"eval: {s}"))
    out["eval"] = e.to_dict()
    texts.append(e.format())
    log(f"finetune: random {shape} weights, a training step against a transformers loop, then peak memory")
    t = T.run(shape, block=min(1024, PRESETS[shape].n_positions), steps=rounds)
    out["finetune"] = t.to_dict()
    texts.append(T.format_bench(t))
    log("app: a streamed reply against generate's decode rate, then model ready after launch")
    a = A.run(model, tokens=128, rounds=rounds, launches=min(rounds, 2), log=lambda s: log(f"app: {s}"))
    out["app"] = a.to_dict()
    texts.append(A.format_report(a))
