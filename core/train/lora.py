"""LoRA for GPT-2: low-rank adapters on chosen projections, merged into plain weights on export.

GPT-2 computes q, k and v with one fused ``attn.c_attn`` (n_embd -> 3*n_embd). A single adapter on
it would couple the three; here each chosen part (q, k or v) gets its own ``A`` (r x d) and ``B``
(d x r) that update only its third of the output rows, so ``--lora-targets q,v`` leaves k exactly as
it was. Merging adds ``scale * B @ A`` to that third of ``c_attn.weight``. Under FSDP the merge reads
the full state dict gathered from the shards, with the same rule.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gptchat.core.model.gpt import GPT

# target -> (module path inside a Block, the slice of the output it adapts: None = all of it)
TARGETS = {
    "q": ("attn.c_attn", 0),
    "k": ("attn.c_attn", 1),
    "v": ("attn.c_attn", 2),
    "o": ("attn.c_proj", None),
    "fc": ("mlp.c_fc", None),
    "proj": ("mlp.c_proj", None),
}


class LoRALinear(nn.Module):
    """``base(x)`` plus, for each adapted part of the output, ``scale * B(A(x))``."""

    def __init__(self, base: nn.Linear, parts: list[int | None], rank: int, alpha: float, n_split: int = 1):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.n_split = n_split
        self.parts = list(parts)
        out = base.out_features // n_split
        dev = base.weight.device
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        for _ in self.parts:
            a = torch.empty(rank, base.in_features, device=dev, dtype=torch.float32)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as in the LoRA paper's code; B = 0 so we start at base
            self.lora_A.append(nn.Parameter(a))
            self.lora_B.append(nn.Parameter(torch.zeros(out, rank, device=dev, dtype=torch.float32)))

    def forward(self, x):
        y = self.base(x)
        if self.parts == [None]:
            return y + self.scale * ((x.to(self.lora_A[0].dtype) @ self.lora_A[0].t()) @ self.lora_B[0].t()).to(y.dtype)
        ys = list(y.split(y.shape[-1] // self.n_split, dim=-1))
        for i, part in enumerate(self.parts):
            delta = (x.to(self.lora_A[i].dtype) @ self.lora_A[i].t()) @ self.lora_B[i].t()
            ys[part] = ys[part] + self.scale * delta.to(y.dtype)
        return torch.cat(ys, dim=-1)


@torch.no_grad()
def _merge(m: LoRALinear, weight, a_list, b_list) -> torch.Tensor:
    """``weight`` (out, in) with ``scale * B @ A`` added to each adapted part of its rows, in fp32."""
    w = weight.detach().float().clone()
    rows = w.shape[0] // m.n_split
    for a, b, part in zip(a_list, b_list, m.parts):
        delta = m.scale * (b.detach().float() @ a.detach().float())  # (rows, in)
        if part is None:
            w += delta
        else:
            w[part * rows : (part + 1) * rows] += delta
    return w


def parse_targets(text: str) -> list[str]:
    """``--lora-targets`` ("q,v,fc") as a list, blanks dropped."""
    return [x.strip() for x in text.split(",") if x.strip()]


def add_lora(model, targets: list[str], rank: int, alpha: float) -> list[str]:
    """Freeze ``model`` and attach adapters; returns the names of the trainable parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    by_module: dict[str, list[int | None]] = {}
    for t in targets:
        path, part = TARGETS[t]
        by_module.setdefault(path, []).append(part)
    for block in model.transformer.h:
        for path, parts in by_module.items():
            parent_name, child = path.split(".")
            parent = getattr(block, parent_name)
            base = getattr(parent, child)
            n_split = 3 if path == "attn.c_attn" else 1
            setattr(parent, child, LoRALinear(base, sorted(parts, key=lambda p: -1 if p is None else p), rank, alpha, n_split))
    return [n for n, p in model.named_parameters() if p.requires_grad]


def has_lora(model) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def adapter_state(model, sd: dict | None = None) -> dict[str, torch.Tensor]:
    """The adapters' tensors on CPU, from ``model`` or (under FSDP, whose parameters are shards) from
    its gathered full state dict ``sd``."""
    items = sd.items() if sd is not None else model.named_parameters()
    return {n: p.detach().cpu().clone() for n, p in items if "lora_" in n}


def merged_state_dict(model, sd: dict | None = None) -> dict[str, torch.Tensor]:
    """The plain GPT state dict (HF names) with every adapter folded into its weight.

    ``sd``: the tensors to read instead of ``model``'s own (the full state dict gathered under FSDP);
    ``model`` then only says where the adapters are and how they are shaped.
    """
    sd = model.state_dict() if sd is None else sd
    out = {}
    lora_mods = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    for name, t in sd.items():
        if "lora_" in name:
            continue
        mod = name.rsplit(".base.", 1)[0] if ".base." in name else None
        if mod is not None and mod in lora_mods:
            leaf = name.rsplit(".", 1)[1]
            m = lora_mods[mod]
            if leaf == "weight":
                idx = range(len(m.parts))
                t = _merge(m, t, [sd[f"{mod}.lora_A.{i}"] for i in idx], [sd[f"{mod}.lora_B.{i}"] for i in idx])
            out[f"{mod}.{leaf}"] = t
        else:
            out[name] = t
    return out


def plain_model(model, sd: dict | None = None):
    """A plain GPT (no adapters) holding ``model``'s weights (or those of its full state dict ``sd``),
    adapters merged; shares unmerged tensors."""
    if has_lora(model):
        sd = merged_state_dict(model, sd)
    return GPT.from_state_dict(model.config, model.state_dict() if sd is None else sd, dtype=torch.float32,
                               source="the trained model")
