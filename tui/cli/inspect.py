"""`gptchat inspect`: each token's probability under one or more models, and the sampler's filters."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from gptchat.core.config import default_model, sampling_defaults
from gptchat.core.errors import UsageError
from gptchat.core.generate import options
from gptchat.tui.cli.common import (
    DeviceOpt, DtypeOpt, GreedyOpt, JsonOpt, RepetitionPenaltyOpt, TemperatureOpt, TopKOpt, TopPOpt, err, print_json,
    sampling_given,
)
from gptchat.tui.format import surprise_style

EXAMPLES = """
\b
Examples:
  gptchat inspect "The capital of France is" --model gpt2 --top 5
  gptchat inspect "The capital of France is" -m gpt2 -m ./my-finetune --temperature 0.7 --top-p 0.9
  gptchat inspect --text completion.txt --model gpt2 --json
"""


def inspect(
    prompt: Annotated[Optional[str], typer.Argument(help="The text to inspect (or use --text FILE).", show_default=False)] = None,
    model: Annotated[Optional[list[str]], typer.Option("--model", "-m", help="A checkpoint folder, nanoGPT ckpt.pt, run name or hub name; repeat to compare models. Default: gpt2.")] = None,
    text: Annotated[Optional[Path], typer.Option("--text", help="Score the text in this UTF-8 file (a prompt plus a completion, say) token by token.")] = None,
    top: Annotated[int, typer.Option("--top", min=1, max=100, help="How many alternatives to show per token and per filter step (1-100).")] = 5,
    temperature: TemperatureOpt = None,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    repetition_penalty: RepetitionPenaltyOpt = None,
    greedy: GreedyOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Show each token's probability and what the sampler would do next."""
    body = _read(prompt, text)
    try:
        params, _ = options.sampling_params(options.resolve(sampling_given(temperature, top_k, top_p, repetition_penalty, None), None, sampling_defaults()), greedy)
    except ValueError as e:
        raise UsageError(str(e)) from None
    # torch-backed modules load here, inside the command, so `gptchat --help` stays fast
    from gptchat.core.generate.inspect import inspect_model
    from gptchat.core.generate.loaded import open_model

    results = []
    for spec in model or [default_model()]:
        lm = open_model(spec, device=device, dtype=dtype)
        results.append(inspect_model(lm, lm.tokenizer.encode(body), params, top))
    if json_out:
        print_json({"text": body, "sampling": params.to_dict(), "models": results})
        return
    out = Console(highlight=False, markup=False, emoji=False)
    for r in results:
        if r["dropped_tokens"]:
            err(f"note: {r['model']}: only the last {len(r['tokens'])} tokens fit the window; {r['dropped_tokens']} dropped")
    _tokens_table(out, results, top)
    for r in results:
        _next_table(out, r, top)


def _read(prompt: str | None, path: Path | None) -> str:
    if (prompt is None) == (path is None):
        raise UsageError("give the text to inspect, or --text FILE (one of the two)")
    if path is None:
        return prompt
    from gptchat.core.errors import DataError
    from gptchat.core.train.data import read_text

    try:
        return read_text(path)  # says why: missing, a folder, binary, not UTF-8 (with the iconv line), empty
    except DataError as e:
        raise UsageError(f"--text: {e}") from None


def _tok(s: str) -> str:
    """A token as typed, quoted when spaces at its ends or unprintable characters would hide in a cell."""
    return repr(s) if s.strip() != s or not s.isprintable() or not s else s


def _p(p: float) -> str:
    return f"{p:.4f}" if p >= 1e-3 else f"{p:.1e}"


def _tokens_table(out: Console, results: list[dict], top: int) -> None:
    same = all(r["tokens"] and [t["id"] for t in r["tokens"]] == [t["id"] for t in results[0]["tokens"]] for r in results)
    groups = [results] if same else [[r] for r in results]
    for group in groups:
        table = Table(title="per token: probability (rank), colour = surprise", title_justify="left", box=None,
                      header_style="bold", padding=(0, 2, 0, 0))
        table.add_column("#", justify="right")
        table.add_column("token")
        for r in group:
            table.add_column(f"{r['model']}", justify="right")
        table.add_column(f"top {top} ({group[0]['model']})", overflow="fold")
        for i, t in enumerate(group[0]["tokens"]):
            cells = [str(i), _tok(t["text"])]
            for r in group:
                s = r["tokens"][i]
                cells.append(Text(f"{_p(s['prob'])} ({s['rank']})", style=surprise_style(s["logprob"])))
            cells.append("  ".join(f"{_tok(a['text'])} {_p(a['prob'])}" for a in t["top"]))
            table.add_row(*cells)
        out.print(table)
        for r in group:
            out.print(f"{r['model']}: perplexity {r['perplexity']:.2f}, mean log-probability {r['mean_logprob']:.3f}")


def _next_table(out: Console, r: dict, top: int) -> None:
    table = Table(title=f"next token ({r['model']}): the sampler step by step", title_justify="left", box=None,
                  header_style="bold", padding=(0, 2, 0, 0))
    for h in ("step", "kept", "removed", f"top {top} after this step"):
        table.add_column(h, overflow="fold")
    for s in r["next"]["stages"]:
        removed = ""
        if s["removed_count"]:
            shown = ", ".join(_tok(a["text"]) for a in s["removed"][:3])
            removed = f"{s['removed_count']} tokens, {s['removed_mass']:.3f} of the mass ({shown}...)"
        table.add_row(s["name"], str(s["kept"]), removed,
                      "  ".join(f"{_tok(a['text'])} {_p(a['prob'])}" for a in s["top"][:top]))
    out.print(table)


inspect.__doc__ = (inspect.__doc__ or "") + "\n" + EXAMPLES
