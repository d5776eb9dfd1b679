"""int8 weights for CPU decode: every Linear and the tied head, one scale per output channel.

Why: batch-1 decode reads every weight once per token, so its speed is the memory bandwidth over
the bytes of weights; int8 reads a quarter of fp32's. Quantized at load from whatever checkpoint
was read (the fp32/bf16 weights are symmetric-rounded per output row: w ~= q * scale, q in
[-127, 127]), so every checkpoint format gets it.

The kernel: PyTorch's fbgemm dynamic linear (``quantized::linear_dynamic``), which quantizes each
activation row on the fly (per tensor, 8 bits) and multiplies int8 x int8 with VNNI. Measured on
this project's CPU (AMD EPYC, AVX512-VNNI, 2 threads) against the other int8 CPU kernels in torch
2.13, for the 50257x768 head read from memory: fbgemm 1.5 ms, oneDNN ``qlinear_pointwise`` 1.1-3
ms (plus a host sync per call for its scalar activation scale), ``aten._weight_int8pack_mm``
(weight-only, bf16 activations) 7-12 ms -- it is fast only while the weight sits in cache --,
``torch._int_mm`` 17 ms; fp32 ``F.linear`` 6 ms. The quality cost of quantizing activations too is
measured (mean |logit - fp32 logit|, greedy agreement) by ``gptchat bench --quantize int8`` and
pinned in tests/engine/test_quant.py.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

QUANT_MODES = ("none", "int8")


def available() -> bool:
    """True where the int8 kernel exists (PyTorch built with fbgemm: x86 CPUs)."""
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(torch.ops.quantized, "linear_dynamic")


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: returns (q int8 [out, in], scale fp32 [out]) with w ~= q * scale[:, None]."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
    return q, scale


class QuantLinear(nn.Module):
    """A Linear whose weight is int8 with per-output-channel scales; computes in fp32 on the CPU."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        q, scale = quantize_rows(weight)
        self.out_features, self.in_features = q.shape
        zero = torch.zeros(self.out_features, dtype=torch.long)
        b = None if bias is None else bias.detach().float().contiguous()
        # fbgemm's own blocked layout, packed once: the only copy kept (dequantize() unpacks it)
        with warnings.catch_warnings():  # quantized tensors are deprecated, but fbgemm packs only from one
            warnings.simplefilter("ignore", UserWarning)
            qw = torch._make_per_channel_quantized_tensor(q, scale.double(), zero, 0)
            self._packed = torch.ops.quantized.linear_prepack(qw, b)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("bias", b, persistent=False)

    def nbytes(self) -> int:
        """Bytes this layer reads per call: the int8 weight, its scales and the bias."""
        return self.out_features * self.in_features + 4 * self.out_features * (2 if self.bias is not None else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        # reduce_range=False: 8-bit activations; VNNI has no 16-bit accumulator to saturate
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, shape[-1]).float(), self._packed, False)
        return y.view(*shape[:-1], self.out_features).to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight [out, in] this layer computes with."""
        return torch.ops.quantized.linear_unpack(self._packed)[0].dequantize().float()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def quantize_model(model: nn.Module, mode: str = "int8") -> nn.Module:
    """Replace every nn.Linear of ``model`` (the tied lm_head included) by a QuantLinear, in place.

    The embedding keeps its float table (a lookup reads one row per token: nothing to gain); the
    head gets an int8 copy of it. Returns the model. ``mode`` "none" leaves it as it is.
    """
    if mode == "none":
        return model
    if mode != "int8":
        raise ValueError(f"unknown quantization {mode!r}; use one of {', '.join(QUANT_MODES)}")
    if not available():
        raise RuntimeError("int8 needs PyTorch's fbgemm kernels (an x86 CPU build); this PyTorch has none")
    with torch.no_grad():
        for name, lin in list(model.named_modules()):
            if isinstance(lin, nn.Linear):
                parent, _, attr = name.rpartition(".")
                owner = model.get_submodule(parent) if parent else model
                setattr(owner, attr, QuantLinear(lin.weight, lin.bias))
    return model


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantLinear) for m in model.modules())
