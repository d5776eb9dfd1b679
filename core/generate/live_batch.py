"""The rows of a running ``Engine.generate_rows`` batch: KV cache, masks, positions, samplers.

Rows join (prefilled on their own, their prompt placed to end at the current slot) and leave
(compacted out of the cache) while the others keep decoding; no row ever attends to another's slots.
"""

from __future__ import annotations

import torch

from gptchat.core.generate.engine import left_pad, prefill_mask
from gptchat.core.model.kv_cache import KVCache
from gptchat.core.generate.sampling import SamplingParams, make_generator


class LiveBatch:
    """The live rows of ``Engine.generate_rows``: their KV cache, masks, positions and samplers.

    Every row shares the cache's slot numbering; ``visible`` (B, cap) says which slots each row may
    attend to (its own prompt and tokens), ``next_pos`` is each row's own next position id.
    """

    def __init__(self, engine, params: SamplingParams, cap: int):
        self.e, self.params, self.cap = engine, params, cap
        cfg = engine.model.config
        self.shape = (cfg.n_head, cfg.head_dim)
        self.layers = [blk.attn for blk in engine.model.transformer.h]
        dev = engine.device
        self.k = [torch.zeros(0, *self.shape[:1], cap, self.shape[1], dtype=engine.dtype, device=dev) for _ in self.layers]
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

    def admit(self, items: list[tuple[list[int], int, int]], s_end: int) -> torch.Tensor:
        """Prefill new rows on their own and add them so their prompts end at slot ``s_end``.
        Returns their last logits (n, V)."""
        e, dev = self.e, self.e.device
        prompts = [ids for ids, _, _ in items]
        ids, pos, valid = left_pad(prompts, pad_id=e.eos_id or 0)
        n, L = ids.shape
        ids, pos, valid = ids.to(dev), pos.to(dev), valid.to(dev)
        limits = [min(m, e.n_ctx - len(p)) for p, m, _ in items]
        ragged = not bool(valid.all())
        for attn in self.layers:
            attn.kv_cache = KVCache(n, self.shape[0], L, self.shape[1], e.dtype, dev)
        logits = e.model(ids, pos if ragged else None, prefill_mask(valid) if ragged else None,
                         start=0, kv_len=L, last_only=True)[:, -1, :]
        self.s_end = s_end
        cap = max(self.cap, s_end + max(limits))
        old = len(self.rows)
        for i, attn in enumerate(self.layers):
            new_k = attn.kv_cache.k.new_zeros(old + n, self.shape[0], cap, self.shape[1])
            new_v = torch.zeros_like(new_k)
            new_k[:old, :, : s_end], new_v[:old, :, : s_end] = self.k[i][:, :, :s_end], self.v[i][:, :, :s_end]
            new_k[old:, :, s_end - L : s_end] = attn.kv_cache.k
            new_v[old:, :, s_end - L : s_end] = attn.kv_cache.v
            self.k[i], self.v[i] = new_k, new_v
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

    def compact(self, tok: torch.Tensor) -> torch.Tensor:
        """Drop finished rows from the cache and every per-row tensor; returns their tokens' survivors."""
        keep = [j for j, a in enumerate(self.alive) if a]
        idx = torch.tensor(keep, dtype=torch.long, device=self.e.device)
        self.k = [k.index_select(0, idx) for k in self.k]
        self.v = [v.index_select(0, idx) for v in self.v]
        self.visible, self.next_pos = self.visible[idx], self.next_pos[idx]
        self.seen = self.seen[idx] if self.seen is not None else None
        self.gens = [self.gens[j] for j in keep] if self.gens is not None else None
        self.rows = [self.rows[j] for j in keep]
        self.alive = [True] * len(keep)
        self._install()
        return tok[idx]

    def decode(self, tok: torch.Tensor) -> torch.Tensor:
        """Feed each row's last token at slot s_end; logits (B', V)."""
        slot = self.s_end
        mask = self.visible[:, None, None, : slot + 1]  # (B', 1, 1, slot+1)
        logits = self.e.model(tok.view(-1, 1), self.next_pos[:, None], mask, start=slot, kv_len=slot + 1)
        self.next_pos = self.next_pos + 1
        self.s_end += 1
        return logits[:, -1, :]

    def _install(self) -> None:
        for attn, k, v in zip(self.layers, self.k, self.v):
            cache = KVCache(0, self.shape[0], 0, self.shape[1], k.dtype, k.device)  # empty; takes our buffers
            cache.k, cache.v = k, v
            attn.kv_cache = cache

