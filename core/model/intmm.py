"""int8 products of several rows on PyTorch's int8 x int8 GEMM (``torch._int_mm``: oneDNN, AMX or VNNI tiles).

The same arithmetic as the C kernel's (core/model/qkernel.c, gptchat_qgemm): each activation row rounded to int16
with its own scale, multiplied exactly in integers by the int8 weights, scaled per row and per output. The GEMM
multiplies bytes, so each int16 row goes in as two byte rows (gptchat_split16: x16 = 256 h + l) and the two int32
sums are joined afterwards (gptchat_join16). The weights stay in the kernel's packed groups, the only copy: a
block of BLOCK outputs is unpacked into a plain int8 buffer (gptchat_unpack) just before its products.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from gptchat.core.model import native
from gptchat.core.model.device import switched_off
from gptchat.core.model.trial import Trial

BLOCK = 512  # outputs unpacked at a time: [512, K] int8 (384 KB at K 768) and its [2 x CHUNK, 512] int32 sums in L2
CHUNK = 256  # activation rows a GEMM call: their int32 sums, [512, 512], 1 MB


@functools.lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL:
    lib = native.kernel()
    P, L, I = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    lib.gptchat_split16.argtypes = [P, P, P, L, L, L, I]
    lib.gptchat_unpack.argtypes = [P, P, L, L, L, I]
    lib.gptchat_join16.argtypes = [P, P, P, P, P, L, L, L, I]
    for f in (lib.gptchat_split16, lib.gptchat_unpack, lib.gptchat_join16):
        f.restype = None
    return lib


def available() -> bool:
    """Whether this PyTorch has the int8 GEMM on the CPU (``torch._int_mm``), the C kernel exists and
    GPTCHAT_INTMM=0 does not switch this way off."""
    return not switched_off("GPTCHAT_INTMM") and native.kernel() is not None and hasattr(torch, "_int_mm")


def product(packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor,
            n: int) -> torch.Tensor:
    """x (M, K) fp32 contiguous times the int8 groups of ``native.pack`` (scales per output, bias) -> (M, n) fp32."""
    lib, threads = _lib(), torch.get_num_threads()
    m, k = x.shape
    kp = native.padded(n, k)[1]
    a = torch.empty(m, 2, kp, dtype=torch.int8)
    xs = torch.empty(m)
    lib.gptchat_split16(x.data_ptr(), a.data_ptr(), xs.data_ptr(), m, k, kp, threads)
    a = a.view(2 * m, kp)
    y = x.new_empty(m, n)
    w = torch.empty(min(n, BLOCK), kp, dtype=torch.int8)
    sums = torch.empty(2 * min(m, CHUNK) * min(n, BLOCK), dtype=torch.int32)
    for n0 in range(0, n, BLOCK):
        n1 = min(n, n0 + BLOCK)
        nb = n1 - n0
        wb = w[:nb]
        lib.gptchat_unpack(packed.data_ptr(), wb.data_ptr(), n0, n1, kp, threads)
        for m0 in range(0, m, CHUNK):
            m1 = min(m, m0 + CHUNK)
            out = sums[: 2 * (m1 - m0) * nb].view(2 * (m1 - m0), nb)
            torch._int_mm(a[2 * m0 : 2 * m1], wb.t(), out=out)
            lib.gptchat_join16(out.data_ptr(), xs[m0:].data_ptr(), scale[n0:].data_ptr(),
                               None if bias is None else bias[n0:].data_ptr(), y[m0, n0:].data_ptr(), m1 - m0, nb,
                               n, threads)
    return y


FEW = 16  # fewer rows a call stay on the C kernel: at 8 rows the two were even on a 2-core Xeon with AMX

# (outputs, inputs, rows) -> the way calls of FEW to quant.NATIVE_ROWS rows of that shape go: timed on the calls
# themselves (a batch's decode steps), as a warm harness misjudged them: at 16 rows one 768 x 3072 product in
# cache ran 0.56-0.64 ms on the C kernel and 0.62-0.78 here, yet batch-16 decode was 1.06x faster here in the
# same phase of the same 2-core Xeon (1.31x in a faster one)
_few: dict[tuple[int, int, int], Trial] = {}


def few_rows(packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor,
             n: int) -> torch.Tensor:
    """x (..., K) fp32 contiguous of FEW to quant.NATIVE_ROWS rows times the int8 groups -> (..., n): on the C kernel
    (native.gemm) or ``product``, whichever the calls of this shape timed faster."""
    k = x.shape[-1]
    rows = x.numel() // k
    trial = _few.get((n, k, rows))
    if trial is None:
        trial = _few[(n, k, rows)] = Trial(("kernel", "gemm"))
    return trial.call(lambda way: native.gemm(packed, scale, bias, x, n) if way == "kernel"
                      else product(packed, scale, bias, x.view(rows, k), n).view(*x.shape[:-1], n))


def wins(rows: int) -> bool:
    """Whether a product of more than quant.NATIVE_ROWS ``rows`` rows goes to ``product``: where timed faster
    on this machine than an fp32 product on the dequantized weight."""
    return rows >= FEW and available() and _beats()


def describe(kernel_rows: int) -> str:
    """Which products go to ``product`` on this machine, in words ("" for none); ``kernel_rows``: the most rows
    the C kernel takes (quant.NATIVE_ROWS)."""
    if not available():
        return ""
    few = f"{FEW}-{kernel_rows} rows where timed faster in use"
    return f"PyTorch's int8 GEMM beyond {kernel_rows} rows, {few}" if _beats() else f"PyTorch's int8 GEMM for {few}"


@functools.lru_cache(maxsize=1)
def _beats() -> bool:
    """Timed once a process (~20 ms, native.faster): 1024 rows through a 768 x 768 int8 weight against the fp32
    product on the dequantized weight (PyTorch's GEMM or gptchat's panels, whichever ``native.gemm_beats_panels``
    picked). Measured on a 2-core Xeon with AMX: 2.5-2.9x PyTorch's fp32 GEMM at 1000 rows; without AMX the int8
    GEMM may lose (oneDNN's VNNI or AVX2 kernels), hence the timing."""
    gen = torch.Generator().manual_seed(0)
    n = 768
    q = torch.randint(-127, 128, (n, 768), dtype=torch.int8, generator=gen)
    packed, scale, bias = native.pack(q), torch.rand(n, generator=gen) / 100, torch.randn(n, generator=gen)
    x = torch.randn(1024, 768, generator=gen)
    if native.gemm_beats_panels():
        other = functools.partial(torch.addmm, bias, x, (q.float() * scale[:, None]).t())
    else:
        other = functools.partial(native.qsgemm, packed, scale, bias, x, n)
    return native.faster(functools.partial(product, packed, scale, bias, x, n), other)
