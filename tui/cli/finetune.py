"""`gptchat finetune` and `gptchat runs`: train GPT-2 on text, list the runs."""

from __future__ import annotations

import sys
import time
from typing import Annotated, Optional

import typer

from gptchat.tui.cli.common import DeviceOpt, DtypeOpt, JsonOpt, err, print_json

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
    eval_every: Annotated[Optional[int], typer.Option("--eval-every", help="Evaluate, sample and save every this many steps. Default: a tenth of the run, at most 250.", show_default=False)] = None,
    patience: Annotated[Optional[int], typer.Option(help="Stop early after this many evaluations without a better validation loss. Default: never.", show_default=False)] = None,
    name: Annotated[Optional[str], typer.Option(help="The run's name (its folder, and what --model and --resume take). Default: from the data file name.", show_default=False)] = None,
    resume: Annotated[Optional[str], typer.Option(help="Continue the run of this name exactly where it stopped (its settings are reused).", show_default=False)] = None,
    fmt: Annotated[str, typer.Option("--format", help="text: plain documents. jsonl: prompt/completion pairs, loss on the completion only.")] = "text",
    template: Annotated[Optional[str], typer.Option("--template", "-t", help="With --format jsonl: render each prompt through this template (`gptchat templates list`). Default: prompt + completion as they are.", show_default=False)] = None,
    lora: Annotated[bool, typer.Option("--lora", help="Train low-rank adapters instead of all weights (merged into the weights on export).")] = False,
    lora_rank: Annotated[int, typer.Option("--lora-rank", help="LoRA rank r.")] = 8,
    lora_alpha: Annotated[float, typer.Option("--lora-alpha", help="LoRA alpha; the update is scaled by alpha/r.")] = 16.0,
    lora_targets: Annotated[str, typer.Option("--lora-targets", help="Comma list of what to adapt: q, k, v (the parts of attn.c_attn), o (attn.c_proj), fc (mlp.c_fc), proj (mlp.c_proj).")] = "q,k,v",
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model (slow start, faster steps on GPU).")] = False,
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
    Ctrl+C saves and stops, --resume continues. `gptchat runs` lists runs.
    """
    from gptchat.core.errors import UsageError
    from gptchat.core.train import Settings, train

    if resume is None and not data:
        raise UsageError("give training data (a .txt file, several files or a folder), or --resume NAME")
    if resume is not None:
        given = {"data": data, "model": model, "--from-scratch": from_scratch or None, "--arch": arch, "--epochs": epochs,
                 "--lr": lr, "--batch-size": batch_size, "--grad-accum": grad_accum, "--block-size": block_size,
                 "--eval-every": eval_every, "--patience": patience, "--name": name, "--template": template,
                 "--lora": lora or None, "--compile": compile or None, "--fsdp": fsdp or None, "--dtype": dtype}
        extra = [k for k, v in given.items() if v]
        if extra:
            raise UsageError(f"--resume reuses the run's settings; drop {', '.join(extra)} (only --steps and --device may change)")
        settings = Settings(device=device) if device else None
    else:
        settings = Settings(
            data=list(data or []), model=model, from_scratch=from_scratch, arch=arch, steps=steps, epochs=epochs, lr=lr,
            batch_size=batch_size, grad_accum=grad_accum, block_size=block_size, val_fraction=val_fraction,
            eval_every=eval_every, patience=patience, format=fmt, template=template, lora=lora, lora_rank=lora_rank,
            lora_alpha=lora_alpha, lora_targets=lora_targets, compile=compile, grad_checkpointing=grad_checkpointing,
            fsdp=fsdp, device=device, dtype=dtype, seed=seed, sample_tokens=sample_tokens, name=name,
        )
    show = _json_printer if json_out else Progress(sys.stderr)
    result = train(settings, resume=resume, steps=steps if resume else None, on_event=show)
    if isinstance(show, Progress):
        show.close()
    if result.status == "interrupted":
        err(f"stopped at step {result.step}; continue with: gptchat finetune --resume {result.name}")
        raise typer.Exit(130)


def _json_printer(ev: dict) -> None:
    print_json(ev)


class Progress:
    """A one-line progress bar on stderr (loss, tokens/s, ETA); evaluations and samples as lines."""

    def __init__(self, stream):
        self.s = stream
        self.tty = stream.isatty()
        self.width = 0
        self._last_plain = 0.0

    def _line(self, text: str) -> None:
        if self.width:
            self.s.write("\r" + " " * self.width + "\r")
            self.width = 0
        self.s.write(text + "\n")
        self.s.flush()

    def __call__(self, ev: dict) -> None:
        t = ev["type"]
        if t == "start":
            for line in ev["plan_text"]:
                self._line(line)
            r, d = ev["resolved"], ev["data"]
            self._line(
                f"run {ev['run']}: {d['train_tokens']:,} training / {d['val_tokens']:,} validation tokens, "
                f"{r['steps']} steps x {r['tokens_per_step']:,} tokens (batch {r['batch_size']} x accum {r['grad_accum']} "
                f"x {ev['world']} proc x {r['block_size']}), lr {r['lr']:.2g}{' (resumed)' if ev['resumed'] else ''}"
            )
            self._line(f"  folder: {ev['path']}")
        elif t == "step":
            frac = ev["step"] / max(1, ev["steps"])
            bar = "#" * int(24 * frac)
            text = (f"{ev['step']:>6}/{ev['steps']} [{bar:<24}] loss {ev['loss']:.4f}  lr {ev['lr']:.2e}  "
                    f"{ev['tokens_per_s']:,.0f} tok/s  ETA {_hms(ev['eta_s'])}")
            if self.tty:
                self.s.write("\r" + text.ljust(self.width))
                self.s.flush()
                self.width = len(text)
            elif time.time() - self._last_plain > 10 or ev["step"] == ev["steps"]:
                self._last_plain = time.time()
                self._line(text)
        elif t == "eval":
            mark = " (best)" if ev["best"] else ""
            self._line(f"step {ev['step']}: val loss {ev['val_loss']:.4f}, perplexity {ev['ppl']:.2f}{mark}")
        elif t == "sample":
            text = (ev["prompt"] + "|" + ev["text"]).replace("\n", "⏎")[:160]
            self._line(f"  sample: {text}")
        elif t == "warning":
            self._line(f"warning: {ev['message']}")
        elif t == "done":
            best = ev.get("best_val_loss")
            best_s = f", best val loss {best:.4f}" if best is not None else ""
            self._line(f"{ev['status']} at step {ev['step']}{best_s} in {_hms(ev['elapsed_s'])}: {ev['path']}")

    def close(self) -> None:
        if self.width:
            self.s.write("\n")
            self.s.flush()
            self.width = 0


def _hms(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def runs(json_out: JsonOpt = False) -> None:
    """List finetune runs with their state, step, best validation loss and folder.

    Example: gptchat runs --json
    """
    from gptchat.core.train import list_runs

    found = list_runs()
    if json_out:
        print_json(found)
        return
    if not found:
        err("no runs yet; start one with `gptchat finetune data.txt`")
        return
    rows = [("NAME", "STATE", "STEP", "BEST VAL", "BASE", "PATH")]
    for r in found:
        step = f"{r['step'] or 0}/{r['steps'] or '?'}"
        best = f"{r['best_val_loss']:.4f}" if r["best_val_loss"] is not None else "-"
        rows.append((r["name"], r["state"], step, best, r["base"] + (" +lora" if r["lora"] else ""), r["path"]))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[5])
