"""GPT-2's byte-level BPE as a tiktoken ``Encoding``: a checkpoint's own files, or GPT-2's shipped here.

Where the vocabulary comes from:
1. the checkpoint folder's own files: ``vocab.json`` + ``merges.txt`` (Hugging Face), ``encoder.json`` +
   ``vocab.bpe`` (OpenAI's release), or ``tokenizer.json`` alone (what transformers 5 ``save_pretrained``
   writes);
2. else GPT-2's ``encoder.json`` + ``vocab.bpe``, shipped in ``gpt2/`` and sha256-checked against the
   hashes tiktoken pins, when the model's vocabulary is GPT-2-sized. Nothing touches the network.

A model whose vocabulary is not GPT-2-sized and that has no files of its own is refused: another
vocabulary is never silently replaced by GPT-2's.

tiktoken's data-gym parser reads the files (~140 ms for GPT-2). The ranks it builds are cached in a
compact binary form in gptchat's cache folder (read back in about half the time of tiktoken's own
format), keyed by the sha256 of the files they came from and checked against their own sha256 (in the
file name) when read back; see ``_store_ranks``.
"""

from __future__ import annotations

import base64
import codecs
import hashlib
import json
import os
import struct
import sys
import tempfile
import threading
from array import array
from dataclasses import dataclass
from itertools import accumulate
from importlib.resources import as_file, files
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

from gptchat.core.errors import PathError, TokenizerError
from gptchat.core.paths import get_paths, private_dir

EOT = "<|endoftext|>"
EOT_ID = 50256
# GPT-2's pre-tokenizer, as tiktoken writes it for the "gpt2" encoding (possessive quantifiers,
# equivalent to the original regex but faster).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# sha256 of OpenAI's published GPT-2 files (the hashes tiktoken checks for its "gpt2" encoding).
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
# GPT-2's ranks written in tiktoken's format are byte for byte r50k_base.tiktoken, whose hash tiktoken pins.
GPT2_TIKTOKEN_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# Embedding sizes that mean "GPT-2's vocabulary": its own, and nanoGPT's padded to a multiple of 64.
GPT2_VOCAB_SIZES = (50257, 50304)
# GPT-2's files are 1.5 MB; even a 250k-token tokenizer.json is ~20 MB. Refuse anything far larger unread.
MAX_FILE_BYTES = 64 << 20

# (vocabulary, merges) file names, in the order we look for them; then tokenizer.json alone.
VOCAB_FILE_PAIRS = (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe"))
TOKENIZER_JSON = "tokenizer.json"
_SPECIALS = (EOT, "<|startoftext|>")  # in some vocabularies, never mergeable tokens


@dataclass
class Tokenizer:
    """A GPT-2 tokenizer. User text goes through ``encode`` (special tokens are plain text there)."""

    enc: tiktoken.Encoding
    source: str  # the file the vocabulary came from, for provenance
    eot_id: int = EOT_ID

    @property
    def n_vocab(self) -> int:
        return self.enc.n_vocab

    def encode(self, text: str) -> list[int]:
        """Encode user text; a typed "<|endoftext|>" is ordinary text, never the special token."""
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode(self, ids) -> str:
        return self.enc.decode([int(i) for i in ids], errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self.enc.decode_single_token_bytes(int(token_id))

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """Turns token ids into text one at a time without ever emitting half a UTF-8 character.

    A token can end in the middle of a multi-byte character (emoji are often split over two or three
    tokens); the incremental decoder holds those bytes back until the character is complete.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._dec.decode(self.tok.token_bytes(token_id))

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)


# -- where the files are ---------------------------------------------------------------------------


def find_vocab_files(folder: Path) -> tuple[Path, Path | None] | None:
    """The folder's (vocabulary, merges) pair, merges None when missing; None when there is no pair."""
    folder = Path(folder)
    for vocab_name, merges_name in VOCAB_FILE_PAIRS:
        if (folder / vocab_name).is_file():
            merges = folder / merges_name
            return folder / vocab_name, merges if merges.is_file() else None
    return None


def tokenizer_from_folder(folder: Path) -> Tokenizer | None:
    """The folder's own tokenizer, or None when it holds no tokenizer files."""
    folder = Path(folder)
    pair = find_vocab_files(folder) if folder.is_dir() else None
    if pair is not None and pair[1] is not None:
        return _from_pair(*pair)
    if (folder / TOKENIZER_JSON).is_file():
        return _from_tokenizer_json(folder / TOKENIZER_JSON)
    if pair is not None:
        raise TokenizerError(f"{pair[0]} has no merges file beside it ({_merges_name(pair[0])})")
    return None


def gpt2_tokenizer() -> Tokenizer:
    """GPT-2's own vocabulary, from the files shipped with gptchat (works offline)."""
    shipped = files(__package__) / "gpt2"
    with as_file(shipped / "encoder.json") as vocab, as_file(shipped / "vocab.bpe") as merges:
        return _from_pair(vocab, merges, pins=(GPT2_ENCODER_JSON_SHA256, GPT2_VOCAB_BPE_SHA256))


def load_tokenizer(folder: Path | None = None, vocab_size: int | None = None) -> Tokenizer:
    """The checkpoint's own vocabulary if its folder has one, else GPT-2's shipped one.

    ``vocab_size`` is the model's embedding size. When given, a model without tokenizer files gets
    GPT-2's vocabulary only if it is GPT-2-sized, and a vocabulary larger than the model is refused.
    """
    tok = tokenizer_from_folder(folder) if folder is not None else None
    if tok is None:
        if vocab_size is not None and vocab_size not in GPT2_VOCAB_SIZES:
            where = f"{folder} has no tokenizer files" if folder is not None else "no tokenizer files were given"
            raise TokenizerError(
                f"{where} (vocab.json + merges.txt, encoder.json + vocab.bpe, or tokenizer.json) and the "
                f"model's {vocab_size}-token vocabulary is not GPT-2's; put the model's own tokenizer files beside it"
            )
        tok = gpt2_tokenizer()
    if vocab_size is not None and tok.n_vocab > vocab_size:
        raise TokenizerError(
            f"the vocabulary ({tok.source}, {tok.n_vocab} tokens) is larger than the model's embedding "
            f"table ({vocab_size}); put the model's own tokenizer files beside it"
        )
    return tok


def _merges_name(vocab: Path) -> str:
    return dict(VOCAB_FILE_PAIRS)[vocab.name]


# -- reading the files strictly ----------------------------------------------------------------------


def _read(path: Path) -> tuple[str, str]:
    """(text, sha256) of a tokenizer file, decoded as strict UTF-8; one line naming the file otherwise."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise TokenizerError(f"{path} is {size} bytes, too large for a tokenizer file")
        data = path.read_bytes()
    except OSError as e:
        raise TokenizerError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8"), hashlib.sha256(data).hexdigest()
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{path} is not a tokenizer file (not UTF-8 text at byte {e.start})") from None


def _json_object(text: str, path: Path) -> dict:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(obj, dict) or not obj:
        raise TokenizerError(f"{path} is not a tokenizer file (expected a JSON object)")
    return obj


def _check_vocab(entries, path: Path) -> None:
    if not isinstance(entries, dict) or not entries or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in entries.values()
    ):
        raise TokenizerError(f"{path} is not a BPE vocabulary (expected token -> integer id)")


def _check_merges(text: str, path: Path) -> None:
    # tiktoken drops the first line (the "#version" header) and what follows the last newline.
    if not text.startswith("#version") or not text.endswith("\n"):
        raise TokenizerError(f"{path} is not a BPE merges file (a '#version' line, then one 'a b' pair per line)")


# -- building the encoding ---------------------------------------------------------------------------


def _from_pair(vocab: Path, merges: Path, pins: tuple[str, str] | None = None) -> Tokenizer:
    """A data-gym pair; ``pins``: the sha256 the two files must have (GPT-2's, for the shipped copy)."""
    (vocab_text, vocab_sha), (merges_text, merges_sha) = _read(vocab), _read(merges)
    for path, got, want in zip((vocab, merges), (vocab_sha, merges_sha), pins or (None, None)):
        if want is not None and got != want:
            raise TokenizerError(f"{path} is damaged (sha256 {got[:12]}…, GPT-2's is {want[:12]}…); reinstall gptchat")

    def build() -> dict[bytes, int]:
        _check_vocab(_json_object(vocab_text, vocab), vocab)
        _check_merges(merges_text, merges)
        return _data_gym_ranks(vocab, vocab_sha, merges, merges_sha)

    enc = _encoding(hashlib.sha256(f"{vocab_sha} {merges_sha}".encode()).hexdigest(), build)
    return Tokenizer(enc=enc, source=str(vocab), eot_id=enc.eot_token)


def _from_tokenizer_json(path: Path) -> Tokenizer:
    text, sha = _read(path)

    def build() -> dict[bytes, int]:
        vocab_data, merges_data = (t.encode("utf-8") for t in _tokenizer_json_as_pair(text, path))
        # tiktoken's parser reads files: hand it the pair written out, checked by hash like any other.
        with tempfile.TemporaryDirectory() as tmp:
            vocab, merges = Path(tmp) / "vocab.json", Path(tmp) / "merges.txt"
            vocab.write_bytes(vocab_data)
            merges.write_bytes(merges_data)
            return _data_gym_ranks(vocab, hashlib.sha256(vocab_data).hexdigest(),
                                   merges, hashlib.sha256(merges_data).hexdigest(), shown=path)

    enc = _encoding(sha, build)
    return Tokenizer(enc=enc, source=str(path), eot_id=enc.eot_token)


def _tokenizer_json_as_pair(text: str, path: Path) -> tuple[str, str]:
    """A Hugging Face tokenizer.json's byte-level BPE as (vocab.json, merges.txt) texts."""
    model = _json_object(text, path).get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE":
        raise TokenizerError(f"{path}: model.type is not BPE; gptchat reads GPT-2-style byte-level BPE only")
    vocab, merges = model.get("vocab"), model.get("merges")
    _check_vocab(vocab, path)
    if not isinstance(merges, list):
        raise TokenizerError(f"{path}: model.merges is not a list")
    lines = []
    for i, m in enumerate(merges):
        # tokenizers writes "a b" strings (before 0.20) or [a, b] pairs; byte-level tokens hold no spaces.
        pair = m.split(" ") if isinstance(m, str) else m
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) and p and " " not in p for p in pair)):
            raise TokenizerError(f"{path}: model.merges[{i}] is not a pair of tokens")
        lines.append(f"{pair[0]} {pair[1]}\n")
    return json.dumps(vocab, ensure_ascii=False), "#version: 0.2\n" + "".join(lines)


def _data_gym_ranks(vocab: Path, vocab_sha: str, merges: Path, merges_sha: str, shown: Path | None = None) -> dict[bytes, int]:
    """tiktoken's parser, its failures turned into one line naming the file (``shown``, if converted)."""
    try:
        return data_gym_to_mergeable_bpe_ranks(str(merges), str(vocab), vocab_bpe_hash=merges_sha, encoder_json_hash=vocab_sha)
    except KeyError:
        raise TokenizerError(f"{shown or vocab} is not a byte-level BPE vocabulary like GPT-2's") from None
    except AssertionError:  # tiktoken's check that ids follow merge priority, which its encoder relies on
        mismatch = f"{shown}: model.vocab" if shown else f"{merges} does not match {vocab.name}:"
        raise TokenizerError(f"{mismatch} ids must follow merge order") from None
    except ValueError:  # a merges line that is not two tokens
        raise TokenizerError(f"{shown or merges} is not a BPE merges file (one 'a b' pair per line)") from None
    except OSError as e:  # tiktoken copies what it reads into its cache (TIKTOKEN_CACHE_DIR)
        raise TokenizerError(f"cannot read {shown or vocab} through tiktoken's cache: {e}") from None


_loaded: dict[str, tiktoken.Encoding] = {}  # one Encoding per vocabulary and process


def _encoding(key: str, build) -> tiktoken.Encoding:
    """The encoding for files whose sha256 gives ``key``: from memory, the disk cache, or ``build()``."""
    enc = _loaded.get(key)
    if enc is None:
        ranks, name = _cached_ranks(key)
        if ranks is None:
            ranks = build()
            name = _store_ranks(key, ranks)
        enc = _loaded[key] = _make_encoding(ranks, name)
    return enc


def encoding_name(ranks: dict[bytes, int]) -> str:
    """The name that keys tokenized datasets: "gpt2" for GPT-2's vocabulary whichever files it came from.

    Computed from the ranks written in tiktoken's format, which for GPT-2 is byte for byte
    r50k_base.tiktoken, whose hash tiktoken pins.
    """
    blob = b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in sorted(ranks.items(), key=lambda kv: kv[1]))
    digest = hashlib.sha256(blob).hexdigest()
    return "gpt2" if digest == GPT2_TIKTOKEN_SHA256 else f"bpe-{digest[:12]}"


def _make_encoding(ranks: dict[bytes, int], name: str) -> tiktoken.Encoding:
    return tiktoken.Encoding(name=name, pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={EOT: max(ranks.values()) + 1})


# -- the fast form: built ranks cached on disk ------------------------------------------------------
# One file per vocabulary, "<key>.<sha256 of the file>.ranks": a magic line, the encoding's name, the
# count n (uint32), n ranks (uint32), n token lengths (uint16), then the tokens' bytes end to end (all
# little-endian). Reading it is two array copies and one dict build: about half of tiktoken's own
# base64 format, and a fifth of parsing vocab.json + merges.txt. A file whose content does not match the
# sha256 in its name (truncated, edited, half-written by another tool) is deleted and rebuilt.

RANKS_MAGIC = b"gptchat-bpe-ranks 1\n"


def _cache_folder() -> Path:
    return get_paths().cache / "tokenizers"


def _cached_ranks(key: str) -> tuple[dict[bytes, int] | None, str]:
    """(ranks, encoding name) saved by ``_store_ranks``, checked against the sha256 in the file's name."""
    for path in sorted(_cache_folder().glob(f"{key}.*.ranks")):
        try:
            data = path.read_bytes()
        except OSError:
            break  # unreadable: build in memory; storing says nothing if it fails too
        got = _parse_ranks(data) if hashlib.sha256(data).hexdigest() == path.name.split(".")[1] else None
        if got is not None:
            return got
        try:
            path.unlink()  # damaged: build again
        except OSError:
            pass
    return None, ""


def _arrays(data: bytes, typecode: str) -> array:
    a = array(typecode)
    a.frombytes(data)
    if sys.byteorder != "little":
        a.byteswap()
    return a


def _parse_ranks(data: bytes) -> tuple[dict[bytes, int], str] | None:
    """The ranks and name in ``data`` (the cache format above), or None when it is not well formed."""
    if not data.startswith(RANKS_MAGIC):
        return None
    nl = data.find(b"\n", len(RANKS_MAGIC))
    head = nl + 1 + 4
    if nl < 0 or len(data) < head:
        return None
    name = data[len(RANKS_MAGIC):nl].decode("ascii", "replace")
    (n,) = struct.unpack("<I", data[nl + 1:head])
    body = head + 6 * n
    if n == 0 or len(data) < body:
        return None
    ranks = _arrays(data[head:head + 4 * n], "I")
    lengths = _arrays(data[head + 4 * n:body], "H")
    ends = list(accumulate(lengths, initial=body))
    if ends[-1] != len(data) or 0 in lengths:
        return None
    table = dict(zip(map(data.__getitem__, map(slice, ends, ends[1:])), ranks))
    return (table, name) if len(table) == n else None


def _store_ranks(key: str, ranks: dict[bytes, int]) -> str:
    """Save ranks in the cache format, atomically (a temporary file moved into place); their name.

    The cache is only a cache: when it cannot be written, the next start builds the ranks again.
    """
    name = encoding_name(ranks)
    items = sorted(ranks.items(), key=lambda kv: kv[1])
    tables = [array("I", [r for _, r in items]), array("H", [len(t) for t, _ in items])]
    if sys.byteorder != "little":
        for a in tables:
            a.byteswap()
    data = b"".join([RANKS_MAGIC, name.encode("ascii") + b"\n", struct.pack("<I", len(items)),
                     *(a.tobytes() for a in tables), *(t for t, _ in items)])
    folder = _cache_folder()
    tmp = folder / f".{key}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        private_dir(folder)
        tmp.write_bytes(data)
        os.replace(tmp, folder / f"{key}.{hashlib.sha256(data).hexdigest()}.ranks")
    except (OSError, PathError):
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
    return name
