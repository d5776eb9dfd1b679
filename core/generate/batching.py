"""Batching for the one decode loop: left padding, masks, and the live rows of a running batch.

Rows join (prefilled on their own, their prompt placed to end at the current slot) and leave
(compacted out of the cache) while the others keep decoding; no row ever attends to another's slots.
"""

from __future__ import annotations

import torch

from gptchat.core.generate.sampling import SamplingParams, make_generator
from gptchat.core.model.device import to_device
from gptchat.core.model.kv_cache import KVCache


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


def _cache_over(k: torch.Tensor, v: torch.Tensor) -> KVCache:
    """A KVCache whose buffers are ``k`` and ``v`` (views allowed: prefill then writes in place)."""
    cache = KVCache(0, k.shape[1], 0, k.shape[3], k.dtype, k.device)
    cache.k, cache.v = k, v
    return cache


class LiveBatch:
    """The live rows of ``Engine.generate``: their KV cache, masks, positions and samplers.

    Every row shares the cache's slot numbering; ``visible`` (B, cap) says which slots each row may
    attend to (its own prompt and tokens), ``next_pos`` is each row's own next position id (written out
    only when read while dense: ``_write_positions``). While
    ``dense`` (no padding, every row starting at slot 0: a single prompt, or prompts of one length)
    attention needs no mask and positions equal slots, which keeps SDPA on its fastest path.
    """

    def __init__(self, engine, params: SamplingParams, cap: int):
        self.e, self.params, self.cap = engine, params, cap
        cfg = engine.model.config
        self.shape = (cfg.n_head, cfg.head_dim)
        self.layers = [blk.attn for blk in engine.model.transformer.h]
        dev = engine.device
        self.k = [torch.zeros(0, self.shape[0], cap, self.shape[1], dtype=engine.kv_dtype, device=dev)
                  for _ in self.layers]
        self.v = [t.clone() for t in self.k]
        self.visible = torch.zeros(0, cap, dtype=torch.bool, device=dev)
        self.next_pos = torch.zeros(0, dtype=torch.long, device=dev)
        self.seen = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(0, engine.vocab_limit, dtype=torch.bool, device=dev)
        self.gens = None if params.is_greedy else []
        self.rows: list[int] = []
        self.alive: list[bool] = []
        self.count: dict[int, int] = {}
        self.limits: dict[int, int] = {}
        self.s_end = 0  # slots [0, s_end) hold tokens; the next decode step writes slot s_end
        self.n_rows = 0
        self.dense = True
        self.slot = None  # s_end as a 0-d tensor, for a compiled step

    def admit(self, items: list[tuple[list[int], int, int]], s_end: int) -> torch.Tensor:
        """Prefill new rows on their own and add them so their prompts end at slot ``s_end``.
        Returns their last logits (n, V)."""
        e, dev = self.e, self.e.device
        self._write_positions()
        ids, pos, valid = left_pad([p for p, _, _ in items], pad_id=e.eos_id or 0)
        n, L = ids.shape
        ids, pos, valid = to_device(ids, dev), to_device(pos, dev), to_device(valid, dev)
        limits = [min(m, e.n_ctx - len(p)) for p, m, _ in items]
        ragged = not bool(valid.all())
        self.dense = self.dense and not ragged and s_end == L
        cap = max(self.cap, s_end + max(limits))
        old = len(self.rows)
        for i, attn in enumerate(self.layers):  # the new rows' prefill writes straight into the grown cache
            self.k[i], self.v[i] = (self._grown(t, old + n, cap, s_end, s_end - L) for t in (self.k[i], self.v[i]))
            attn.kv_cache = _cache_over(self.k[i][old:, :, s_end - L : s_end], self.v[i][old:, :, s_end - L : s_end])
        logits = e.model(ids, pos if ragged else None, prefill_mask(valid) if ragged else None,
                         start=0, kv_len=L, last_only=True)[:, -1, :]
        self.s_end = s_end
        vis = torch.zeros(n, cap, dtype=torch.bool, device=dev)
        vis[:, s_end - L : s_end] = valid
        vis[:, s_end:] = True
        if cap > self.cap:
            self.visible = torch.cat([self.visible, self.visible.new_ones(old, cap - self.cap)], dim=1)
        self.visible = torch.cat([self.visible, vis])
        self.cap = cap
        self.next_pos = torch.cat([self.next_pos, pos[:, -1] + 1])
        if self.seen is not None:
            seen = torch.zeros(n, e.vocab_limit, dtype=torch.bool, device=dev)
            seen.scatter_(1, ids.clamp(max=e.vocab_limit - 1), valid)
            self.seen = torch.cat([self.seen, seen])
        if self.gens is not None:
            self.gens += [make_generator(seed, dev) for _, _, seed in items]
        for limit in limits:
            r = self.n_rows
            self.n_rows += 1
            self.rows.append(r)
            self.alive.append(True)
            self.count[r], self.limits[r] = 0, limit
        self._install()
        return logits

    def _grown(self, buf: torch.Tensor, rows: int, cap: int, s_end: int, left: int) -> torch.Tensor:
        """``buf``'s rows and first ``s_end`` slots in a cache of ``rows`` rows and ``cap`` slots, the rest left
        unwritten but for what a masked read could see before a write: the new rows' slots left of their prompts
        (``left``: the prompts start there) and, under a compiled step (which reads every slot through a mask), all
        from ``s_end`` on. Masked slots still enter the products (a weight of 0 times NaN is NaN), so those are
        zeroed; the prefill writes the prompts' slots and each decode step its slot before reading it. Zeroing
        whole caches cost 4-12 ms of a 1000-token 124M prefill of ~0.66 s (2-core Xeon, A/B in one process; where
        the heap hands back pages the system must fault in, their first touch moves to the prefill's writes)."""
        new = buf.new_empty(rows, self.shape[0], cap, self.shape[1])
        old = buf.shape[0]
        new[:old, :, :s_end] = buf[:, :, :s_end]
        new[old:, :, :left] = 0
        if self.e.compile:
            new[:, :, s_end:] = 0
        return new

    def compact(self, tok: torch.Tensor) -> torch.Tensor:
        """Drop finished rows from the cache and every per-row tensor; returns their tokens' survivors."""
        keep = [j for j, a in enumerate(self.alive) if a]
        idx = torch.tensor(keep, dtype=torch.long, device=self.e.device)
        self._write_positions()
        self.k = [k.index_select(0, idx) for k in self.k]
        self.v = [v.index_select(0, idx) for v in self.v]
        self.visible, self.next_pos = self.visible[idx], self.next_pos[idx]
        self.seen = self.seen[idx] if self.seen is not None else None
        self.gens = [self.gens[j] for j in keep] if self.gens is not None else None
        self.rows = [self.rows[j] for j in keep]
        self.alive = [True] * len(keep)
        self._install()
        return tok[idx]

    def decode(self, tok: torch.Tensor, step=None) -> torch.Tensor:
        """Feed each row's last token at slot s_end; logits (B', V). ``step``: a compiled
        GPT.decode_step, for a dense batch (it takes the slot as a tensor: one graph for every slot)."""
        slot = self.s_end
        if step is not None:
            if self.slot is None:
                self.slot = torch.zeros((), dtype=torch.long, device=self.e.device)
            self.slot.fill_(slot)  # in place: no new tensor, and on CUDA no host sync
            if self.e.device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are done with
            logits = step(tok.view(-1, 1), self.slot)
            self.s_end += 1
            return logits
        if self.dense:  # positions are the slots and every slot so far is visible: no mask
            pos, mask = None, None
        else:
            pos, mask = self.next_pos[:, None], self.visible[:, None, None, : slot + 1]  # mask (B', 1, 1, slot+1)
        logits = self.e.model(tok.view(-1, 1), pos, mask, start=slot, kv_len=slot + 1)
        if not self.dense:
            self.next_pos = self.next_pos + 1
        self.s_end += 1
        return logits[:, -1, :]

    def _write_positions(self) -> None:
        """While dense every row's next position is s_end, so next_pos is not kept step by step (a tensor op
        a token, run on caches the step has just flushed); it is written out here before it is read."""
        if self.dense and self.rows:
            self.next_pos = torch.full((len(self.rows),), self.s_end, dtype=torch.long, device=self.e.device)

    def _install(self) -> None:
        for attn, k, v in zip(self.layers, self.k, self.v):
            attn.kv_cache = _cache_over(k, v)
