"""Models kept loaded for a session (several at once), what they cost in memory, and checkpoint hashes."""

from __future__ import annotations

import hashlib
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gptchat.core.config import default_model

if TYPE_CHECKING:  # torch comes with them: imported by the first load, after the chat app's first paint
    from gptchat.core.generate.loaded import LoadedModel


@dataclass
class Loaded:
    spec: str
    lm: LoadedModel
    checkpoint_hash: str
    bytes: int  # parameter memory

    @property
    def key(self) -> tuple:
        """(spec, device, dtype, quantize): an fp32 and an int8 copy of one checkpoint are two entries."""
        d = self.lm.describe()
        return (self.spec, d["device"], d["dtype"], d["quantize"])


class ModelPool:
    """Models stay loaded (several at once) until unloaded; loading is blocking: call it in a worker."""

    def __init__(self):
        self._models: dict[tuple, Loaded] = {}
        self._lock = threading.Lock()

    def get(self, spec: str | None, device: str | None = None, dtype: str | None = None,
            quantize: str | None = None) -> Loaded | None:
        """The loaded copy matching; device/dtype None or "auto" match any, quantize None means "none"."""
        spec, quantize = spec or default_model(), quantize or "none"
        with self._lock:
            for (s, dev, dt, q), m in self._models.items():
                if (s == spec and q == quantize and (device in (None, "auto") or dev.startswith(device))
                        and (dtype in (None, "auto") or dt == dtype)):
                    return m
        return None

    def load(self, spec: str | None, device: str | None = None, dtype: str | None = None,
             quantize: str | None = None) -> Loaded:
        spec = spec or default_model()
        got = self.get(spec, device, dtype, quantize)
        if got is not None:
            return got
        from gptchat.core.generate.loaded import open_model

        lm = open_model(spec, device=None if device == "auto" else device, dtype=None if dtype == "auto" else dtype,
                        quantize=quantize)
        m = Loaded(spec, lm, checkpoint_hash(lm.checkpoint), weight_bytes(lm.engine.model))
        with self._lock:
            self._models[m.key] = m
        return m

    def unload(self, spec: str) -> None:
        with self._lock:
            for k in [k for k in self._models if k[0] == spec]:
                del self._models[k]

    def loaded(self) -> list[Loaded]:
        with self._lock:
            return list(self._models.values())

    def memory(self) -> tuple[int, int]:
        """(bytes of parameters held, resident memory of this process)."""
        return sum(m.bytes for m in self.loaded()), process_rss()


def weight_bytes(model) -> int:
    """Bytes of the weights held: the parameters, plus the int8 layers' packed weights (buffers, not parameters)."""
    from gptchat.core.model.quant import QuantLinear

    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return params + sum(m.nbytes() for m in model.modules() if isinstance(m, QuantLinear))


def process_rss() -> int:
    """Resident memory now (Linux /proc); elsewhere the peak, which getrusage reports in KB (bytes on macOS)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return _rusage_peak()


def peak_rss() -> int:
    """This process's peak resident memory in bytes: Linux's VmHWM (since the start or reset_peak_rss), elsewhere
    getrusage's. Not getrusage first: a spawned child's ru_maxrss starts from its parent's RSS at the fork."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, ValueError, IndexError, StopIteration):
        return _rusage_peak()


def _rusage_peak() -> int:
    """getrusage's peak RSS in bytes (it reports KB, bytes on macOS)."""
    import resource  # POSIX only: imported here so the pool still works on Windows

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def reset_peak_rss() -> bool:
    """Start peak_rss over from the resident memory now (Linux 4.0 on: /proc/self/clear_refs); False where the
    peak cannot be reset (it then stays the process's)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def checkpoint_hash(ck, sample: int = 1 << 22) -> str:
    """A sha256 over the config and weight files: whole files up to 64 MB, else size + head + tail."""
    h = hashlib.sha256()
    config = Path(ck.folder) / "config.json"
    files = sorted(set(ck.files) | ({config} if config.is_file() else set()))
    for f in files:
        f = Path(f)
        try:
            size = f.stat().st_size
            h.update(f"{f.name}:{size}\n".encode())
            with open(f, "rb") as fh:
                if size <= 16 * sample:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        h.update(block)
                else:
                    h.update(fh.read(sample))
                    fh.seek(size - sample)
                    h.update(fh.read(sample))
        except OSError:
            continue
    return h.hexdigest()[:16]
