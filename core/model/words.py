"""What a user may type for ``--device``, ``--dtype`` and ``--quantize``, checked without torch.

The chat command checks a launch's words before the app starts, and the app paints before torch is
imported; core/model/device.py turns the checked words into torch devices and dtypes.
"""

from __future__ import annotations

import re

from gptchat.core.errors import DeviceError

QUANT_MODES = ("none", "int8")  # weights as the checkpoint has them, or int8 weight-only (core/model/quant.py)
DEVICE_HELP = "use auto, cpu, cuda, cuda:N or mps"
_DEVICE = re.compile(r"^(auto|cpu|cuda|mps)(?::(\d+))?$")
_DTYPES = {"auto": "auto", "fp32": "fp32", "float32": "fp32", "fp16": "fp16", "float16": "fp16", "half": "fp16",
           "bf16": "bf16", "bfloat16": "bf16"}


def device_word(spec: str | None) -> tuple[str, int | None]:
    """(kind, index) for a device as typed: ("auto", None), ("cpu", None), ("cuda", 1) ...; DeviceError if unknown."""
    text = (spec or "auto").strip().lower()
    m = _DEVICE.match(text)
    if m is None or (m.group(1) == "auto" and m.group(2) is not None):
        raise DeviceError(f"unknown device {text!r}; {DEVICE_HELP}")
    return m.group(1), None if m.group(2) is None else int(m.group(2))


def dtype_word(spec: str | None) -> str:
    """auto, fp32, fp16 or bf16 for a dtype as typed (float32, half, bfloat16 ... too); DeviceError if unknown."""
    text = (spec or "auto").strip().lower()
    if text not in _DTYPES:
        raise DeviceError(f"unknown dtype {text!r}; use auto, fp32, fp16 or bf16")
    return _DTYPES[text]
