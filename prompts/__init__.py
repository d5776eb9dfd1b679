"""Prompt templates as data: the bundled TOML files, user overrides, and strict validation.

A template is a TOML file; loading one runs no code. Only the stdlib is imported here, so
``gptchat.core`` can read templates without this package knowing anything about the engine. The
caller passes the user template folder (``gptchat.core.paths.get_paths().templates``); a user file
with the same name as a bundled one replaces it.

Errors are ``TemplateFileError`` (a ``ValueError``); ``gptchat.core.prompting.templates`` turns them into
the CLI's ``TemplateError``. Every message names the file and the key at fault. The ``[options]`` table
is only checked to be a table here: its keys and values are generation settings, which
``gptchat.core.prompting.templates`` checks against ``gptchat.core.generate.options``.
"""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

try:
    import tomllib
except ImportError:  # pragma: no cover - Python 3.10 has no tomllib; tomli is the same parser
    import tomli as tomllib

KINDS = ("raw", "zero-shot", "one-shot", "few-shot", "chat")

# Keys every kind accepts, and the extra keys each kind uses. Anything else is a typo and an error.
COMMON_KEYS = {"name", "description", "kind", "instruction", "variables", "separators", "stop", "options"}
KIND_KEYS = {
    "raw": {"input_format", "input_variable"},
    "zero-shot": {"input_format", "input_variable"},
    "one-shot": {"input_format", "input_variable", "example_format", "examples"},
    "few-shot": {"input_format", "input_variable", "example_format", "examples", "shots"},
    "chat": {"chat"},
}
SEPARATOR_KEYS = {"instruction": "\n\n", "example": "\n\n", "turn": "\n"}
CHAT_KEYS = {"user_label": "User:", "assistant_label": "Assistant:"}
EXAMPLE_ID_KEY = "id"  # an example row may carry an id; it is recorded, never rendered
DEFAULT_SHOTS = 3


class TemplateFileError(ValueError):
    """A template file (or a format string in it) is invalid."""


@dataclass(frozen=True)
class Template:
    """A validated template. ``source`` is "bundled" or "user"; ``text`` is the file as written."""

    name: str
    description: str
    kind: str
    instruction: str = ""
    input_format: str = "{input}"
    input_variable: str = "input"
    example_format: str = ""
    examples: tuple[dict[str, str], ...] = ()
    shots: int | None = None  # few-shot: examples to show by default (see default_shots)
    variables: dict[str, str] = field(default_factory=dict)  # default values
    separators: dict[str, str] = field(default_factory=lambda: dict(SEPARATOR_KEYS))
    stop: tuple[str, ...] = ()
    options: dict[str, float | int] = field(default_factory=dict)
    user_label: str = CHAT_KEYS["user_label"]
    assistant_label: str = CHAT_KEYS["assistant_label"]
    source: str = "bundled"
    path: str = ""
    text: str = ""
    overrides_bundled: bool = False

    @property
    def example_fields(self) -> list[str]:
        return format_fields(self.example_format) if self.example_format else []

    @property
    def takes_examples(self) -> bool:
        return self.kind in ("one-shot", "few-shot")

    @property
    def default_shots(self) -> int:
        if self.kind == "one-shot":
            return 1
        if self.kind == "few-shot":
            return self.shots if self.shots is not None else DEFAULT_SHOTS
        return 0

    def variable_names(self) -> list[str]:
        """Variables the caller fills (instruction and input), in order of first use."""
        fmt = self.instruction + ("" if self.kind == "chat" else self.input_format)
        names = format_fields(fmt)
        if self.kind == "chat" and "input" not in names:
            names.append("input")
        return names


# -- format strings: "{name}" fields, "{{" and "}}" for literal braces, nothing else ----------

_TOKEN = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}|[{}]")


def parse_format(fmt: str) -> list[tuple[str, str | None]]:
    """Split a format into (literal, field) pairs; field is None for the trailing literal.

    Deliberately smaller than ``str.format``: no attribute access, indexing or conversions, so a
    template can never reach into Python objects. A stray brace is an error, not a guess.
    """
    out: list[tuple[str, str | None]] = []
    literal, pos = [], 0
    for m in _TOKEN.finditer(fmt):
        literal.append(fmt[pos : m.start()])
        pos = m.end()
        tok = m.group(0)
        if tok in ("{{", "}}"):
            literal.append(tok[0])
        elif m.group(1):
            out.append(("".join(literal), m.group(1)))
            literal = []
        else:
            snippet = fmt[max(0, m.start() - 10) : m.start() + 20]
            raise TemplateFileError(
                f"stray {tok!r} near {snippet!r}: write {{name}} for a variable and {tok * 2} for a literal {tok}"
            )
    literal.append(fmt[pos:])
    out.append(("".join(literal), None))
    return out


def format_fields(fmt: str) -> list[str]:
    """The variable names in a format, first use first, each once."""
    return list(dict.fromkeys(name for _, name in parse_format(fmt) if name))


# -- validation -----------------------------------------------------------------------------


def parse_template(text: str, name: str, *, source: str = "bundled", path: str = "") -> Template:
    """Validate a template file's text. ``name`` is the file's stem."""
    where = path or f"{name}.toml"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise TemplateFileError(f"{where}: not valid TOML: {e}") from None
    try:
        fields = _validate(data, name)
    except TemplateFileError as e:
        raise TemplateFileError(f"{where}: {e}") from None
    return Template(**fields, source=source, path=path, text=text)


def _check_type(key: str, value, typ, what: str):
    # bool is an int in Python; a template saying `top_k = true` is a mistake.
    if isinstance(value, bool) or not isinstance(value, typ):
        raise TemplateFileError(f"key {key!r} must be {what}, not {type(value).__name__} {value!r}")
    return value


def _string_table(key: str, value, allowed: dict[str, str] | None = None) -> dict[str, str]:
    _check_type(key, value, dict, "a table")
    for k, v in value.items():
        if allowed is not None and k not in allowed:
            raise TemplateFileError(f"unknown key {key}.{k!r}; known keys: {', '.join(allowed)}")
        _check_type(f"{key}.{k}", v, str, "a string")
    return dict(value)


def _validate(data: dict, stem: str) -> dict:
    kind = data.get("kind")
    if kind is None:
        raise TemplateFileError(f"missing key 'kind' (one of: {', '.join(KINDS)})")
    if kind not in KINDS:
        raise TemplateFileError(f"key 'kind' is {kind!r}; use one of: {', '.join(KINDS)}")
    allowed = COMMON_KEYS | KIND_KEYS[kind]
    for key in data:
        if key not in allowed:
            other = [k for k, keys in KIND_KEYS.items() if key in keys]
            hint = f" (it is used by kind {' / '.join(other)})" if other else ""
            raise TemplateFileError(
                f"unknown key {key!r} for kind {kind!r}{hint}; known keys: {', '.join(sorted(allowed))}"
            )
    if "description" not in data:
        raise TemplateFileError("missing key 'description' (one line saying what the template is for)")
    name = _check_type("name", data.get("name", stem), str, "a string")
    if name != stem:
        raise TemplateFileError(f"key 'name' is {name!r} but the file is {stem}.toml; make them the same")

    out: dict = {"name": name, "kind": kind}
    for key in ("description", "instruction", "input_format", "input_variable", "example_format"):
        if key in data:
            out[key] = _check_type(key, data[key], str, "a string")
    for key in ("instruction", "input_format", "example_format"):
        if key in out:
            try:
                parse_format(out[key])
            except TemplateFileError as e:
                raise TemplateFileError(f"key {key!r}: {e}") from None

    separators = _string_table("separators", data.get("separators", {}), SEPARATOR_KEYS)
    out["separators"] = {**SEPARATOR_KEYS, **separators}
    chat = _string_table("chat", data.get("chat", {}), CHAT_KEYS)
    for k, default in CHAT_KEYS.items():
        label = chat.get(k, default)
        if not label.strip():
            raise TemplateFileError(f"key chat.{k} is empty; give the label a speaker writes, e.g. {default!r}")
        out[k] = label

    stop = _check_type("stop", data.get("stop", []), list, "a list of strings")
    for i, s in enumerate(stop):
        if not isinstance(s, str) or not s:
            raise TemplateFileError(f"key stop[{i}] must be a non-empty string, not {s!r}")
    if kind == "chat":
        # The model would otherwise go on to write the user's next turn itself.
        next_user = "\n" + out["user_label"]
        stop = stop if next_user in stop else [*stop, next_user]
    out["stop"] = tuple(stop)

    # Generation options are the engine's business: gptchat.core checks their names and ranges with the
    # one options module (this package knows nothing about the engine).
    out["options"] = dict(_check_type("options", data.get("options", {}), dict, "a table"))

    _validate_variables(data, out, kind)
    if kind in ("one-shot", "few-shot"):
        _validate_examples(data, out, kind)
    return out


def _validate_variables(data: dict, out: dict, kind: str) -> None:
    if kind == "chat":
        out["input_variable"] = "input"
        used = format_fields(out.get("instruction", "")) + ["input"]
    else:
        fmt = out.get("input_format", "{input}")
        var = out.get("input_variable", "input")
        if var not in format_fields(fmt):
            raise TemplateFileError(
                f"key 'input_format' ({fmt!r}) has no {{{var}}} field; the user's input goes there "
                f"(set 'input_variable' if it has another name)"
            )
        used = format_fields(out.get("instruction", "") + fmt)
    defaults = _string_table("variables", data.get("variables", {}))
    for k in defaults:
        if k not in used:
            raise TemplateFileError(
                f"key variables.{k!r} is not used by 'instruction' or 'input_format' (used: {', '.join(used)})"
            )
    out["variables"] = defaults


def _validate_examples(data: dict, out: dict, kind: str) -> None:
    if "example_format" not in out:
        raise TemplateFileError(f"missing key 'example_format' (kind {kind!r} shows examples)")
    fields = format_fields(out["example_format"])
    if not fields:
        raise TemplateFileError("key 'example_format' has no {field}; examples would all look the same")
    if EXAMPLE_ID_KEY in fields:
        raise TemplateFileError(
            f"key 'example_format' uses {{{EXAMPLE_ID_KEY}}}, which is reserved for example ids; rename the field"
        )
    rows = _check_type("examples", data.get("examples", []), list, "an array of tables ([[examples]])")
    examples = []
    for i, row in enumerate(rows):
        key = f"examples[{i}]"
        _check_type(key, row, dict, "a table")
        for k in fields:
            if k not in row:
                raise TemplateFileError(f"{key} is missing key {k!r} (example_format uses {', '.join(fields)})")
        for k, v in row.items():
            if k not in fields and k != EXAMPLE_ID_KEY:
                raise TemplateFileError(f"unknown key {key}.{k!r}; example_format uses {', '.join(fields)}")
            _check_type(f"{key}.{k}", v, str, "a string")
        examples.append(dict(row))
    out["examples"] = tuple(examples)
    if kind == "few-shot" and "shots" in data:
        shots = _check_type("shots", data["shots"], int, "an integer")
        if shots < 0 or (examples and shots > len(examples)):
            raise TemplateFileError(
                f"key 'shots' is {shots}; it must be between 0 and {len(examples)}, the examples given"
            )
        out["shots"] = shots


# -- finding templates --------------------------------------------------------------------------


def _bundled_files() -> dict[str, "resources.abc.Traversable"]:
    root = resources.files(__name__)
    return {p.name[: -len(".toml")]: p for p in root.iterdir() if p.name.endswith(".toml")}


def _user_files(user_dir: Path | None) -> dict[str, Path]:
    if user_dir is None or not Path(user_dir).is_dir():
        return {}
    return {p.stem: p for p in sorted(Path(user_dir).glob("*.toml")) if p.is_file()}


def _read(name: str, file, source: str, overrides: bool) -> Template:
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TemplateFileError(f"{file}: cannot read the template: {e}") from None
    path = str(file) if source == "user" else f"gptchat/prompts/{name}.toml"
    tpl = parse_template(text, name, source=source, path=path)
    return replace(tpl, overrides_bundled=True) if overrides else tpl


def template_names(user_dir: Path | None = None) -> list[str]:
    return sorted({*_bundled_files(), *_user_files(user_dir)})


def load_template(name: str, user_dir: Path | None = None) -> Template:
    """The user's template called ``name`` if there is one, else the bundled one."""
    user, bundled = _user_files(user_dir), _bundled_files()
    if name in user:
        return _read(name, user[name], "user", name in bundled)
    if name in bundled:
        return _read(name, bundled[name], "bundled", False)
    near = sorted(p for p in Path(user_dir).glob(f"{glob.escape(name)}.*") if p.is_file()) if user_dir else []
    if near:  # mine.yaml, mine.TOML, mine.toml.txt: a template the user wrote, which is never read
        raise TemplateFileError(f"no template named {name!r}: {near[0]} is not read, templates are .toml files; "
                                f"rename it to {name}.toml (`gptchat templates show raw` shows the format)")
    raise TemplateFileError(
        f"no template named {name!r}; available: {', '.join(template_names(user_dir))} "
        f"(see `gptchat templates list`)"
    )


def scan_templates(user_dir: Path | None = None) -> tuple[list[Template], list[str]]:
    """Every template by name, and one message per file that failed to load (so one bad user
    file does not hide the others from a listing)."""
    found, errors = [], []
    for name in template_names(user_dir):
        try:
            found.append(load_template(name, user_dir))
        except TemplateFileError as e:
            errors.append(str(e))
    if user_dir is not None and Path(user_dir).is_dir():
        errors += [f"{p}: templates are .toml files; rename it to {p.name.split('.')[0]}.toml"
                   for p in sorted(Path(user_dir).iterdir())
                   if p.is_file() and p.suffix != ".toml" and not p.name.startswith(".") and not p.name.endswith("~")]
    return found, errors
