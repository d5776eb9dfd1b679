"""Pick the device and dtype: automatic by default (cuda, then mps, then cpu), overridable."""

from __future__ import annotations

import functools
import logging
import os

import torch

from gptchat.core.errors import DeviceError
from gptchat.core.model.words import device_word, dtype_word

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def switched_off(variable: str) -> bool:
    """A ``GPTCHAT_*`` kernel switch set to 0/false/no/off (unset: on)."""
    return os.environ.get(variable, "1").strip().lower() in ("0", "false", "no", "off")


def _configured(spec: str | None, key: str) -> tuple[str | None, str]:
    """(``spec``, or config.toml's value where none is given; how an error names it)."""
    if spec is None:
        from gptchat.core import config

        cfg = config.load()
        got = getattr(cfg, key)
        if got is not None:
            return got, f"{cfg.path}: {key} = {got!r}"
    return spec, f"--{key} {(spec or 'auto').strip().lower()}"


def pick_device(spec: str | None = None) -> torch.device:
    spec, said = _configured(spec, "device")  # no --device: config.toml's, else auto
    kind, index = device_word(spec)  # DeviceError for a word that names no device
    spec = (spec or "auto").strip().lower()
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{said}: CUDA is not available on this machine (try --device cpu)")
        if index is not None and index >= torch.cuda.device_count():
            raise DeviceError(f"{said}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif kind == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise DeviceError(f"{said}: Apple MPS is not available on this machine (try --device cpu)")
    return torch.device(kind if index is None else f"{kind}:{index}")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is no such file)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_native_bf16() -> bool:
    """True where the CPU multiplies bf16 in hardware (AVX512-BF16, AMX, or Arm's BF16 extension).
    Elsewhere oneDNN emulates bf16 and it is slower than fp32."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})


def cpu_amx_bf16() -> bool:
    """True where the CPU multiplies bf16 matrices on AMX tiles (Xeons from Sapphire Rapids on): oneDNN, and so
    PyTorch's bf16 products and attention, use them, at several times the rate of the AVX512-BF16 pair dot
    products gptchat's own bf16 kernels use; those kernels step aside there (flash.pytorch_faster, packed.kind)."""
    return "amx_bf16" in cpu_flags()


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask: containers and taskset narrow it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def set_threads() -> int:
    """One intra-op thread per usable core, unless the user set OMP_NUM_THREADS; returns the count."""
    if not os.environ.get("OMP_NUM_THREADS"):
        n = usable_cores()
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
    return torch.get_num_threads()


_said = False


def pick_dtype(spec: str | None, device: torch.device) -> torch.dtype:
    spec, said = _configured(spec, "dtype")  # no --dtype: config.toml's, else auto
    spec = dtype_word(spec)  # DeviceError for a word that names no dtype
    if spec == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "mps":
            return torch.float16
        return torch.float32  # CPU half-precision matmuls are slow or missing on most CPUs
    dtype = DTYPES[spec]
    if dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DeviceError(f"{said}: this GPU does not support bfloat16; use fp16")
    if dtype is torch.bfloat16 and device.type == "cpu" and not cpu_native_bf16():
        global _said
        if not _said:  # said once per process, however many models load
            logging.getLogger("gptchat").warning(
                "%s: this CPU has no native bf16 (AVX512-BF16 or AMX), where bf16 runs slower than fp32; "
                "using fp32", said)
            _said = True
        return torch.float32
    return dtype


def describe(device: torch.device, dtype: torch.dtype) -> str:
    name = str(device)
    if device.type == "cuda":
        name += f" ({torch.cuda.get_device_name(device)})"
    elif device.type == "cpu":
        name += f" ({torch.get_num_threads()} threads)"
    return f"{name} {DTYPE_NAMES.get(dtype, str(dtype))}"


def compile_mode(device: torch.device) -> str:
    """torch.compile's mode for the decode step: CUDA graphs on CUDA (a step is many small kernels
    whose launches cost more than their work at batch 1), inductor's default elsewhere."""
    return "reduce-overhead" if device.type == "cuda" else "default"


def compile_default(device: torch.device) -> bool:
    """Whether --compile is on when not given: only where it was measured faster (see `gptchat bench
    --compile`). Nowhere yet: on CPU the compiled step ran at 0.55x the eager one (124M fp32, 2 AVX2
    cores, same run; it reads the whole n_ctx cache), and on CUDA it has not been measured."""
    return False


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` (a host tensor) on ``device``; to CUDA through pinned memory, without the host waiting."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@functools.lru_cache(maxsize=1)
def keep_freed_buffers() -> bool:
    """Let glibc keep freed buffers of up to 32 MB in its heap for the next call, rather than hand them back
    to the system and fault them in again (zeroed, 4 KB at a time) in the next forward: a 124M prefill of
    1000 tokens allocates ~100 MB of activations, and its next run took 9,000-46,000 page faults in fp32
    and 23,000-78,000 in int8; without them, alternating in one process, 1.04x fp32 and 1.09x int8 (2-core
    Zen 4). The price: up to
    ``GPTCHAT_HEAP_KEEP_MB`` (default 256) of freed memory stays the process's after a forward; the peak is
    the forward's own. True where set (glibc, and not switched off with ``GPTCHAT_HEAP_KEEP_MB=0``)."""
    import ctypes

    keep = os.environ.get("GPTCHAT_HEAP_KEEP_MB", "256")
    try:
        mb = int(keep)
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (ValueError, OSError, AttributeError):
        return False
    if mb <= 0:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    # set either and glibc stops moving both itself: the mmap threshold goes to the ceiling its own rule
    # rises to (buffers up to 32 MB from the heap), the trim threshold to what is kept
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, mb << 20))
