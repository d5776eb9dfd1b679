"""Every location gptchat reads or writes. ``GPTCHAT_HOME`` redirects all of them (tests use it)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

APP = "gptchat"


@dataclass(frozen=True)
class Paths:
    config: Path  # config.toml, user templates
    data: Path  # history database, finetune runs, registered models
    cache: Path  # tokenized datasets

    @property
    def config_file(self) -> Path:
        return self.config / "config.toml"

    @property
    def templates(self) -> Path:
        return self.config / "templates"

    @property
    def history_db(self) -> Path:
        return self.data / "history.sqlite3"

    @property
    def runs(self) -> Path:
        return self.data / "runs"

    @property
    def models(self) -> Path:
        return self.data / "models"

    @property
    def datasets(self) -> Path:
        return self.cache / "datasets"

    def as_dict(self) -> dict[str, str]:
        return {
            "config": str(self.config),
            "config_file": str(self.config_file),
            "templates": str(self.templates),
            "data": str(self.data),
            "history": str(self.history_db),
            "runs": str(self.runs),
            "models": str(self.models),
            "cache": str(self.cache),
            "datasets": str(self.datasets),
            "hf_cache": str(hf_hub_cache()),
        }


def get_paths() -> Paths:
    home = os.environ.get("GPTCHAT_HOME")
    if home:
        root = Path(home).expanduser()
        return Paths(config=root / "config", data=root / "data", cache=root / "cache")
    import platformdirs

    return Paths(
        config=Path(platformdirs.user_config_dir(APP)),
        data=Path(platformdirs.user_data_dir(APP)),
        cache=Path(platformdirs.user_cache_dir(APP)),
    )


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache, resolved the way huggingface_hub does (without importing it)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"
