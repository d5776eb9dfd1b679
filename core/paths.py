"""Every location gptchat reads or writes. ``GPTCHAT_HOME`` redirects all of them (tests use it).

What gptchat writes there (chat history, finetune runs, tokenised data) is the user's private data:
folders are created with ``private_dir`` (0700) and files with ``private_file``/``open_private`` (0600),
whatever the umask.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from gptchat.core.errors import PathError

APP = "gptchat"
PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


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


# -- private folders and files ----------------------------------------------------------------------


def private_dir(path: str | os.PathLike) -> Path:
    """``path`` as a folder only its owner can enter (0700), created with any missing parents (0700).

    An existing folder is tightened to 0700 (history written by older versions was 0755). Raises
    PathError, in one line, when it cannot be made (a file in the way, no permission, disk full).
    """
    path = Path(path).expanduser()
    missing = []
    p = path
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    try:
        for d in reversed(missing):
            try:
                d.mkdir(mode=PRIVATE_DIR)
            except FileExistsError:  # another process made it first
                if not d.is_dir():
                    raise
            os.chmod(d, PRIVATE_DIR)  # mkdir's mode is masked by the umask
        if not path.is_dir():
            raise NotADirectoryError(f"{path} is not a folder")
        _tighten(path, PRIVATE_DIR)
    except OSError as e:
        raise PathError(_cannot(path, e)) from None
    return path


def private_file(path: str | os.PathLike) -> Path:
    """``path`` as a file only its owner can read (0600): created empty when missing, tightened otherwise.

    Call it before a library (sqlite3, torch.save, numpy) writes the file, or right after.
    """
    path = Path(path)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, PRIVATE_FILE))
        _tighten(path, PRIVATE_FILE)
    except OSError as e:
        raise PathError(f"cannot create {path}: {e.strerror or e}") from None
    return path


def open_private(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8"):
    """``open(path, mode)`` for writing ("w", "a", "x", with or without "b"), the file created 0600."""
    flags = os.O_WRONLY | os.O_CREAT | {"w": os.O_TRUNC, "a": os.O_APPEND, "x": os.O_EXCL}[mode.replace("b", "")[0]]
    fd = os.open(path, flags, PRIVATE_FILE)
    try:
        _tighten(path, PRIVATE_FILE)
        return os.fdopen(fd, mode, encoding=None if "b" in mode else encoding)
    except BaseException:
        os.close(fd)
        raise


def _tighten(path: Path, mode: int) -> None:
    """chmod ``path`` to ``mode`` when others can read it; a folder we do not own is left as it is."""
    st = os.stat(path)
    if stat.S_IMODE(st.st_mode) & 0o077 and (not hasattr(os, "getuid") or st.st_uid == os.getuid()):
        os.chmod(path, mode)


def _cannot(path: Path, e: OSError) -> str:
    blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    why = f"{blocker} is a file, not a folder" if blocker else (e.strerror or str(e))
    home = os.environ.get("GPTCHAT_HOME")
    hint = f" (check GPTCHAT_HOME={home})" if home and path.is_relative_to(Path(home).expanduser()) else ""
    return f"cannot create the folder {path}: {why}{hint}"
