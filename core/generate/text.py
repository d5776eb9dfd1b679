"""Text on top of the token engine: the per-row text layer every front end uses.

``RowText`` owns one row's streaming UTF-8 decode, stop strings, finish reason and timings;
``stream_rows`` drives the engine's one decode loop for many rows (rows that join and leave
included), ``stream`` for one prompt. Stop strings are matched on text, not tokens (a stop like
"\\nUser:" can be split over tokens in many ways). Text that could still turn out to be the start
of a stop string is held back until it is certain not to be, so no part of a stop string is ever
printed.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Iterator

from gptchat.core.generate.options import SamplingParams
from gptchat.core.text.tokenizer import Tokenizer

if TYPE_CHECKING:  # the engine brings torch; this layer needs it only from a call on (the chat app paints first)
    from gptchat.core.generate.engine import Engine


@dataclass
class GenOptions:
    params: SamplingParams = field(default_factory=SamplingParams)
    max_new_tokens: int = 128
    seed: int | None = None  # None: a random seed, reported in the result so it can be reproduced
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a whole number >= 1, got {self.max_new_tokens!r}")
        if any(not s for s in self.stop):
            raise ValueError("stop sequences must not be empty strings")


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "eos" | "stop" | "length" | "window" | "cancelled"
    prompt_tokens: int
    seed: int
    prefill_s: float = 0.0
    decode_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tokens_per_s(self) -> float:
        n = max(self.completion_tokens - 1, 0)  # the first token comes out of prefill
        return n / self.decode_s if self.decode_s > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["completion_tokens"] = self.completion_tokens
        d["tokens_per_s"] = round(self.tokens_per_s, 2)
        return d


class StopMatcher:
    """Feeds text in, lets out only text that cannot be part of a stop string."""

    def __init__(self, stops: tuple[str, ...] | list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.hit = False

    def push(self, text: str) -> str:
        if self.hit:
            return ""
        buf = self.pending + text
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.hit, self.pending = True, ""
            return buf[:cut]
        hold = 0  # the longest tail of buf that is a proper prefix of some stop string
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:k]):
                    hold = k
                    break
        self.pending = buf[len(buf) - hold:] if hold else ""
        return buf[: len(buf) - hold]

    def flush(self) -> str:
        out, self.pending = ("" if self.hit else self.pending), ""
        return out


@dataclass
class RowRequest:
    """One prompt for ``stream_rows``."""

    ids: list[int]
    max_new_tokens: int
    seed: int
    stop: tuple[str, ...] = ()


class RowText:
    """One row's text: stream decoder, stop strings, collected ids and text, finish reason, timings.

    Feed it the engine's tokens for the row with ``push``; it finishes on eos, a stop string or the
    row's last token, or with ``finish`` (the engine stopped first: "cancelled"). ``completion`` is
    set once it has finished. ``eos_id`` None keeps eos as text (benchmarks' ``ignore_eos``).
    """

    def __init__(self, tokenizer: Tokenizer, req: RowRequest, n_ctx: int, eos_id: int | None,
                 t0: float | None = None):
        self.req, self.eos_id, self.n_ctx = req, eos_id, n_ctx
        self.limit = min(req.max_new_tokens, n_ctx - len(req.ids))
        self.dec = tokenizer.stream_decoder()
        self.matcher = StopMatcher(req.stop)
        self.ids: list[int] = []
        self.parts: list[str] = []
        self.reason: str | None = None
        self.t0 = t0 if t0 is not None else time.perf_counter()
        self.t_first: float | None = None
        self.completion: Completion | None = None

    @property
    def finished(self) -> bool:
        return self.reason is not None

    def push(self, token: int, done: bool, now: float | None = None) -> str:
        """The row's next token (``done``: the engine's last for it); returns the text now safe to show."""
        if self.finished:
            return ""
        now = now if now is not None else time.perf_counter()
        self.t_first = self.t_first or now
        if token == self.eos_id:
            self.reason = "eos"
            return ""
        self.ids.append(token)
        out = self.matcher.push(self.dec.push(token))
        self.parts.append(out)
        if self.matcher.hit:
            self.reason = "stop"
        elif done and len(self.ids) < self.limit:
            self.reason = "stop"  # one of the engine's stop ids
        elif done:
            self.reason = "window" if self.limit < self.req.max_new_tokens else "length"
        return out

    def finish(self, now: float | None = None) -> str:
        """End the row ("cancelled" unless it has finished) and build ``completion``; returns the
        text that was held back and is now safe to show."""
        now = now if now is not None else time.perf_counter()
        self.reason = self.reason or "cancelled"
        tail = "" if self.matcher.hit else self.matcher.push(self.dec.flush()) + self.matcher.flush()
        self.parts.append(tail)
        t_first = self.t_first or now
        notes = []
        if self.limit < self.req.max_new_tokens:
            notes.append(f"max_new_tokens lowered from {self.req.max_new_tokens} to {self.limit}: the prompt is "
                         f"{len(self.req.ids)} tokens and the window is {self.n_ctx}")
        self.completion = Completion("".join(self.parts), self.ids, self.reason, len(self.req.ids), self.req.seed,
                                     t_first - self.t0, now - t_first, notes)
        return tail


@dataclass
class RowEvent:
    """Streamed output of one row: new printable text (from ``token``), or, last, the row's
    remaining text with its Completion."""

    row: int
    text: str
    token: int | None = None
    completion: Completion | None = None


def stream_rows(
    engine: Engine,
    tokenizer: Tokenizer,
    params: SamplingParams,
    rows: list[RowRequest],
    cancel: threading.Event | None = None,
    waiting: deque[RowRequest] | None = None,
    ignore_eos: bool = False,
) -> Iterator[RowEvent]:
    """Generate for many prompts in one batch, yielding each row's text as soon as it is safe to show
    and its Completion as soon as it has finished (rows still running when ``cancel`` stops the
    engine finish as "cancelled"). ``row`` numbers ``rows`` first, then the requests taken from
    ``waiting`` (popped from it) as finished rows make room; those left are for the next call."""
    pending = list(waiting) if waiting is not None else []
    refill = deque((q.ids, q.max_new_tokens, q.seed) for q in pending) if waiting is not None else None
    eos = None if ignore_eos else engine.eos_id
    t_prev = time.perf_counter()
    texts = [RowText(tokenizer, q, engine.n_ctx, eos, t_prev) for q in rows]
    drop: set[int] = set()
    steps = engine.generate([q.ids for q in rows], params, [q.max_new_tokens for q in rows],
                            seeds=[q.seed for q in rows], cancel=cancel, drop=drop, refill=refill,
                            ignore_eos=ignore_eos)
    try:
        for step in steps:
            now = time.perf_counter()
            for rt in step:
                while rt.row >= len(texts):  # a waiting prompt took a finished row's place
                    texts.append(RowText(tokenizer, pending[len(texts) - len(rows)], engine.n_ctx, eos, t_prev))
                row = texts[rt.row]
                out = row.push(rt.token, rt.done, now)
                if out:
                    yield RowEvent(rt.row, out, rt.token)
                if row.finished:
                    drop.add(rt.row)  # a stop string: the engine does not know
                    yield RowEvent(rt.row, row.finish(now), None, row.completion)
            t_prev = time.perf_counter()
    finally:
        steps.close()
        for _ in range(len(pending) - len(refill or ())):
            waiting.popleft()
    for i, row in enumerate(texts):
        if not row.finished:
            yield RowEvent(i, row.finish(), None, row.completion)


@dataclass
class Chunk:
    """Streamed output: new printable text, and the final Completion on the last chunk."""

    text: str
    token_id: int | None = None
    completion: Completion | None = None


def new_seed() -> int:
    return random.SystemRandom().randrange(2**31)


def stream(
    engine: Engine,
    tokenizer: Tokenizer,
    prompt_ids: list[int],
    opts: GenOptions,
    cancel: threading.Event | None = None,
    ignore_eos: bool = False,
) -> Iterator[Chunk]:
    """Generate for one prompt, yielding text as soon as it is safe to show."""
    seed = opts.seed if opts.seed is not None else new_seed()
    req = RowRequest(prompt_ids, opts.max_new_tokens, seed, opts.stop)
    for ev in stream_rows(engine, tokenizer, opts.params, [req], cancel, ignore_eos=ignore_eos):
        if ev.completion is not None:
            yield Chunk(ev.text, None, ev.completion)
        elif ev.text:
            yield Chunk(ev.text, ev.token)


def complete(engine, tokenizer, prompt_ids, opts, cancel=None) -> Completion:
    last = None
    for chunk in stream(engine, tokenizer, prompt_ids, opts, cancel):
        last = chunk
    return last.completion
