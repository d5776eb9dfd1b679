"""Weights in 2 MB pages: one block, advised for Linux's transparent huge pages, that the weights a batch-1
decode step streams are copied into after loading, where they are the process's own memory anyway: int8's
packed groups, and bf16's weights (converted from the checkpoint's fp32 at load).

Why: batch-1 decode streams every weight once a token. In 4 KB pages a 124M int8 model is ~30,000 pages
a token, each a TLB miss on the way; in 2 MB pages it is ~60. Measured on a 2-core AMD EPYC (Milan),
alternating in one process: int8 batch-1 decode 1.07-1.12x faster (median pairs; 10 of 12 pairs faster). On
a 2-core Zen 4 (Genoa), a 124M bf16 step alternating x20 in one process: 1.13x (5.28 -> 4.66 ms, ~53 GB/s
where summing a buffer read 55), fp32 1.09x in the fast memory phases. fp32 weights nevertheless stay where
they were loaded (often the checkpoint's memory-mapped file: no copy at all, ~0.04 s for 124M): advised 2 MB
pages came 4-5x slower than plain ones from this VM's kernel (310 MB: 0.28-0.38 s against 0.075, compacting
memory on the way), which the start-up's first token cannot pay. The mapped file itself comes in 2 MB pages
where the page cache holds it in 2 MB folios (readers._advise_huge, checkpoints.write_safetensors): a 124M
fp32 step 1.05x, at no cost. Where the kernel does not give huge pages
(THP "never", not Linux) the block is ordinary memory and nothing changes.
"""

from __future__ import annotations

import bisect
import ctypes
import functools
import sys

import torch

HUGE = 2 << 20
_MADV_HUGEPAGE = 14


@functools.lru_cache(maxsize=1)
def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        f = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    f.argtypes, f.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return f


def block(nbytes: int) -> torch.Tensor:
    """``nbytes`` of uint8 CPU memory starting on a 2 MB boundary, advised for huge pages before any of it
    is touched (a large allocation is fresh mmap'd memory: its pages come on first write)."""
    raw = torch.empty(nbytes + HUGE, dtype=torch.uint8)
    start = (-raw.data_ptr()) % HUGE
    madvise = _madvise()
    if madvise is not None and nbytes >= HUGE:
        madvise(raw.data_ptr() + start, (nbytes + HUGE - 1) // HUGE * HUGE, _MADV_HUGEPAGE)
    return raw[start : start + nbytes]


def rehome(tensors: list[tuple[dict, str]]) -> int:
    """Copy each ``d[name]`` (a module's ``_buffers`` or ``_parameters`` and a key; CPU, contiguous) into one
    huge-page block and put the copy in its place, one at a time so that each original can go before the
    next is copied. Returns the bytes moved (0: nothing to move)."""
    entries = [(d, name, d[name]) for d, name in tensors if d.get(name) is not None]
    entries = [(d, n, t) for d, n, t in entries if t.device.type == "cpu" and t.is_contiguous()]
    sizes = [(t.numel() * t.element_size() + 63) // 64 * 64 for _, _, t in entries]
    if sum(sizes) < HUGE:
        return 0
    mem = block(sum(sizes))
    off = 0
    for i, size in enumerate(sizes):
        d, name, t = entries[i]
        entries[i] = None  # the last reference here: the original goes once its module lets go of it
        copy = mem[off : off + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        copy.copy_(t)
        d[name] = torch.nn.Parameter(copy, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else copy
        del t
        off += size
    return off


def streamed(model: torch.nn.Module, bf16: bool = True) -> list[tuple[dict, str]]:
    """(module dict, name) of each CPU tensor a batch-1 decode step streams every token that is the process's
    own memory already: int8 products' packed groups, and (``bf16``) the weights of bf16 products, the tied
    head's included (``rehome_streamed`` re-ties the token table to it)."""
    from gptchat.core.model.quant import QuantLinear

    out = []
    for m in model.modules():
        if isinstance(m, QuantLinear):
            out.append((m._buffers, "packed"))
        elif bf16 and isinstance(m, torch.nn.Linear) and m.weight.dtype == torch.bfloat16 and m.weight.dim() == 2:
            if m.weight.device.type == "cpu":
                out.append((m._parameters, "weight"))
    return out


def rehome_streamed(model: torch.nn.Module, bf16: bool = True) -> int:
    """``rehome`` the model's ``streamed`` tensors; a token table tied to the head follows it. Returns bytes moved."""
    wte, head = getattr(model.transformer, "wte", None), getattr(model, "lm_head", None)
    tied = isinstance(head, torch.nn.Linear) and head.weight is getattr(wte, "weight", None)
    moved = rehome(streamed(model, bf16))
    if tied:
        wte.weight = head.weight
    return moved


def share(tensors) -> float | None:
    """The fraction of ``tensors``' bytes (CPU) that sit in 2 MB pages: anonymous huge pages (``block``) or a file
    mapped in 2 MB folios (a checkpoint, see readers._advise_huge), read from /proc/self/smaps and taken per
    mapping (its 2 MB part over its resident part). None where the kernel does not say (not Linux)."""
    found = mappings()
    if found is None:
        return None
    huge_keys = ("AnonHugePages", "FilePmdMapped", "ShmemPmdMapped")
    maps = sorted((lo, hi, f.get("Rss", 0), sum(f.get(k, 0) for k in huge_keys)) for lo, hi, f in found)
    starts = [m[0] for m in maps]
    total = huge = 0.0
    for t in tensors:
        if t.device.type != "cpu" or not t.numel():
            continue
        lo = t.data_ptr()
        hi = lo + t.numel() * t.element_size()
        i = max(bisect.bisect_right(starts, lo) - 1, 0)
        while i < len(maps) and maps[i][0] < hi:
            a, b, rss, pmd = maps[i]
            part = max(0, min(b, hi) - max(a, lo))
            total += part
            huge += part * (min(pmd / rss, 1.0) if rss else 0.0)
            i += 1
    return huge / total if total else None


def mappings() -> list[tuple[int, int, dict]] | None:
    """This process's mappings from /proc/self/smaps: (start, end, {field: value}), sizes in kB and flags such
    as THPeligible as numbers. None where the kernel does not say (not Linux)."""
    try:
        with open("/proc/self/smaps") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    out: list[tuple[int, int, dict]] = []
    for line in lines:
        head = line.split(" ", 1)[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(x, 16) for x in head.split("-"))
            out.append((lo, hi, {}))
        elif out and ":" in line:
            key, _, value = line.partition(":")
            word = value.split()[0] if value.split() else ""
            if word.isdigit():
                out[-1][2][key] = int(word)
    return out
