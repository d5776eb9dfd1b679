"""GPT-2's byte-level BPE as a tiktoken ``Encoding``, built from local vocabulary files.

A checkpoint folder usually carries its own vocabulary (``vocab.json`` + ``merges.txt`` in Hugging
Face folders, ``encoder.json`` + ``vocab.bpe`` in OpenAI's release). We turn either pair into
tiktoken's mergeable ranks without touching the network; only when no files are found anywhere do
we fall back to ``tiktoken.get_encoding("gpt2")``, which works if its cache holds the files.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from gptchat.core.errors import TokenizerError

EOT = "<|endoftext|>"
EOT_ID = 50256
# GPT-2's pre-tokenizer, as tiktoken writes it for the "gpt2" encoding (possessive quantifiers,
# equivalent to the original regex but faster).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# sha256 of OpenAI's published GPT-2 files (the same hashes tiktoken checks).
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"

# (vocabulary, merges) file names, in the order we look for them.
VOCAB_FILE_PAIRS = (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe"))


def _byte_decoder() -> dict[str, int]:
    """GPT-2 writes each byte as a printable unicode character; this maps them back."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def ranks_from_files(vocab_path: Path, merges_path: Path | None) -> dict[bytes, int]:
    """Mergeable ranks (token bytes -> id) from a GPT-2 vocabulary, checked against its merges."""
    try:
        vocab = json.loads(Path(vocab_path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"cannot read the vocabulary {vocab_path}: {e}") from None
    if not isinstance(vocab, dict) or not vocab:
        raise TokenizerError(f"{vocab_path} is not a GPT-2 vocabulary (expected a JSON object of token -> id)")
    dec = _byte_decoder()
    ranks: dict[bytes, int] = {}
    try:
        for tok, idx in vocab.items():
            if tok in (EOT, "<|startoftext|>"):
                continue
            ranks[bytes(dec[ch] for ch in tok)] = int(idx)
    except (KeyError, TypeError, ValueError):
        raise TokenizerError(f"{vocab_path} is not a byte-level BPE vocabulary like GPT-2's") from None
    if merges_path is not None and Path(merges_path).exists():
        # tiktoken merges by rank, so ids must follow merge priority: check it, as tiktoken does.
        lines = Path(merges_path).read_text(encoding="utf-8").split("\n")
        merges = [ln.split() for ln in lines if ln and not ln.startswith("#version")]
        base = len(ranks) - len(merges)
        for i, pair in enumerate(merges):
            if len(pair) != 2:
                raise TokenizerError(f"{merges_path}: line {i + 2} is not a merge pair")
            merged = bytes(dec[c] for c in pair[0] + pair[1])
            if ranks.get(merged) != base + i:
                raise TokenizerError(
                    f"{merges_path} does not match {vocab_path.name}: ids must follow merge order"
                )
    return ranks


@dataclass
class Tokenizer:
    """A GPT-2 tokenizer. User text goes through ``encode`` (special tokens are plain text there)."""

    enc: "object"  # tiktoken.Encoding
    source: str  # where the vocabulary came from, for provenance
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


def _file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@lru_cache(maxsize=8)
def _encoding_from_files(vocab: str, merges: str | None, digest: str):
    import tiktoken

    ranks = ranks_from_files(Path(vocab), Path(merges) if merges else None)
    return tiktoken.Encoding(
        name=f"gpt2-{digest[:12]}",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={EOT: max(ranks.values()) + 1},
    )


def find_vocab_files(folder: Path) -> tuple[Path, Path | None] | None:
    folder = Path(folder)
    for vocab_name, merges_name in VOCAB_FILE_PAIRS:
        if (folder / vocab_name).is_file():
            merges = folder / merges_name
            return folder / vocab_name, merges if merges.is_file() else None
    return None


def tokenizer_from_folder(folder: Path) -> Tokenizer | None:
    found = find_vocab_files(folder)
    if found is None:
        return None
    vocab, merges = found
    digest = _file_digest(vocab)
    enc = _encoding_from_files(str(vocab), str(merges) if merges else None, digest)
    return Tokenizer(enc=enc, source=str(vocab), eot_id=enc.eot_token)


def _fallback_folders() -> list[Path]:
    """Other places on this machine that may hold GPT-2's vocabulary files."""
    from gptchat.core.paths import get_paths, hf_hub_cache

    out = [get_paths().data / "tokenizer"]
    for repo in ("models--gpt2", "models--openai-community--gpt2", "models--distilgpt2"):
        snaps = hf_hub_cache() / repo / "snapshots"
        if snaps.is_dir():
            out.extend(sorted(snaps.iterdir()))
    return out


def load_tokenizer(folder: Path | None = None) -> Tokenizer:
    """The checkpoint's own vocabulary if it has one, else GPT-2's from this machine."""
    candidates = ([Path(folder)] if folder else []) + _fallback_folders()
    for cand in candidates:
        tok = tokenizer_from_folder(cand) if cand.is_dir() else None
        if tok is not None:
            return tok
    return _tiktoken_gpt2()


def _tiktoken_gpt2() -> Tokenizer:
    import tiktoken

    # tiktoken downloads its files when they are not in its cache; never try that offline.
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline and not _tiktoken_gpt2_cached():
        raise TokenizerError(_NO_TOKENIZER)
    try:
        enc = tiktoken.get_encoding("gpt2")
    except Exception:  # tiktoken raises requests' errors when it cannot fetch the files
        raise TokenizerError(_NO_TOKENIZER) from None
    return Tokenizer(enc=enc, source="tiktoken:gpt2", eot_id=enc.eot_token)


_NO_TOKENIZER = (
    "no GPT-2 vocabulary found: put vocab.json + merges.txt (or encoder.json + vocab.bpe) in the "
    "model folder, or run `gptchat pull gpt2` once while online"
)


def _tiktoken_gpt2_cached() -> bool:
    import tempfile

    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    cache = cache or os.path.join(tempfile.gettempdir(), "data-gym-cache")
    url = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    keys = [hashlib.sha1((url + f).encode()).hexdigest() for f in ("vocab.bpe", "encoder.json")]
    return all(os.path.exists(os.path.join(cache, k)) for k in keys)
