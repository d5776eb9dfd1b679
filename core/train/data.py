"""Training data: files in, a cached uint16 token memmap out, then a deterministic batch order.

Text: a .txt file, several files, or a folder of .txt/.md/.rst. Each file is a document and a literal
``<|endoftext|>`` inside a file separates documents; every document ends with the EOT token.
Instruction data (``--format jsonl``): one ``{"prompt": ..., "completion": ...}`` object per line,
rendered through a template if one is given; the loss mask is 0 on prompt tokens and 1 on the
completion and the EOT after it. Examples are packed back to back, so EOT is never padding.

Tokenizing happens once: the result is keyed by the content hash (plus tokenizer, format and
template) and stored in ``get_paths().datasets/<key>/`` with a DONE marker, written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gptchat.core.errors import DataError
from gptchat.core.paths import private_dir
from gptchat.core.prompting import examples
from gptchat.core.text.tokenizer import EOT

TEXT_EXTS = (".txt", ".md", ".rst", ".text", ".markdown")
JSONL_EXTS = (".jsonl",)
CACHE_VERSION = 1
ENCODE_GROUP_BYTES = 32 << 20  # tokenize this much text per batch call, so memory stays flat


@dataclass
class Dataset:
    key: str
    folder: Path
    tokens: np.ndarray  # uint16 memmap
    mask: np.ndarray | None  # uint8 memmap, 1 where a token is a training target (jsonl only)
    meta: dict

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])


# -- reading files -------------------------------------------------------------------------------


def collect_files(paths: list[str | os.PathLike], fmt: str = "text") -> list[Path]:
    """The files to train on, in a stable order. A folder contributes its text files, recursively."""
    if not paths:
        raise DataError("no training data given: pass a .txt file, several files, or a folder")
    exts = JSONL_EXTS if fmt == "jsonl" else TEXT_EXTS
    out: list[Path] = []
    for p in map(lambda s: Path(s).expanduser(), paths):
        if not p.exists():
            raise DataError(f"{p} does not exist")
        if p.is_dir():
            found = sorted(
                f for f in p.rglob("*")
                if f.is_file() and f.suffix.lower() in exts and not any(s.startswith(".") for s in f.relative_to(p).parts)
            )
            if not found:
                raise DataError(f"{p} holds no {', '.join(exts)} files")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"{p} is not a regular file or a folder")
    seen: set[Path] = set()
    return [f for f in out if not (f.resolve() in seen or seen.add(f.resolve()))]


def guess_format(paths: list[str | os.PathLike]) -> str:
    """``--format`` where none is given: "jsonl" when every path is a .jsonl file or a folder holding .jsonl files
    and no text files, else "text" (a file of prompt/completion lines trained as plain text was a silent mistake)."""
    def kind(p: Path) -> str:
        if p.is_dir():
            suffixes = {f.suffix.lower() for f in p.rglob("*") if f.is_file()}
            return "jsonl" if suffixes & set(JSONL_EXTS) and not suffixes & set(TEXT_EXTS) else "text"
        return "jsonl" if p.suffix.lower() in JSONL_EXTS else "text"

    kinds = {kind(Path(p).expanduser()) for p in paths}
    return "jsonl" if kinds == {"jsonl"} else "text"


def read_text(path: Path) -> str:
    """A file's text, or a DataError saying why it is not usable text."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    if not raw.strip():
        raise DataError(f"{path} is empty")
    nul = raw.find(b"\x00", 0, 1 << 20)
    if nul >= 0:
        raise DataError(f"{path} looks like a binary file (a NUL byte at offset {nul}); give UTF-8 text")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
            f"convert it first, e.g. iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8{path.suffix}"
        ) from None
    return text.replace("\r\n", "\n")


def _read_pairs(path: Path) -> list[tuple[str, str]]:
    pairs = []
    for n, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        keys = examples.pair_keys(obj) if isinstance(obj, dict) else None  # prompt/completion, input/output, ...
        if keys is None:
            raise DataError(f'{path}:{n}: expected an object with "prompt" and "completion" (or {examples.pairs_help()})')
        pair = (obj[keys[0]], obj[keys[1]])
        if not isinstance(pair[0], str) or not isinstance(pair[1], str):
            raise DataError(f'{path}:{n}: "{keys[0]}" and "{keys[1]}" must be strings')
        if not pair[1].strip():
            raise DataError(f'{path}:{n}: the completion is empty')
        pairs.append(pair)
    if not pairs:
        raise DataError(f"{path} holds no prompt/completion lines")
    return pairs


# -- the cache -----------------------------------------------------------------------------------


def scan(paths, fmt: str = "text", warn=None) -> tuple[list[Path], str]:
    """Check every file (exists, not empty, not binary, UTF-8, valid JSONL) and hash the contents.

    Runs before any model is loaded, so bad data is reported first. Returns (files, digest); in a
    folder or a list of several files, empty files are skipped with a warning.
    """
    if fmt not in ("text", "jsonl"):
        raise DataError(f"unknown data format {fmt!r}; use text or jsonl")
    files = collect_files(paths, fmt)
    h = hashlib.sha256(f"gptchat-data v{CACHE_VERSION} {fmt}\n".encode())
    kept = []
    for f in files:
        try:
            if fmt == "jsonl":
                _read_pairs(f)
            else:
                read_text(f)
        except DataError as e:
            if len(files) > 1 and str(e).endswith("is empty"):
                if warn:
                    warn(f"skipped the empty file {f}")
                continue
            raise
        h.update(hashlib.sha256(f.read_bytes()).digest())
        kept.append(f)
    return kept, h.hexdigest()


def prepare(paths, tokenizer, fmt: str = "text", template: str | None = None, warn=None,
            scanned: tuple[list[Path], str] | None = None) -> Dataset:
    """Tokenize ``paths`` once (or reuse the cache) and return the memmapped tokens."""
    from gptchat.core.paths import get_paths

    if template is not None and fmt != "jsonl":
        raise DataError("--template applies to --format jsonl (prompt/completion pairs) only")
    files, digest = scanned or scan(paths, fmt, warn)
    tpl = None
    h = hashlib.sha256(f"{digest} {tokenizer.enc.name}".encode())
    if template is not None:
        from gptchat.core.prompting.templates import get_template

        tpl = get_template(template)
        h.update(tpl.text.encode())
    key = h.hexdigest()
    folder = get_paths().datasets / key[:24]
    if not (folder / "DONE").exists():
        _build(folder, files, tokenizer, fmt, tpl, key)
    return open_dataset(folder)


def open_dataset(folder: Path) -> Dataset:
    folder = Path(folder)
    if not (folder / "DONE").exists():
        raise DataError(f"{folder} is not a finished tokenized dataset")
    meta = json.loads((folder / "meta.json").read_text())
    tokens = np.memmap(folder / "tokens.bin", dtype=np.uint16, mode="r")
    mask = np.memmap(folder / "mask.bin", dtype=np.uint8, mode="r") if (folder / "mask.bin").exists() else None
    return Dataset(meta["key"], folder, tokens, mask, meta)


def _build(folder: Path, files, tokenizer, fmt, tpl, key) -> None:
    if tokenizer.n_vocab > 65536:
        raise DataError("the tokenizer has more than 65536 tokens; uint16 token files cannot hold it")
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    private_dir(tmp.parent)
    tmp.mkdir(mode=0o700)
    threads = max(1, os.cpu_count() or 1)
    eot = tokenizer.eot_id
    n_docs = 0
    with open(tmp / "tokens.bin", "wb") as tf, (open(tmp / "mask.bin", "wb") if fmt == "jsonl" else _null()) as mf:
        if fmt == "text":
            group: list[str] = []
            size = 0

            def flush():
                for ids in tokenizer.encode_batch(group, num_threads=threads):
                    np.asarray(ids + [eot], dtype=np.uint16).tofile(tf)

            for f in files:
                for doc in read_text(f).split(EOT):
                    if doc.strip():
                        group.append(doc)
                        size += len(doc)
                        n_docs += 1
                if size >= ENCODE_GROUP_BYTES:
                    flush()
                    group, size = [], 0
            flush()
        else:
            for f in files:
                pairs = _read_pairs(f)
                prompts = [_render_prompt(tpl, p, tokenizer) for p, _ in pairs] if tpl else None
                p_ids = prompts or tokenizer.encode_batch([p for p, _ in pairs], num_threads=threads)
                c_ids = tokenizer.encode_batch([c for _, c in pairs], num_threads=threads)
                for p, c in zip(p_ids, c_ids):
                    ids = p + c + [eot]
                    np.asarray(ids, dtype=np.uint16).tofile(tf)
                    np.asarray([0] * len(p) + [1] * (len(c) + 1), dtype=np.uint8).tofile(mf)
                    n_docs += 1
    n = (tmp / "tokens.bin").stat().st_size // 2
    if n_docs == 0 or n == 0:
        raise DataError(f"{files[0] if len(files) == 1 else 'the data'} holds no text")
    meta = {
        "key": key, "format": fmt, "template": tpl.name if tpl else None, "tokenizer": tokenizer.enc.name,
        "files": [str(f.resolve()) for f in files], "n_docs": n_docs, "n_tokens": n,
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    for name in ("tokens.bin", "mask.bin", "meta.json"):
        if (tmp / name).exists():
            with open(tmp / name, "rb") as fp:
                os.fsync(fp.fileno())
    (tmp / "DONE").write_text("")
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished the same dataset first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "DONE").exists():
            raise


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def _render_prompt(tpl, prompt: str, tokenizer) -> list[int]:
    from gptchat.core.prompting.templates import Budget, render

    return render(tpl, {tpl.input_variable: prompt}, tokenizer=tokenizer, budget=Budget(reserve=0)).ids


# -- split and batches -----------------------------------------------------------------------------


@dataclass
class Split:
    train: tuple[int, int]  # [start, end) token offsets
    val: tuple[int, int]


def split(n_tokens: int, block: int, val_fraction: float) -> Split:
    """A contiguous tail for validation: at least one block + 1 tokens, the rest for training."""
    n_val = max(int(n_tokens * val_fraction), block + 1)
    if n_tokens - n_val < block + 1:
        raise DataError(
            f"{n_tokens} tokens are too few for a {block}-token block with a validation split; "
            "add data or pass a smaller --block-size"
        )
    return Split((0, n_tokens - n_val), (n_tokens - n_val, n_tokens))


class Batches:
    """Which training windows a step reads, as a pure function of (seed, step): resume needs no state.

    The training range is cut into ``n_chunks`` windows of ``block + 1`` tokens at a stride of
    ``block``; each epoch visits them in a fresh permutation, shifted by a per-epoch offset so window
    borders move. Step ``s`` takes windows ``s*G .. (s+1)*G-1`` of that endless sequence (G = the
    global batch); micro-batch ``i`` of rank ``r`` takes its slice, so any (world, accumulation) split
    of the same global batch reads the same windows.
    """

    def __init__(self, ds: Dataset, rng: tuple[int, int], block: int, seed: int):
        self.ds, self.start, self.end, self.block, self.seed = ds, rng[0], rng[1], block, seed
        usable = self.end - self.start - 1
        self.n_chunks = usable // block
        self.slack = usable - self.n_chunks * block
        self._epoch = -1
        self._perm = np.empty(0, dtype=np.int64)
        self._shift = 0

    def _order(self, epoch: int):
        if epoch != self._epoch:
            g = np.random.default_rng([self.seed, epoch])
            self._perm = g.permutation(self.n_chunks)
            self._shift = int(g.integers(0, self.slack + 1))
            self._epoch = epoch
        return self._perm, self._shift

    def window_starts(self, first: int, count: int) -> list[int]:
        out = []
        for k in range(first, first + count):
            perm, shift = self._order(k // self.n_chunks)
            out.append(self.start + shift + int(perm[k % self.n_chunks]) * self.block)
        return out

    def micro_batch(self, step: int, micro: int, rank: int, world: int, accum: int, batch: int):
        first = step * batch * world * accum + (micro * world + rank) * batch
        return windows(self.ds, self.window_starts(first, batch), self.block)


def windows(ds: Dataset, starts: list[int], block: int):
    """(x, y) int64 tensors of shape (len(starts), block); y is -1 where the loss is masked."""
    import torch

    buf = np.stack([np.asarray(ds.tokens[s : s + block + 1], dtype=np.int64) for s in starts])
    x = torch.from_numpy(buf[:, :-1].copy())
    y = buf[:, 1:].copy()
    if ds.mask is not None:
        m = np.stack([np.asarray(ds.mask[s + 1 : s + block + 1]) for s in starts])
        y[m == 0] = -1
    return x, torch.from_numpy(y)


def val_starts(rng: tuple[int, int], block: int, limit: int) -> list[int]:
    """The fixed held-out windows: consecutive blocks from the start of the validation range."""
    n = (rng[1] - rng[0] - 1) // block
    return [rng[0] + i * block for i in range(min(n, limit))]
