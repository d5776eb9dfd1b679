"""Training-time memory savers: a layer norm and the products after it, as one autograd step that
keeps only what is cheap to recompute from.

Why: finetuning GPT-2 124M on 4 x 1024 tokens keeps ~17 activations of n_embd floats per token and
layer for backward (2.6 GB, more than the weights, gradients and AdamW state together). Autograd
keeps each layer norm's output (for the product after it) beside its input, and the MLP's GELU
output beside the GELU's input. Recomputing a layer norm or a GELU in backward costs a few percent
of a product; keeping them costs 6 of those 17 (n_embd each for the two norms, 4 n_embd for the
GELU). ``ln_linear`` (ln_1 then c_attn) keeps the norm's input; ``ln_mlp`` (ln_2, c_fc, GELU,
c_proj) keeps the norm's input and the pre-activation. Every product and gradient is the one
autograd would compute, so results equal the unfused path's up to rounding order.

Under autocast (bf16 on the CPU, bf16/fp16 on a GPU) the steps make autocast's own casts (the norm in
fp32, its output, the weights and biases cast to the autocast type for the products, the activation in
that type) with autocast itself off inside: besides the norms' outputs and the activation, nothing is
left in autocast's weight-cast cache (a copy of every weight in the autocast type, held until the
autocast block ends: ~170 MB for 124M); the weights are cast again in backward. Measured for 124M
on 4 x 1024 tokens, bf16 autocast on a 2-core Zen 4 (``python -m gptchat.core.bench.train --bf16``):
peak RSS 4276 -> 3555 MB against transformers' 7335 (0.58x -> 0.48x; with the head loss's casts
made once and its bf16 products by vocabulary blocks, evaluate.py); speed 1.38x -> 1.40x.

Used for training without LoRA adapters on those projections (``usable``); everything else takes the
ordinary modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def usable(x: torch.Tensor, *modules: nn.Module) -> bool:
    """The fused steps apply: gradients wanted and the projections are plain Linears."""
    return torch.is_grad_enabled() and x.requires_grad and all(isinstance(m, nn.Linear) for m in modules)  # not LoRA's


def _autocast_type(x: torch.Tensor) -> torch.dtype | None:
    """The type autocast would run the products in, or None (no autocast here)."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


def _to(t: torch.Tensor | None, dt: torch.dtype | None) -> torch.Tensor | None:
    return t if t is None or dt is None else t.to(dt)


def _norm(x, ln: tuple):
    weight, bias, eps = ln
    return torch.native_layer_norm(x, (x.shape[-1],), weight, bias, eps)  # (out, mean, rstd)


def _norm_backward(ctx, grad, x, mean, rstd, ln: tuple):
    """(grad x, grad weight, grad bias) of the layer norm, each only where wanted."""
    weight, bias, _ = ln
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1] and weight is not None,
             ctx.needs_input_grad[2] and bias is not None]
    return torch.ops.aten.native_layer_norm_backward(grad.to(x.dtype), x, (x.shape[-1],), mean, rstd, weight, bias,
                                                     needs)


def _act(h, kind: str):
    return F.relu(h) if kind == "relu" else F.gelu(h, approximate="tanh" if kind == "gelu_tanh" else "none")


def _act_backward(grad, h, kind: str):
    if kind == "relu":
        return grad * (h > 0)
    return torch.ops.aten.gelu_backward(grad, h, approximate="tanh" if kind == "gelu_tanh" else "none")


def _bias_grad(g, bias):
    return None if bias is None or not bias.requires_grad else g.reshape(-1, g.shape[-1]).sum(0).to(bias.dtype)


def _weight_grad(g, inp, w):
    if not w.requires_grad:
        return None
    return (g.reshape(-1, g.shape[-1]).t() @ inp.reshape(-1, inp.shape[-1])).to(w.dtype)


class _LNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ln_w, ln_b, w, b, eps: float, dt):
        with torch.autocast(x.device.type, enabled=False):
            n, mean, rstd = _norm(x, (ln_w, ln_b, eps))
            ctx.save_for_backward(x, mean, rstd, ln_w, ln_b, w, b)
            ctx.eps, ctx.dt = eps, dt
            return F.linear(_to(n, dt), _to(w, dt), _to(b, dt))

    @staticmethod
    def backward(ctx, g):
        x, mean, rstd, ln_w, ln_b, w, b = ctx.saved_tensors
        ln, dt = (ln_w, ln_b, ctx.eps), ctx.dt
        n = _to(_norm(x, ln)[0], dt)  # recomputed: not kept
        gw, gb = _weight_grad(g, n, w), _bias_grad(g, b)
        gn = g @ _to(w, dt)
        return (*_norm_backward(ctx, gn, x, mean, rstd, ln), gw, gb, None, None)


class _LNMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ln_w, ln_b, w1, b1, w2, b2, eps: float, kind: str, dt):
        with torch.autocast(x.device.type, enabled=False):
            n, mean, rstd = _norm(x, (ln_w, ln_b, eps))
            h = F.linear(_to(n, dt), _to(w1, dt), _to(b1, dt))
            del n
            ctx.save_for_backward(x, mean, rstd, h, ln_w, ln_b, w1, b1, w2, b2)
            ctx.eps, ctx.kind, ctx.dt = eps, kind, dt
            return F.linear(_act(h, kind), _to(w2, dt), _to(b2, dt))

    @staticmethod
    def backward(ctx, g):
        x, mean, rstd, h, ln_w, ln_b, w1, b1, w2, b2 = ctx.saved_tensors
        ln, dt = (ln_w, ln_b, ctx.eps), ctx.dt
        a = _act(h, ctx.kind)  # recomputed: not kept
        gw2, gb2 = _weight_grad(g, a, w2), _bias_grad(g, b2)
        del a
        gh = _act_backward(g @ _to(w2, dt), h, ctx.kind)
        n = _to(_norm(x, ln)[0], dt)
        gw1, gb1 = _weight_grad(gh, n, w1), _bias_grad(gh, b1)
        del n
        return (*_norm_backward(ctx, gh @ _to(w1, dt), x, mean, rstd, ln), gw1, gb1, gw2, gb2, None, None, None)


def ln_linear(x: torch.Tensor, ln: nn.LayerNorm, lin: nn.Linear) -> torch.Tensor:
    """``lin(ln(x))``, keeping x (not ln(x)) for backward."""
    return _LNLinear.apply(x, ln.weight, ln.bias, lin.weight, lin.bias, ln.eps, _autocast_type(x))


def ln_mlp(x: torch.Tensor, ln: nn.LayerNorm, fc: nn.Linear, proj: nn.Linear, kind: str) -> torch.Tensor:
    """``proj(act(fc(ln(x))))``, keeping x and fc's output (not ln(x) or the activation) for backward."""
    return _LNMLP.apply(x, ln.weight, ln.bias, fc.weight, fc.bias, proj.weight, proj.bias, ln.eps, kind,
                        _autocast_type(x))
