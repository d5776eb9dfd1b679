"""gptchat's C kernels (qkernel.c beside this file) for the CPU: int8 products, one-query attention,
a whole batch-1 decode step (step1.py), causal attention for prefills and for training (flash.py), the
MLP's activation, and fp32 products of a few rows on weights packed in panels (batched decode, packed.py);
compiled at first use and loaded with ctypes.

Why a kernel of our own: batch-1 decode with int8 weights should read a quarter of fp32's bytes at the
memory's speed, but fbgemm's int8 product is compute-bound on AVX2 CPUs without VNNI (measured on AMD
Milan, 2 threads, the 124M model's 49 matrices one row each: 14.9 ms a token against 7.6 ms for this
kernel, and 25-47 ms for fp32). See qkernel.c for the layout and the arithmetic. The same library holds
the attention of one query over the KV cache (a decode step with no padding), which PyTorch's CPU flash
kernel ran ~3x slower, and the fp32 pieces named above, each where PyTorch's own was measured slower.

Built with the machine's C compiler (``$CC``, else gcc, else cc) into gptchat's cache folder (or
``$GPTCHAT_KERNELS``), named by a hash of the source and the flags, written under a temporary name and
renamed, so that concurrent first uses never load a half-written file. Its OpenMP calls are left
unresolved and bound to the OpenMP runtime PyTorch has loaded (made global first), so the kernels run
on PyTorch's own threads.

``kernel()`` is None where any of this is missing (not Linux on x86-64, no AVX2/FMA, no compiler, a
failed build, or ``GPTCHAT_NATIVE=0``): QuantLinear then uses fbgemm, attention PyTorch's kernel and
batched fp32 decode oneDNN's packed weights.
The reason is logged once.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import torch

from gptchat.core.model.device import cpu_flags, switched_off

log = logging.getLogger(__name__)
FLAGS = ["-O3", "-mavx2", "-mfma", "-fPIC"]
_P = ctypes.c_void_p
_L = ctypes.c_long


def _openmp_runtime() -> str | None:
    """The path of the OpenMP runtime PyTorch loaded (libgomp, or Intel's/LLVM's, which export GOMP_*)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if line.rstrip().endswith(".so") or ".so." in line}
    except OSError:
        return None
    for name in ("libgomp", "libiomp5", "libomp"):
        for p in sorted(paths):
            if Path(p).name.startswith(name):
                return p
    return None


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "gcc", "cc"):
        if cc and shutil.which(cc):
            return shutil.which(cc)
    return None


def _build(cc: str, source: Path, openmp: bool, folder: Path) -> Path:
    flags = FLAGS + (["-fopenmp"] if openmp else [])
    text = source.read_bytes()
    key = hashlib.sha256(text + " ".join([cc, *flags]).encode()).hexdigest()[:16]
    target = folder / f"qkernel-{key}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        obj, lib = Path(tmp) / "k.o", Path(tmp) / "k.so"
        # compile with -fopenmp (the pragmas), link without it: GOMP_* stay unresolved until load
        for cmd in ([cc, *flags, "-c", str(source), "-o", str(obj)], [cc, "-shared", str(obj), "-o", str(lib), "-lm"]):
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                lines = (done.stderr or done.stdout).strip().splitlines()
                said = next((ln for ln in lines if "error" in ln), lines[-1] if lines else "no output")
                raise OSError(f"{' '.join(cmd)}: {said.strip()}")
        os.replace(lib, target)
    return target


@functools.lru_cache(maxsize=1)
def kernel() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (and one logged line saying why) where it cannot be had."""
    from gptchat.core.paths import get_paths

    def no(why: str) -> None:
        log.info("no C kernels (int8 runs on fbgemm, decode attention on PyTorch's): %s", why)

    if switched_off("GPTCHAT_NATIVE"):
        return no("GPTCHAT_NATIVE=0")
    if not sys.platform.startswith("linux") or platform.machine().lower() not in ("x86_64", "amd64"):
        return no(f"not Linux on x86-64 ({sys.platform}, {platform.machine()})")
    if not {"avx2", "fma"} <= cpu_flags():
        return no("this CPU has no AVX2/FMA")
    cc = _compiler()
    if cc is None:
        return no("no C compiler (gcc or cc) found; set CC to one")
    runtime = _openmp_runtime()
    try:
        if runtime is not None:
            ctypes.CDLL(runtime, mode=os.RTLD_GLOBAL | getattr(os, "RTLD_NOLOAD", 0))
        source = Path(str(resources.files("gptchat.core.model") / "qkernel.c"))
        folder = Path(os.environ["GPTCHAT_KERNELS"]) if os.environ.get("GPTCHAT_KERNELS") else get_paths().cache / "kernels"
        lib = ctypes.CDLL(str(_build(cc, source, runtime is not None, folder)))
    except (OSError, subprocess.SubprocessError) as e:
        return no(f"the build failed: {e}")
    lib.gptchat_qgemm.argtypes = [_P, _P, _P, _P, _P, _L, _L, _L, _L, ctypes.c_int]
    lib.gptchat_dequant.argtypes = [_P, _P, _P, _L, _L, _L, _L, ctypes.c_int]
    lib.gptchat_pack.argtypes = [_P, _P, _L, _L, _L]
    lib.gptchat_attend1.argtypes = [_P, _L, _L, _P, _P, _L, _L, _L, _P, _P, _L, _L, _L, _L, ctypes.c_float,
                                    ctypes.c_int, ctypes.c_int, _P, _L]
    lib.gptchat_step1.argtypes = [_P, _P, _P, _L, _L, _L, _L, _L, _L, ctypes.c_int, ctypes.c_int, ctypes.c_float,
                                  _P, _P, _P, _P, _P, _L, _P, ctypes.c_int, _P, _P, _P, _L, _L, _L, _P,
                                  ctypes.c_int, ctypes.c_int, ctypes.c_int, _P, _L]
    lib.gptchat_act.argtypes = [_P, _L, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, _P, _L]
    lib.gptchat_sgemm.argtypes = [_P, _P, _P, _P, _L, _L, _L, ctypes.c_int, ctypes.c_int]
    lib.gptchat_qsgemm.argtypes = [_P, _P, _P, _P, _P, _L, _L, _L, _L, ctypes.c_int, ctypes.c_int]
    lib.gptchat_attend_causal.argtypes = [_P, _L, _L, _L, _P, _P, _L, _L, _L, _P, _L, _L, _L, _L, ctypes.c_float,
                                          ctypes.c_int, ctypes.c_int]
    lib.gptchat_attend_causal.restype = ctypes.c_int
    lib.gptchat_attn_fwd.argtypes = [_P, _P, _P, _L, _L, _L, _L, _L, _L, ctypes.c_float, _P, _P, _P, _L, _L,
                                     ctypes.c_int, ctypes.c_int]
    lib.gptchat_attn_bwd.argtypes = [_P, _P, _P, _P, _P, _L, _L, _L, _L, _L, ctypes.c_float, ctypes.c_int,
                                     ctypes.c_int]
    lib.gptchat_attn_fwd.restype = lib.gptchat_attn_bwd.restype = ctypes.c_int
    lib.gptchat_avx512_ok.argtypes, lib.gptchat_avx512_ok.restype = [], ctypes.c_int
    lib.gptchat_bpack.argtypes, lib.gptchat_bpack.restype = [_P, _P, _L, _L], None
    lib.gptchat_rows.argtypes = [_P, _P, _P, _L, _L, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.gptchat_rows.restype = ctypes.c_int
    lib.gptchat_bgemm.argtypes, lib.gptchat_bgemm.restype = [_P, _P, _P, _P, _L, _L, _L, ctypes.c_int], ctypes.c_int
    lib.gptchat_fewrows.argtypes, lib.gptchat_fewrows.restype = [_P, _P, _P, _P, _L, _L, _L, ctypes.c_int], ctypes.c_int
    lib.gptchat_set_prefetch.argtypes, lib.gptchat_set_prefetch.restype = [_L], None
    lib.gptchat_amx_ok.argtypes, lib.gptchat_amx_ok.restype = [], ctypes.c_int
    lib.gptchat_amx_bgemm.argtypes, lib.gptchat_amx_bgemm.restype = lib.gptchat_bgemm.argtypes, ctypes.c_int
    lib.gptchat_amx_gemm32.argtypes = [_P, _P, _P, _L, _L, _L, ctypes.c_int]
    lib.gptchat_amx_gemm32.restype = ctypes.c_int
    for f in (lib.gptchat_dequant, lib.gptchat_pack, lib.gptchat_attend1, lib.gptchat_act):
        f.restype = None
    lib.gptchat_qgemm.restype = lib.gptchat_step1.restype = lib.gptchat_sgemm.restype = ctypes.c_int
    lib.gptchat_qsgemm.restype = ctypes.c_int
    return lib


def padded(n: int, k: int) -> tuple[int, int]:
    """The packed layout's padded (rows, inputs): rows to a multiple of 4, inputs of 32."""
    return -(-n // 4) * 4, -(-k // 32) * 32


def pack(q: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] row-major -> the kernel's layout (a flat int8 tensor)."""
    lib = kernel()
    n, k = q.shape
    np_, kp = padded(n, k)
    q = q.contiguous()
    out = torch.empty(np_ * kp, dtype=torch.int8)
    lib.gptchat_pack(q.data_ptr(), out.data_ptr(), n, k, kp)
    return out


def gemm(packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor,
         n: int) -> torch.Tensor:
    """x (..., K) fp32 contiguous -> (..., n) fp32 through the kernel (a decode step calls this ~50 times
    a token: kept to a handful of microseconds around the kernel itself)."""
    k = x.shape[-1]
    y = x.new_empty(x.shape[:-1] + (n,))
    if kernel().gptchat_qgemm(packed.data_ptr(), scale.data_ptr(), None if bias is None else bias.data_ptr(),
                              x.data_ptr(), y.data_ptr(), x.numel() // k, n, k, padded(n, k)[1],
                              torch.get_num_threads()):
        raise MemoryError("int8 kernel: no memory for its activation buffer")
    return y


def panels(w: torch.Tensor, bias: torch.Tensor | None,
           out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An fp32 weight [N, K] (nn.Linear's) and bias [N] -> gptchat_sgemm's layout: [ceil(N/16), K, 16], one
    panel of 16 outputs after another (written into ``out``, fp32 of that many elements, when given), and the
    bias padded to match (zeros past N)."""
    n, k = w.shape
    full, p = n // 16, -(-n // 16)
    w = w.detach()
    packed = torch.empty(p, k, 16) if out is None else out.view(p, k, 16)
    packed[:full].copy_(w[: full * 16].reshape(full, 16, k).transpose(1, 2))  # no padded copy of the whole weight
    if p > full:
        packed[full].zero_()
        packed[full, :, : n - full * 16].copy_(w[full * 16 :].t())
    if bias is None:
        return packed, None
    b = torch.zeros(p * 16)
    b[:n] = bias.detach()
    return packed, b


def _panel_product(fn, packed: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor, n: int,
                   *more) -> torch.Tensor:
    """x (..., K) contiguous through the panel kernel ``fn`` (gptchat_sgemm or _bgemm; ``more``: its arguments
    after the threads) -> (..., n), x's dtype."""
    k = x.shape[-1]
    y = x.new_empty(x.shape[:-1] + (n,))
    if fn(packed.data_ptr(), None if bias is None else bias.data_ptr(), x.data_ptr(), y.data_ptr(), x.numel() // k,
          n, k, torch.get_num_threads(), *more):
        raise MemoryError("panel product kernel: no memory for its buffers")
    return y


@functools.lru_cache(maxsize=1)
def gemm_beats_panels() -> bool:
    """Whether PyTorch's GEMM multiplies many rows (prefills, eval windows) faster than gptchat's panel kernel
    (``sgemm``; ``qsgemm`` runs the same loop on dequantized panels): timed once a process, a 1024-row product
    through a 768 x 768 weight each way, best of three after a warm-up (~30 ms). Neither wins everywhere: on a
    2-core Zen 4 (AVX2 FMAs at its full rate) the panels were 1.06-1.29x, on a 2-core Xeon with two 512-bit FMA
    units a cycle PyTorch's (MKL's AVX-512 kernels, ~300 GFLOP/s against ~175) 1.6-1.8x. At 256 rows the two
    are too close to call. Both sum in fp32; they differ by rounding."""
    gen = torch.Generator().manual_seed(0)
    w, b, x = torch.randn(768, 768, generator=gen), torch.randn(768, generator=gen), torch.randn(1024, 768, generator=gen)
    pw, pb = panels(w, b)
    wt = w.t()
    return faster(lambda: torch.addmm(b, x, wt), lambda: sgemm(pw, pb, x, 768))


def faster(first, second) -> bool:
    """Whether ``first`` (a call) runs faster than ``second`` here: each timed in turn, best of three after a
    warm-up round (the once-a-process choices between two equivalent kernels)."""
    best = [float("inf"), float("inf")]
    with torch.inference_mode():
        for rep in range(4):  # the first: a warm-up
            for i, way in enumerate((first, second)):
                t = time.perf_counter()
                way()
                if rep:
                    best[i] = min(best[i], time.perf_counter() - t)
    return best[0] < best[1]


def sgemm(packed: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor, n: int) -> torch.Tensor:
    """x (..., K) fp32 contiguous times weights from ``panels`` -> (..., n) fp32 (zmm sums where ``wide``)."""
    return _panel_product(kernel().gptchat_sgemm, packed, bias, x, n, int(wide()))


def can_rows(x: torch.Tensor, w: torch.Tensor) -> bool:
    """``rows`` applies: one row, a contiguous fp32 or bf16 [N, K] CPU weight (K a multiple of 8) without
    gradients wanted, the kernel built, not inside torch.compile."""
    return (x.numel() == w.shape[1] and w.dtype in (torch.float32, torch.bfloat16) and x.dtype == w.dtype
            and w.device.type == "cpu" and x.device.type == "cpu" and w.is_contiguous() and w.shape[1] % 8 == 0
            and not (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))
            and not torch.compiler.is_compiling() and kernel() is not None)


def rows(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """w [N, K] . x for one row x (any shape of K entries) -> (..., N) in w's dtype (fp32 sums). See ``can_rows``."""
    n, k = w.shape
    x32 = x.reshape(k).float().contiguous()
    y = torch.empty(n)
    bf = w.dtype == torch.bfloat16
    if kernel().gptchat_rows(w.data_ptr(), x32.data_ptr(), y.data_ptr(), n, k, torch.get_num_threads(), int(bf),
                             int(bf and wide())):
        raise MemoryError("row kernel: no memory for its buffer")
    return y.to(w.dtype).view(*x.shape[:-1], n)


FEW_ROWS = 24  # up to this many rows an fp32 product on the inference layout goes to gptchat_fewrows (at 32: even)


def can_few_rows(x: torch.Tensor, w: torch.Tensor) -> bool:
    """``few_rows`` applies: 2 to FEW_ROWS rows of fp32 x (..., K) on the CPU times a contiguous fp32 [K, N] CPU
    weight (the inference layout's ``weight.t()``; N a multiple of 8), no gradients wanted, the kernel built, not
    inside torch.compile, and not switched off (``GPTCHAT_FEW_ROWS=0``)."""
    k = w.shape[0]
    return (w.dim() == 2 and x.shape[-1] == k and 2 <= x.numel() // max(k, 1) <= FEW_ROWS
            and not switched_off("GPTCHAT_FEW_ROWS")
            and w.dtype == torch.float32 and x.dtype == torch.float32 and w.device.type == "cpu"
            and x.device.type == "cpu" and w.is_contiguous() and w.shape[1] % 8 == 0
            and not (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))
            and not torch.compiler.is_compiling() and kernel() is not None)


def few_rows(w: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ w [K, N] (+ bias) -> (..., N) fp32 by gptchat_fewrows. See ``can_few_rows``."""
    k, n = w.shape
    x2 = x.reshape(-1, k).contiguous()
    y = torch.empty(x2.shape[0], n)
    b = None if bias is None else bias.float().contiguous()
    if kernel().gptchat_fewrows(w.data_ptr(), None if b is None else b.data_ptr(), x2.data_ptr(), y.data_ptr(),
                                x2.shape[0], k, n, torch.get_num_threads()):
        raise MemoryError("few-rows kernel: no memory for its partial sums")
    return y.view(*x.shape[:-1], n)


AVX512 = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq"})  # what the AVX-512 section of the kernel uses


def wide() -> bool:
    """The AVX-512 forms of two kernels run rather than their AVX2 ones: bf16 batch-1 products read their rows in
    zmm registers (qkernel.c's dot_rows_wide), and fp32 panel products (batched fp32 decode, int8 prefills)
    keep up to 16 rows' sums in zmm registers a pass (panel_block16) where AVX2 keeps 6 rows' in pairs of ymm: twice
    the FMA rate on CPUs with two 512-bit FMA units (Xeons; on Zen 4, which splits 512-bit work in two, the
    same). Only AVX-512F/BW are needed; ``GPTCHAT_WIDE=0`` keeps AVX2."""
    return avx512(bf16=False) and not switched_off("GPTCHAT_WIDE")


@functools.lru_cache(maxsize=None)
def avx512(bf16: bool) -> bool:
    """The kernel's AVX-512 section (training attention, bf16 panels) runs here: the library built by a
    compiler that knew AVX512-BF16's intrinsics (gcc 10, clang 9 on), and a CPU with AVX-512 (and
    AVX512-BF16 for ``bf16``)."""
    lib = kernel()
    flags = AVX512 | ({"avx512_bf16"} if bf16 else set())
    return lib is not None and bool(lib.gptchat_avx512_ok()) and flags <= cpu_flags()


def bpanels(w: torch.Tensor) -> torch.Tensor:
    """A bf16 weight [N, K] (nn.Linear's; K even) -> ``bgemm``'s panels of 16 outputs x pairs of inputs."""
    n, k = w.shape
    out = torch.empty(-(-n // 16) * 16 * k, dtype=torch.bfloat16)
    kernel().gptchat_bpack(w.detach().contiguous().data_ptr(), out.data_ptr(), n, k)
    return out


def bgemm(packed: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor, n: int) -> torch.Tensor:
    """x (..., K) bf16 contiguous times weights from ``bpanels`` (+ bias, bf16) -> (..., n) bf16, sums in fp32: on
    AMX tiles for up to 64 rows where ``amx`` (K a multiple of 32), else in AVX512-BF16."""
    k = x.shape[-1]
    tiles = x.numel() <= 64 * k and k % 32 == 0 and amx()
    return _panel_product(kernel().gptchat_amx_bgemm if tiles else kernel().gptchat_bgemm, packed, bias, x, n)


@functools.lru_cache(maxsize=1)
def amx() -> bool:
    """The kernel's AMX products run here: a CPU with AMX-BF16, a compiler that knew its intrinsics, and Linux
    granting the process the tiles' state; ``GPTCHAT_AMX=0`` says no."""
    return (not switched_off("GPTCHAT_AMX") and avx512(bf16=True) and "amx_bf16" in cpu_flags()
            and bool(kernel().gptchat_amx_ok()))


def can_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> bool:
    """``attend`` applies: fp32 or bf16 on the CPU, one query a row, the last dimension contiguous and a
    multiple of 8, keys and values laid out alike, the kernel built, not inside torch.compile (the compiled
    decode step reads the cache through a mask: a foreign call cannot be traced), and no mask or a boolean one
    of one row of slots a batch row (B, 1, 1, n: a padded batch's decode step)."""
    return (q.shape[2] == 1 and not torch.compiler.is_compiling() and _readable(q, k, v, (torch.float32, torch.bfloat16))
            and (mask is None or mask.dtype == torch.bool and mask.shape == (q.shape[0], 1, 1, k.shape[2])))


def _readable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dtypes: tuple) -> bool:
    """k and v of one of ``dtypes`` and q of theirs, or fp32 q over bf16 k and v (an int8 model's bf16 cache)."""
    return (k.dtype in dtypes and k.dtype == v.dtype and (q.dtype == k.dtype or q.dtype == torch.float32)
            and q.device.type == "cpu" and q.shape[3] % 8 == 0 and q.stride(3) == k.stride(3) == 1
            and k.stride() == v.stride() and kernel() is not None)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
           mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one query a row, q (B, nh, 1, hs), over the slots of k and v (B, nh, n, hs) its row of
    ``mask`` (B, 1, 1, n) marks (None: every slot): (B, 1, nh * hs). See ``can_attend``."""
    B, nh, _, hs = q.shape
    bf = k.dtype == torch.bfloat16  # bf16 caches widened as read, the sums fp32, a bf16 output rounded
    q32 = q.float()
    out, scores = torch.empty(B, 1, nh * hs), torch.empty(B * nh * k.shape[2])
    vis = None if mask is None else mask.reshape(B, -1).contiguous()  # one byte a slot
    kernel().gptchat_attend1(q32.data_ptr(), q32.stride(0), q32.stride(1), k.data_ptr(), v.data_ptr(), k.stride(0),
                             k.stride(1), k.stride(2), out.data_ptr(), scores.data_ptr(), B, nh, k.shape[2], hs,
                             scale, torch.get_num_threads(), int(bf), None if vis is None else vis.data_ptr(),
                             0 if vis is None else vis.stride(0))
    return out.to(q.dtype)


def can_attend_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """``attend_causal`` applies: as ``can_attend`` but any number of queries, no gradients wanted, not inside
    torch.compile, and bf16 (a bf16 model's prefill) as well as fp32."""
    return (q.shape[2] > 1 and k.shape[2] >= q.shape[2] and not q.requires_grad and not torch.compiler.is_compiling()
            and _readable(q, k, v, (torch.float32, torch.bfloat16)))


def attend_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention from slot 0 of q (B, nh, T, hs) over the first T slots of k and v (B, nh, >= T, hs):
    (B, T, nh * hs) in q's dtype, the layout c_proj reads. See ``can_attend_causal``. PyTorch's CPU flash
    kernel and the transpose after it took 15-25% longer (124M, T = 1000, 2-core EPYC). bf16: the keys and
    values are widened as read and the sums are fp32 (the queries are widened first, the output rounded)."""
    B, nh, T, hs = q.shape
    bf = k.dtype == torch.bfloat16
    q32 = q.float()
    out = torch.empty(B, T, nh * hs)
    if kernel().gptchat_attend_causal(q32.data_ptr(), q32.stride(0), q32.stride(1), q32.stride(2), k.data_ptr(),
                                      v.data_ptr(), k.stride(0), k.stride(1), k.stride(2), out.data_ptr(), B, nh, T, hs,
                                      scale, torch.get_num_threads(), int(bf)):
        raise MemoryError("causal attention kernel: no memory for its scratch buffers")
    return out.to(q.dtype)


ACTS = {"gelu_tanh": 0, "gelu": 1, "relu": 2}  # the kernel's activation codes


def can_activate(h: torch.Tensor) -> bool:
    """``activate_`` applies: a contiguous fp32 or bf16 CPU tensor without gradients, the kernel built, and not
    inside torch.compile (which cannot trace a foreign call)."""
    return (not torch.compiler.is_compiling() and h.dtype in (torch.float32, torch.bfloat16)
            and h.device.type == "cpu" and not h.requires_grad and h.is_contiguous() and kernel() is not None)


def activate_(h: torch.Tensor, kind: str, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``h`` through the activation ``kind`` (a key of ACTS), in place (bf16: computed in fp32, stored rounded).
    ``bias`` (fp32 ``h`` only: a contiguous fp32 vector of h's last dimension): act(h + bias), the product before it
    made without its bias. See ``can_activate``."""
    if bias is not None and not (h.dtype == bias.dtype == torch.float32 and bias.is_contiguous()
                                 and bias.numel() == h.shape[-1]):
        raise ValueError("activate_: the bias must be a contiguous fp32 vector as wide as h's rows (fp32 h)")
    kernel().gptchat_act(h.data_ptr(), h.numel(), ACTS[kind], torch.get_num_threads(), int(h.dtype == torch.bfloat16),
                         int(wide()), None if bias is None else bias.data_ptr(), h.shape[-1])
    return h


def qsgemm(packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor,
           n: int) -> torch.Tensor:
    """x (M, K) fp32 contiguous times the int8 groups of ``pack`` (scales per output, bias) -> (M, n) fp32, for many
    rows: each panel of 16 outputs dequantized once into cache, then multiplied in fp32 (gptchat_qsgemm)."""
    m, k = x.shape
    y = x.new_empty(m, n)
    if kernel().gptchat_qsgemm(packed.data_ptr(), scale.data_ptr(), None if bias is None else bias.data_ptr(),
                               x.data_ptr(), y.data_ptr(), m, n, k, padded(n, k)[1], torch.get_num_threads(),
                               int(wide())):
        raise MemoryError("int8 kernel: no memory for its panel buffers")
    return y


def set_prefetch(bytes_ahead: int) -> None:
    """How far ahead of the read the int8 products prefetch (step1's ``_prefetch`` trial picks it)."""
    kernel().gptchat_set_prefetch(bytes_ahead)


def dequantize(packed: torch.Tensor, scale: torch.Tensor, n0: int, n1: int, k: int,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows n0..n1 (n0 a multiple of 4) as fp32 [n1 - n0, k], into ``out`` when given."""
    if out is None:
        out = torch.empty(n1 - n0, k)
    kernel().gptchat_dequant(packed.data_ptr(), scale.data_ptr(), out.data_ptr(), n0, n1, k, padded(1, k)[1],
                             torch.get_num_threads())
    return out
