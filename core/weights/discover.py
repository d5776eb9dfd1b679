"""Find the GPT-2 checkpoints on this machine, for `gptchat models` and the TUI's model picker."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from gptchat.core.errors import GptchatError
from gptchat.core.paths import get_paths, hf_hub_cache
from gptchat.core.weights.checkpoints import Checkpoint, _run_output, sniff
from gptchat.core.weights.hub import HUB_MODELS, cached_snapshot


@dataclass
class LocalModel:
    name: str  # what to pass to --model
    format: str
    path: str
    params: int
    size_bytes: int
    shape: str
    source: str  # hf-cache | runs | models | dir

    @classmethod
    def of(cls, ck: Checkpoint, name: str, source: str) -> "LocalModel":
        c = ck.config
        return cls(
            name=name,
            format=ck.format,
            path=str(ck.path),
            params=c.n_params(),
            size_bytes=ck.size_bytes,
            shape=f"{c.n_layer}L/{c.n_head}H/{c.n_embd}d/{c.n_positions}ctx",
            source=source,
        )


def _try(path: Path, name: str, source: str) -> LocalModel | None:
    try:
        return LocalModel.of(sniff(path, name=name), name, source)
    except (GptchatError, OSError):
        return None  # not a GPT-2 checkpoint (or unreadable): not listed


def _is_file(p: Path) -> bool:
    try:
        return p.is_file()
    except OSError:  # a folder we may not enter: skipped, so one bad folder never breaks the listing
        return False


def _hf_cache_models() -> list[LocalModel]:
    out = []
    short = {repo: name for name, repos in HUB_MODELS.items() for repo in repos}
    cache = hf_hub_cache()
    if not cache.is_dir():
        return out
    seen = set()
    for d in sorted(cache.glob("models--*")):
        repo = d.name[len("models--"):].replace("--", "/")
        name = short.get(repo, repo)
        if name in seen:
            continue
        snap = cached_snapshot(name)
        if snap is not None and (m := _try(snap, name, "hf-cache")):
            seen.add(name)
            out.append(m)
    return out


def _folder_models(root: Path, source: str) -> list[LocalModel]:
    out = []
    if not root.is_dir():
        return out
    for d in sorted(root.iterdir()):
        if not d.is_dir():
            continue
        try:
            target = _run_output(d) if source == "runs" else d
        except GptchatError:
            continue
        if m := _try(target, d.name, source):
            out.append(m)
    return out


def local_models(extra_dirs: list[Path] | None = None) -> list[LocalModel]:
    """Hub models in the HF cache, finetune runs, registered models, and checkpoints in extra_dirs.

    ``extra_dirs`` (default: the current directory) are searched one level deep, for folders with a
    config.json and for nanoGPT ckpt.pt files.
    """
    paths = get_paths()
    found = _hf_cache_models() + _folder_models(paths.runs, "runs") + _folder_models(paths.models, "models")
    for root in extra_dirs if extra_dirs is not None else [Path.cwd()]:
        root = Path(root)
        if not root.is_dir():
            continue
        try:
            cands = [root] + [d for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")]
        except OSError:
            continue  # an unreadable folder holds nothing we can list
        for d in cands:
            if _is_file(d / "config.json") or _is_file(d / "ckpt.pt"):
                rel = os.path.relpath(d) if d != Path.cwd() else "."
                if m := _try(d, rel if not rel.startswith("..") else str(d), "dir"):
                    found.append(m)
    return found
