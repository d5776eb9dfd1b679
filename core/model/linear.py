"""gpt.Linear: nn.Linear with the CPU's one-row paths (a decode step's split products, a prefill's head row, a short
prompt's few rows), and the rule for when a Linear is plain enough for gpt.Block's fused many-row paths."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gptchat.core.model import native
from gptchat.core.model.device import switched_off


ROWS_FROM = 8192  # one row through a [out, in] weight this wide goes to native.rows (a vocabulary head)


class Linear(nn.Linear):
    """nn.Linear whose one-row product can be split over the input dimension (``parts`` > 1, set by
    GPT.to_inference_layout): a batch-1 decode step on the CPU is memory-bound matrix-vector products,
    and PyTorch's single call streams the weight at about half the machine's read bandwidth however
    many threads it has. Split into ``parts`` contiguous blocks of input rows, one ``bmm`` gives each
    thread a block of its own to stream, and the partial outputs are summed (measured on a 2-core AMD
    EPYC, the 124M model's matrices: 26 GB/s against 16 GB/s unsplit; summing a buffer reads 31 GB/s)."""

    parts = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.out_features >= ROWS_FROM and native.can_rows(x, self.weight):
            y = native.rows(self.weight, x)  # a prefill's last-row head: PyTorch's one-row product reads slowly
            return y if self.bias is None else y + self.bias
        if self.parts > 1 and x.numel() == self.in_features:
            w = self.weight.t()  # [in, out], contiguous in the inference layout
            if w.is_contiguous():
                k = self.in_features // self.parts
                y = torch.bmm(x.reshape(self.parts, 1, k), w.view(self.parts, k, self.out_features)).sum(0)
                if self.bias is not None:
                    y = y.add_(self.bias)
                return y.view(x.shape[:-1] + (self.out_features,))
        w = self.weight.t()  # [in, out]: contiguous in the inference layout
        if native.can_few_rows(x, w):  # a short prefill: PyTorch's GEMM reads the weights slowly at a few rows
            return native.few_rows(w, self.bias, x)
        return F.linear(x, self.weight, self.bias)


def split_parts(in_features: int, threads: int) -> int:
    """How many blocks a one-row product over ``in_features`` inputs is split into: one per thread,
    fewer where they do not divide it evenly (1: not split). ``GPTCHAT_SPLIT_K=0`` turns it off."""
    if switched_off("GPTCHAT_SPLIT_K"):
        return 1
    return next(p for p in range(max(1, threads), 0, -1) if in_features % p == 0 and in_features // p >= 32 or p == 1)


def plain(m: nn.Module) -> bool:
    """A plain Linear in inference with fp32 weight and bias (not LoRA, int8 or packed: they patch or replace it)."""
    return (type(m) is Linear and "forward" not in m.__dict__ and m.weight.dtype == torch.float32
            and (m.bias is None or m.bias.dtype == torch.float32) and not m.training)
