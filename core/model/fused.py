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

Used for plain fp32 (or bf16/fp16 weight) training without autocast and without LoRA adapters on
those projections (``usable``); everything else takes the ordinary modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def usable(x: torch.Tensor, *modules: nn.Module) -> bool:
    """The fused steps apply: gradients wanted, no autocast, and the projections are plain Linears."""
    return (torch.is_grad_enabled() and x.requires_grad and not torch.is_autocast_enabled(x.device.type)
            and all(isinstance(m, nn.Linear) for m in modules))  # LoRA's LoRALinear is not one


def _norm(x, ln: tuple):
    weight, bias, eps = ln
    return torch.native_layer_norm(x, (x.shape[-1],), weight, bias, eps)  # (out, mean, rstd)


def _norm_backward(ctx, grad, x, mean, rstd, ln: tuple):
    """(grad x, grad weight, grad bias) of the layer norm, each only where wanted."""
    weight, bias, _ = ln
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1] and weight is not None,
             ctx.needs_input_grad[2] and bias is not None]
    return torch.ops.aten.native_layer_norm_backward(grad, x, (x.shape[-1],), mean, rstd, weight, bias, needs)


def _act(h, kind: str):
    return F.relu(h) if kind == "relu" else F.gelu(h, approximate="tanh" if kind == "gelu_tanh" else "none")


def _act_backward(grad, h, kind: str):
    if kind == "relu":
        return grad * (h > 0)
    return torch.ops.aten.gelu_backward(grad, h, approximate="tanh" if kind == "gelu_tanh" else "none")


def _bias_grad(g, bias):
    return None if bias is None or not bias.requires_grad else g.reshape(-1, g.shape[-1]).sum(0)


def _weight_grad(g, inp, w):
    return None if not w.requires_grad else g.reshape(-1, g.shape[-1]).t() @ inp.reshape(-1, inp.shape[-1])


class _LNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ln_w, ln_b, w, b, eps: float):
        n, mean, rstd = _norm(x, (ln_w, ln_b, eps))
        ctx.save_for_backward(x, mean, rstd, ln_w, ln_b, w, b)
        ctx.eps = eps
        return F.linear(n, w, b)

    @staticmethod
    def backward(ctx, g):
        x, mean, rstd, ln_w, ln_b, w, b = ctx.saved_tensors
        ln = (ln_w, ln_b, ctx.eps)
        n = _norm(x, ln)[0]  # recomputed: not kept
        gw, gb = _weight_grad(g, n, w), _bias_grad(g, b)
        gn = g @ w
        return (*_norm_backward(ctx, gn, x, mean, rstd, ln), gw, gb, None)


class _LNMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ln_w, ln_b, w1, b1, w2, b2, eps: float, kind: str):
        n, mean, rstd = _norm(x, (ln_w, ln_b, eps))
        h = F.linear(n, w1, b1)
        ctx.save_for_backward(x, mean, rstd, h, ln_w, ln_b, w1, b1, w2, b2)
        ctx.eps, ctx.kind = eps, kind
        return F.linear(_act(h, kind), w2, b2)

    @staticmethod
    def backward(ctx, g):
        x, mean, rstd, h, ln_w, ln_b, w1, b1, w2, b2 = ctx.saved_tensors
        ln = (ln_w, ln_b, ctx.eps)
        a = _act(h, ctx.kind)  # recomputed: not kept
        gw2, gb2 = _weight_grad(g, a, w2), _bias_grad(g, b2)
        del a
        gh = _act_backward(g @ w2, h, ctx.kind)
        n = _norm(x, ln)[0]
        gw1, gb1 = _weight_grad(gh, n, w1), _bias_grad(gh, b1)
        del n
        return (*_norm_backward(ctx, gh @ w1, x, mean, rstd, ln), gw1, gb1, gw2, gb2, None, None)


def ln_linear(x: torch.Tensor, ln: nn.LayerNorm, lin: nn.Linear) -> torch.Tensor:
    """``lin(ln(x))``, keeping x (not ln(x)) for backward."""
    return _LNLinear.apply(x, ln.weight, ln.bias, lin.weight, lin.bias, ln.eps)


def ln_mlp(x: torch.Tensor, ln: nn.LayerNorm, fc: nn.Linear, proj: nn.Linear, kind: str) -> torch.Tensor:
    """``proj(act(fc(ln(x))))``, keeping x and fc's output (not ln(x) or the activation) for backward."""
    return _LNMLP.apply(x, ln.weight, ln.bias, fc.weight, fc.bias, proj.weight, proj.bias, ln.eps, kind)
