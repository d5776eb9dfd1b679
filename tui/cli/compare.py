"""`gptchat compare`: prompts x models x templates x shots, one seed, side by side with each reply's score."""

from __future__ import annotations

from itertools import product
from typing import Annotated, Optional

import typer

from gptchat.core.config import default_model
from gptchat.tui.cli.common import (
    DeviceOpt, DtypeOpt, JsonOpt, MaxNewTokensOpt, QuantizeOpt, TemperatureOpt, TopKOpt, TopPOpt, print_json,
)

EXAMPLES = """
\b
Examples:
  gptchat compare "How do I attach a disk?" --model gpt2 --model azure-docs --seed 1
  gptchat compare "hot" --template few-shot --shots 0 --shots 3 --examples words.jsonl --json
  gptchat compare "The capital of France is" --model gpt2 --quantize int8 --seed 1
"""
COLUMN_MIN = 36  # narrower than this per pane, and the panes are stacked instead


def compare(
    prompts: Annotated[list[str], typer.Argument(help="One or more prompts; each is answered by every pane.", show_default=False)],
    model: Annotated[Optional[list[str]], typer.Option("--model", "-m", help="A model (checkpoint folder, run name or hub name); repeatable. Default: gpt2.")] = None,
    template: Annotated[Optional[list[str]], typer.Option("--template", "-t", help="A template (`gptchat templates list`); repeatable. Default: raw.")] = None,
    shots: Annotated[Optional[list[int]], typer.Option("--shots", help="Examples the template shows; repeatable. Default: the template's.")] = None,
    examples: Annotated[Optional[str], typer.Option(help="A JSONL or TSV file of examples (any of prompt/completion, input/output, question/answer, instruction/response).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="One seed for every pane. Default: random, printed.")] = None,
    max_new_tokens: MaxNewTokensOpt = None,
    temperature: TemperatureOpt = None,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    quantize: QuantizeOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Compare completions of models, templates and shots on the same prompts and seed."""
    import threading

    # torch-backed modules load here, inside the command, so `gptchat --help` stays fast
    from gptchat.core.generate.text import new_seed
    from gptchat.core.session.compare import Pane, PaneDone, run_compare
    from gptchat.core.session.pool import ModelPool
    from gptchat.core.session.settings import ChatSettings

    panes = [Pane(m, t, k) for m, t, k in product(model or [default_model()], template or ["raw"], shots or [None])]
    settings = ChatSettings(examples=examples, seed=seed if seed is not None else new_seed(), device=device,
                            dtype=dtype, quantize=quantize, max_new_tokens=max_new_tokens, temperature=temperature,
                            top_k=top_k, top_p=top_p)
    pool, out = ModelPool(), []
    for text in prompts:
        done = {ev.pane: ev for ev in run_compare(pool, panes, text, settings, threading.Event(), score=True)
                if isinstance(ev, PaneDone)}
        out.append({"prompt": text, "panes": [_pane(p, done[i]) for i, p in enumerate(panes)]})
    if json_out:
        print_json({"seed": settings.seed, "quantize": quantize or "none", "results": out})
    else:
        _show(out, settings.seed, quantize)


compare.__doc__ += "\n" + EXAMPLES


def _pane(p, ev) -> dict:
    return {"label": p.label(), "model": p.model or default_model(), "template": p.template, "shots": p.shots,
            "completion": ev.completion.text, "tokens": ev.completion.completion_tokens,
            "finish": ev.completion.finish_reason, "mean_logprob": ev.info.get("mean_logprob")}


def _score(d: dict) -> str:
    lp = d["mean_logprob"]
    return "mean log p: n/a" if lp is None else f"mean log p: {lp:.3f}"


def _show(results: list[dict], seed: int, quantize: str | None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(markup=False, highlight=False, emoji=False)
    n = len(results[0]["panes"])
    wide = console.is_terminal and console.width >= COLUMN_MIN * n
    console.print(f"seed {seed}" + (f"  weights {quantize}" if quantize not in (None, "none") else ""))
    for r in results:
        console.print(f"\n> {r['prompt']}")
        if wide:
            table = Table(show_lines=False, expand=True)
            for d in r["panes"]:
                table.add_column(d["label"], overflow="fold")
            table.add_row(*[d["completion"].strip() for d in r["panes"]])
            table.add_row(*[_score(d) for d in r["panes"]])
            console.print(table)
            continue
        for d in r["panes"]:
            console.print(f"--- {d['label']} ({_score(d)})")
            console.print(d["completion"].strip())
