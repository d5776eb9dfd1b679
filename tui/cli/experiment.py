"""`gptchat experiment`: base, in-context, finetuned and from-scratch models on the same held-out text."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from gptchat.core.config import default_model
from gptchat.tui.cli.common import Bar, DeviceOpt, DtypeOpt, JsonOpt, err, print_json, window_ticker
from gptchat.tui.cli.table import print_table

EXAMPLES = """
\b
Examples:
  gptchat experiment docs/ --name azure
  gptchat experiment docs/ --name azure -m gpt2 -m gpt2-medium --shots 0,1,3 --finetune-steps 300 --from-scratch tiny
  gptchat experiment --show azure --markdown report.md
"""


def _ints(text: str, flag: str) -> list[int]:
    from gptchat.core.errors import UsageError

    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"{flag} must be whole numbers separated by commas, got {text!r}") from None


def experiment(
    data: Annotated[Optional[list[str]], typer.Argument(help="Text files or folders (.txt/.md/.jsonl) to split into training and held-out text.", show_default=False)] = None,
    name: Annotated[Optional[str], typer.Option(help="The experiment's name (its folder under the data dir); a rerun with the same name resumes it.")] = None,
    models: Annotated[Optional[str], typer.Option(help="Comma-separated models to compare, each as it is (checkpoints, run names or hub names). Default: gpt2, where no -m is given either.", show_default=False)] = None,
    model: Annotated[Optional[list[str]], typer.Option("--model", "-m", help="A model to compare, as the other commands take it; repeatable, and joins --models.", show_default=False)] = None,
    shots: Annotated[str, typer.Option(help="Comma-separated example counts: each K > 0 adds a row per model with K training documents before each window.")] = "0",
    finetune_steps: Annotated[int, typer.Option(help="Finetune each model for this many steps on the training split (0: no finetuned rows); also the steps of --from-scratch.")] = 0,
    lora: Annotated[bool, typer.Option("--lora", help="Finetune LoRA adapters instead of all weights.")] = False,
    from_scratch: Annotated[Optional[str], typer.Option(help="Also train a model of this shape from scratch (nano, tiny, mini, gpt2 ...).")] = None,
    heldout: Annotated[Optional[str], typer.Option(help="Score on this file instead of a split of DATA (then all of DATA trains).")] = None,
    heldout_fraction: Annotated[float, typer.Option(help="Share of the documents held out by the split.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of the split and of the examples' draw.")] = 0,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate of the finetunes. Default: finetune's.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Finetune batch size. Default: finetune's.")] = None,
    block_size: Annotated[Optional[int], typer.Option(help="Finetune window in tokens. Default: finetune's.")] = None,
    show: Annotated[Optional[str], typer.Option(help="Show the experiment NAME's table and samples again (nothing is computed).")] = None,
    markdown: Annotated[Optional[Path], typer.Option(help="Write a Markdown report (table, samples, SVG charts) to this file.")] = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Compare base, in-context, finetuned and from-scratch models on the same held-out text."""
    from gptchat.core.errors import UsageError

    from gptchat.core.eval import study as S  # the study's files: --show never loads torch

    if show:
        spec = S.load_spec(show)
        cells = S.load_cells(S.folder(show))
    else:
        if not data or not name:
            raise UsageError("give DATA and --name NAME (or --show NAME for a finished experiment)")
        spec = spec_from(locals())
        from gptchat.core.eval import experiment as X  # torch: loaded inside the command (`--help` stays fast)

        bar, ticks = Bar(enabled=sys.stderr.isatty()), {}

        def log(line: str) -> None:
            bar.close()  # a row's scoring progress ends before the next line
            err(f"experiment: {line}")

        def progress(label: str, done: int, total: int) -> None:
            ticks.setdefault(label, window_ticker(bar, label))(done, total)

        try:
            cells = X.run(spec, log=log, progress=progress)
        except X.Stopped as e:
            bar.close()
            err(f"experiment: {e}")
            raise typer.Exit(143) from None  # 128 + SIGTERM, as a shell reports a terminated command
        if cells is None:  # a torchrun rank other than 0: it took part in the finetunes; rank 0 reports
            return
    _output(S, spec, cells, json_out, markdown)


def spec_from(params: dict):
    """The study that the command's parameters (by name, as Typer passes them) ask for; the TUI's form
    builds its study with this too, from the same command's parse of its fields."""
    from gptchat.core.eval.study import Spec

    train = {k: params[k] for k in ("lr", "batch_size", "block_size") if params.get(k) is not None}
    return Spec(name=params["name"], data=list(params["data"] or []),
                  models=_models(params.get("models"), params.get("model")),
                  shots=_ints(params["shots"], "--shots"), finetune_steps=params["finetune_steps"], lora=params["lora"],
                  from_scratch=params["from_scratch"], heldout=params["heldout"],
                  heldout_fraction=params["heldout_fraction"], seed=params["seed"], train=train,
                  device=params["device"], dtype=params["dtype"])


def _models(models: str | None, model: list[str] | None) -> list[str]:
    """--models' comma list, then each -m, each model once in the order given; gpt2 where neither is given
    (``--models ''`` with --from-scratch: no pretrained rows)."""
    if models is None and not model:
        return [default_model()]
    given = [m.strip() for m in (models or "").split(",")] + [m.strip() for m in model or []]
    return list(dict.fromkeys(m for m in given if m))


experiment.__doc__ += "\n" + EXAMPLES


def _output(S, spec, cells: dict, json_out: bool, markdown: Optional[Path]) -> None:
    from gptchat.core.eval import report

    order = [r.id for r in S.rows(spec)]
    best = S.best(cells)
    state = S.study_state(spec.name)["state"]
    if state != "finished":
        err(f"experiment {spec.name}: {state}, {sum(r in cells for r in order)}/{len(order)} rows done"
            + ("" if state == "running" else "; run the same command again to resume it"))
    if markdown is not None:
        markdown.write_text(report.markdown(spec.name, S.split_rule(spec), cells, order, best), encoding="utf-8")
        err(f"wrote {markdown}")
    if json_out:
        print_json({"name": spec.name, "state": state, "split": S.split_rule(spec), "best": best,
                    "rows": [cells[r] for r in order if r in cells], "missing": [r for r in order if r not in cells]})
        return
    print_table(report.table_rows(cells, order, best), report.HEADERS)
    for r in order:
        for s in cells.get(r, {}).get("samples", [])[:1]:
            print(f"{cells[r]['label']}: {s['prompt']}|{s['completion']}".replace("\n", " "))
