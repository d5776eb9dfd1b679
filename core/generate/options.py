"""Every generation setting, defined once: name, aliases, type, range, default, help, what "off" means.

Every front end reads this table: the CLI's Typer options (help and defaults), the TUI's ``/set`` and
settings panel (``parse`` from text), template ``[options]`` and batch JSONL rows (``check`` typed
values), and every caller that samples (``resolve`` explicit > template > default, then
``sampling_params``). A setting's range is therefore the same everywhere: ``SamplingParams`` (what the
engine samples with) is checked against it too, and sampling.py's tensor functions guard their arguments
with ``check``. Neither this module nor SamplingParams imports torch: the chat app builds settings and
paints before torch is loaded.

Errors are ``ValueError`` naming the setting; each front end turns them into its own kind of error.
The module imports nothing heavy at load time: ``gptchat --help`` reads the table.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

__all__ = [
    "Setting", "SETTINGS", "NAMES", "DEFAULTS", "DEFAULT_WORDS", "canonical", "spellings", "parse", "check",
    "check_options", "resolve", "SamplingParams", "sampling_params", "cli_help", "unescape", "parse_vars",
]


@dataclass(frozen=True)
class Setting:
    name: str  # canonical: SamplingParams' field, the template / JSONL key; the CLI flag is its kebab form
    type: type  # float, int or bool
    default: object  # gptchat's own default (None: none, e.g. a random seed)
    help: str  # one or two sentences with the legal values, for --help and the settings panel
    label: str  # how the settings panel names it
    aliases: tuple[str, ...] = ()
    off: object = None  # the value that turns the setting's effect off, for "/set NAME off"; None: no such value
    templated: bool = True  # a template's [options] may set it (explicit > template > default)
    lo: float | None = None  # the legal range: lo <= v (lo < v when lo_open) and v <= hi; floats also finite
    lo_open: bool = False
    hi: float | None = None
    legal: str = ""  # the range in words, for error messages ("between 0 and 1 (1 means off)")

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def in_range(self, v) -> bool:
        if isinstance(v, float) and not math.isfinite(v):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return self.hi is None or v <= self.hi


SETTINGS: dict[str, Setting] = {s.name: s for s in (
    Setting("temperature", float, 0.8, "Sampling temperature, >= 0; 0 means greedy.", "temperature",
            aliases=("temp",), lo=0, legal="a number >= 0 (0 means greedy)"),
    Setting("top_k", int, 40, "Sample from the k most likely tokens only, >= 0; 0 turns it off.", "top-k",
            aliases=("topk",), off=0, lo=0, legal="a whole number >= 0 (0 means off)"),
    Setting("top_p", float, 1.0, "Nucleus sampling: keep the most likely tokens up to this probability mass, "
            "0 to 1; 1 turns it off, 0 is greedy.", "top-p", aliases=("topp",), off=1.0, lo=0, hi=1,
            legal="between 0 and 1 (1 means off)"),
    Setting("repetition_penalty", float, 1.0, "Penalise tokens already in the context, > 0; 1 turns it off, "
            "1.1-1.3 is typical.", "repetition penalty", aliases=("rep",), off=1.0, lo=0, lo_open=True,
            legal="a number > 0 (1 means off)"),
    Setting("max_new_tokens", int, 128, "The most tokens to generate, >= 1 (kept inside the model's window).",
            "max new tokens", aliases=("max", "max_tokens", "n"), lo=1, legal="a whole number >= 1"),
    Setting("greedy", bool, False, "Always take the most likely token (deterministic; ignores the sampling "
            "options).", "greedy", off=False, templated=False),
    Setting("seed", int, None, "Random seed, a whole number: the same seed, prompt and options give the same "
            "text.", "seed", templated=False),
)}
NAMES = tuple(n for n, s in SETTINGS.items() if s.templated)  # what a template's [options] may set
DEFAULTS = {n: SETTINGS[n].default for n in NAMES}
DEFAULT_WORDS = ("", "none", "default", "auto", "-")  # typed for a value: back to the template's / the default
_TRUE, _FALSE = ("on", "true", "yes", "1"), ("off", "false", "no", "0")


def _key(spelling: str) -> str:
    return spelling.strip().lower().replace("-", "_")


_BY_SPELLING = {_key(a): s.name for s in SETTINGS.values() for a in (s.name, *s.aliases)}


def spellings(name: str) -> list[str]:
    """Every way to write a setting: canonical, kebab-case, and each alias."""
    s = SETTINGS[name]
    return list(dict.fromkeys([s.name, s.name.replace("_", "-"), *s.aliases]))


def canonical(spelling: str) -> str | None:
    """The canonical name for any spelling (``temp``, ``top-p``, ``Max_Tokens``), or None if none."""
    return _BY_SPELLING.get(_key(spelling))


def _setting(name: str) -> Setting:
    n = canonical(name)
    if n is None:
        raise ValueError(f"no setting {name!r}; settings are {', '.join(SETTINGS)}")
    return SETTINGS[n]


def check(name: str, value):
    """A typed value (TOML, JSON, a CLI flag) checked against the setting's type and range.

    Returns it normalised (ints for int settings, floats for float ones); ValueError says what is legal.
    ``None`` is not a value here: callers treat None as "not given".
    """
    s = _setting(name)
    if s.type is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{s.name} must be true or false, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        what = "a whole number" if s.type is int else "a number"
        raise ValueError(f"{s.name} must be {what}, got {value!r}")
    if s.type is int and not isinstance(value, int):
        raise ValueError(f"{s.name} must be a whole number, got {value!r}")
    if not s.in_range(value):  # the value as given, so the message shows what was written
        raise ValueError(f"{s.name} must be {s.legal}, got {value!r}")
    return int(value) if s.type is int else float(value)


def parse(name: str, text: str):
    """A value typed as text (``/set top-p 0.9``, the settings panel) -> the checked value.

    ``DEFAULT_WORDS`` give None (the template's value, else the default); ``off`` gives the value that
    turns the setting off where there is one (top-k 0, top-p 1, ...). ValueError says what is legal.
    """
    s = _setting(name)
    t = str(text).strip()
    low = t.lower()
    if s.type is bool:
        if low in ("", *_TRUE):  # "/set greedy" alone means on
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"{s.name} is on or off, got {t!r}")
    if low in DEFAULT_WORDS:
        return None
    if low == "off":
        if s.off is None:
            raise ValueError(f"{s.name} has no off value: {s.help}")
        return s.off
    try:
        value = int(t) if s.type is int else float(t)
    except ValueError:
        what = "a whole number" if s.type is int else "a number"
        raise ValueError(f"{s.name} must be {what}, got {t!r}") from None
    return check(s.name, value)


def check_options(options: dict) -> dict:
    """A template's ``[options]`` table: known keys only, each value checked; ValueError names the key."""
    if not isinstance(options, dict):
        raise ValueError(f"options must be a table, not {type(options).__name__}")
    out = {}
    for k, v in options.items():
        if k not in NAMES:
            raise ValueError(f"unknown key options.{k!r}; known options: {', '.join(NAMES)}")
        try:
            out[k] = check(k, v)
        except ValueError as e:
            raise ValueError(f"key options.{k}: {e}") from None
    return out


def resolve(given: dict, template_options: dict | None, defaults: dict) -> dict:
    """Each templated setting from the first place that sets it (value not None): given, template, ``defaults``
    (core/config.py's sampling_defaults: config.toml's [sampling] over DEFAULTS)."""
    tpl = template_options or {}
    return {k: given[k] if given.get(k) is not None else tpl.get(k, defaults[k]) for k in NAMES}


@dataclass(frozen=True)
class SamplingParams:
    """How the engine picks each token (core/generate/sampling.py); every field is checked against the table."""

    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off; CTRL's penalty on tokens already in the context
    greedy: bool = False

    def __post_init__(self) -> None:
        for name in ("temperature", "top_k", "top_p", "repetition_penalty", "greedy"):
            check(name, getattr(self, name))

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0 or self.top_k == 1 or self.top_p == 0

    def to_dict(self) -> dict:
        return asdict(self)


def sampling_params(o: dict, greedy: bool = False) -> tuple[SamplingParams, int]:
    """(SamplingParams, max_new_tokens) from resolved values; ValueError names a bad value."""
    v = {k: check(k, o[k]) for k in NAMES}
    params = SamplingParams(temperature=v["temperature"], top_k=v["top_k"], top_p=v["top_p"],
                            repetition_penalty=v["repetition_penalty"], greedy=bool(greedy))
    return params, v["max_new_tokens"]


def cli_help(name: str) -> str:
    """The help of a CLI flag: what it does and legal values, then where its default comes from."""
    s = SETTINGS[name]
    if not s.templated:
        return s.help
    default = f"{s.default:g}" if isinstance(s.default, float) else str(s.default)
    return f"{s.help} Default: the template's, else {default}."


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
