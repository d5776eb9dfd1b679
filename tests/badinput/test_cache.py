"""A tampered Hugging Face cache: refs/main may not lead outside the cache, nor break `gptchat models`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gptchat.core.paths import hf_hub_cache
from gptchat.core.weights.hub import cached_snapshot
from gptchat.tui.cli.main import main
from tests.factory import hf_model, save


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return save(hf_model(n_layer=1, n_head=2, n_embd=8, n_positions=16, seed=6), tmp_path_factory.mktemp("good"))


def cached_repo(good: Path, ref: bytes) -> Path:
    """gpt2 in the HF cache with one good snapshot, and refs/main holding ``ref``."""
    root = hf_hub_cache() / "models--openai-community--gpt2"
    shutil.copytree(good, root / "snapshots" / "abc123")
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_bytes(ref)
    return root


@pytest.mark.parametrize("ref", [b"../../../../outside", b"/tmp", b"\xff\xfe\x00", b".."], ids=["traversal", "absolute", "binary", "dotdot"])
def test_hostile_main_ref_is_not_followed(good, tmp_path, capsys, monkeypatch, ref):
    monkeypatch.chdir(tmp_path)  # `models` also lists checkpoints in the current folder
    root = cached_repo(good, ref)
    outside = (root / "snapshots" / "../../../../outside").resolve()
    shutil.copytree(good, outside, dirs_exist_ok=True)  # a valid model where the ref points
    assert cached_snapshot("gpt2") == root / "snapshots" / "abc123"
    with pytest.raises(SystemExit) as ex:
        main(["models", "--json"])
    out, err = capsys.readouterr()
    assert ex.value.code == 0 and "Traceback" not in err
    assert [(m["name"], m["path"]) for m in json.loads(out)] == [("gpt2", str(root / "snapshots" / "abc123"))]
