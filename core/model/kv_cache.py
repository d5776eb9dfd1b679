"""A preallocated key/value cache: one pair of buffers per layer, written at explicit positions.

GPT-2's positions are absolute and learned, so the cache never slides: slot ``s`` holds the token at
absolute slot ``s`` of the sequence for every row of the batch. Rows of a left-padded batch share
slots; their *position ids* differ (see engine.py), and padding slots are masked out.
"""

from __future__ import annotations

import torch
from torch import nn


class KVCache(nn.Module):
    def __init__(self, batch_size: int, n_head: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch_size, n_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def batch_size(self) -> int:
        return self.k.shape[0]

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor, kv_len: int):
        """Write k, v (B, nh, T, hs) at slots [start, start+T); return the first kv_len slots.

        ``start`` a 0-d long tensor (GPT.decode_step): write one slot there and return the whole
        buffers, so that no shape depends on the slot (the caller masks the slots not yet written)."""
        if isinstance(start, torch.Tensor):
            self.k.index_copy_(2, start.view(1), k.to(self.k.dtype))
            self.v.index_copy_(2, start.view(1), v.to(self.v.dtype))
            return self.k, self.v
        T = k.shape[2]
        self.k[:, :, start : start + T] = k
        self.v[:, :, start : start + T] = v
        return self.k[:, :, :kv_len], self.v[:, :, :kv_len]
