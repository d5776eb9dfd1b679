"""Reading checkpoint files safely: JSON metadata, pickles of tensors only, safetensors headers.

Each reader checks what a file declares before allocating anything for it (sizes against the file's
real size, dtypes, shapes and byte ranges against each other), so a corrupt or hostile file fails in
one line naming the file and the field. Shapes are checked against the model config by the caller
(checkpoints.iter_tensors), which knows what a GPT-2 of that config holds.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from gptchat.core.errors import CheckpointError

MAX_JSON_BYTES = 16 << 20  # config.json is ~1 KB and a shard index ~100 KB: anything this big is not metadata
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
_HUGE = 2 << 20  # a huge page, the unit the mapped file's pages are dropped in
ST_DTYPES = {"F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2), "F64": ("float64", 8)}  # weights
# every dtype safetensors defines, with its size: a mask buffer stored as BOOL is skipped, not refused
ST_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4,
            "I64": 8, "U64": 8, **{k: v[1] for k, v in ST_DTYPES.items()}}
# torch dtype names -> safetensors' (what checkpoints.write_safetensors writes)
ST_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64", "int32": "I32",
            "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}
# What a corrupt pickle or zip makes torch.load raise (it has no error class of its own for it).
_CORRUPT = (RuntimeError, OSError, EOFError, ValueError, KeyError, IndexError, TypeError, AttributeError,
            struct.error, UnicodeDecodeError, RecursionError)


def read_json_object(path: Path, what: str) -> dict:
    """A small JSON file holding one object (a config or a shard index), decoded strictly as UTF-8."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise CheckpointError(f"{path} is {size:,} bytes, far too large for a {what}")
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not UTF-8 text; it is not a {what}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except (ValueError, RecursionError) as e:  # a 5000-digit number, nesting thousands deep
        raise CheckpointError(f"{path} is not a usable {what} ({type(e).__name__})") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} holds a JSON {type(raw).__name__}, not an object; it is not a {what}")
    return raw


def torch_load(path: Path):
    """``torch.load`` of tensors and plain data only (memory-mapped when the format allows).

    A file that needs anything else (a class, a function: code that would run while unpickling) is
    refused in gptchat's words: torch's own message suggests loading it unsafely, which we never do.
    """
    import pickle
    import warnings

    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols; the outcome is what matters
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                # files from before torch 1.6's zip format cannot be memory-mapped
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} contains code or objects, which gptchat never unpickles ({_refusal_reason(str(e))}); "
            "only tensors and plain data are loaded"
        ) from None
    except _CORRUPT as e:
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise CheckpointError(f"{path} is truncated or corrupt, or not a PyTorch file ({type(e).__name__}: {first})") from None


def _refusal_reason(message: str) -> str:
    """What torch refused, without its advice to turn the safety off."""
    if m := re.search(r"GLOBAL ([\w.]+)", message):
        return f"it references {m.group(1)}"
    for line in message.splitlines():
        line = line.strip()
        if line and not any(w in line for w in ("weights_only", "torch.load", "Weights only", "documentation")):
            return line[:120]
    return "not plain data"


@dataclass(frozen=True)
class TensorEntry:
    """One tensor a safetensors header declares: checked, but not yet read."""

    key: str
    dtype: str  # safetensors' name: F32, BF16, BOOL, ... (only ST_DTYPES are ever read)
    shape: tuple[int, ...]
    begin: int  # byte range in the data section
    end: int


def safetensors_header(path: Path) -> tuple[int, list[TensorEntry]]:
    """(where the data section starts, the tensors in file order), every field checked against the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path} is truncated or corrupt: no header")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise CheckpointError(f"{path} is truncated or corrupt: its header claims {n:,} bytes")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CheckpointError(f"{path} is truncated or corrupt: unreadable header") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is truncated or corrupt: its header is not a JSON object")
    header.pop("__metadata__", None)
    base = 8 + n
    entries = sorted((_entry(path, k, v) for k, v in header.items()), key=lambda e: (e.begin, e.end))
    pos = 0
    for e in entries:
        if e.begin < pos:
            raise CheckpointError(f"{path}: tensor {e.key} overlaps another tensor's bytes; the header is corrupt")
        pos = e.end
    if base + pos > size:
        raise CheckpointError(f"{path} is truncated or corrupt: {size:,} bytes, but its header needs {base + pos:,}")
    return base, entries


def _entry(path: Path, key: str, info) -> TensorEntry:
    where = f"{path}: tensor {key[:80]}"
    if not isinstance(info, dict):
        raise CheckpointError(f"{where} has no dtype/shape/data_offsets in the header")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in ST_SIZES:
        raise CheckpointError(f"{where} has dtype {str(dtype)[:20]!r}, which is not a safetensors dtype")
    if not isinstance(shape, list) or len(shape) > 8 or not all(_natural(d) for d in shape):
        raise CheckpointError(f"{where} has shape {str(shape)[:60]}: not a list of sizes >= 0")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_natural(o) for o in offsets) or offsets[0] > offsets[1]:
        raise CheckpointError(f"{where} has data_offsets {str(offsets)[:60]}: not [begin, end] with 0 <= begin <= end")
    nbytes = ST_SIZES[dtype]
    for d in shape:
        nbytes *= d
    if nbytes != offsets[1] - offsets[0]:
        raise CheckpointError(f"{where}: shape {shape} needs {nbytes:,} bytes, but data_offsets span {offsets[1] - offsets[0]:,}")
    return TensorEntry(key, dtype, tuple(shape), offsets[0], offsets[1])


def _natural(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def read_safetensors(path: Path, base: int, entries: list[TensorEntry], mapped: bool = True):
    """(key, tensor) for each checked entry.

    ``mapped`` (the default): each tensor is a view of the file mapped copy-on-write, so loading reads
    nothing and copies nothing; pages come in from the page cache when the model first uses them, and
    a write (finetuning) changes the process's own copy, never the file. Memory holds the weights
    once, as when reading. A tensor whose bytes are not aligned to its element size is read instead.
    Otherwise each tensor is read straight into its own buffer, the largest first: a caller that
    converts each tensor and drops it (int8 at load) then holds the one big float tensor (GPT-2's token
    table is a third of the model) before its smaller converted ones pile up. (The header was checked against the
    file's size; a file truncated while mapped would fault, as with any memory-mapped loader.)
    """
    import mmap

    import torch

    try:
        with open(path, "rb", buffering=0) as f:
            view = None
            if mapped and entries:
                try:
                    view = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
                except (OSError, ValueError):  # a filesystem that cannot map: read instead
                    view = None
                else:
                    _advise_huge(view)
            for e in entries if view is not None else sorted(entries, key=lambda e: e.begin - e.end):
                dtype = getattr(torch, ST_DTYPES[e.dtype][0])
                start, size = base + e.begin, ST_DTYPES[e.dtype][1]
                if view is not None and e.end > e.begin and start % size == 0:
                    t = torch.frombuffer(view, dtype=dtype, count=(e.end - e.begin) // size, offset=start)
                    yield e.key, t.view(e.shape)
                    _drop_pages(view, start, e.end - e.begin)
                else:
                    yield e.key, _read_into(f, path, start, e, dtype)
    except OSError as ex:
        raise CheckpointError(f"cannot read {path}: {ex.strerror or ex}") from None


def _advise_huge(view) -> None:
    """Ask Linux to read the file into 2 MB folios where it reads it from disk (MADV_HUGEPAGE on a file
    mapping: read-around in PMD-sized folios). A file cached in 2 MB folios, however it got there (read
    this way, or written in large writes: checkpoints.write_safetensors, a download in large chunks), is
    mapped in 2 MB pages without any copy: 500 MB of fp32 weights are then ~250 page-table entries
    rather than ~120,000, and batch-1 decode streams them ~1.05x faster (hugepages.py). A file already
    cached in 4 KB pages stays so until the kernel drops it. No effect where THP is off."""
    import mmap

    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        try:
            view.madvise(advice)
        except (OSError, ValueError):
            pass


def _drop_pages(view, start: int, length: int) -> None:
    """Hand back the 2 MB stretches lying wholly inside a tensor's bytes once its consumer has moved on.

    The mapping is copy-on-write and nothing writes while a checkpoint streams, so a dropped page is
    read again from the file if it is touched later, unchanged; what this saves is the pages a
    consumer read only to copy them (a transposed or converted tensor: wte into the inference layout,
    154 MB for GPT-2 small, stayed counted in the process's memory until the mapping closed)."""
    import mmap

    advice = getattr(mmap, "MADV_DONTNEED", None)
    # whole 2 MB stretches only: dropping part of one splits its 2 MB mapping (_advise_huge) for good
    lo, hi = -(-start // _HUGE) * _HUGE, (start + length) // _HUGE * _HUGE
    if advice is not None and hi > lo:
        try:
            view.madvise(advice, lo, hi - lo)
        except (OSError, ValueError):
            pass


def _read_into(f, path: Path, start: int, e: TensorEntry, dtype):
    """One tensor read from ``f`` into a buffer of its own."""
    import torch

    t = torch.empty(e.shape, dtype=dtype)
    if t.numel():
        f.seek(start)
        view, got = memoryview(t.view(-1).view(torch.uint8).numpy()), 0
        while got < len(view):  # one read() returns at most ~2 GiB on Linux
            n = f.readinto(view[got:])
            if not n:
                raise CheckpointError(f"{path} is truncated or corrupt while reading {e.key}")
            got += n
    return t
