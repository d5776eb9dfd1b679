"""`gptchat eval`: perplexity of one or more models on held-out text, zero-shot or with examples."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from gptchat.core.config import default_model
from gptchat.tui.cli.common import Bar, DeviceOpt, DtypeOpt, JsonOpt, QuantizeOpt, err, print_json, window_ticker
from gptchat.tui.cli.table import print_table

EXAMPLES = """
\b
Examples:
  gptchat eval heldout.txt --model gpt2 --model gpt2-medium
  gptchat eval docs/ --model gpt2 --stride 256 --json
  gptchat eval heldout.txt --model gpt2 --shots 0 --shots 3 --examples train.jsonl
  gptchat eval heldout.txt --model gpt2 --device cpu --quantize int8
"""
HEADERS = ["model", "shots", "tokens", "loss", "ppl", "bits/byte", "word ppl", "seconds", "tokens/s"]


def eval_cmd(
    files: Annotated[list[str], typer.Argument(help="Held-out text: .txt/.md files, .jsonl rows (prompt/completion, input/output, question/answer, instruction/response or text) or folders.", show_default=False)],
    model: Annotated[Optional[list[str]], typer.Option("--model", "-m", help="A model to score (checkpoint folder, run name or hub name); repeatable. Default: gpt2.")] = None,
    stride: Annotated[Optional[int], typer.Option(help="Tokens between window starts; each window scores the tokens the previous one did not. Default: half the window.")] = None,
    window: Annotated[Optional[int], typer.Option(help="Tokens per window, examples included. Default: the model's context (1024 for GPT-2).")] = None,
    shots: Annotated[Optional[list[int]], typer.Option("--shots", help="Examples before each window (context only, never scored); repeatable, one row each. Default: 0.")] = None,
    examples: Annotated[Optional[str], typer.Option(help="The examples for --shots: JSONL (any of the key pairs above), TSV, or a text file whose documents are the examples.")] = None,
    template: Annotated[Optional[str], typer.Option("--template", "-t", help="Render each example with this template's example format (its fields filled from the row). Default: the example's own text.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for drawing the examples of each window.")] = 0,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    quantize: QuantizeOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Measure perplexity, bits per byte and word perplexity of models on held-out text."""
    from gptchat.core.errors import UsageError

    ks = shots or [0]
    if any(k < 0 for k in ks):
        raise UsageError("--shots must be 0 or more")
    if any(ks) and not examples:
        raise UsageError(f"--shots {max(ks)} needs --examples FILE (a JSONL, TSV or text file of examples)")
    if examples and not any(ks):  # scored with no examples, the user believing otherwise
        raise UsageError("--examples is used only with --shots N (N >= 1): add --shots 3, say, and --shots 0 too "
                         "for the row without examples")
    # torch-backed modules load here, inside the command, so `gptchat --help` stays fast
    from gptchat.core.eval.heldout import load_heldout
    from gptchat.core.eval.perplexity import evaluate, resolve_window
    from gptchat.core.eval.shots import in_context
    from gptchat.core.generate.loaded import open_model

    text = load_heldout(files)
    scores = []
    for spec in model or [default_model()]:
        lm = open_model(spec, device=device, dtype=dtype, quantize=quantize)
        for k in ks:
            ctx = in_context(k, examples, lm.tokenizer, template, seed, resolve_window(lm.engine, window))
            if ctx is not None and ctx.excerpts:
                err(f"{lm.name} +{k} shots: {ctx.excerpt_note('text examples')}")
            bar = Bar(enabled=sys.stderr.isatty())
            try:
                s = evaluate(lm, text, stride=stride, window=window, shots=ctx,
                             progress=window_ticker(bar, lm.name + (f" +{k} shots" if k else "")))
            finally:  # an error or Ctrl+C mid-way: its line starts on a line of its own
                bar.close()
            err(describe(s))
            scores.append(s)
    if json_out:
        print_json({"heldout": text.source, "bytes": text.n_bytes, "words": text.n_words,
                    "results": [s.to_dict() for s in scores]})
        return
    print_table([row(s) for s in scores], HEADERS)


eval_cmd.__doc__ += "\n" + EXAMPLES


def describe(s) -> str:
    """One line on how a row was scored: windows, stride, example context, scored tokens per window."""
    weights = f" ({s.quantize} weights)" if s.quantize != "none" else ""
    line = f"{s.model}{weights}: {s.windows} windows of {s.window} tokens, stride {s.stride}, {s.tokens} tokens scored"
    if s.scored_per_window:
        line += f" ({_span(s.scored_per_window)} per window)"
    if s.shots:
        line += (f"; {s.shots} example{'s' if s.shots != 1 else ''} took {_span(s.context_tokens)} tokens of context "
                 "per window (never scored)")
    return line


def _span(values) -> str:
    """'3-9', or '24' where every value is the same."""
    lo, hi = min(values), max(values)
    return f"{lo}-{hi}" if lo != hi else f"{lo}"


def row(s) -> list[str]:
    return [s.model, str(s.shots), str(s.tokens), f"{s.loss:.4f}", f"{s.ppl:.2f}", f"{s.bits_per_byte:.4f}",
            f"{s.word_ppl:.2f}", f"{s.seconds:.2f}", f"{s.tokens_per_s:.0f}"]
