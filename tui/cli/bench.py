"""`gptchat bench`: engine speed against transformers on the same weights, in the same process."""

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
    json_out: JsonOpt = False,
) -> None:
    """Measure prefill and decode speed against transformers on the same weights.

    Batch-1 decode is also shown against its ceiling (the read bandwidth, measured in the same run,
    over the bytes of weights a token reads). With --quantize int8 or --dtype bf16 the quality
    against fp32 is measured too. With --compile the compiled batch-1 decode step is measured against
    the eager one in the same run, and its compile (warm-up) time is printed.

    Examples: gptchat bench --shape gpt2 --batch-sizes 1,8,32 ; gptchat bench --quantize int8 --json
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

    from gptchat.core.bench import engine as B

    rep = B.run(model=model, shape=shape, device=device, dtype=dtype, prompt_tokens=prompt_tokens,
                new_tokens=new_tokens, batch_sizes=sizes, batch_new_tokens=batch_new_tokens,
                reference=reference, repeats=repeats, quantize=quantize or "none", log=lambda s: err(f"bench: {s}"),
                compile=bool(compile))
    if json_out:
        from dataclasses import asdict

        d = asdict(rep)
        for r, row in zip(rep.results, d["results"]):
            row["ratio"], row["fraction_of_ceiling"] = r.ratio, r.fraction
        print_json(d)
    else:
        print(B.format_report(rep))
