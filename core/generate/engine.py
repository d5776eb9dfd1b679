"""Token-level generation over the KV cache: prefill, decode, batches, scoring.

The engine knows nothing about text: it takes and yields token ids. ``textgen.py`` turns ids into
text, applies stop strings and measures time.
"""

from __future__ import annotations

import threading
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Iterator

import torch

from gptchat.core.weights.checkpoints import Checkpoint, load
from gptchat.core.errors import ContextOverflow
from gptchat.core.generate.sampling import SamplingParams, make_generator, sample


@dataclass
class RowToken:
    """One row's new token in ``generate_rows``; ``done`` marks the row's last token."""

    row: int
    token: int
    done: bool


@dataclass
class Step:
    """One decode step for the whole batch."""

    tokens: list[int]  # the token each row produced (rows already finished repeat eos)
    finished: list[bool]  # rows that have ended (eos, stop id or their own length limit)


def left_pad(prompts: list[list[int]], pad_id: int):
    """Left-pad ragged prompts. Returns ids (B, T), position ids (B, T), valid (B, T)."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    valid = torch.zeros((len(prompts), T), dtype=torch.bool)
    for i, p in enumerate(prompts):
        if p:
            ids[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
            valid[i, T - len(p):] = True
    # each row's positions start at 0 on its first real token (pads get position 0; they are masked)
    pos = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
    return ids, pos, valid


def prefill_mask(valid: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool: causal, real tokens only; every slot also sees itself so no row is all-masked."""
    T = valid.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=valid.device).tril()
    mask = causal[None] & valid[:, None, :]
    mask |= torch.eye(T, dtype=torch.bool, device=valid.device)[None]
    return mask[:, None]


class Engine:
    def __init__(self, model, checkpoint: Checkpoint | None = None, device=None, dtype=None):
        self.model = model.eval().to_inference_layout()
        self.checkpoint = checkpoint
        p = next(model.parameters())
        self.device = device or p.device
        self.dtype = dtype or p.dtype
        self.n_ctx = model.config.n_positions
        self.vocab_limit = min(model.config.vocab_size, 50257)  # padded ids (50304) are never sampled
        self.eos_id = 50256 if model.config.vocab_size > 50256 else None
        self._lock = threading.Lock()  # one generation at a time per loaded model

    @classmethod
    def load(cls, spec, device: str | None = None, dtype: str | None = None, download: bool = True) -> "Engine":
        from gptchat.core.model.device import pick_device, pick_dtype

        dev = pick_device(device)
        dt = pick_dtype(dtype, dev)
        model, ck = load(spec, device=dev, dtype=dt, download=download, inference_layout=True)
        return cls(model, ck, dev, dt)

    # -- steps --------------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, pos: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        """Run the prompt (B, T) through the model into a fresh cache; logits of the last slot (B, V)."""
        B, T = ids.shape
        self.model.setup_cache(B, self.n_ctx)
        logits = self.model(ids.to(self.device), pos, mask, start=0, kv_len=T, last_only=True)
        return logits[:, -1, :]

    @torch.inference_mode()
    def decode(self, tok: torch.Tensor, slot: int, pos: torch.Tensor | None, mask: torch.Tensor | None):
        """One token per row (B,) at cache ``slot``; logits (B, V)."""
        logits = self.model(tok.view(-1, 1).to(self.device), pos, mask, start=slot, kv_len=slot + 1)
        return logits[:, -1, :]

    # -- generation ---------------------------------------------------------------------------

    def check_window(self, prompt_len: int, max_new_tokens: int) -> int:
        """The number of new tokens that fit after the prompt in the context window."""
        if prompt_len == 0:
            raise ContextOverflow("the prompt is empty; give the model at least one token of text")
        if prompt_len >= self.n_ctx:
            raise ContextOverflow(
                f"the prompt is {prompt_len} tokens but the model's window is {self.n_ctx}, with room "
                f"needed for the reply; shorten the prompt (or use a template, which cuts it to fit)"
            )
        return min(max_new_tokens, self.n_ctx - prompt_len)

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        max_new_tokens: int,
        seeds: list[int] | None = None,
        stop_ids: set[int] | None = None,
        cancel: threading.Event | None = None,
        ignore_eos: bool = False,
    ) -> Iterator[Step]:
        """Yield one Step per new token for a batch of prompts of any lengths.

        Rows are left-padded and each starts its positions at 0, so a row's greedy output equals
        running it alone. A row finishes on eos (or a ``stop_ids`` token); generation ends when every
        row has finished, after ``max_new_tokens``, or when ``cancel`` is set (checked between tokens).
        ``ignore_eos`` keeps going past eos (benchmarks need a fixed number of tokens).
        """
        if not prompts:
            return
        B = len(prompts)
        T = max(len(p) for p in prompts)
        if any(len(p) == 0 for p in prompts):
            self.check_window(0, max_new_tokens)
        max_new = self.check_window(T, max_new_tokens)
        if max_new <= 0:
            return
        stop = set(stop_ids or ())
        if self.eos_id is not None and not ignore_eos:
            stop.add(self.eos_id)
        gens = None
        if not params.is_greedy:
            seeds = list(seeds) if seeds is not None else [0] * B
            gens = [make_generator(s, self.device) for s in seeds]
        with self._lock, torch.inference_mode():
            ids, pos, valid = left_pad(prompts, pad_id=self.eos_id or 0)
            ragged = not bool(valid.all())
            dev = self.device
            ids, pos, valid = ids.to(dev), pos.to(dev), valid.to(dev)
            seen = None
            if params.repetition_penalty != 1.0:
                seen = torch.zeros(B, self.vocab_limit, dtype=torch.bool, device=dev)
                seen.scatter_(1, ids.clamp(max=self.vocab_limit - 1), valid)
            mask = prefill_mask(valid) if ragged else None
            logits = self.prefill(ids, pos if ragged else None, mask)
            next_pos = pos[:, -1] + 1  # (B,)
            if ragged:  # slots each row may attend to: its real prompt tokens, then every new token
                visible = torch.ones(B, T + max_new, dtype=torch.bool, device=dev)
                visible[:, :T] = valid
            done = torch.zeros(B, dtype=torch.bool, device=dev)
            stop_t = torch.tensor(sorted(stop), dtype=torch.long, device=dev)
            packed = self._packed_linears(B)
            fast = packed.use if packed is not None else nullcontext
            for i in range(max_new):
                tok = sample(logits[:, : self.vocab_limit], params, gens, seen)  # (B,)
                if self.eos_id is not None:
                    tok = torch.where(done, torch.full_like(tok, self.eos_id), tok)
                if stop:
                    done |= torch.isin(tok, stop_t)
                if seen is not None:
                    seen.scatter_(1, tok[:, None], True)
                toks = tok.tolist()
                yield Step(toks, done.tolist())
                if bool(done.all()) or i == max_new - 1 or (cancel is not None and cancel.is_set()):
                    return
                slot = T + i
                if ragged:
                    step_mask = visible[:, None, None, : slot + 1]  # (B, 1, 1, slot+1)
                    with fast():
                        logits = self.decode(tok, slot, next_pos[:, None], step_mask)
                else:
                    with fast():
                        logits = self.decode(tok, slot, None, None)
                next_pos = next_pos + 1

    # -- batches with per-row limits --------------------------------------------------------------

    def generate_rows(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        max_new_tokens: list[int],
        seeds: list[int] | None = None,
        stop_ids: set[int] | None = None,
        cancel: threading.Event | None = None,
        drop: set[int] | None = None,
        refill: deque | None = None,
    ) -> Iterator[list[RowToken]]:
        """Like ``generate``, for throughput: each row has its own token limit and finished rows leave.

        Yields, per step, one RowToken for every row still running (``row`` numbers the rows:
        ``prompts`` first, then rows taken from ``refill`` in the order taken). A row's last token
        has ``done`` set: it is eos (or a ``stop_ids`` token), or the row reached its limit,
        ``min(max_new_tokens, n_ctx - prompt length)``: the row's own window, not the batch's. Rows
        the caller adds to ``drop`` (on a stop string, say) are finished too.

        Finished rows are compacted out of the KV cache once they are a quarter of the batch. With
        ``refill``, a deque of (prompt ids, max_new_tokens, seed), their places are given to waiting
        prompts: each is prefilled alone and put in the cache so that its prompt ends at the current
        slot (it must not be longer than the slots so far; sort prompts longest first). Prompts left
        in the deque (the cache bound, twice the first batch's, was reached) are for the next call.
        Rows never see each other, so greedy output equals ``generate``'s for each prompt alone.
        """
        if not prompts:
            return
        for p in prompts:
            self.check_window(len(p), 1)
        if min(max_new_tokens) < 1:
            raise ValueError("max_new_tokens must be >= 1 for every row")
        stop = set(stop_ids or ()) | ({self.eos_id} if self.eos_id is not None else set())
        drop = drop if drop is not None else set()
        seeds = list(seeds) if seeds is not None else [0] * len(prompts)
        B0, T = len(prompts), max(map(len, prompts))
        # cache slots: the longest prompt plus the most tokens any row may add (this can pass n_ctx:
        # slots are shared, positions are each row's own and stay inside its window)
        cap = T + max(min(m, self.n_ctx - len(p)) for p, m in zip(prompts, max_new_tokens))
        with self._lock, torch.inference_mode():
            from gptchat.core.generate.live_batch import LiveBatch

            b = LiveBatch(self, params, cap)
            cap_max = 2 * cap
            logits = b.admit(list(zip(prompts, max_new_tokens, seeds)), T)
            stop_t = torch.tensor(sorted(stop), dtype=torch.long, device=self.device)
            packed = self._packed_linears(B0)
            while True:
                tok = sample(logits[:, : self.vocab_limit], params, b.gens, b.seen)  # (B',)
                hit = torch.isin(tok, stop_t).tolist()
                if b.seen is not None:
                    b.seen.scatter_(1, tok[:, None], True)
                out = []
                for j, (r, t) in enumerate(zip(b.rows, tok.tolist())):
                    if b.alive[j]:
                        b.count[r] += 1
                        done = hit[j] or b.count[r] >= b.limits[r]
                        out.append(RowToken(r, t, done))
                        b.alive[j] = not done
                yield out
                b.alive = [a and r not in drop for a, r in zip(b.alive, b.rows)]
                if cancel is not None and cancel.is_set():
                    return
                n_alive = sum(b.alive)
                dead = len(b.rows) - n_alive
                waiting = []
                if refill and (n_alive == 0 or 4 * (B0 - n_alive) >= B0):
                    s_after = b.s_end + (1 if n_alive else 0)  # where new prompts end, after this step
                    while refill and n_alive + len(waiting) < B0:
                        ids, m, seed = refill[0]
                        limit = min(m, self.n_ctx - len(ids))
                        if len(ids) > s_after or s_after + limit - 1 > cap_max:
                            break  # does not fit this cache: left for the next call
                        self.check_window(len(ids), 1)
                        waiting.append(refill.popleft())
                if n_alive == 0 and not waiting:
                    return
                if dead and (4 * dead >= len(b.rows) or waiting):
                    tok = b.compact(tok)
                if n_alive:
                    with packed.use() if packed is not None and len(b.rows) >= 4 else nullcontext():
                        logits = b.decode(tok)
                if waiting:
                    new = b.admit(waiting, b.s_end)
                    logits = torch.cat([logits, new]) if n_alive else new

    def _packed_linears(self, batch_size: int):
        """oneDNN-packed weights for batched CPU decode (see packed.py), or None where they do not help."""
        from gptchat.core.model import packed

        if batch_size < 4 or not packed.available(self.device, self.dtype):
            return None
        if getattr(self, "_packed", None) is None:
            self._packed = packed.PackedLinears(self.model, batch_hint=16)
        return self._packed

    # -- scoring ------------------------------------------------------------------------------

    @torch.inference_mode()
    def score(self, ids: list[int]) -> list[float]:
        """log p(ids[t] | ids[:t]) for t = 1..n-1 (the first token has no context to be scored in)."""
        if len(ids) < 2:
            return []
        if len(ids) > self.n_ctx:
            raise ContextOverflow(f"cannot score {len(ids)} tokens in a {self.n_ctx}-token window")
        with self._lock:
            self.model.drop_cache()
            x = torch.tensor([ids], dtype=torch.long, device=self.device)
            logits = self.model(x).float()[0, :-1, : self.vocab_limit]  # (T-1, V)
            logp = torch.log_softmax(logits, dim=-1)
            out = logp.gather(1, x[0, 1:, None]).squeeze(1)
        return out.tolist()

