"""int8 weights for CPU decode: every Linear and the tied head, one scale per output channel.

Why: batch-1 decode reads every weight once per token, so its speed is the memory bandwidth over
the bytes of weights; int8 reads a quarter of fp32's. Quantized at load from whatever checkpoint
was read (w ~= q * scale, q in [-127, 127], symmetric per output row), tensor by tensor while the
checkpoint streams from disk (StreamQuantizer), so the fp32 model never exists whole.

Two kernels. Where core/model/native.py can build its AVX2 kernel (x86-64 Linux, a C compiler): each
activation row is rounded to int16 with its own scale and multiplied exactly in int32 (a row's result
never depends on the other rows of its call); calls of more than NATIVE_ROWS rows (prefill, eval)
multiply in fp32 on dequantized weights instead, in gptchat's panel kernel (native.qsgemm) or PyTorch's GEMM,
whichever ``native.gemm_beats_panels`` timed faster on this machine. From intmm.FEW rows, where timed faster
still (a 2-core Xeon with AMX: batch-16 decode 1.06-1.31x the C kernel's, 2.5-2.9x MKL's fp32 GEMM at 1000
rows), the same int16 rows go through PyTorch's int8 GEMM as two byte rows each (core/model/intmm.py): the C
kernel's integer sums. Measured on this project's CPU (AMD EPYC Milan, AVX2, no VNNI, 2 threads), random 124M
weights, `gptchat bench` alternating the two kernels: batch-1 decode 68.8 tok/s (50% of the bandwidth ceiling)
against fbgemm's 40.1 (26%), batch 16 221.6 against 250.0, batch 32 276.7 against 325.4, prefill of 1000 tokens 2.0 s
against 1.6 s; peak RSS of `generate` 447-452 MB against 505 MB; mean |logit - fp32 logit| on the
trained test model 0.0036 against 0.0101. Elsewhere fbgemm's int8 x int8 product
(``quantized::linear_with_input_q_dq_qweight_dq_output_fp32``), whose activation quantization is one
scale per call; each row is therefore divided by its own max |x| first (every row then spans [-1, 1],
so the one scale fits every row exactly as it would fit that row alone), and the output row multiplied
back. Activations get 7 bits (0..127): on CPUs without VNNI fbgemm sums pairs of u8 x s8 products in
int16, which saturates with 8-bit activations.
The quality cost (mean |logit - fp32 logit|, greedy agreement on a trained model) is printed by
``gptchat bench --quantize int8`` and pinned in tests/engine/test_quant.py.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from gptchat.core.errors import CheckpointError
from gptchat.core.model import intmm, native
from gptchat.core.model.words import QUANT_MODES

ACT_SCALE, ACT_ZERO = 1.0 / 63.0, 64  # a row divided by its max |x| lies in [-1, 1]: 7-bit codes 1..127
_BLOCK = 1 << 18  # elements quantized at a time: float temporaries of 1 MB, which the allocator reuses


def available() -> bool:
    """True where the int8 kernel exists (PyTorch built with fbgemm: x86 CPUs)."""
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(
        torch.ops.quantized, "linear_with_input_q_dq_qweight_dq_output_fp32")


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: returns (q int8 [out, in], scale fp32 [out]) with w ~= q * scale[:, None]."""
    w = w.detach()
    q = torch.empty(w.shape, dtype=torch.int8)
    scale = torch.empty(w.shape[0])
    rows = max(1, _BLOCK // max(1, w.shape[1]))  # whole-tensor temporaries would fragment the heap
    for i in range(0, w.shape[0], rows):
        blk = w[i : i + rows].float()
        s = blk.abs().amax(dim=1).div_(127.0).clamp_(min=1e-12)
        q[i : i + rows] = blk.div(s[:, None]).round_().clamp_(-127, 127)
        scale[i : i + rows] = s
    return q, scale


NATIVE_ROWS = 256  # up to this many rows a call, the AVX2 kernel; more, fp32 products on panels dequantized in cache


GEMM_BLOCK = 512  # outputs dequantized at a time for PyTorch's GEMM: a [512, in] fp32 buffer (1.5 MB at 768 in)


class QuantLinear(nn.Module):
    """A Linear whose weight is int8 with per-output-channel scales; computes in fp32 on the CPU.

    Two kernels, one chosen at construction: the AVX2 kernel (core/model/native.py; int16 activations
    per row, exact int32 sums) where it could be built, else fbgemm's (7-bit activations per row).
    Either way a row's output never depends on the other rows of its call."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.native = native.kernel() is not None
        if self.native:  # the kernel's grouped layout: the only copy kept
            self.register_buffer("packed", native.pack(q), persistent=False)
        else:
            zero = torch.zeros(self.out_features, dtype=torch.long)
            # fbgemm's own blocked layout, packed once: the only copy kept (dequantize() unpacks it)
            with warnings.catch_warnings():  # quantized tensors are deprecated, but fbgemm packs only from one
                warnings.simplefilter("ignore", UserWarning)
                qw = torch._make_per_channel_quantized_tensor(q, scale.double(), zero, 0)
                self._packed = torch.ops.quantized.linear_prepack(qw, None)
        self.register_buffer("scale", scale.float().contiguous(), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous(), persistent=False)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> "QuantLinear":
        return cls(*quantize_rows(weight), bias)

    def nbytes(self) -> int:
        """Bytes this layer reads per call: the int8 weight, its scales and the bias."""
        return self.out_features * self.in_features + 4 * self.out_features * (2 if self.bias is not None else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if self.native and x.dtype == torch.float32 and rows <= NATIVE_ROWS:
            if rows >= intmm.FEW and intmm.available():  # the C kernel or the int8 GEMM, as timed in use
                return intmm.few_rows(self.packed, self.scale, self.bias, x.contiguous(), self.out_features)
            return native.gemm(self.packed, self.scale, self.bias, x.contiguous(), self.out_features)
        shape = x.shape
        x = x.reshape(-1, shape[-1]).float()  # (M, in)
        y = self._many_rows(x) if self.native else self._fbgemm(x)
        return y.view(*shape[:-1], self.out_features)

    def _fbgemm(self, x: torch.Tensor) -> torch.Tensor:
        # each row over its own max |x|: the kernel's one activation scale then fits every row alike
        amax = torch.linalg.vector_norm(x, float("inf"), dim=1, keepdim=True).clamp_(min=1e-30)  # (M, 1)
        y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(x / amax, ACT_SCALE, ACT_ZERO,
                                                                                self._packed)  # (M, out)
        return y.mul_(amax) if self.bias is None else torch.addcmul(self.bias, y, amax)

    def _many_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Many rows (prefill, eval): PyTorch's int8 GEMM (core/model/intmm.py) where it was timed faster than the
        other ways, else fp32 products on whichever of two ways is faster here (``native.gemm_beats_panels``: on a
        2-core Zen 4 the panels 1.06-1.29x, on a 2-core Xeon with two 512-bit FMA units the GEMM 1.6-1.8x, 1000
        rows through 124M's shapes)."""
        if intmm.wins(x.shape[0]):
            return intmm.product(self.packed, self.scale, self.bias, x.contiguous(), self.out_features)
        return self._through_gemm(x) if native.gemm_beats_panels() else self._through_panels(x)

    def _through_panels(self, x: torch.Tensor) -> torch.Tensor:
        """The weights dequantized 16 outputs at a time into cache, multiplied in gptchat's panel kernel
        (native.qsgemm)."""
        return native.qsgemm(self.packed, self.scale, self.bias, x.contiguous(), self.out_features)

    def _through_gemm(self, x: torch.Tensor) -> torch.Tensor:
        """The weights dequantized GEMM_BLOCK outputs at a time into a buffer, multiplied by PyTorch's GEMM."""
        n, k = self.out_features, self.in_features
        y = x.new_empty(x.shape[0], n)
        buf = torch.empty(min(n, GEMM_BLOCK), k)
        for n0 in range(0, n, GEMM_BLOCK):
            n1 = min(n, n0 + GEMM_BLOCK)
            w = native.dequantize(self.packed, self.scale, n0, n1, k, out=buf[: n1 - n0]).t()
            if self.bias is None:
                torch.mm(x, w, out=y[:, n0:n1])
            else:
                torch.addmm(self.bias[n0:n1], x, w, out=y[:, n0:n1])
        return y

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """The fp32 weight rows ``idx`` (any shape) -> (*idx.shape, in): the tied token table's lookup."""
        n, k = self.out_features, self.in_features
        if not self.native:
            raise TypeError("rows() reads the AVX2 kernel's layout; fbgemm's keeps its own table")
        kp = native.padded(n, k)[1]
        grouped = self.packed.view(-1, kp // 32, 4, 32)
        q = grouped[idx // 4, :, idx % 4, :].reshape(*idx.shape, kp)[..., :k]
        return q.float() * self.scale[idx].unsqueeze(-1)

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight [out, in] this layer computes with."""
        if self.native:
            return native.dequantize(self.packed, self.scale, 0, self.out_features, self.in_features)
        return torch.ops.quantized.linear_unpack(self._packed)[0].dequantize().float()

    def extra_repr(self) -> str:
        kernel = "AVX2 kernel" if self.native else "fbgemm"
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel, {kernel}"


class QuantEmbedding(nn.Module):
    """The token table as int8 rows (the tied head's): a lookup dequantizes only the rows it reads.
    With the AVX2 kernel the table is the head's own packed rows (no second copy)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, head: QuantLinear | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = q.shape
        self.head = [head] if head is not None and head.native else []  # a list: not a submodule of this one
        if not self.head:
            self.register_buffer("q", q, persistent=False)  # (V, C) int8
            self.register_buffer("scale", scale, persistent=False)  # (V,)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if self.head:
            return self.head[0].rows(idx)
        return self.q[idx].float() * self.scale[idx].unsqueeze(-1)  # (..., C)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per-row" + (", the head's rows" if self.head else "")


def _check(mode: str) -> None:
    if mode != "int8":
        raise ValueError(f"unknown quantization {mode!r}; use one of {', '.join(QUANT_MODES)}")
    if not available():
        raise RuntimeError("int8 needs PyTorch's fbgemm kernels (an x86 CPU build); this PyTorch has none")


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def quantize_model(model: nn.Module, mode: str = "int8") -> nn.Module:
    """Replace every nn.Linear of ``model`` by a QuantLinear and the tied token table by a
    QuantEmbedding sharing the head's int8 rows, in place. Returns the model; "none" leaves it."""
    if mode == "none":
        return model
    _check(mode)
    with torch.no_grad():
        wte = model.transformer.wte
        if isinstance(wte, nn.Embedding) and getattr(model.lm_head, "weight", None) is wte.weight:
            q, scale = quantize_rows(wte.weight)
            model.lm_head = QuantLinear(q, scale, None)
            model.transformer.wte = QuantEmbedding(q, scale, model.lm_head)
        for name, lin in list(model.named_modules()):
            if isinstance(lin, nn.Linear):
                _replace(model, name, QuantLinear.from_float(lin.weight, lin.bias))
    return model


class StreamQuantizer:
    """``GPT.from_state_dict``'s per-tensor ``transform`` for int8: each 2-D weight (the Linears,
    the token table, a stored head) is quantized as it arrives and a meta stand-in of its shape is
    loaded instead, so only one float tensor is alive at a time; ``install`` then swaps in the
    int8 modules. ``source`` names the checkpoint in errors."""

    def __init__(self, source: str = "the state dict", mode: str = "int8"):
        _check(mode)
        self.source = source
        self.rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # module name -> (q, scale)

    def __call__(self, key: str, t: torch.Tensor) -> torch.Tensor:
        if t.dim() != 2 or key == "transformer.wpe.weight":  # positions stay float: one row a token
            return t
        self.rows[key.rpartition(".")[0]] = quantize_rows(t)
        return torch.empty(t.shape, dtype=t.dtype, device="meta")

    def install(self, model: nn.Module) -> nn.Module:
        q, scale = self.rows.pop("transformer.wte")
        head = self.rows.pop("lm_head", None)
        if head is not None and not (torch.equal(head[0], q) and torch.equal(head[1], scale)):
            raise CheckpointError(f"{self.source}: lm_head.weight differs from wte; untied GPT-2 heads are not supported")
        model.lm_head = QuantLinear(q, scale, None)
        model.transformer.wte = QuantEmbedding(q, scale, model.lm_head)
        del q, scale, head
        while self.rows:  # each row's int8 copy is dropped as soon as fbgemm has packed it
            name, (q, scale) = self.rows.popitem()
            _replace(model, name, QuantLinear(q, scale, model.get_submodule(name).bias))
            del q, scale
        left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
        if left:
            raise CheckpointError(f"{self.source}: {left[0]} was not quantized; this is not a GPT-2 checkpoint")
        return model


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantLinear) for m in model.modules())
