"""Hub names (gpt2, gpt2-medium, ...): found in the local Hugging Face cache, fetched only when online."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from gptchat.core.errors import ModelNotFound
from gptchat.core.paths import hf_hub_cache

# The short names users type, and the repositories they live in now (the hub moved them under
# organisations; caches made before the move hold the old ids, so both are looked for).
HUB_MODELS = {
    "gpt2": ("openai-community/gpt2", "gpt2"),
    "gpt2-medium": ("openai-community/gpt2-medium", "gpt2-medium"),
    "gpt2-large": ("openai-community/gpt2-large", "gpt2-large"),
    "gpt2-xl": ("openai-community/gpt2-xl", "gpt2-xl"),
    "distilgpt2": ("distilbert/distilgpt2", "distilgpt2"),
}
# Only what gptchat reads; never the TF/Flax/ONNX copies that the repos also carry.
PATTERNS = ["config.json", "*.safetensors", "model.safetensors.index.json", "vocab.json", "merges.txt",
            "tokenizer.json", "tokenizer_config.json", "generation_config.json"]


def repo_ids(name: str) -> tuple[str, ...]:
    return HUB_MODELS.get(name, (name,))


def looks_like_repo_id(spec: str) -> bool:
    """'gpt2' or 'owner/name' (not a path that exists, and no path-like characters)."""
    if spec in HUB_MODELS:
        return True
    parts = spec.split("/")
    return len(parts) == 2 and all(p and not p.startswith(".") for p in parts) and "\\" not in spec


def cached_snapshot(name: str) -> Path | None:
    """The snapshot folder of ``name`` in the local HF cache (refs/main first), if it has a config."""
    cache = hf_hub_cache()
    for repo in repo_ids(name):
        root = cache / ("models--" + repo.replace("/", "--"))
        snaps = root / "snapshots"
        if not snaps.is_dir():
            continue
        try:
            candidates = [snaps / ref] if (ref := _main_ref(root)) else []
            candidates += sorted(snaps.iterdir(), key=_mtime, reverse=True)
            for snap in candidates:
                if (snap / "config.json").is_file() and (any(snap.glob("*.safetensors")) or any(snap.glob("*.bin"))):
                    return snap
        except OSError:
            continue  # an unreadable cache entry is not a model
    return None


def _main_ref(repo_root: Path) -> str | None:
    """The commit refs/main points at: a bare name (a hostile ref such as ../../x leads nowhere)."""
    try:
        ref = (repo_root / "refs" / "main").read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return ref if ref and Path(ref).name == ref and not ref.startswith(".") and "\\" not in ref else None


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0  # a dangling link sorts last


def offline() -> bool:
    return any(
        os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check, so that an offline machine fails in seconds instead of hanging."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def download(name: str, how: str | None = None) -> Path:
    """Fetch a hub model into the HF cache (with huggingface_hub's progress bars on stderr); ``how``: what to do
    when there is no network (default: for a command that wanted the model to run)."""
    how = how or f"copy a checkpoint folder here and pass --model PATH, or run `gptchat pull {name}` when online"
    if offline():
        raise ModelNotFound(f"{name} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; {how}")
    if not hub_reachable():
        raise ModelNotFound(f"{name} is not in the local Hugging Face cache and the hub cannot be reached; {how}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    last: Exception | None = None
    for repo in repo_ids(name):
        try:
            return Path(snapshot_download(repo, allow_patterns=PATTERNS, cache_dir=str(hf_hub_cache())))
        except RepositoryNotFoundError as e:
            last = e
        except (HfHubHTTPError, OSError) as e:
            raise ModelNotFound(f"downloading {repo} failed: {str(e).splitlines()[0]}") from None
    raise ModelNotFound(f"no model named {name!r} on the hub ({type(last).__name__})")
