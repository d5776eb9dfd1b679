"""Batch prompting files: reading prompt rows, writing result rows, resuming and merging outputs.

Input is a .txt file (one prompt per line), a .jsonl file (one object per line: ``prompt`` or the
template's variables, an optional ``id`` and per-row options), or the same text from stdin.

Output is JSONL (one object per line) or CSV. Each record goes out in a single write followed by a
flush to a part file beside the output, so a crash leaves whole records plus, at worst, one partial
record at the end, which a resumed run cuts off; the output itself is only ever replaced whole. Records are keyed by (id, model, template, shots): the key says which work is
done, whatever order the records are in.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from gptchat.core.errors import BatchInputError, BatchOutputError
from gptchat.core.generate.options import NAMES as OPTION_NAMES
from gptchat.core.outputs import replace_atomic

FORMATS = ("jsonl", "csv")
INPUT_FORMATS = ("txt", "jsonl")
ROW_OPTIONS = set(OPTION_NAMES) | {"greedy", "stop", "seed"}
RESERVED = {"id", "prompt"} | ROW_OPTIONS


@dataclass
class Row:
    index: int  # position among the good rows of the input, 0-based
    line: int  # line number in the input file
    id: str
    prompt: str | None = None  # raw text (no template), or the template's input
    variables: dict[str, str] = field(default_factory=dict)
    overrides: dict = field(default_factory=dict)  # per-row temperature, top_k, ..., stop, seed


@dataclass
class Skipped:
    line: int
    reason: str


# -- input ------------------------------------------------------------------------------------------


def detect_format(name: str, text: str, fmt: str | None) -> str:
    if fmt:
        if fmt not in INPUT_FORMATS:
            raise BatchInputError(f"unknown input format {fmt!r}; use txt or jsonl")
        return fmt
    suffix = Path(name).suffix.lower()
    if suffix == ".txt":
        return "txt"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if name == "-":  # stdin: JSON Lines if the first line is a JSON object
        first = next((ln for ln in text.splitlines() if ln.strip()), "")
        return "jsonl" if first.lstrip().startswith("{") else "txt"
    raise BatchInputError(
        f"{name}: cannot tell the input format from {suffix or 'no suffix'!r}; name it .txt (one prompt "
        f"per line) or .jsonl (one JSON object per line), or pass --input-format"
    )


def read_rows(
    name: str,
    text: str,
    fmt: str | None = None,
    *,
    templated: bool = False,
    skip_bad: bool = False,
    skipped: list[Skipped] | None = None,
) -> list[Row]:
    """Parse the input. A bad row raises BatchInputError naming ``name:line``, or with ``skip_bad``
    is left out and recorded in ``skipped``. ``templated``: rows may carry template variables."""
    fmt = detect_format(name, text, fmt)
    label = "stdin" if name == "-" else Path(name).name
    rows: list[Row] = []
    ids: set[str] = set()
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = _txt_row(line, lineno) if fmt == "txt" else _json_row(line, lineno, templated)
            if row.id in ids:
                raise ValueError(f"id {row.id!r} is used by an earlier row; ids must be unique")
        except ValueError as e:
            msg = f"{label}:{lineno}: {e}"
            if not skip_bad:
                raise BatchInputError(msg + " (--skip-bad skips such rows)") from None
            if skipped is not None:
                skipped.append(Skipped(lineno, msg))
            continue
        ids.add(row.id)
        row.index = len(rows)
        rows.append(row)
    if not rows:  # an empty job would replace the output with nothing and exit 0
        bad = len(skipped or []) if skip_bad else 0
        raise BatchInputError(f"no prompts in {label}" + (f": all {bad} rows are bad" if bad else ""))
    return rows


def _txt_row(line: str, lineno: int) -> Row:
    return Row(0, lineno, str(lineno), prompt=line.rstrip("\r"))


def _json_row(line: str, lineno: int, templated: bool) -> Row:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object such as {{\"prompt\": \"...\"}}, got {type(obj).__name__}")
    rid = obj.get("id", lineno)
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or rid == "":
        raise ValueError(f"'id' must be a non-empty string or an integer, got {json.dumps(rid)}")
    prompt = obj.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError(f"'prompt' must be a string, got {json.dumps(prompt)}")
    variables = {}
    for k, v in obj.items():
        if k in RESERVED:
            continue
        if not templated:
            raise ValueError(
                f"unknown key {k!r}; without --template a row has 'prompt', optional 'id' and options "
                f"({', '.join(sorted(ROW_OPTIONS))})"
            )
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise ValueError(f"variable {k!r} must be a string, got {json.dumps(v)}")
        variables[k] = v if isinstance(v, str) else str(v)
    if prompt is None and not variables:
        raise ValueError("the row has no 'prompt'" + (" and no template variables" if templated else ""))
    if prompt is not None and not prompt:
        raise ValueError("'prompt' is empty")
    return Row(0, lineno, str(rid), prompt=prompt, variables=variables, overrides=_overrides(obj))


def _overrides(obj: dict) -> dict:
    out = {}
    for k in ("temperature", "top_p", "repetition_penalty"):
        if k in obj:
            v = obj[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{k!r} must be a number, got {json.dumps(v)}")
            out[k] = float(v)
    for k in ("top_k", "max_new_tokens", "seed"):
        if k in obj:
            v = obj[k]
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{k!r} must be a whole number, got {json.dumps(v)}")
            out[k] = v
    if "greedy" in obj:
        if not isinstance(obj["greedy"], bool):
            raise ValueError(f"'greedy' must be true or false, got {json.dumps(obj['greedy'])}")
        out["greedy"] = obj["greedy"]
    if "stop" in obj:
        stop = obj["stop"]
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"'stop' must be a non-empty string or a list of them, got {json.dumps(obj['stop'])}")
        out["stop"] = stop
    return out


# -- output -----------------------------------------------------------------------------------------

CSV_COLUMNS = [
    "id", "model", "template", "shots", "examples", "seed", "temperature", "top_k", "top_p",
    "repetition_penalty", "greedy", "max_new_tokens", "prompt_tokens", "completion_tokens",
    "finish_reason", "completion", "prefill_s", "decode_s", "batch_size", "rank",
]


def record_key(rec: dict) -> tuple[str, str, str, str]:
    """What identifies a result: the row id and the grid cell (model, template, shots)."""
    shots = rec.get("shots")
    return (str(rec.get("id")), str(rec.get("model") or ""), str(rec.get("template") or ""),
            "" if shots in (None, "") else str(shots))


def encode(rec: dict, fmt: str) -> bytes:
    """One complete record as bytes, newline included."""
    if fmt == "jsonl":
        return (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8")
    return _csv_line([_csv_cell(rec, c) for c in CSV_COLUMNS])


def _csv_line(cells: list) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(cells)
    return buf.getvalue().encode("utf-8")


def _csv_cell(rec: dict, col: str):
    s = rec.get("sampling", {})
    t = rec.get("timings", {})
    v = {
        "examples": ";".join(rec.get("examples") or []),
        **{k: s.get(k) for k in ("temperature", "top_k", "top_p", "repetition_penalty", "greedy")},
        **{k: t.get(k) for k in ("prefill_s", "decode_s", "batch_size", "rank")},
    }.get(col, rec.get(col))
    return "" if v is None else v


class Writer:
    """Appends whole records to a file (or stdout's buffer), one write and one flush per record."""

    def __init__(self, stream, fmt: str, header: bool):
        self.stream, self.fmt = stream, fmt
        if header and fmt == "csv":
            self._put(_csv_line(CSV_COLUMNS))

    @classmethod
    def open(cls, path: Path, fmt: str, append: bool) -> "Writer":
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "ab" if append else "wb")
        return cls(f, fmt, header=f.tell() == 0)

    def _put(self, data: bytes) -> None:
        self.stream.write(data)
        self.stream.flush()

    def write(self, rec: dict) -> None:
        self._put(encode(rec, self.fmt))

    def close(self) -> None:
        self.stream.close()


@dataclass
class Chunk:
    key: tuple[str, str, str, str]
    data: bytes  # the record as written, newline included


def scan(path: Path, fmt: str, repair: bool = True) -> list[Chunk]:
    """The whole records in an output file. A partial record at the end (a crash mid-write) is cut
    off the file when ``repair``; anything else unreadable is an error: we never guess."""
    if not path.exists():
        return []
    data = path.read_bytes()
    chunks, end = _split(data, fmt, path)
    if end < len(data) and repair:
        with open(path, "r+b") as f:
            f.truncate(end)
    return chunks


def _split(data: bytes, fmt: str, path: Path) -> tuple[list[Chunk], int]:
    # Record boundaries: a newline (outside quotes, for CSV). Whatever follows the last one is partial.
    bounds, start, quoted = [], 0, False
    for i, b in enumerate(data):
        if b == 0x22 and fmt == "csv":  # '"'
            quoted = not quoted
        elif b == 0x0A and not quoted:
            bounds.append((start, i + 1))
            start = i + 1
    chunks, header_seen = [], False
    for n, (a, b) in enumerate(bounds, 1):
        raw = data[a:b]
        try:
            text = raw.decode("utf-8")
            if fmt == "jsonl":
                rec = json.loads(text)
                if not isinstance(rec, dict) or "id" not in rec:
                    raise ValueError("not a result record")
            else:
                cells = next(csv.reader(io.StringIO(text)))
                if not header_seen:
                    if cells != CSV_COLUMNS:
                        raise ValueError("the header is not gptchat batch's")
                    header_seen = True
                    continue
                if len(cells) != len(CSV_COLUMNS):
                    raise ValueError("wrong number of columns")
                rec = dict(zip(CSV_COLUMNS, cells))
        except (ValueError, UnicodeDecodeError, StopIteration) as e:
            raise BatchOutputError(
                f"{path}: record {n} cannot be read ({e}); is this a gptchat batch {fmt} file? "
                f"Fix or move it, or run without --resume to start over"
            ) from None
        chunks.append(Chunk(record_key(rec), raw))
    return chunks, (bounds[-1][1] if bounds else 0)


def write_atomic(path: Path, chunks: list[Chunk], fmt: str) -> None:
    """Replace ``path`` with these records in one step (a temporary file beside it, then os.replace)."""

    def write(f) -> None:
        if fmt == "csv":
            f.write(_csv_line(CSV_COLUMNS))
        for c in chunks:
            f.write(c.data)

    replace_atomic(path, write)


def canonical_order(chunks: list[Chunk], order: Callable[[tuple], tuple | None]) -> list[Chunk]:
    """Sort records by ``order(key)`` (input row, then grid cell); unknown keys keep their place at the end."""
    ranked = [(order(c.key), i, c) for i, c in enumerate(chunks)]
    known = sorted((r for r in ranked if r[0] is not None), key=lambda r: (r[0], r[1]))
    unknown = [r for r in ranked if r[0] is None]
    seen, out = set(), []
    for _, _, c in known + unknown:
        if c.key not in seen:  # a key written twice (a resumed shard): keep the first
            seen.add(c.key)
            out.append(c)
    return out
