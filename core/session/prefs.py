"""Chat settings that stick: the last model, template, shots, examples file, sampling settings and
template variables, restored on the next launch; and the settings a reopened conversation last used.

The launch settings live in the user config dir (``chat-settings.json``), written atomically (a
temporary file beside it, then ``os.replace``) and 0600. Whatever is read back, from that file or from
a conversation's history, is checked setting by setting: a value that is no longer legal (a deleted
examples file, a removed template, a hand edit) is dropped, never a reason not to start.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

from gptchat.core.errors import GptchatError
from gptchat.core.generate import options
from gptchat.core.paths import get_paths, open_private, private_dir
from gptchat.core.session.settings import SETTING_NAMES, ChatSettings, parse_setting, settings_from

FILE_NAME = "chat-settings.json"
MACHINE = ("device", "dtype", "quantize")  # the machine's settings, not the chat's: never kept nor restored
KEPT = tuple(n for n in SETTING_NAMES if n not in MACHINE)


def prefs_path() -> Path:
    return get_paths().config / FILE_NAME


def kept_values(saved: dict) -> dict:
    """The entries of ``saved`` that are kept settings with legal values (the others are dropped)."""
    out = {}
    for k, v in saved.items():
        if k not in KEPT or v is None:
            continue
        try:
            if k == "vars":
                if isinstance(v, dict) and all(isinstance(x, str) for x in v.values()):
                    out[k] = {str(n): x for n, x in v.items()}
            elif k in options.SETTINGS:
                out[k] = options.check(k, v)
            elif k == "model":
                if isinstance(v, str) and v.strip():
                    out[k] = v
            else:
                out[k] = parse_setting(k, str(v))
        except (GptchatError, ValueError):
            continue
    return out


def load() -> dict:
    """The kept settings of the last launch ({} when there are none or the file cannot be read)."""
    try:
        raw = json.loads(prefs_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return kept_values(raw) if isinstance(raw, dict) else {}


def save(settings: ChatSettings) -> None:
    """Keep ``settings`` for the next launch. Raises PathError/OSError when the config dir is not writable."""
    path = prefs_path()
    private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open_private(tmp) as f:
        json.dump({k: v for k, v in settings.to_dict().items() if k in KEPT}, f, indent=1)
    os.replace(tmp, path)


def startup_settings(given: dict) -> ChatSettings:
    """A launch's settings: each one given (a CLI flag, not None), else the last launch's, else the default.
    UsageError for a bad given value."""
    return settings_from(**{**load(), **{k: v for k, v in given.items() if v is not None}})


def conversation_settings(current: ChatSettings, saved: dict) -> ChatSettings:
    """The settings to continue a conversation with: what it last used (``saved``; settings not in it
    back to their defaults), on this machine's device, dtype and quantization. ``saved`` empty: ``current``."""
    kept = kept_values(saved)
    if not kept:
        return current
    return replace(ChatSettings(**{k: getattr(current, k) for k in MACHINE}), **kept)
