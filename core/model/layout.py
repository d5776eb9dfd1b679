"""The inference layout (GPT.to_inference_layout, GPT.from_state_dict): which 2-D weights are kept transposed in
memory ([in, out], the shapes unchanged) and the copy that transposes them."""

from __future__ import annotations

import torch

from gptchat.core.model import native
from gptchat.core.model.device import switched_off


def head_by_rows(w: torch.Tensor | None) -> bool:
    """The tied token table/head stays [V, C] in memory in the inference layout: on the CPU in fp32 or bf16 with
    the C kernels, whose batch-1 step reads the head a row of C a logit as fast as the transposed copy (which took
    ~0.1 s of a 124M start to make: 154 MB copied and page-faulted). Elsewhere it is transposed like the others
    (PyTorch's split product reads [in, out] rows ~1.5x faster)."""
    return (w is not None and w.device.type == "cpu" and w.dtype in (torch.float32, torch.bfloat16)
            and not switched_off("GPTCHAT_STEP1") and native.kernel() is not None)


def rows_kept(w: torch.Tensor) -> bool:
    """A bf16 weight on the CPU stays in its own [out, in] order where the C kernels run batch-1 steps: they
    stream bf16 rows as fast as the memory reads (step1.py), and oneDNN packs batched products from either."""
    return w.dtype == torch.bfloat16 and head_by_rows(w)


def placed(t: torch.Tensor, transposed: bool) -> torch.Tensor:
    """``t`` contiguous, or for a 2-D weight in the inference layout: [in, out] in memory, same shape."""
    if transposed and t.dim() == 2:
        return _transposed_copy(t).t() if t.is_contiguous() else t
    return t.contiguous()


def _transposed_copy(t: torch.Tensor, rows: int = 256) -> torch.Tensor:
    """``t.t().contiguous()``, copied ``rows`` source rows at a time: each block's reads and writes stay in
    cache (wte, 50257 x 768 fp32, on a 2-core AMD EPYC: 110-120 ms against 160-190 ms in one copy)."""
    out = torch.empty(t.shape[1], t.shape[0], dtype=t.dtype, device=t.device)
    if t.device.type != "cpu":
        return out.copy_(t.t())
    for i in range(0, t.shape[0], rows):
        out[:, i:i + rows].copy_(t[i:i + rows].t())
    return out
