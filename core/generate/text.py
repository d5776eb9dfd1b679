"""Text on top of the token engine: streaming decode, stop strings, timings, results.

Stop strings are matched on text, not tokens (a stop like "\\nUser:" can be split over tokens in
many ways). Text that could still turn out to be the start of a stop string is held back until
it is certain not to be, so no part of a stop string is ever printed.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator

from gptchat.core.generate.engine import Engine
from gptchat.core.generate.sampling import SamplingParams
from gptchat.core.text.tokenizer import Tokenizer


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
    notes = []
    fit = engine.check_window(len(prompt_ids), opts.max_new_tokens)
    if fit < opts.max_new_tokens:
        notes.append(
            f"max_new_tokens lowered from {opts.max_new_tokens} to {fit}: the prompt is {len(prompt_ids)} "
            f"tokens and the window is {engine.n_ctx}"
        )
    dec = tokenizer.stream_decoder()
    matcher = StopMatcher(opts.stop)
    ids: list[int] = []
    reason = "window" if fit < opts.max_new_tokens else "length"
    t0 = time.perf_counter()
    t_first = None
    text_parts: list[str] = []
    for step in engine.generate([prompt_ids], opts.params, fit, seeds=[seed], cancel=cancel, ignore_eos=ignore_eos):
        if t_first is None:
            t_first = time.perf_counter()
        tok = step.tokens[0]
        if tok == engine.eos_id and not ignore_eos:
            reason = "eos"
            break
        ids.append(tok)
        out = matcher.push(dec.push(tok))
        if out:
            text_parts.append(out)
            yield Chunk(out, tok)
        if matcher.hit:
            reason = "stop"
            break
    else:
        if cancel is not None and cancel.is_set() and len(ids) < fit:
            reason = "cancelled"
    t1 = time.perf_counter()
    if not matcher.hit:
        tail = matcher.push(dec.flush()) + matcher.flush()
        if tail:
            text_parts.append(tail)
    else:
        tail = ""
    comp = Completion(
        text="".join(text_parts),
        token_ids=ids,
        finish_reason=reason,
        prompt_tokens=len(prompt_ids),
        seed=seed,
        prefill_s=(t_first or t1) - t0,
        decode_s=t1 - (t_first or t1),
        notes=notes,
    )
    yield Chunk(tail, None, comp)


def complete(engine, tokenizer, prompt_ids, opts, cancel=None) -> Completion:
    last = None
    for chunk in stream(engine, tokenizer, prompt_ids, opts, cancel):
        last = chunk
    return last.completion
