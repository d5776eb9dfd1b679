"""What a lower precision costs in quality: logits and greedy choices against fp32 on the same weights.

Random weights give near-flat logits, where any error flips the argmax and says nothing, so the
figures come from a trained model: the checkpoint the user measures, or (no checkpoint given) a small
byte-level GPT-2 trained here for 200 steps on fixed text (Python's own docstrings; ~30 CPU-seconds).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from gptchat.core.model.config import GPTConfig
from gptchat.core.model.gpt import GPT
from gptchat.core.model.quant import quantize_model


def corpus() -> bytes:
    """A fixed English text of ~20 KB: a few standard modules' docstrings."""
    import argparse, collections, json, logging, pathlib, re, textwrap  # noqa: E401  (their docstrings)

    docs = [m.__doc__ or "" for m in (argparse, collections, json, logging, pathlib, re, textwrap)]
    return "\n\n".join(docs).encode("utf-8")


def tiny_trained_model(steps: int = 200, seed: int = 0, block: int = 48, batch: int = 8) -> GPT:
    """A 2-layer byte-level GPT-2 (vocab 256) trained on ``corpus()``: peaked logits in seconds."""
    torch.manual_seed(seed)
    cfg = GPTConfig(n_layer=2, n_head=4, n_embd=64, n_positions=block, vocab_size=256, dropout=0.0)
    model = GPT(cfg)
    model.init_weights(seed)
    data = torch.tensor(list(corpus()), dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for step in range(steps):
        for g in opt.param_groups:  # cosine decay: a settled model, not one mid-jump
            g["lr"] = 3e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
        starts = torch.randint(0, len(data) - block - 1, (batch,), generator=gen)
        x = torch.stack([data[s : s + block] for s in starts])
        y = torch.stack([data[s + 1 : s + block + 1] for s in starts])
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


@dataclass
class Quality:
    mode: str
    mean_abs_logit_diff: float  # mean |logit - fp32 logit| over every position and token
    max_abs_logit_diff: float
    greedy_agreement: float  # fraction of positions whose argmax equals fp32's
    logit_std: float  # the fp32 logits' spread, to read the differences against
    positions: int
    model: str


def prompt_set(vocab: int, n: int = 8, length: int = 48, seed: int = 1) -> torch.Tensor:
    """Fixed prompts (n, length): slices of the corpus for byte-level models, else of its GPT-2 ids."""
    text = corpus()
    if vocab <= 256:
        ids = list(text)
    else:
        from gptchat.core.text.tokenizer import load_tokenizer

        ids = load_tokenizer(None, vocab).encode(text.decode("utf-8"))
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - length, (n,), generator=gen).tolist()
    return torch.tensor([ids[s : s + length] for s in starts], dtype=torch.long)


@torch.inference_mode()
def compare(model: GPT, mode: str = "int8", prompts: torch.Tensor | None = None, name: str = "") -> Quality:
    """Quantize (``mode`` "int8") or cast ("bf16") a copy of ``model`` and compare its logits on
    ``prompts`` with the fp32 original's."""
    ref = copy.deepcopy(model).float().eval()
    low = copy.deepcopy(ref).to(torch.bfloat16) if mode == "bf16" else quantize_model(copy.deepcopy(ref), mode)
    if prompts is None:
        prompts = prompt_set(model.config.vocab_size, length=min(48, model.config.n_positions))
    a, b = ref(prompts).float(), low(prompts).float()
    diff = (a - b).abs()
    return Quality(mode, diff.mean().item(), diff.max().item(),
                   (a.argmax(-1) == b.argmax(-1)).float().mean().item(), a.std().item(),
                   prompts.numel(), name or "tiny byte-level GPT-2 trained on fixed text")
