"""In-context examples for scoring: K examples drawn (seeded) per window, rendered with a template.

The pool is any examples file (core/prompting/examples.py reads JSONL rows with any of the common key
pairs, or TSV), or a plain text file whose documents are the examples. With a template, each example is
its ``example_format`` (fields mapped from the row) plus the example separator; without one, an example
is its document text (a row's prompt then completion, as finetuning sees it) and a blank line. The
template's instruction is kept only when it has no variables left at their demo values (a bundled
template's "Write the opposite of each word." says nothing about the user's examples).

Each example is encoded on its own and the ids are concatenated, so a prefix's length is the sum of
its examples' lengths and ``room`` (the most any window can draw) is exact.

Plain-text documents (a text file without a template, or the training documents of an experiment) are often far
longer than a window: each is cut to its first ``window // (TEXT_SHARE * K)`` tokens (at a line's end where one
falls in the second half of that), so that K of them take at most half the window and the held-out text the rest.
Examples with fields (JSONL, TSV, or rendered by a template) are never cut: one too long is an error.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from gptchat.prompts import format_fields

from gptchat.core.errors import TemplateError, UsageError
from gptchat.core.eval.heldout import JSONL_SUFFIXES, documents
from gptchat.core.prompting.examples import TSV_SUFFIXES, load_examples, row_text
from gptchat.core.prompting.templates import Template, get_template, substitute

RAW_SEPARATOR = "\n\n"
TEXT_SHARE = 2  # plain-text examples take at most 1 / TEXT_SHARE of the window together (see the module docstring)


def load_pool(path: str | Path, template: Template | None) -> list[dict[str, str]]:
    """An examples file as rows: the template's fields, or ``{"text": ...}`` without a template."""
    path = Path(path)
    if template is not None:
        if not template.takes_examples:
            raise TemplateError(f"template {template.name!r} is kind {template.kind!r} and shows no examples")
        if path.suffix.lower() not in JSONL_SUFFIXES + TSV_SUFFIXES:
            return [{template.example_fields[0]: d} for d in documents(path)] if len(template.example_fields) == 1 \
                else _no_fields(path, template)
        return load_examples(path, template.example_fields)
    rows = documents(path)  # JSONL rows as prompt+completion, or text documents
    if not rows:
        raise TemplateError(f"{path}: no examples in the file")
    return [{"text": d} for d in rows]


def _no_fields(path: Path, template: Template):
    raise TemplateError(
        f"{path.name}: plain text has no fields; template {template.name!r} needs {', '.join(template.example_fields)} "
        f"(use a .jsonl file, or no --template)"
    )


@dataclass
class InContext:
    """K examples per window from ``pool``; window i's pick is seeded by (seed, i)."""

    k: int
    pool: list[dict[str, str]]
    tokenizer: object
    template: Template | None = None
    seed: int = 0
    cut: int | None = None  # the most tokens of an example (plain text only; see the module docstring)
    excerpts: int = 0  # how many examples were cut
    _encoded: list[list[int]] = field(default_factory=list, repr=False)
    _head: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self):
        if self.k < 1:
            raise UsageError(f"--shots is {self.k}; in-context scoring needs at least 1 (0 is plain eval)")
        if self.k > len(self.pool):
            n = len(self.pool)
            raise UsageError(f"--shots is {self.k} but the examples file has {n} example{'s' if n != 1 else ''}")
        texts = [self._text(row) for row in self.pool]
        self._encoded = self.tokenizer.encode_batch(texts)
        if self.cut is not None and self.template is None:
            long = [i for i, ids in enumerate(self._encoded) if len(ids) > self.cut]
            for i in long:
                self._encoded[i] = self._excerpt(row_text(self.pool[i]))
            self.excerpts = len(long)
        head = _instruction(self.template)
        self._head = self.tokenizer.encode(head) if head else []

    def _text(self, row: dict[str, str]) -> str:
        tpl = self.template
        if tpl is None:
            return row_text(row) + RAW_SEPARATOR
        return substitute(tpl.example_format, row, "example") + tpl.separators["example"]

    def _excerpt(self, text: str) -> list[int]:
        """The first ``cut`` tokens of an example and its separator, ended at a line's end in their second half."""
        sep = self.tokenizer.encode(RAW_SEPARATOR)
        n = max(1, self.cut - len(sep))
        head = self.tokenizer.decode(self.tokenizer.encode(text)[:n]).rstrip("\ufffd")  # no half a character
        end = head.rfind("\n")
        if end >= len(head) // 2:
            head = head[:end]
        return (self.tokenizer.encode(head.rstrip("\n"))[:n] + sep)[: self.cut]

    def excerpt_note(self, what: str) -> str | None:
        """One line on the examples cut to fit (None: none was), ``what`` naming them ("text examples")."""
        if not self.excerpts:
            return None
        return (f"{self.excerpts} of {len(self.pool)} {what} cut to their first {self.cut} tokens (the examples take "
                f"at most half the window)")

    @property
    def room(self) -> int:
        """The most tokens any window's examples can take: the instruction and the K longest."""
        return len(self._head) + sum(sorted(map(len, self._encoded), reverse=True)[: self.k])

    def prefix(self, i: int) -> list[int]:
        picks = random.Random(f"{self.seed}:{i}").sample(range(len(self.pool)), self.k)
        return self._head + [t for j in picks for t in self._encoded[j]]


def _instruction(tpl: Template | None) -> str:
    if tpl is None or not tpl.instruction:
        return ""
    if any(name in tpl.variables for name in format_fields(tpl.instruction)):
        return ""  # the demo task's instruction would describe other examples than the user's
    return substitute(tpl.instruction, {}, f"template {tpl.name!r}: instruction") + tpl.separators["instruction"]


def in_context(shots: int, examples: str | None, tokenizer, template: str | None = None, seed: int = 0,
               window: int | None = None) -> InContext | None:
    """The --shots/--examples/--template options as an InContext (None for zero-shot); plain-text examples are cut
    to fit ``window`` (see the module docstring)."""
    if not shots:
        return None
    if not examples:
        raise UsageError(f"--shots {shots} needs --examples FILE (a JSONL, TSV or text file of examples)")
    tpl = get_template(template) if template else None
    text = tpl is None and Path(examples).suffix.lower() not in JSONL_SUFFIXES + TSV_SUFFIXES
    cut = text_cut(window, shots) if text else None
    return InContext(shots, load_pool(examples, tpl), tokenizer, tpl, seed, cut=cut)


def text_cut(window: int | None, shots: int) -> int | None:
    """The most tokens of each of ``shots`` plain-text examples in a ``window``-token window (None: no window)."""
    return max(1, window // (TEXT_SHARE * shots)) if window else None
