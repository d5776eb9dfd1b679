"""oneDNN-packed copies of a model's Linear weights, for batched decode on the CPU.

Why: a batched decode step is a chain of (B, C) x (C, N) products with B around 4-64. On this
project's CPU (AMD EPYC, AVX2; PyTorch's fp32 GEMM goes to MKL) MKL's sgemm is slow at that shape,
while oneDNN with the weight reordered once into its blocked layout is 1.5-3x faster per product
(measured for B=16: the 768x50257 head 128 ms -> 43 ms, 768x3072 21 ms -> 10 ms; figures from a
loaded shared machine, the ratios held across runs); from B=2 already (the 124M model's matrices,
B=2: 23 ms packed against 50 ms for MKL). At B=1 the split product of gpt.Linear is faster (19 ms
against 22 ms packed), so the packed path is used for batches of 2 or more in fp32.

bf16 is the other way round: on a CPU with native bf16 (AVX512-BF16 here), ``F.linear`` on bf16
weights runs at 35-40 GB/s on cached matrices and 17 GB/s on the head, so bf16 decode was slower
than fp32; oneDNN's packed bf16 weights run at 80-90 GB/s and 36 GB/s (the head 4.2 ms -> 2.2 ms,
measured at batch 1). So bf16 uses the packed weights at every batch size.

bf16 on CPUs with AVX512-BF16 goes further with gptchat's kernel (native.bgemm, qkernel.c's gptchat_bgemm: bf16
pairs multiplied into fp32 sums by VDPBF16PS on panels of 16 outputs): the 124M model's 49 products in one
process on a 2-core Zen 4, 4 rows 8.3 ms against oneDNN's 11.1, 16 rows 15.1 against 17.5, 64 rows 41.5
against 42.0.

fp32 on x86-64 with AVX2/FMA goes one better: gptchat's own kernel (native.sgemm, qkernel.c's
gptchat_sgemm) on weights laid out in panels of 16 outputs. Measured on the same 2-core AMD EPYC, a
124M decode step alternating the two in one process: 2 rows 29-33 ms against 32-40, 4 rows 29-31 against
42-45, 16 rows 63-76 against 83-87, 64 rows 150-192 against 182-203 (the products alone, outside the
model: 16 rows 35-41 ms against ~64, 4 rows 21-23 ms, about the read bandwidth). oneDNN stays for bf16
and where the kernel cannot be built (``GPTCHAT_NATIVE=0``).

The packed weights are a second copy (for GPT-2 124M, ~500 MB), built on first use and rebuilt when
a weight changes in place. ``GPTCHAT_ONEDNN=0`` turns the whole thing off.

"mkl" is for many rows rather than few (eval's windows): MKL's packed copy of each fp32 weight
(``torch.ops.mkl``, cblas_sgemm_pack), multiplied by its own GEMM (cblas_sgemm_compute), which then skips the
packing of the weight that each plain call does. The same sums as PyTorch's GEMM (equal bit for bit at 100 rows
and more, measured); 1000 rows x the four 124M shapes on a 2-core Xeon with AVX-512, warm: 306-321 against
286-299 GFLOP/s. Its pack is the size of the weight once resident (MKL asks for ~2.2-2.6x in address space, never
touched), so it is kept where memory is budgeted for it (eval), not for generation: a 1000-token 124M prefill
took 0.696 s on it against 0.731 s (medians of 9, alternating), but generate's peak RSS (757 MB) would gain the
~340 MB of the blocks' weights, past its 1.2 x weights + 300 MB (898 MB). Eval's head is packed by vocabulary
blocks (``blocks``): MKL's, or where AMX is there split3's bf16x3 panels.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from gptchat.core.model import hugepages, native, split3
from gptchat.core.model.device import cpu_amx_bf16, switched_off


def mkl_packs() -> bool:
    """Whether this PyTorch multiplies on MKL-packed fp32 weights ("mkl" PackedLinears)."""
    return (not switched_off("GPTCHAT_MKL_PACKED") and torch.backends.mkl.is_available()
            and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight") and hasattr(torch.ops.mkl, "_mkl_linear"))


def _mkl_pack(w: torch.Tensor, rows: int) -> torch.Tensor:
    """MKL's pack of ``w`` (N, K) for products of about ``rows`` rows: any row count multiplies right on it (1 to 4096
    measured), but MKL settles its threading by the rows it was told: 512 rows through a 1024 x 768 block packed for
    1024 took 1.8x the time of one packed for 512."""
    return torch.ops.mkl._mkl_reorder_linear_weight(w.detach(), rows)


def kind(device: torch.device, dtype: torch.dtype) -> str | None:
    """"panels" (gptchat's fp32 kernel), "bpanels" (its bf16 one), "onednn", or None: no packed weights for this
    device and dtype."""
    if switched_off("GPTCHAT_ONEDNN"):
        return None
    if torch.device(device).type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return None
    if dtype == torch.float32 and native.kernel() is not None:
        return "panels"
    if dtype == torch.bfloat16 and native.avx512(bf16=True) and (not cpu_amx_bf16() or native.amx()):
        # with AMX, on its tiles (native.amx): oneDNN's products on them had run batch-16 bf16 decode 1.45x the
        # AVX512-BF16 panels'
        return "bpanels"
    if not torch.backends.mkldnn.is_available():
        return None
    if hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return "onednn"
    return None


class PackedLinears:
    """Packed weights for every nn.Linear of a model; ``use()`` routes their calls through them."""

    def __init__(self, model: nn.Module, batch_hint: int = 16, kind: str = "onednn"):
        self.model = model
        self.batch_hint = batch_hint
        self.kind = kind
        self._packed: dict[str, tuple[object, torch.Tensor | None]] = {}
        self._stamp: dict[str, tuple] = {}
        self._found: list[tuple[str, nn.Linear, dict, str]] | None = None
        self.version = 0  # counts the refreshes that packed something (a plan over the packed weights rebuilds)
        self.plan = None  # such a plan, kept here by its owner (stepn.py)
        self._blocks: tuple[tuple, list] | None = None  # the head's packed vocabulary blocks (eval), by their stamp

    def _linears(self) -> list[tuple[str, nn.Linear]]:
        """The model's Linears, by name. Walking the module tree took ~0.7 ms, twice a decode step; the walk
        is kept and checked through each Linear's parent (a module swapped for a wrapper walks again)."""
        found = self._found
        if found is None or any(d.get(a) is not m for _, m, d, a in found):
            found, seen = [], set()
            for prefix, parent in self.model.named_modules():
                for a, m in parent._modules.items():
                    if isinstance(m, nn.Linear) and id(m) not in seen:
                        seen.add(id(m))
                        found.append((f"{prefix}.{a}" if prefix else a, m, parent._modules, a))
            self._found = found
        # "mkl" leaves the head out: eval multiplies by it in vocabulary blocks (``blocks``)
        skip = getattr(self.model, "lm_head", None) if self.kind == "mkl" else None
        return [(n, m) for n, m, _, _ in found if m is not skip]

    @property
    def built(self) -> bool:
        """Some weights are packed already (a later refresh packs only what changed)."""
        return bool(self._packed)

    def refresh(self) -> None:
        """Pack the weights that are new or changed since the last call."""
        with torch.inference_mode():
            linears = self._linears()
            for gone in set(self._packed) - {name for name, _ in linears}:  # swapped out: its copy goes too
                del self._packed[gone], self._stamp[gone]
            fresh = []
            for name, lin in linears:
                w, b = lin.weight, lin.bias  # the panels copy the bias too: a change to either packs again
                stamp = (w.data_ptr(), w._version) + ((b.data_ptr(), b._version) if b is not None else ())
                if self._stamp.get(name) != stamp:
                    fresh.append((name, lin, stamp))
            room = _huge_room([lin for _, lin, _ in fresh]) if self.kind == "panels" else None
            for name, lin, stamp in fresh:
                w, b = lin.weight, lin.bias
                if self.kind == "panels":
                    size = _panel_floats(lin)
                    self._packed[name] = native.panels(w, lin.bias, None if room is None else room[:size])
                    room = None if room is None else room[size:]
                elif self.kind == "bpanels":
                    self._packed[name] = (native.bpanels(w), None if b is None else b.detach().contiguous())
                elif self.kind == "mkl":
                    self._packed[name] = (_mkl_pack(w, self.batch_hint), None if b is None else b.detach())
                else:
                    packed = torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), self.batch_hint)
                    self._packed[name] = (packed, None if lin.bias is None else lin.bias.detach())
                self._stamp[name] = stamp
            self.version += bool(fresh)

    def panels_of(self, lin: nn.Module):
        """(panels, bias or None) of ``lin`` where it is one of the model's Linears packed in panels (fp32 "panels":
        the bias padded to them; bf16 "bpanels": its own), else None."""
        name = next((n for n, m in self._linears() if m is lin), None)
        return self._packed.get(name) if self.kind in ("panels", "bpanels") and name is not None else None

    def blocks(self, rows: torch.Tensor, size: int, m: int, how: str = "mkl") -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Packed copies of ``rows`` (V, C) by blocks of ``size`` rows, each with its block (a view): MKL's for
        products of ``m`` rows (``how`` "mkl"), or split3's bf16x3 panels ("bf16x3"). Eval's head by vocabulary
        blocks (perplexity._Head); kept until ``rows`` changes or other blocks are asked for."""
        stamp = (rows.data_ptr(), rows._version, tuple(rows.shape), size, m, how)
        if self._blocks is None or self._blocks[0] != stamp:
            self._blocks = None  # the old copy goes before the new one is made
            with torch.inference_mode():
                pack = split3.pack if how == "bf16x3" else lambda b: _mkl_pack(b, m)
                self._blocks = (stamp, [(pack(b), b) for b in rows.detach().split(size)])
        return self._blocks[1]

    @contextmanager
    def use(self):
        """Within the block, every Linear of the model computes with its packed weight."""
        self.refresh()
        patched, before = [], _in_use.get(id(self.model))
        _in_use[id(self.model)] = self
        try:
            for name, lin in self._linears():
                packed, bias = self._packed[name]
                if self.kind == "panels":
                    lin.forward = _kernel_forward(native.sgemm, packed, bias, lin, torch.float32)
                elif self.kind == "bpanels":
                    lin.forward = _kernel_forward(native.bgemm, packed, bias, lin, torch.bfloat16, BPANEL_ROWS)
                elif self.kind == "mkl":
                    lin.forward = _mkl_forward(packed, bias, lin)
                else:
                    lin.forward = _packed_forward(packed, bias, lin.out_features)
                patched.append(lin)
            yield
        finally:
            if before is None:
                _in_use.pop(id(self.model), None)
            else:
                _in_use[id(self.model)] = before
            for lin in patched:
                del lin.forward  # back to the class's forward


_in_use: dict[int, PackedLinears] = {}  # id(model) -> its packed weights, inside their ``use`` block


def in_use(model: nn.Module) -> PackedLinears | None:
    """The packed weights ``model``'s Linears are computing with now (inside ``PackedLinears.use``), or None."""
    return _in_use.get(id(model))


def _panel_floats(lin: nn.Linear) -> int:
    """The floats of ``lin``'s weight in native.panels' layout (its outputs padded to 16)."""
    return -(-lin.out_features // 16) * 16 * lin.in_features


def _huge_room(linears: list) -> torch.Tensor | None:
    """fp32 room for the panels of ``linears`` in 2 MB pages (hugepages.block), or None where they come to less
    than one page. The panels are streamed whole every step like batch-1's weights: a 2-core Xeon's 48 products of
    124M at 2 rows 18.0 -> 14.8 ms, 8 rows 20.3 -> 17.5, 16 rows 23.3 -> 21.0 against 4 KB pages (one stream a
    thread, whose hardware prefetch stops at every 4 KB page); batch-16 fp32 decode 1.72x -> 1.85x transformers'.
    The cost, once: packing 124M took 0.19 s in plain pages, 0.19-1.09 s in 2 MB ones (the first such block of a
    process waits while the kernel gathers free 2 MB pages; the next came at once)."""
    total = sum(_panel_floats(lin) for lin in linears)
    return hugepages.block(total * 4).view(torch.float32) if total * 4 >= hugepages.HUGE else None


def min_batch(dtype: torch.dtype) -> int:
    """The smallest batch the packed weights are used for (see the module docstring)."""
    return 1 if dtype == torch.bfloat16 else 2


def _packed_forward(packed, bias, out_features: int):
    linear = torch.ops.mkldnn._linear_pointwise

    def forward(x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = linear(x.reshape(-1, shape[-1]).contiguous(), packed, bias, "none", [], "")
        return y.view(*shape[:-1], out_features)

    return forward


def mkl_product(packed: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """x (M, K) fp32 contiguous times the MKL-packed ``weight`` (N, K) (+ bias) -> (M, N)."""
    return torch.ops.mkl._mkl_linear(x, packed, weight, bias, x.shape[0])  # M given: packed at any M (see above)


def _mkl_forward(packed: torch.Tensor, bias: torch.Tensor | None, lin: nn.Linear):
    """``lin``'s forward on its MKL-packed weight, for fp32 CPU inference (else the module's own)."""
    out_features, plain, weight = lin.out_features, type(lin).forward, lin.weight.detach()

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu" or torch.is_grad_enabled():
            return plain(lin, x)
        shape = x.shape
        return mkl_product(packed, weight, bias, x.reshape(-1, shape[-1]).contiguous()).view(*shape[:-1], out_features)

    return forward


BPANEL_ROWS = 64  # bf16 panels for up to this many rows (a decode step's; a refill's prompt takes the module's)
MANY_ROWS = 256  # fp32 calls of more rows (a batch's prompts) leave the panels where PyTorch's GEMM is faster there


def _kernel_forward(product, packed: torch.Tensor, bias: torch.Tensor | None, lin: nn.Linear, dtype: torch.dtype,
                    max_rows: int | None = None):
    """``lin``'s forward through one of gptchat's panel products (native.sgemm, native.bgemm)."""
    out_features, plain = lin.out_features, type(lin).forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if (x.dtype != dtype or x.device.type != "cpu" or torch.is_grad_enabled()
                or max_rows is not None and rows > max_rows
                or rows > MANY_ROWS and product is native.sgemm and native.gemm_beats_panels()):
            return plain(lin, x)  # not what the panels are for (autocast, autograd, a long prompt): the module's own
        return product(packed, bias, x.contiguous(), out_features)

    return forward
