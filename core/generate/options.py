"""Generation options as the CLI resolves them: explicit value > template option > default.

Shared by ``gptchat generate`` and ``gptchat batch`` (where a JSONL row's own values come first).
"""

from __future__ import annotations

from gptchat.core.generate.sampling import SamplingParams

DEFAULTS = dict(temperature=0.8, top_k=40, top_p=1.0, repetition_penalty=1.0, max_new_tokens=128)
NAMES = tuple(DEFAULTS)


def resolve(given: dict, template_options: dict | None = None) -> dict:
    """Each option from the first place that sets it (value not None): given, template, default."""
    tpl = template_options or {}
    return {k: given[k] if given.get(k) is not None else tpl.get(k, DEFAULTS[k]) for k in DEFAULTS}


def sampling_params(o: dict, greedy: bool = False) -> tuple[SamplingParams, int]:
    """SamplingParams and max_new_tokens from resolved options; ValueError names a bad value."""
    for k, kind in (("temperature", float), ("top_p", float), ("repetition_penalty", float), ("top_k", int),
                    ("max_new_tokens", int)):
        v = o[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and v != int(v)):
            raise ValueError(f"{k} must be a {'whole ' if kind is int else ''}number, got {v!r}")
    n = int(o["max_new_tokens"])
    if n < 1:
        raise ValueError(f"max_new_tokens must be a whole number >= 1, got {n}")
    params = SamplingParams(temperature=float(o["temperature"]), top_k=int(o["top_k"]), top_p=float(o["top_p"]),
                            repetition_penalty=float(o["repetition_penalty"]), greedy=bool(greedy))
    return params, n


def unescape(s: str) -> str:
    """``\\n`` and ``\\t`` typed on a command line become a newline and a tab."""
    return s.replace("\\n", "\n").replace("\\t", "\t")


def parse_vars(items: list[str] | None) -> dict[str, str]:
    """``--var NAME=VALUE`` items to a dict; ValueError on an item without ``=`` or a name."""
    out = {}
    for item in items or []:
        name, eq, value = item.partition("=")
        if not eq or not name.strip():
            raise ValueError(f"--var takes NAME=VALUE, got {item!r}")
        out[name.strip()] = unescape(value)
    return out
