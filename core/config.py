"""config.toml: the user's standing defaults, under every flag (`gptchat paths` shows where it lives).

    model = "azure-docs"   # the model a command runs when none is named (the chat app: when none is remembered)
    device = "cpu"         # auto, cpu, cuda, cuda:N or mps
    dtype = "bf16"         # auto, fp32, fp16 or bf16
    [sampling]             # under a template's own [options], which are tuned to its task, and under the flags
    temperature = 0.8
    top_k = 40

A flag always wins. The file is optional; what it holds is checked when it is read, and a bad file stops the
command with one line naming the file and the key (it is never half applied). The finetune's base model stays
gpt2 unless --model names one (a run records exactly what it started from). Read with the standard library only:
`gptchat --help` and `gptchat paths` never load torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from gptchat.core.errors import UsageError
from gptchat.core.generate import options  # (the settings' table: stdlib only, no torch)

try:
    import tomllib
except ImportError:  # pragma: no cover - Python 3.10: tomli is the same parser
    import tomli as tomllib

FALLBACK_MODEL = "gpt2"
DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
DTYPES = ("auto", "fp32", "fp16", "bf16")
KEYS = ("model", "device", "dtype", "sampling")


class ConfigError(UsageError):
    """config.toml cannot be used: one line naming the file and what is wrong."""


@dataclass(frozen=True)
class Config:
    path: Path | None = None
    model: str | None = None
    device: str | None = None
    dtype: str | None = None
    sampling: dict = field(default_factory=dict)
    error: str | None = None  # why the file is not used (only where tolerated: see tolerate)


_cache: dict[tuple, Config] = {}
_tolerant: set[str] = set()  # config files a running chat app reads leniently (tolerate)


def config_path() -> Path:
    from gptchat.core.paths import get_paths

    return get_paths().config_file


def load() -> Config:
    """The user's config (an empty one where there is no file); read again when the file changes."""
    path = config_path()
    try:
        st = path.stat()
    except OSError:
        return Config()
    key = (str(path), st.st_mtime_ns, st.st_size)
    if key not in _cache:
        try:
            got = _parse(path)
        except ConfigError as e:
            if str(path) not in _tolerant:
                raise
            got = Config(path, error=str(e))
        _cache.clear()
        _cache[key] = got
    return _cache[key]


def tolerate() -> str | None:
    """For the chat app, which must keep running: from now on this process reads the config file leniently (one
    that cannot be used counts as empty: the built-in defaults apply). Returns why the file is not used, if it is
    not. The commands read it strictly: a bad file stops them (the chat command checks it before the app opens)."""
    path = config_path()
    _tolerant.add(str(path))
    return load().error


def _parse(path: Path) -> Config:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read it ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    unknown = [k for k in raw if k not in KEYS]
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r}; the keys are model, device, dtype and a [sampling] table")

    def text(key: str, ok, want: str) -> str | None:
        v = raw.get(key)
        if v is None:
            return None
        if not isinstance(v, str) or not ok(v.strip().lower()):
            raise ConfigError(f"{path}: {key} = {v!r}: use {want}")
        return v.strip()

    model = text("model", bool, "a checkpoint folder, a finetune run or a hub name, in quotes")
    device = text("device", DEVICE_RE.match, "auto, cpu, cuda, cuda:N or mps")
    dtype = text("dtype", DTYPES.__contains__, ", ".join(DTYPES))
    sampling = raw.get("sampling", {})
    if not isinstance(sampling, dict):
        raise ConfigError(f"{path}: sampling must be a table ([sampling], then one setting a line)")
    try:
        sampling = options.check_options(sampling)
    except ValueError as e:
        raise ConfigError(f"{path}: {str(e).replace('options.', 'sampling.')}") from None
    return Config(path, model, device and device.lower(), dtype and dtype.lower(), sampling)


def sampling_defaults() -> dict:
    """Each sampling setting where neither a flag nor a template sets it: the config's [sampling] over the built-in
    defaults (what options.resolve takes as its ``defaults``)."""
    return {**options.DEFAULTS, **load().sampling}


def default_model() -> str:
    """The model a command runs when none is named: config.toml's ``model``, else gpt2."""
    return load().model or FALLBACK_MODEL
