"""Helpers for the training tests: a small real corpus from the stdlib, and GPT-2's vocabulary where
--from-scratch runs look for it (GPTCHAT_HOME/data/tokenizer)."""

from __future__ import annotations

import inspect
from pathlib import Path


def corpus_text(n_chars: int = 60_000) -> str:
    """Real English-and-code text that is on every machine: stdlib modules' source and docstrings."""
    import argparse
    import collections
    import json
    import textwrap

    text = "\n<|endoftext|>\n".join(inspect.getsource(m) for m in (textwrap, json, collections, argparse))
    return text[:n_chars]


def write_corpus(folder: Path, n_chars: int = 60_000, name: str = "corpus.txt") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    p.write_text(corpus_text(n_chars), encoding="utf-8")
    return p


# fast settings for a nano model on a slow shared CPU: 128 tokens a step, short evals, no samples
FAST = dict(from_scratch=True, arch="nano", block_size=32, batch_size=4, eval_batches=2, sample_tokens=0)
