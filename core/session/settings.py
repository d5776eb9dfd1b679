"""What the next chat message uses: the model, the template and its examples, and the generation
settings of core/generate/options.py (names, ranges and defaults come from there, nowhere else)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from gptchat.core.config import sampling_defaults
from gptchat.core.errors import UsageError
from gptchat.core.generate import options
from gptchat.core.generate.text import GenOptions
from gptchat.core.model.words import QUANT_MODES
from gptchat.core.prompting.templates import get_template


@dataclass
class ChatSettings:
    """What the next message uses. ``None`` for a generation option means: the template's, else the default."""

    model: str | None = None
    template: str = "chat"
    shots: int | None = None
    examples: str | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    greedy: bool = False
    max_new_tokens: int | None = None
    seed: int | None = None
    device: str | None = None
    dtype: str | None = None
    quantize: str | None = None  # None: the checkpoint's weights; "int8" (core/model/quant.py), CPU only
    vars: dict[str, str] = field(default_factory=dict)  # template variables other than the input (zero-shot's task)

    def resolved(self, template_options: dict) -> dict:
        """Concrete generation values: the setting, else the template's option, else gptchat's default."""
        return options.resolve({k: getattr(self, k) for k in options.NAMES}, template_options, sampling_defaults())

    def gen_options(self, template_options: dict, stop=(), seed: int | None = None) -> GenOptions:
        try:
            params, n_new = options.sampling_params(self.resolved(template_options), self.greedy)
            return GenOptions(params=params, max_new_tokens=n_new, seed=seed, stop=tuple(stop))
        except ValueError as e:
            raise UsageError(str(e)) from None

    def with_value(self, name: str, text: str) -> "ChatSettings":
        """A copy with one setting parsed from text (``/set temp 0.7``: any spelling); UsageError if bad."""
        name = setting_name(name)
        return replace(self, **{name: parse_setting(name, text)})

    def with_var(self, name: str, value: str) -> "ChatSettings":
        """A copy with one template variable set (``/var task Translate``); an empty value unsets it."""
        name = name.strip()
        if not name or not name.replace("_", "").isalnum():
            raise UsageError(f"a variable name is letters, digits and _, got {name!r}")
        kept = {k: v for k, v in self.vars.items() if k != name}
        return replace(self, vars={**kept, name: options.unescape(value)} if value else kept)

    def to_dict(self) -> dict:
        return asdict(self)


SETTING_NAMES = tuple(f.name for f in fields(ChatSettings))


def setting_name(spelling: str) -> str:
    """The canonical name of a chat setting from any spelling (``temp``, ``top-p``); UsageError if none."""
    name = options.canonical(spelling) or spelling.strip().lower().replace("-", "_")
    if name not in SETTING_NAMES:
        raise UsageError(f"no setting {spelling.strip()!r}; settings are {', '.join(SETTING_NAMES)}")
    return name


def parse_setting(name: str, text: str):
    """A chat setting's value from text; generation options parse through the options module."""
    name = setting_name(name)
    if name in options.SETTINGS:
        try:
            return options.parse(name, text)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if name == "vars":
        try:
            return options.parse_vars(str(text).split())
        except ValueError as e:
            raise UsageError(str(e)) from None
    text = str(text).strip()
    if text.lower() in options.DEFAULT_WORDS:
        return "chat" if name == "template" else None
    if name == "quantize":
        if text.lower() not in QUANT_MODES:
            raise UsageError(f"quantize is one of {', '.join(QUANT_MODES)}, got {text!r}")
        return text.lower()
    if name == "shots":
        try:
            v = int(text)
        except ValueError:
            raise UsageError(f"shots must be a whole number, got {text!r}") from None
        if v < 0:
            raise UsageError(f"shots must be >= 0, got {v}")
        return v
    if name == "template":
        get_template(text)  # TemplateError names what is wrong
        return text
    if name == "examples":
        if not Path(text).expanduser().is_file():
            raise UsageError(f"examples file {text} does not exist")
        return str(Path(text).expanduser())
    return text


def settings_from(**given) -> ChatSettings:
    """ChatSettings from typed values (the CLI's flags); each generation option checked. UsageError if bad."""
    for k, v in given.items():
        if v is None:
            continue
        if k in options.SETTINGS:
            try:
                given[k] = options.check(k, v)
            except ValueError as e:
                raise UsageError(str(e)) from None
        elif k in ("template", "shots", "examples", "quantize"):
            given[k] = parse_setting(k, str(v))
    return ChatSettings(**given)
