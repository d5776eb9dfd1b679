"""Held-out text for scoring: plain text files and JSONL rows, as documents.

The same files finetuning reads (core/train/data.py): ``<|endoftext|>`` inside a text file separates
documents, and a JSONL row is one document, its prompt followed by its completion (any of the key
pairs in core/prompting/examples.py). Documents are joined with the end-of-text token, which is
scored like any other token. Bytes and words, for bits/byte and word perplexity, count the documents'
text only (lm-evaluation-harness counts the document, not the separator).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from gptchat.core.errors import DataError, TemplateError
from gptchat.core.prompting.examples import row_text
from gptchat.core.text.tokenizer import EOT
from gptchat.core.train.data import collect_files, read_text

JSONL_SUFFIXES = (".jsonl", ".ndjson")


@dataclass
class HeldOut:
    docs: list[str]
    source: str
    _ids: dict = field(default_factory=dict, repr=False)  # token ids per tokenizer source

    @property
    def n_bytes(self) -> int:
        return sum(len(d.encode("utf-8")) for d in self.docs)

    @property
    def n_words(self) -> int:
        return sum(len(d.split()) for d in self.docs)

    def ids(self, tokenizer) -> list[int]:
        key = (tokenizer.source, tokenizer.n_vocab)
        if key not in self._ids:
            out: list[int] = []
            for i, doc_ids in enumerate(tokenizer.encode_batch(self.docs)):
                out += ([tokenizer.eot_id] if i else []) + doc_ids
            if len(out) < 2:
                raise DataError(
                    f"{self.source} is {len(out)} token{'s' if len(out) != 1 else ''} long; scoring needs at least 2"
                )
            self._ids[key] = out
        return self._ids[key]


def documents(path: Path) -> list[str]:
    """A file's documents: JSONL rows as prompt+completion, or text split at ``<|endoftext|>``."""
    text = read_text(path)  # DataError for a missing, empty, binary or non-UTF-8 file
    if path.suffix.lower() in JSONL_SUFFIXES:
        docs = []
        for n, line in enumerate(text.split("\n"), 1):
            if line.strip():
                try:
                    docs.append(row_text(json.loads(line)))
                except (json.JSONDecodeError, ValueError, TemplateError) as e:
                    raise DataError(f"{path}:{n}: {e}") from None
        return docs
    return [d for d in text.split(EOT) if d.strip()]


def load_heldout(paths: list[str]) -> HeldOut:
    """Every file (folders: their .txt/.md/.jsonl files) as one held-out text."""
    files = collect_files(paths, "text")  # a file is taken whatever its suffix; folders give their text files
    docs = [d for f in files for d in documents(f)]
    if not docs or not "".join(docs).strip():
        raise DataError(f"{', '.join(map(str, paths))} holds no text to score")
    return HeldOut(docs, ", ".join(map(str, paths)))
