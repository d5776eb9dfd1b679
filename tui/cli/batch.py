"""`gptchat batch`: complete many prompts, over a grid of models x templates x shots, into JSONL or CSV."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from gptchat.core.config import sampling_defaults
from gptchat.core.errors import UsageError
from gptchat.core.generate.options import parse_vars, resolve, sampling_params, unescape
from gptchat.core.outputs import check_target
from gptchat.core.stops import term_as_interrupt
from gptchat.tui.cli.common import (
    Bar, DeviceOpt, DtypeOpt, GreedyOpt, MaxNewTokensOpt, QuantizeOpt, RepetitionPenaltyOpt, TemperatureOpt, TopKOpt,
    TopPOpt, err, print_json, sampling_given,
)

EXAMPLES = """
\b
Examples:
  gptchat batch prompts.txt --model gpt2 > out.jsonl
  gptchat batch rows.jsonl -o out.jsonl --template few-shot-qa --shots 3 --examples ex.jsonl
  gptchat batch rows.jsonl -o grid.jsonl --model gpt2 --model ./azure-docs --shots 0 --shots 3 --template few-shot-qa
  gptchat batch rows.jsonl -o out.jsonl --resume
  cat prompts.txt | gptchat batch - --greedy --max-new-tokens 32
  torchrun --nproc_per_node 4 --no-python gptchat batch rows.jsonl -o out.jsonl
\b
Input: .txt (one prompt per line; the id is the line number) or .jsonl (one object per line:
"prompt" or the template's variables, an optional "id", and optional per-row temperature, top_k,
top_p, repetition_penalty, max_new_tokens, greedy, stop, seed). Each output record holds the id,
model, template, shots, examples used, sampling settings, seed, token counts, the completion, the
finish reason and timings ("quantize": "int8" too under --quantize int8). A row's seed is
sha256("SEED:ID"), so results do not depend on batching (under --quantize int8 too).
Throughput against transformers: python -m gptchat.core.bench.batch
"""


def batch(
    input: Annotated[str, typer.Argument(help="A .txt or .jsonl file of prompts, or - to read stdin.", show_default=False, metavar="INPUT")],
    model: Annotated[Optional[list[str]], typer.Option("--model", "-m", metavar="MODEL", help="A checkpoint folder, nanoGPT ckpt.pt, finetune run or hub name; repeat for a grid. Default: gpt2.")] = None,
    template: Annotated[Optional[list[str]], typer.Option("--template", "-t", metavar="NAME", help="Render each row through this template (`gptchat templates list`); repeat for a grid.")] = None,
    shots: Annotated[Optional[list[int]], typer.Option("--shots", metavar="N", help="Examples the template shows (0 = zero-shot); repeat for a grid. Default: the template's.")] = None,
    examples: Annotated[Optional[str], typer.Option(metavar="FILE", help="A JSONL or TSV file of examples for the templates (replaces their built-in ones).")] = None,
    var: Annotated[Optional[list[str]], typer.Option("--var", metavar="NAME=VALUE", help="A template variable for every row, NAME=VALUE; repeatable. A row's own value wins.")] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", metavar="FILE", help="Write results to this file (default: stdout).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="Output format: jsonl or csv.")] = "jsonl",
    input_format: Annotated[Optional[str], typer.Option("--input-format", help="Input format: txt or jsonl. Default: from the file suffix (stdin: jsonl if the first line is a JSON object).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Skip rows whose (id, model, template, shots) is already in the output; append the rest.")] = False,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Skip invalid rows and report them, instead of stopping at the first.")] = False,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Prompts generated together. Default: automatic (16 on a CPU, up to 64 on a GPU, fewer for long prompts).", show_default=False)] = None,
    seed: Annotated[int, typer.Option(help="Base seed; each row's seed is derived from it and the row's id.")] = 0,
    greedy: GreedyOpt = False,
    temperature: TemperatureOpt = None,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    repetition_penalty: RepetitionPenaltyOpt = None,
    max_new_tokens: MaxNewTokensOpt = None,
    stop: Annotated[Optional[list[str]], typer.Option("--stop", metavar="TEXT", help="Stop a completion when the model writes this text (not included); repeatable; \\n and \\t are understood.")] = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    quantize: QuantizeOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the run's summary as JSON on stdout (needs -o).")] = False,
) -> None:
    """Complete many prompts in batches, over a grid of models, templates and shots."""
    if fmt not in ("jsonl", "csv"):
        raise UsageError(f"unknown --format {fmt!r}; use jsonl or csv")
    if input_format not in (None, "txt", "jsonl"):
        raise UsageError(f"unknown --input-format {input_format!r}; use txt or jsonl")
    if json_out and output is None:
        raise UsageError("--json prints the summary on stdout, where the results go without -o; give -o FILE")
    if not template and (examples or var):
        raise UsageError("--examples and --var need a --template (see `gptchat templates list`)")
    given = sampling_given(temperature, top_k, top_p, repetition_penalty, max_new_tokens)
    try:
        sampling_params(resolve(given, None, sampling_defaults()), greedy)  # bad values fail now, before a load
        variables = parse_vars(var)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if examples and not Path(examples).is_file():
        raise UsageError(f"--examples: no such file: {examples}")
    if output is not None:  # a folder, a path under a file, or the input itself: refused before anything loads
        output = str(check_target(output, inputs=[input, examples]))

    # the batch modules import torch: loaded inside the command so `gptchat --help` stays fast
    from gptchat.core.batch.jobs import Settings
    from gptchat.core.batch.io import Skipped, read_rows
    from gptchat.core.batch.run import Dist, run

    stops = _stops(stop)
    name, text = _read_input(input)
    skipped: list[Skipped] = []
    rows = read_rows(name, text, input_format, templated=bool(template), skip_bad=skip_bad, skipped=skipped)
    dist = Dist.from_env()
    settings = Settings(given=given, greedy=greedy, stop=stops, seed=seed, variables=variables, examples=examples,
                        skip_bad=skip_bad)
    quiet = dist.rank != 0
    bar = Bar(enabled=sys.stderr.isatty() and not quiet)
    try:
        with term_as_interrupt():  # a scheduler's or `timeout`'s SIGTERM ends it as Ctrl+C does
            summary = run(rows, "stdin" if name == "-" else Path(name).name, models=model, templates=template,
                          shots=shots, settings=settings, output=Path(output) if output else None,
                          stdout=sys.stdout.buffer, fmt=fmt, resume=resume, batch_size=batch_size, device=device,
                          dtype=dtype, quantize=quantize, skipped=skipped,
                          progress=lambda p: bar.draw(p.rows_done, p.rows_total, _rates(p)),
                          log=(lambda s: None) if quiet else err, dist=dist)
    except KeyboardInterrupt:
        bar.close()
        if not quiet:  # what was done and how to go on (it ended without a word)
            err(f"batch: stopped; the results done so far are kept beside {output}: run the same command with "
                "--resume to finish" if output else "batch: stopped")
        raise typer.Exit(130) from None
    finally:  # an error mid-way: its line starts on a line of its own
        bar.close()
    if quiet:
        return  # rank 0 reports for every rank
    for reason in summary.bad:
        err(f"skipped: {reason}")
    if json_out:
        print_json(summary.to_dict())
    else:
        d = summary.to_dict()
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(summary.finish_reasons.items())) or "-"
        where = f" -> {output}" if output else ""
        err(f"batch: {summary.done} results{where} ({summary.resumed} already done, {len(summary.bad)} bad rows "
            f"skipped) in {d['elapsed_s']:.1f} s: {d['rows_per_s']:.2f} rows/s, {d['tokens_per_s']:.1f} tok/s; "
            f"finish: {reasons}")


def _rates(p) -> str:
    return f"rows  {p.rows_per_s:.2f} rows/s  {p.tokens_per_s:.1f} tok/s  {p.model}"


def _stops(stop: list[str] | None) -> tuple[str, ...]:
    """The --stop texts, checked by generate's rule (an empty one is refused) in its one home, GenOptions."""
    from gptchat.core.generate.text import GenOptions  # torch: see batch()

    stops = tuple(unescape(s) for s in stop or [])
    try:
        GenOptions(stop=stops)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return stops


def _read_input(path: str) -> tuple[str, str]:
    if path == "-":
        if sys.stdin.isatty():
            err("reading prompts from stdin, one per line; end with Ctrl+D")
        data = sys.stdin.buffer.read()
        where = "stdin"
    else:
        p = Path(path)
        if not p.is_file():
            raise UsageError(f"no such input file: {path}")
        data = p.read_bytes()
        where = path
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UsageError(f"{where} is not UTF-8 text (byte {e.start})") from None
    return path, text


batch.__doc__ = (batch.__doc__ or "") + "\n" + EXAMPLES
