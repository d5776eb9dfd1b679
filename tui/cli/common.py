"""What every CLI command shares: option aliases, output helpers, error handling."""

from __future__ import annotations

import json
import os
import sys
import time
from functools import lru_cache
from typing import Annotated, Optional

import typer

from gptchat.core.generate import options  # the one table of generation settings; imports no torch

# Before torch loads its OpenMP: an idle decode thread spins briefly (10,000 turns, a few microseconds),
# then sleeps. Batch-1 decode runs ~60 short parallel regions a token. Measured on a 2-core EPYC (AVX2),
# int8 124M decode, tok/s: quiet machine PASSIVE 33-45, this 57-66, ACTIVE 58-70; beside two busy
# processes PASSIVE 30, this 28, ACTIVE 14, libgomp's default-like 100,000 turns 7 (a spinning thread
# steals the core its partner needs). A user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT is kept.
if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "10000"

ModelOpt = Annotated[
    Optional[str],
    typer.Option(
        "--model",
        "-m",
        help="A checkpoint folder, a nanoGPT ckpt.pt, a finetune run name, or a hub name "
        "(gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2). Default: gpt2.",
    ),
]
DeviceOpt = Annotated[
    Optional[str],
    typer.Option(help="Where to run: auto, cpu, cuda, cuda:N or mps. Default: auto (cuda, then mps, then cpu)."),
]
DtypeOpt = Annotated[
    Optional[str],
    typer.Option(help="Precision: auto, fp32, fp16 or bf16. Default: auto (bf16 on recent CUDA, fp16 on older CUDA and mps, fp32 on cpu)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout and nothing else.")]
QuantizeOpt = Annotated[
    Optional[str],
    typer.Option(help="Weights: none, or int8 (every layer and the head in int8 with per-channel scales, on "
                 "x86 CPUs: a quarter of the weight memory and faster batch-1 decode than fp32; greedy choices "
                 "agreed with fp32's at 98.4% of positions; `gptchat bench --quantize int8` measures both). "
                 "Default: none."),
]

CompileOpt = Annotated[
    Optional[bool],
    typer.Option("--compile/--no-compile", help="Compile the batch-1 decode step with torch.compile (CUDA graphs "
                 "on CUDA); its one-off compile time is spent at load. Default: on only where measured faster "
                 "(nowhere yet: on CPU it was slower; `gptchat bench --compile` measures it).", show_default=False),
]


def _setting(name: str, *short: str) -> typer.models.OptionInfo:
    """A generation option's flag: the name, help and default wording come from core's options table.
    Values are checked by the options module (not by Click), so every front end gives the same message."""
    return typer.Option(options.SETTINGS[name].flag, *short, help=options.cli_help(name), show_default=False)


TemperatureOpt = Annotated[Optional[float], _setting("temperature")]
TopKOpt = Annotated[Optional[int], _setting("top_k")]
TopPOpt = Annotated[Optional[float], _setting("top_p")]
RepetitionPenaltyOpt = Annotated[Optional[float], _setting("repetition_penalty")]
MaxNewTokensOpt = Annotated[Optional[int], _setting("max_new_tokens", "-n")]
GreedyOpt = Annotated[bool, typer.Option("--greedy", help=options.cli_help("greedy"))]


def sampling_given(temperature, top_k, top_p, repetition_penalty, max_new_tokens) -> dict:
    """The generation options given on the command line (None: not given), keyed by their canonical names."""
    return dict(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                max_new_tokens=max_new_tokens)


def debug() -> bool:
    return os.environ.get("GPTCHAT_DEBUG", "") not in ("", "0")


def err(msg: str) -> None:
    """A line for the person at the terminal (stderr, so stdout stays clean for scripts)."""
    print(msg, file=sys.stderr, flush=True)


class Bar:
    """A one-line progress bar on stderr, redrawn in place; drawn only where ``enabled`` (a terminal)."""

    WIDTH = 24

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.drawn = False

    def draw(self, done: int, total: int, text: str) -> None:
        if not self.enabled:
            return
        fill = "#" * int((done / total if total else 1.0) * self.WIDTH)
        sys.stderr.write(f"\r[{fill:<{self.WIDTH}}] {done}/{total} {text}  ")
        sys.stderr.flush()
        self.drawn = True

    def close(self) -> None:
        """End the bar's line (if one was drawn): what is printed next starts on its own."""
        if self.drawn:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self.drawn = False


def window_ticker(bar: Bar, name: str):
    """``progress(done, total)`` for an eval's windows: done, their rate and the time left, on ``bar``, timed from
    the call with 0 done (evaluate makes it as it starts)."""
    t0 = time.perf_counter()

    def tick(done: int, total: int) -> None:
        nonlocal t0
        if done == 0:
            t0 = time.perf_counter()
        spent = time.perf_counter() - t0
        left = spent / done * (total - done) if done else 0.0
        bar.draw(done, total, f"windows  {done / spent if spent else 0.0:.2f} windows/s  {left:.0f} s left  {name}")

    return tick


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    sys.stdout.flush()


@lru_cache(maxsize=None)
def click_command(fn):
    """The Click command Typer builds for one command function (a one-command app gives the command
    itself): the app's forms parse their fields with it, so they accept exactly what the CLI does."""
    app = typer.Typer(add_completion=False)
    app.command()(fn)
    return typer.main.get_command(app)


def long_flag(command, param: str) -> str:
    """A command's long flag for a parameter (``"batch_size"`` -> ``"--batch-size"``)."""
    p = next(p for p in command.params if p.name == param)
    return next((o for o in p.opts if o.startswith("--")), p.opts[0])
