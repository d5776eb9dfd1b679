"""What every CLI command shares: option aliases, output helpers, error handling."""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated, Optional

import typer

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


def debug() -> bool:
    return os.environ.get("GPTCHAT_DEBUG", "") not in ("", "0")


def err(msg: str) -> None:
    """A line for the person at the terminal (stderr, so stdout stays clean for scripts)."""
    print(msg, file=sys.stderr, flush=True)


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def human_count(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return str(n)
