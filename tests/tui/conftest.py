"""Fixtures for the Pilot tests: tiny real checkpoints (the helper functions are in helpers.py)."""

from __future__ import annotations

import pytest

from tests.factory import hf_model, save


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A random-weight GPT-2 with a 1024-token window (so the budget bar has real proportions)."""
    return str(save(hf_model(n_positions=1024, seed=3), tmp_path_factory.mktemp("tiny") / "tiny"))


@pytest.fixture(scope="session")
def slower_model(tmp_path_factory) -> str:
    """Wider than tiny_model, so a long reply takes seconds even on a fast machine: a stop key pressed
    after the first chunk always lands while the reply is still being generated."""
    return str(save(hf_model(n_layer=4, n_head=4, n_embd=256, n_positions=1024, seed=3),
                    tmp_path_factory.mktemp("slower") / "slower"))
