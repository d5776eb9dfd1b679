"""A whole batched decode step in one C call: step1.py's one-call step for a batch of rows, one token each, on
the packed weights of packed.py (qkernel.c's ``gptchat_stepn``): fp32 panels, or bf16 panels on AMX tiles.

Why: a batch-16 fp32 step of 124M on a 2-core Xeon took ~41 ms, of which the panel products were ~30 and
attention ~4; the other ~7 went to the work around them run from Python (~15 module calls a layer, layer norms,
residual adds, cache writes, views) and to the 49 parallel regions the products entered one by one. Here the
threads stay in one region for the whole step and meet at barriers; each product's panels are shared out as
gptchat_sgemm shares them, so every fp32 sum is the one the modules compute, in the same order. Measured there,
`gptchat bench --batch-sizes 16`: fp32 a step 41 -> 35 ms, batch 16 1.84x -> 2.27x transformers'; bf16 a step
22.2 -> 17.5 ms, 2.04x -> 2.63x transformers' bf16.

Used by ``GPT.forward`` for one token a row of two rows or more, inside the engine's ``PackedLinears.use`` block
(batched decode), where step1 can run the model's layers (its plan gives the norms, the token and position tables
and the attention scales), the head is tied (no bias), and the caches are [B, nh, cap, hs] of the plan's dtype
with the slot inside them; a padded batch's position ids and mask of visible slots are read as they are.
Otherwise the modules run. fp32 logits equal the modules' to ~1e-6 (the norms' sums are taken in double, as
step1's). bf16 (n_embd a multiple of 32, AMX granted): as step1's bf16 step, the norms, biases, tables and cache
stay bf16 and the activations fp32, rounded to bf16 only as a product's input; the logits, returned in fp32, are
nearer an fp32 model's on the same weights than the bf16 modules' are. ``GPTCHAT_STEPN=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import nn

from gptchat.core.model import native, packed, step1
from gptchat.core.model.device import switched_off

# where each product's weight sits in a layer's row of step1's pointers; its scale and bias follow it
_WEIGHT_AT = (2, 5, 10, 13)


@functools.lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL | None:
    lib = native.kernel()
    if lib is None:
        return None
    P, L, I, F = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float
    lib.gptchat_stepn.argtypes = [P, P, P, L, L, L, L, L, L, L, I, F, P, P, P, L, P, L, P, P, L, L, L, P, L, P, P, L,
                                  I, I, I]
    lib.gptchat_stepn.restype = I
    return lib


class BatchPlan:
    """step1's plan of a model with every product's weight and bias swapped for its panels (``ptrs`` None: the
    batched step cannot run it)."""

    def __init__(self, source: step1.Plan, packs: packed.PackedLinears, model: nn.Module):
        self.source, self.version, self.ptrs = source, packs.version, None
        head = model._modules.get("lm_head")
        head_panels = packs.panels_of(head) if head is not None else None
        table, table_s, *_ = source.emb or (None, None)
        if (head_panels is None or head.bias is not None or table is None or table_s is not None
                or table.dtype != source.dtype):
            return
        tensors = list(source.tensors)
        for i, (_, _, m) in enumerate(source.products):
            got = packs.panels_of(m)
            if got is None:
                return
            at = i // 4 * 16 + _WEIGHT_AT[i % 4]
            tensors[at], tensors[at + 1], tensors[at + 2] = got[0], None, got[1]
        self.tensors, self.head, self.vocab = tensors, head_panels[0], head.out_features
        self.ptrs = (ctypes.c_void_p * len(tensors))(*[None if t is None else t.data_ptr() for t in tensors])


def built(packs: packed.PackedLinears | None) -> bool:
    """Batched steps on these packed weights have run in one call (a plan for them was built and applies)."""
    return packs is not None and packs.plan is not None and packs.plan.ptrs is not None


# the packed weights each kind of step reads, with the kind of step1's plan it goes with
_KINDS = {"panels": step1.FP32, "bpanels": step1.BF16}


def _plan(model: nn.Module, packs: packed.PackedLinears) -> BatchPlan | None:
    p = step1.plan(model)
    if p is None or p.kind != _KINDS[packs.kind]:
        return None
    bp = packs.plan
    if bp is None or bp.source is not p or bp.version != packs.version:
        bp = packs.plan = BatchPlan(p, packs, model)
    return bp if bp.ptrs is not None else None


def _caches(attns, rows: int, slot: int, dtype: torch.dtype):
    """(pointer array: each layer's key then value buffer, their strides) of CPU caches of ``dtype`` [rows, nh,
    > slot, hs] alike in every layer, or None."""
    ptrs, st = [], None
    for attn in attns:
        c = attn._modules.get("kv_cache")
        if c is None:
            return None
        k, v = c._buffers["k"], c._buffers["v"]
        st = st or k.stride()
        if (k.shape[0] != rows or k.shape[2] <= slot or k.dtype != dtype or v.dtype != dtype
                or k.device.type != "cpu" or k.stride() != st or v.stride() != st or st[3] != 1):
            return None
        ptrs += [k.data_ptr(), v.data_ptr()]
    return (ctypes.c_void_p * len(ptrs))(*ptrs), st


def run(model: nn.Module, idx: torch.Tensor, pos: torch.Tensor | None, mask: torch.Tensor | None, slot: int,
        kv_len: int | None) -> torch.Tensor | None:
    """The logits (B, 1, V) after ``idx`` (B, 1) written at cache slot ``slot``, at positions ``pos`` (B, 1) (None:
    the slot) seeing the slots ``mask`` (B, 1, 1, slot + 1) marks (None: all), or None where the batched step does
    not apply (the caller then runs the modules)."""
    packs = packed.in_use(model)
    if (packs is None or packs.kind not in _KINDS or kv_len != slot + 1 or idx.dtype != torch.long
            or idx.device.type != "cpu" or switched_off("GPTCHAT_STEPN")):
        return None
    bf16 = packs.kind == "bpanels"
    if bf16 and (not native.amx() or model.config.n_embd % 32):  # the bf16 step's products are AMX tiles
        return None
    B = idx.shape[0]
    if (pos is not None and (pos.shape != (B, 1) or pos.dtype != torch.long or pos.device.type != "cpu")) or (
            mask is not None and (mask.shape != (B, 1, 1, slot + 1) or mask.dtype != torch.bool
                                  or mask.device.type != "cpu" or mask.stride(-1) != 1)):
        return None
    bp = _plan(model, packs)
    lib = _lib()
    if bp is None or lib is None:
        return None
    p = bp.source
    kv = _caches(p.attns, B, slot, p.dtype)
    if kv is None:
        return None
    ptrs, st = kv
    table, _, es0, es1, _ = p.emb
    ids = idx.reshape(B).contiguous()
    pos = None if pos is None else pos.reshape(B).contiguous()
    out = torch.empty(B, 1, bp.vocab)
    wf, bf = p.ln_f
    L, C, nh = p.dims
    rc = lib.gptchat_stepn(bp.ptrs, ptrs, p.scales, L, C, nh, st[0], st[1], st[2], slot, p.act, p.eps, wf.data_ptr(),
                           None if bf is None else bf.data_ptr(), bp.head.data_ptr(), bp.vocab, out.data_ptr(), B,
                           ids.data_ptr(), table.data_ptr(), table.shape[0], es0, es1, p.wpe_ptr, p.n_pos,
                           None if pos is None else pos.data_ptr(), None if mask is None else mask.data_ptr(),
                           0 if mask is None else mask.stride(0), torch.get_num_threads(), int(native.wide()), int(bf16))
    if rc == -4:  # bf16 where this build of the kernels has no AMX: nothing done, the modules run
        return None
    if rc == -2:
        raise IndexError(f"a token of {ids.tolist()} is not in the table of {table.shape[0]}")
    if rc == -3:
        raise IndexError(f"a position of {pos.tolist() if pos is not None else slot} is past the {p.n_pos} the "
                         "model has")
    if rc:
        raise MemoryError("batched decode step: no memory for its scratch buffers")
    return out
