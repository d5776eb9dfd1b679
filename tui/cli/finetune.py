"""`gptchat finetune` and `gptchat runs`: train GPT-2 on text, list the runs."""

from __future__ import annotations

import time
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn

from gptchat.core.errors import UsageError
from gptchat.core.train import Settings, list_runs, train
from gptchat.tui.cli.common import DeviceOpt, DtypeOpt, JsonOpt, err, print_json
from gptchat.tui.cli.table import print_table, stderr_console

EXAMPLES = """
\b
Examples:
  gptchat finetune docs.txt
  gptchat finetune docs/ --model gpt2-medium --steps 2000 --lr 3e-5 --name azure-docs
  gptchat finetune docs.txt --from-scratch --arch tiny
  gptchat finetune pairs.jsonl --format jsonl --template zero-shot --lora
  gptchat finetune --resume azure-docs
  torchrun --nproc_per_node 2 --no-python gptchat finetune docs.txt
  gptchat chat --model azure-docs
"""


def finetune(
    data: Annotated[Optional[list[str]], typer.Argument(help="Training data: .txt files, or folders of .txt/.md/.rst (with --format jsonl: .jsonl files of {\"prompt\", \"completion\"} lines). Documents inside a file are separated by <|endoftext|>.", show_default=False)] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="The model to start from: a checkpoint folder, a run name, or a hub name (gpt2, gpt2-medium, ...). Default: gpt2.", show_default=False)] = None,
    from_scratch: Annotated[bool, typer.Option("--from-scratch", help="Train new, randomly initialised weights instead of finetuning.")] = False,
    arch: Annotated[Optional[str], typer.Option(help="The shape for --from-scratch: nano, tiny, mini, distilgpt2, gpt2, gpt2-medium, gpt2-large, gpt2-xl. Default: tiny.", show_default=False)] = None,
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps to run. Default: from --epochs (with --resume: extend the run to this many steps).", show_default=False)] = None,
    epochs: Annotated[Optional[float], typer.Option(help="Passes over the training data (fractions allowed). Default: 1-3 for finetuning, more from scratch, by data size.", show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate (warmup, then cosine to a tenth). Default: by model size and data size (6e-5 for gpt2, half that on small data; 1e-3 from scratch; 3e-4 with LoRA).", show_default=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", help="Sequences per micro-batch on each device. Default: 4 on CPU, 8 on GPU.", show_default=False)] = None,
    grad_accum: Annotated[Optional[int], typer.Option("--grad-accum", help="Micro-batches per optimizer step (a larger batch without more memory). Default: 1.", show_default=False)] = None,
    block_size: Annotated[Optional[int], typer.Option("--block-size", help="Tokens per training sequence, up to 1024. Default: the model's window, smaller for small data.", show_default=False)] = None,
    val_fraction: Annotated[float, typer.Option("--val-fraction", help="The share of the data (its tail) held out for validation, between 0 and 1.")] = 0.1,
    eval_every: Annotated[Optional[int], typer.Option("--eval-every", help="Evaluate and sample every this many steps. Default: a tenth of the run, at most 250.", show_default=False)] = None,
    save_every: Annotated[Optional[int], typer.Option("--save-every", help="Save a checkpoint (last/) every this many steps. Default: at every evaluation.", show_default=False)] = None,
    save_minutes: Annotated[Optional[float], typer.Option("--save-minutes", help="Also save whenever this many minutes of training have passed since the last save, so a crash loses little work; 0 saves by steps only. Default: 10.", show_default=False)] = None,
    patience: Annotated[Optional[int], typer.Option(help="Stop early after this many evaluations without a better validation loss. Default: never.", show_default=False)] = None,
    name: Annotated[Optional[str], typer.Option(help="The run's name (its folder, and what --model and --resume take). Default: from the data file name.", show_default=False)] = None,
    resume: Annotated[Optional[str], typer.Option(help="Continue the run of this name exactly where it stopped (its settings are reused).", show_default=False)] = None,
    fmt: Annotated[Optional[str], typer.Option("--format", help="text: plain documents. jsonl: prompt/completion pairs, loss on the completion only. Default: jsonl for .jsonl files (or folders of them), else text.", show_default=False)] = None,
    template: Annotated[Optional[str], typer.Option("--template", "-t", help="With --format jsonl: render each prompt through this template (`gptchat templates list`). Default: prompt + completion as they are.", show_default=False)] = None,
    lora: Annotated[bool, typer.Option("--lora", help="Train low-rank adapters instead of all weights (merged into the weights on export).")] = False,
    lora_rank: Annotated[int, typer.Option("--lora-rank", help="LoRA rank r.")] = 8,
    lora_alpha: Annotated[float, typer.Option("--lora-alpha", help="LoRA alpha; the update is scaled by alpha/r.")] = 16.0,
    lora_targets: Annotated[str, typer.Option("--lora-targets", help="Comma list of what to adapt: q, k, v (the parts of attn.c_attn), o (attn.c_proj), fc (mlp.c_fc), proj (mlp.c_proj).")] = "q,k,v",
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model: minutes to compile; for GPU (on CPU its steps measured no faster).")] = False,
    grad_checkpointing: Annotated[bool, typer.Option("--grad-checkpointing", help="Recompute activations in the backward pass: much less memory, about 30% slower.")] = False,
    fsdp: Annotated[bool, typer.Option("--fsdp", help="Under torchrun: shard weights, gradients and optimizer state (FSDP) instead of replicating them (DDP).")] = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    seed: Annotated[int, typer.Option(help="Random seed for initialisation, batch order and samples.")] = 1337,
    sample_tokens: Annotated[int, typer.Option("--sample-tokens", help="Tokens generated from each fixed probe prompt at every evaluation; 0 turns samples off.")] = 32,
    json_out: Annotated[bool, typer.Option("--json", help="Print the event stream as JSON lines on stdout instead of a progress bar.")] = False,
) -> None:
    """Finetune a GPT-2 model on text files (or train one from scratch).

    Writes a run folder with checkpoints (best/ and last/, Hugging Face format) and events.jsonl;
    Ctrl+C saves and stops (a second one stops without saving), --resume continues. `gptchat runs` lists runs.
    """
    settings = settings_from(dict(locals()))
    if resume is not None and steps is None and _already_done(resume):
        return
    show = _json_printer if json_out else TrainProgress(stderr_console())
    try:
        result = train(settings, resume=resume, steps=steps if resume else None, on_event=show)
    finally:
        if isinstance(show, TrainProgress):
            show.close()
    if result.status == "interrupted":
        err(f"stopped at step {result.step}; continue with: gptchat finetune --resume {result.name}")
        raise typer.Exit(130)


def _already_done(name: str) -> bool:
    """A finished run resumed with no new --steps: one line saying so (it printed a plan and "finished at step N"
    as if it had trained)."""
    from gptchat.core.train.runs import find_run, run_info

    info = run_info(find_run(name))
    if info["state"] != "finished":  # (an early-stopped run resumes as it always did)
        return False
    err(f"run {name} has finished at step {info['step']}: nothing to do (--steps N, above {info['step']}, trains it "
        "further)")
    return True


NOT_SETTINGS = ("resume", "json_out")  # the command's parameters that are not training settings
RESUMABLE = ("steps", "device", "val_fraction", "fmt", "lora_rank", "lora_alpha", "lora_targets",
             "grad_checkpointing", "seed", "sample_tokens")  # may be given with --resume (or keep defaults)


def settings_from(params: dict) -> Settings | None:
    """The command's parameters (by name, as Typer parsed them) -> the run's Settings.

    The one place the CLI and the TUI's form turn finetune options into Settings; None with --resume
    (the run's own settings are reused; only --steps and --device may change).
    """
    resume, data = params.get("resume"), params.get("data")
    if resume is None and not data:
        raise UsageError("give training data (a .txt file, several files or a folder), or --resume NAME")
    if resume is not None:
        flags = {"data": "data", "from_scratch": "--from-scratch", "model": "model"}
        extra = [flags.get(k, "--" + k.replace("_", "-")) for k, v in params.items()
                 if v and k not in RESUMABLE and k not in NOT_SETTINGS]
        if extra:
            raise UsageError(f"--resume reuses the run's settings; drop {', '.join(extra)} (only --steps and --device may change)")
        return Settings(device=params["device"]) if params.get("device") else None
    kw = {("format" if k == "fmt" else k): v for k, v in params.items() if k not in NOT_SETTINGS}
    if kw.get("format") is None:
        from gptchat.core.train.data import guess_format  # (cheap: no torch)

        kw["format"] = guess_format(list(data))
    if kw.get("save_minutes") is None:
        kw.pop("save_minutes", None)  # the Settings default
    return Settings(**{**kw, "data": list(data)})


def _json_printer(ev: dict) -> None:
    print_json(ev)


def hms(s: float | None) -> str:
    """Seconds as m:ss or h:mm:ss ("?" when unknown)."""
    if s is None:
        return "?"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def step_text(ev: dict) -> str:
    return (f"loss {ev['loss']:.4f}  lr {ev['lr']:.2e}  {ev['tokens_per_s']:,.0f} tok/s  ETA {hms(ev['eta_s'])}")


class TrainProgress:
    """The event stream on stderr: a Rich progress bar on a terminal (a plain line every 10 s in a log);
    the plan, evaluations, samples and warnings as lines above it."""

    PLAIN_EVERY_S = 10.0

    def __init__(self, console: Console):
        self.console = console
        self.tty = console.is_terminal
        self.bar = Progress(TextColumn("{task.completed:>6.0f}/{task.total:.0f}"), BarColumn(),
                            TextColumn("{task.fields[info]}"), console=console, disable=not self.tty)
        self.task = None
        self._last_plain = 0.0

    def line(self, text: str) -> None:
        self.console.print(text, soft_wrap=True)

    def __call__(self, ev: dict) -> None:
        t = ev["type"]
        if t == "start":
            self.on_start(ev)
        elif t == "step":
            self.on_step(ev)
        elif t == "eval":
            mark = " (best)" if ev["best"] else ""
            self.line(f"step {ev['step']}: val loss {ev['val_loss']:.4f}, perplexity {ev['ppl']:.2f}{mark}")
        elif t == "sample":
            self.line("  sample: " + (ev["prompt"] + "|" + ev["text"]).replace("\n", "⏎")[:160])
        elif t == "warning":
            self.line(f"warning: {ev['message']}")
        elif t == "notice":
            self.line(ev["message"])
        elif t == "done":
            self.close()
            best = ev.get("best_val_loss")
            best_s = f", best val loss {best:.4f}" if best is not None else ""
            self.line(f"{ev['status']} at step {ev['step']}{best_s} in {hms(ev['elapsed_s'])}: {ev['path']}")

    def on_start(self, ev: dict) -> None:
        for text in ev["plan_text"]:
            self.line(text)
        r, d = ev["resolved"], ev["data"]
        self.line(
            f"run {ev['run']}: {d['train_tokens']:,} training / {d['val_tokens']:,} validation tokens"
            f"{' (prompt/completion pairs, loss on the completions)' if ev['settings'].get('format') == 'jsonl' else ''}, "
            f"{r['steps']} steps x {r['tokens_per_step']:,} tokens (batch {r['batch_size']} x accum {r['grad_accum']} "
            f"x {ev['world']} proc x {r['block_size']}), lr {r['lr']:.2g}{' (resumed)' if ev['resumed'] else ''}"
        )
        self.line(f"  folder: {ev['path']}")

    def on_step(self, ev: dict) -> None:
        if self.tty:
            if self.task is None:
                self.bar.start()
                self.task = self.bar.add_task("train", total=ev["steps"], info="")
            self.bar.update(self.task, completed=ev["step"], total=ev["steps"], info=step_text(ev))
        elif time.monotonic() - self._last_plain > self.PLAIN_EVERY_S or ev["step"] == ev["steps"]:
            self._last_plain = time.monotonic()
            self.line(f"{ev['step']:>6}/{ev['steps']}  {step_text(ev)}")

    def close(self) -> None:
        if self.task is not None:
            self.bar.stop()
            self.task = None


def runs(json_out: JsonOpt = False) -> None:
    """List finetune runs with their state, step, best validation loss and folder.

    Example: gptchat runs --json
    """
    found = list_runs()
    if json_out:
        print_json(found)
        return
    if not found:
        err("no runs yet; start one with `gptchat finetune data.txt`")
        return
    rows = []
    for r in found:
        step = f"{r['step'] or 0}/{r['steps'] or '?'}"
        best = f"{r['best_val_loss']:.4f}" if r["best_val_loss"] is not None else "-"
        rows.append((r["name"], r["state"], step, best, r["base"] + (" +lora" if r["lora"] else ""), str(r["path"])))
    print_table(rows, ("NAME", "STATE", "STEP", "BEST VAL", "BASE", "PATH"))
