"""Example pools for few-shot prompts: read from a JSONL or TSV file, and picked by seed.

Each example is a dict of the template's example fields (``question``/``answer``,
``input``/``output`` ...) plus an ``id`` that says where it came from: the row's own ``id`` if it
has one, else ``file:line``. The id is recorded in the render result, so a generation can be traced
back to the exact examples it was shown.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from gptchat.core.errors import TemplateError

ID = "id"
# The key pairs of common instruction datasets, in the order they are looked for: a row with any of them
# is a (prompt, completion) pair for finetuning, an example for any template, or a held-out document.
KEY_PAIRS = (("prompt", "completion"), ("input", "output"), ("question", "answer"), ("instruction", "response"))
TEXT_KEY = "text"  # a row that is one document, not a pair
JSONL_SUFFIXES = (".jsonl", ".ndjson")
TSV_SUFFIXES = (".tsv", ".tab")
# Backslash escapes inside TSV cells, so one row can hold a tab or a multi-line answer.
_TSV_ESCAPES = {"\\t": "\t", "\\n": "\n", "\\r": "\r", "\\\\": "\\"}


def load_examples(path: str | Path, fields: list[str]) -> list[dict[str, str]]:
    """Read an examples file. ``fields`` are the columns the template needs; extra ones are kept
    out of the prompt (a dataset often carries metadata) but a missing one is an error."""
    path = Path(path)
    if not path.is_file():
        raise TemplateError(f"examples file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in JSONL_SUFFIXES + TSV_SUFFIXES:
        raise TemplateError(
            f"{path.name}: unknown examples format {suffix or '(no suffix)'!r}; use .jsonl "
            f"(one JSON object per line) or .tsv (a header row naming the columns)"
        )
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise TemplateError(f"{path}: cannot read the examples file as UTF-8 text: {e}") from None
    rows = _jsonl(path.name, lines, fields) if suffix in JSONL_SUFFIXES else _tsv(path.name, lines, fields)
    if not rows:
        raise TemplateError(f"{path.name}: no examples in the file (it needs rows with {', '.join(fields)})")
    return rows


def pair_keys(row: dict) -> tuple[str, str] | None:
    """The first of KEY_PAIRS that ``row`` has both keys of, or None."""
    return next(((a, b) for a, b in KEY_PAIRS if a in row and b in row), None)


def pair_of(row: dict, where: str = "the row") -> tuple[str, str] | None:
    """The row's (prompt, completion) under the first of KEY_PAIRS it has, or None."""
    keys = pair_keys(row)
    return (_cell(where, keys[0], row[keys[0]]), _cell(where, keys[1], row[keys[1]])) if keys else None


def row_text(row) -> str:
    """A JSONL row as one document: its ``text``, or its prompt followed by its completion."""
    if isinstance(row, dict):
        if isinstance(row.get(TEXT_KEY), str):
            return row[TEXT_KEY]
        pair = pair_of(row)
        if pair is not None:
            return pair[0] + pair[1]
    raise ValueError(f"expected an object with \"text\" or one of the key pairs {pairs_help()}")


def fit_fields(row: dict, fields: list[str]) -> dict[str, str] | None:
    """``row``'s values for a template's example ``fields``: its own keys when it has them all, else a
    two-field template (input/output, question/answer ...) takes any of KEY_PAIRS in order; None if neither."""
    if all(f in row for f in fields):
        return {f: row[f] for f in fields}
    pair = pair_of(row) if len(fields) == 2 else None
    return dict(zip(fields, pair)) if pair else None


def pairs_help() -> str:
    return ", ".join(f"{a}/{b}" for a, b in KEY_PAIRS)


def _cell(where: str, key: str, value) -> str:
    # Numbers are fine as labels (0/1 classes); lists, objects and null are almost certainly a
    # mistake in how the file was written.
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise TemplateError(f"{where}: {key!r} is {json.dumps(value)}; it must be a string")


def _jsonl(name: str, lines: list[str], fields: list[str]) -> list[dict[str, str]]:
    rows = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{name}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TemplateError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise TemplateError(
                f"{where}: expected a JSON object with keys {', '.join(fields)}, got {type(obj).__name__}"
            )
        fitted = fit_fields(obj, fields)
        if fitted is None:
            missing = [f for f in fields if f not in obj]
            raise TemplateError(
                f"{where}: missing key {', '.join(map(repr, missing))} "
                f"(the template's examples need {', '.join(fields)}"
                + (f", or one of the pairs {pairs_help()})" if len(fields) == 2 else ")")
            )
        row = {f: _cell(where, f, v) for f, v in fitted.items()}
        row[ID] = _cell(where, ID, obj[ID]) if ID in obj else where
        rows.append(row)
    return rows


def _unescape(cell: str) -> str:
    out, i = [], 0
    while i < len(cell):
        pair = cell[i : i + 2]
        if pair in _TSV_ESCAPES:
            out.append(_TSV_ESCAPES[pair])
            i += 2
        else:
            out.append(cell[i])
            i += 1
    return "".join(out)


def _tsv(name: str, lines: list[str], fields: list[str]) -> list[dict[str, str]]:
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    if not numbered:
        return []
    head_no, head = numbered[0]
    columns = [c.strip() for c in head.split("\t")]
    dupes = sorted({c for c in columns if columns.count(c) > 1})
    if dupes:
        raise TemplateError(f"{name}:{head_no}: the header names column {', '.join(map(repr, dupes))} twice")
    missing = [f for f in fields if f not in columns]
    mapped = fit_fields(dict.fromkeys(columns, ""), fields)
    if missing and mapped is not None:  # e.g. prompt/completion columns for an input/output template
        pair = next(p for p in KEY_PAIRS if p[0] in columns and p[1] in columns)
        rename = dict(zip(pair, fields))
        columns = [rename.get(c, c) for c in columns]
        missing = []
    if missing:
        raise TemplateError(
            f"{name}:{head_no}: the header has no column {', '.join(map(repr, missing))} "
            f"(it has {', '.join(map(repr, columns))}; the template's examples need {', '.join(fields)})"
        )
    rows = []
    for lineno, line in numbered[1:]:
        where = f"{name}:{lineno}"
        cells = line.split("\t")
        if len(cells) != len(columns):
            raise TemplateError(
                f"{where}: {len(cells)} tab-separated fields, but the header has {len(columns)} "
                f"({', '.join(columns)}); write a tab inside a cell as \\t"
            )
        values = dict(zip(columns, map(_unescape, cells)))
        row = {f: values[f] for f in fields}
        row[ID] = values.get(ID) or where
        rows.append(row)
    return rows


def choose_examples(pool_size: int, shots: int, seed: int = 0) -> list[int]:
    """Indices of ``shots`` examples from a pool, in prompt order; the same seed, the same pick."""
    if shots < 0:
        raise TemplateError(f"--shots is {shots}; it must be 0 (zero-shot) or more")
    if shots > pool_size:
        raise TemplateError(
            f"--shots is {shots} but there are only {pool_size} examples; "
            f"use --shots {pool_size} or fewer, or give more with --examples FILE"
        )
    return random.Random(seed).sample(range(pool_size), shots)
