"""A whole batch-1 decode step in one C call (qkernel.c's ``gptchat_step1``): every layer's norms,
products, attention over the cache, activation and residuals, for one row with no padding.

Why: at batch 1 on the CPU the products are memory-bound and already near the read bandwidth, but the
work around them, run from Python (~15 module calls a layer, each a few microseconds, plus the layer
norms, GELU, cache writes and views), cost as much again as the int8 products themselves (measured on a
2-core AMD EPYC: products ~8.6 ms of a 124M int8 token, the rest 6-9 ms). In one C call the threads stay
in one parallel region and meet at barriers. Measured on that machine, 124M, `gptchat bench` alternating
GPTCHAT_STEP1=0/1: int8 batch-1 decode 83-94 -> 98-140 tok/s, fp32 30-36 -> 36-47 tok/s (the VM's speed
swung within the hour; see the README for the fractions of the bandwidth ceiling).

Used by ``GPT.forward`` for one token of one row (the chat and ``generate`` decode loop) when the model
is on the CPU, not training, without gradients, and every block's products are fp32 in the inference
layout, bf16 in their own [out, in] rows (gpt.py keeps them so), or int8 on the AVX2 kernel (not LoRA);
otherwise the modules run as before.

bf16: the weights, norms, biases, tables and KV cache stay bf16 and are widened to fp32 as they are read
(a bf16 is the top half of an fp32: a shift, plain AVX2, no native bf16 needed); the activations stay
fp32, so a step's logits are nearer fp32's than the bf16 modules' (which round every activation to bf16)
and are returned as fp32. Measured on a 2-core AMD EPYC (Zen 4, AVX512-BF16), 124M, `gptchat bench
--dtype bf16`: batch-1 decode 43 tok/s (25% of the bandwidth ceiling, the modules on oneDNN's packed bf16
weights) -> 101-104 tok/s (71-77%) in the step, 108.5 tok/s (86%) once its rows are read as several streams
(qkernel.c's dot_rows); the step itself ~8.3 ms a token (~30 GB/s, what summing a buffer in C read then).
The token and position rows are read in the step too (an fp32 table, or the int8 head's rows as
QuantEmbedding reads them; other tables are looked up by their module first): after a step has streamed
every weight through the caches, the first few PyTorch ops pay for cold caches (measured ~100 us for the
first op against ~8 us warm), and the six ops of an int8 lookup cost ~0.3-0.5 ms a token. The tied head
runs in the step when it is of the blocks' kind (else its module runs after); an fp32 head is read in
either order, the token table's own included. fp32 logits equal the modules' to ~1e-6 (another order of
the same sums); int8's to ~1e-4 (a norm or GELU a rounding apart can move an activation's int16 code by
one). ``GPTCHAT_STEP1=0`` turns it off; ``GPTCHAT_WIDE=0`` keeps bf16 rows in AVX2 where the CPU has AVX-512.
"""

from __future__ import annotations

import ctypes
import weakref
from contextlib import contextmanager

import torch
from torch import nn

from gptchat.core.model import native
from gptchat.core.model.device import switched_off
from gptchat.core.model.quant import QuantEmbedding, QuantLinear
from gptchat.core.model.trial import Trial


class Plan:
    """One model's weights as gptchat_step1 reads them (``ptrs`` None: the step cannot run this model),
    and the product modules they were taken from: ``current`` compares those on each call, so that a
    module swapped for an adapter, or a weight replaced or moved (a layout change, a dtype), rebuilds it."""

    def __init__(self, model: nn.Module):
        self.products = _products(model)
        self.key = [_storage(m) for _, _, m in self.products]
        self.outside = _outside(model)
        self.ptrs = None
        cfg = model.config
        if cfg.activation not in native.ACTS or cfg.n_embd % cfg.n_head or (cfg.n_embd // cfg.n_head) % 8:
            return
        tensors, small, scales, kinds = [], [], [], set()  # small: norms, biases, scales (contiguous CPU)
        for blk, i in zip(model.transformer.h, range(0, len(self.products), 4)):
            four = [_weight(m) for _, _, m in self.products[i : i + 4]]
            if None in four or any(not isinstance(ln, nn.LayerNorm) for ln in (blk.ln_1, blk.ln_2)):
                return
            kinds |= {kind for _, _, kind in four}
            (w0, s0, _), (w1, s1, _), (w2, s2, _), (w3, s3, _) = four
            b0, b1, b2, b3 = [m.bias for _, _, m in self.products[i : i + 4]]
            row = [blk.ln_1.weight, blk.ln_1.bias, w0, s0, b0, w1, s1, b1, blk.ln_2.weight, blk.ln_2.bias,
                   w2, s2, b2, w3, s3, b3]
            tensors += row
            small += [t for t in row[:2] + [s0, b0, s1, b1] + row[8:10] + [s2, b2, s3, b3] if t is not None]
            scales.append(blk.attn.scale)
        ln_f = model.transformer.ln_f
        self.ln_f = (ln_f.weight, ln_f.bias)
        small += [t for t in self.ln_f if t is not None]
        self.kind = kinds.pop() if len(kinds) == 1 else None
        # bf16 weights come with bf16 norms, biases, tables and caches; int8's and fp32's are fp32
        self.dtype = torch.bfloat16 if self.kind == BF16 else torch.float32
        if self.kind is None or ln_f.weight is None or any(
                t.dtype != self.dtype or not t.is_contiguous() or t.device.type != "cpu" for t in small):
            return
        head = _weight(model.lm_head, rows=self.kind != INT8) if "lm_head" in model._modules else None
        # the tied head too, when it is of the same kind (else the model's own head module runs after the step);
        # an fp32 head in either order: [in, out] rows like the blocks', or the token table's own [out, in];
        # a bf16 head in its own, as the blocks'
        self.head = head[:2] if head is not None and head[2] == self.kind and model.lm_head.bias is None else None
        self.head_rows = int(self.head is not None and self.kind != INT8 and self.head[0].is_contiguous())
        self.wide = int(self.kind == BF16 and native.wide())  # bf16 rows in AVX-512 (read once, not a token)
        self.vocab = model.config.vocab_size
        self.tensors = tensors  # holds them alive while the pointers are in use
        self.ptrs = (ctypes.c_void_p * len(tensors))(*[None if t is None else t.data_ptr() for t in tensors])
        self.scales = (ctypes.c_float * len(scales))(*scales)
        self.act, self.eps = native.ACTS[cfg.activation], cfg.layer_norm_epsilon
        self.dims = (cfg.n_layer, cfg.n_embd, cfg.n_head)
        self.attns = [blk.attn for blk in model.transformer.h]  # their caches are read on each call
        self.wte, self.wpe = model.transformer.wte, model.transformer.wpe.weight
        self.emb = _table(self.wte, self.wpe, self.dtype)
        self.wpe_ptr, self.n_pos = self.wpe.data_ptr(), self.wpe.shape[0]
        self.row_bytes = self.wpe.element_size() * cfg.n_embd  # a position row
        self.caches: list = []  # weak references to the KV caches kv_ptrs was read from (a KVCache keeps its buffers)
        self.kv_ptrs = None
        self.x = torch.empty(1, 1, cfg.n_embd)  # the row's activation, when the hidden state is not returned
        self.pick_below = None  # set by ``held``: the step also takes the argmax of the first this many logits
        self.pick = torch.zeros(1, dtype=torch.long)  # ... written here,
        self.picked_from = None  # ... of these logits (``picked``)

    def current(self, model: nn.Module) -> bool:
        """The model's products, tables and head are still those this plan was built from (~15 us for 124M)."""
        return (_outside(model) == self.outside
                and all(d.get(name) is m and _storage(m) == ptr for (d, name, m), ptr in zip(self.products, self.key)))

    def kv(self, slot: int):
        """(pointers, strides) of the layers' key and value caches, or None where the step cannot read them
        (a missing cache, more than one row, another dtype, slot past its end, strides apart)."""
        caches = [attn._modules.get("kv_cache") for attn in self.attns]
        if len(caches) != len(self.caches) or any(r() is not c for r, c in zip(self.caches, caches)):
            # new caches (a new batch, a compaction): new pointers. Held weakly: a dropped cache is freed
            self.kv_ptrs = None if None in caches else _kv_pointers(caches, self.dtype)
            self.caches = [weakref.ref(c) for c in caches] if self.kv_ptrs is not None else []
        if self.kv_ptrs is None or slot >= self.kv_ptrs[2]:
            return None
        return self.kv_ptrs


def _products(model: nn.Module) -> list[tuple[dict, str, nn.Module]]:
    """Every block's four products as (the parent's module dict, name, module): read through the dicts,
    since each of nn.Module's attribute lookups of a submodule costs ~1.4 us."""
    out = []
    for blk in model.transformer.h:
        for parent, name in ((blk.attn, "c_attn"), (blk.attn, "c_proj"), (blk.mlp, "c_fc"), (blk.mlp, "c_proj")):
            out.append((parent._modules, name, parent._modules[name]))
    return out


def _outside(model: nn.Module) -> tuple:
    """The token and position tables and the head, with what they read from: (module, storage) pairs."""
    mods = (model.transformer._modules.get("wte"), model.transformer._modules.get("wpe"), model._modules.get("lm_head"))
    return tuple((m, tuple(t.data_ptr() for t in (*m._parameters.values(), *m._buffers.values()) if t is not None))
                 for m in mods if m is not None)


def _table(wte: nn.Module, wpe: torch.Tensor, dtype: torch.dtype):
    """The token table as gptchat_step1 reads it: (table, scales or None, row stride, element stride, packed row
    length), or None where the lookup stays in PyTorch (another kind of table, another dtype or device)."""
    if wpe.dtype != dtype or wpe.device.type != "cpu" or not wpe.is_contiguous():
        return None
    if isinstance(wte, QuantEmbedding):
        if not wte.head:  # int8 rows of its own (no AVX2 kernel): the module looks them up
            return None
        head = wte.head[0]
        return head.packed, head.scale, 0, 0, native.padded(head.out_features, head.in_features)[1]
    w = wte._parameters.get("weight") if type(wte) is nn.Embedding else None
    if w is None or w.dtype != dtype or w.device.type != "cpu":
        return None
    return w, None, w.stride(0), w.stride(1), 0


def _kv_pointers(caches, dtype: torch.dtype) -> tuple | None:
    """(pointer array: each layer's key then value buffer, their strides, their slots, bf16), or None where the
    step cannot read them (more than one row, neither ``dtype`` nor bf16 on the CPU, layers of different dtypes,
    strides or lengths). bf16 caches under fp32 or int8 weights: an int8 model's (Engine.kv_dtype)."""
    ptrs, st, cap, kv = [], None, None, None
    for c in caches:
        k, v = c._buffers["k"], c._buffers["v"]
        st, cap, kv = st or k.stride(), cap or k.shape[2], kv or k.dtype
        if k.shape[0] != 1 or k.dtype not in (dtype, torch.bfloat16) or v.dtype != k.dtype or k.dtype != kv \
                or k.device.type != "cpu" or k.stride() != st or v.stride() != st or k.shape[2] != cap:
            return None
        ptrs += [k.data_ptr(), v.data_ptr()]
    if st[3] != 1:
        return None
    return (ctypes.c_void_p * len(ptrs))(*ptrs), st, cap, int(kv == torch.bfloat16)


def _storage(m: nn.Module) -> int | None:
    w = m._parameters.get("weight") if "weight" in m._parameters else m._buffers.get("packed")
    return None if w is None else w.data_ptr()


FP32, INT8, BF16 = 0, 1, 2  # the step's kinds of weights (qkernel.c's W_*)


def _weight(m: nn.Module, rows: bool = False):
    """(weight tensor, scale or None, kind) of a product the step can run, or None: fp32 in the inference
    layout ([in, out] in memory; ``rows``: its own [out, in] order is taken too, for the head), bf16 in its
    own order, int8 on the AVX2 kernel."""
    if isinstance(m, nn.Linear):  # gpt.Linear (LoRA's adapter is not one: fused.usable goes by the same rule)
        w = m.weight
        if w.device.type != "cpu":
            return None
        if w.dtype == torch.float32 and (w.t().is_contiguous() or rows and w.is_contiguous()):
            return w, None, FP32
        if w.dtype == torch.bfloat16 and w.is_contiguous():  # bf16 is read in its own [out, in] rows
            return w, None, BF16
        return None
    if isinstance(m, QuantLinear) and m.native:  # int8 on the AVX2 kernel's packed groups
        return m.packed, m.scale, INT8
    return None


_plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> Plan
_held: dict[int, Plan] = {}  # id(model) -> its plan, checked once for a whole generation (``held``)


# How far ahead the int8 products prefetch (qkernel.c's ``prefetch_ahead``), picked from the process's first int8
# decode steps (trial.Trial): on a 2-core AMD Zen 4 256 bytes (2048: 0.6-0.9x), on a 2-core Xeon with AMX 2048
# (256: 0.66-0.75x; batch-1 decode 0.56-0.59 -> 0.73-0.88 of its ceiling).
_prefetch = Trial((256, 2048), on_choice=native.set_prefetch)


def plan(model: nn.Module) -> Plan | None:
    """The model's plan (built on first use, rebuilt when its products changed), or None where the step
    cannot run it."""
    p = _held.get(id(model))  # held: checked on entry to ``held``
    if p is not None:
        return p
    if switched_off("GPTCHAT_STEP1") or native.kernel() is None:
        return None
    p = _plans.get(model)
    if p is None or not p.current(model):
        p = _plans[model] = Plan(model)
    return p if p.ptrs is not None else None


@contextmanager
def held(model: nn.Module, pick_below: int | None = None):
    """Inside, ``model``'s weights are taken to stay as they are (an engine's generation, which holds the
    engine's lock): its plan is checked once, on entry, instead of on every step. After a step has streamed
    every weight through the caches, ``Plan.current`` touches cold memory: ~0.1 ms a token in a 124M int8
    generation on a 2-core Zen 4 (3% of it), against ~20 us warm. ``pick_below``: each step also takes the
    argmax of its first that many logits, for ``picked``."""
    key, p = id(model), plan(model)
    before = _held.get(key)
    if p is not None:
        _held[key], p.pick_below, p.picked_from = p, pick_below, None
    try:
        yield
    finally:
        if p is not None:
            p.pick_below = p.picked_from = None
        if before is None:
            _held.pop(key, None)
        else:
            _held[key] = before


def picked(model: nn.Module, logits: torch.Tensor) -> torch.Tensor | None:
    """torch.argmax(logits, -1) for the (1, V) ``logits`` the last step of ``held`` model returned (V its
    ``pick_below``), taken in the step by each thread over the logits it had just written (in a 124M int8
    generation torch.argmax took ~66 us after a step, the logits in the other core's caches: 2% of a token);
    None for any other logits."""
    p = _held.get(id(model))
    if p is None or p.picked_from is None or logits.shape != (1, p.pick_below):
        return None
    if logits.data_ptr() != p.picked_from.data_ptr() or logits.stride(-1) != 1:
        return None
    return p.pick.clone()


def run(model: nn.Module, idx: torch.Tensor, slot: int, kv_len: int | None, logits: bool = True) -> torch.Tensor | None:
    """The logits (1, 1, V) after ``idx`` (1, 1) written at cache slot ``slot`` (``logits`` False: the final
    hidden state (1, 1, C)), or None where the step does not apply (the caller then runs the modules)."""
    if kv_len is not None and kv_len != slot + 1:
        return None
    p = plan(model)
    if p is None:
        return None
    kv = p.kv(slot)
    if kv is None or slot >= p.n_pos:
        return None
    kv_ptrs, st, _, kv_bf = kv
    head = p.head if logits else None
    out = torch.empty(1, 1, p.vocab) if head is not None else None
    emb = p.emb if idx.dtype == torch.long and idx.device.type == "cpu" else None
    if emb is not None:  # the lookup in the step: no PyTorch op between two steps but the logits' allocation
        x = p.x if logits else torch.empty(1, 1, p.dims[1])
        table, table_s, es0, es1, kp = emb
        lookup = (idx.data_ptr(), table.data_ptr(), None if table_s is None else table_s.data_ptr(), es0, es1, kp,
                  p.wpe_ptr + slot * p.row_bytes)
    else:
        x = (p.wte(idx) + p.wpe[slot]).float().contiguous()  # (1, 1, C)
        lookup = (None, None, None, 0, 0, 0, None)
    wf, bf = p.ln_f
    pick = p.pick.data_ptr() if out is not None and p.pick_below and p.pick_below <= p.vocab else None
    def step() -> int:
        return native.kernel().gptchat_step1(
            p.ptrs, kv_ptrs, p.scales, p.dims[0], p.dims[1], p.dims[2], st[1], st[2], slot, p.kind, p.act, p.eps,
            wf.data_ptr(), None if bf is None else bf.data_ptr(), x.data_ptr(),
            None if head is None else head[0].data_ptr(), None if head is None or head[1] is None else head[1].data_ptr(),
            p.vocab, None if out is None else out.data_ptr(), torch.get_num_threads(), *lookup, p.head_rows, kv_bf,
            p.wide, pick, p.pick_below or 0)

    if p.kind == INT8 and _prefetch.timing:  # this step at the trial's prefetch distance, timed
        rc = _prefetch.call(lambda ahead: native.set_prefetch(ahead) or step())
    else:
        rc = step()
    p.picked_from = out if pick is not None else None
    if rc == -2:
        raise IndexError(f"token {int(idx)} is not in the table of {p.vocab}")
    if rc:
        raise MemoryError("decode step: no memory for its scratch buffers")
    if out is not None:
        return out  # fp32 logits, also of a bf16 model (its modules' logits are bf16)
    x = x if p.dtype == torch.float32 else x.to(p.dtype)
    return model.lm_head(x) if logits else x
