"""Validation loss on a fixed held-out window, and samples from fixed probe prompts."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from gptchat.core.eval.estimate import HEAD_CHUNK
from gptchat.core.generate.engine import Engine
from gptchat.core.generate.sampling import SamplingParams
from gptchat.core.model.gpt import EXP_FLOOR, HEAD_VOCAB_BLOCK
from gptchat.core.train.data import Dataset, val_starts, windows


def loss_fn(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1), ignore_index=-1, reduction=reduction)


def head_loss(hidden: torch.Tensor, head: torch.Tensor, y: torch.Tensor, chunk: int = HEAD_CHUNK) -> torch.Tensor:
    """Mean cross-entropy of ``hidden`` (B, T, C) @ ``head`` (V, C).T against ``y`` (B, T; -1 ignored),
    equal to ``loss_fn(model(x), y)`` from ``model(x, return_hidden=True)``, without the (B*T, V) fp32
    logits: rows go ``chunk`` at a time and their gradients are computed on the way (a fused
    linear-cross-entropy), so the head's peak memory is one chunk's logits whatever the batch."""
    return _HeadCrossEntropy.apply(hidden, head, y, chunk)


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, head, y, chunk):
        h, t = hidden.reshape(-1, hidden.shape[-1]), y.reshape(-1)
        n = (t != -1).sum().clamp(min=1)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        kind = h.device.type
        # the products' type: autocast's (its casts made here, once) or the inputs'; sums and softmax in fp32
        dt = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else torch.promote_types(h.dtype, head.dtype)
        with torch.autocast(kind, enabled=False):
            grad_h = torch.empty_like(h) if want_h else None
            grad_w = torch.zeros(head.shape, dtype=torch.float32, device=head.device) if want_w else None
            w = head.detach().to(dt)
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            # every chunk's fp32 logits in one reused buffer (a (chunk, V) fp32 tensor is ~100 MB for GPT-2:
            # over glibc's mmap threshold, a fresh allocation is faulted in page by page), written on the CPU
            # by blocks of vocabulary rows (each block's product stays in cache; in bf16 no (chunk, V) bf16
            # copy is made) and in one product elsewhere
            buf = torch.empty(min(chunk, h.shape[0]), w.shape[0], dtype=torch.float32, device=h.device)
            step = HEAD_VOCAB_BLOCK if kind == "cpu" else w.shape[0]
            for i in range(0, h.shape[0], chunk):
                hc, tc = h[i : i + chunk].detach().to(dt), t[i : i + chunk]
                logits = buf[: hc.shape[0]]
                for v in range(0, w.shape[0], step):
                    if dt == torch.float32:
                        torch.mm(hc, w[v : v + step].t(), out=logits[:, v : v + step])
                    else:
                        logits[:, v : v + step] = hc @ w[v : v + step].t()
                valid, tgt = tc != -1, tc.clamp(min=0)
                target = logits.gather(1, tgt[:, None]).squeeze(1)
                # log-sum-exp and softmax in place of the logits: max, exp(z - max), its sum, then / sum
                m = logits.amax(1)
                e = logits.sub_(m[:, None]).clamp_(min=EXP_FLOOR).exp_()  # EXP_FLOOR: see core/model/gpt.py
                s = e.sum(1)
                total += ((m + s.log() - target) * valid).sum()
                if want_h or want_w:
                    g = e.div_(s[:, None])  # softmax
                    g[torch.arange(len(tc), device=g.device), tgt] -= 1
                    g *= valid[:, None]
                    g = g.to(dt)
                    if want_h:
                        grad_h[i : i + chunk] = g @ w
                    if want_w and dt == torch.float32:
                        grad_w.addmm_(g.t(), hc)  # in place: no second (V, C) buffer
                    elif want_w:  # the product rounded to dt like autocast's, by blocks: no (V, C) temporary
                        for v in range(0, w.shape[0], step):
                            grad_w[v : v + step] += g[:, v : v + step].t() @ hc
        ctx.save_for_backward(grad_h if want_h else None, grad_w if want_w else None, n)
        ctx.shape, ctx.dtypes = hidden.shape, (hidden.dtype, head.dtype)
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        # scaled in place: this runs at the memory peak (every activation still held), where a copy
        # of the (V, C) head gradient would add to it. A second backward through the same graph
        # fails loudly (autograd sees the saved tensors changed) rather than scaling twice.
        grad_h, grad_w, n = ctx.saved_tensors
        scale = grad_out / n
        gh = None if grad_h is None else grad_h.mul_(scale).view(ctx.shape).to(ctx.dtypes[0])
        gw = None if grad_w is None else grad_w.mul_(scale).to(ctx.dtypes[1])
        return gh, gw, None, None


@torch.no_grad()
def val_loss(net, ds: Dataset, val_range, block: int, batch: int, n_batches: int, device, amp, dist,
             chunked: bool = True) -> tuple[float, int]:
    """Mean loss over the same windows every time, split over ranks: (loss, tokens scored). ``chunked``: the head
    and the loss by head_loss's chunks, as training's steps (the batch's fp32 logits and log-softmax had made the
    validation a finetune's memory peak: a 16M model's 1.0 GB steps, 2.2 GB evaluating); False under FSDP, whose
    forward computes the logits (its head outside the forward is a shard)."""
    starts = val_starts(val_range, block, n_batches * batch)
    starts = starts[: len(starts) - len(starts) % dist.world] if len(starts) >= dist.world else starts[:1] * dist.world
    mine = starts[dist.rank :: dist.world]
    was = net.training
    net.eval()
    total, count = 0.0, 0
    for i in range(0, len(mine), batch):
        x, y = windows(ds, mine[i : i + batch], block)
        x, y = x.to(device), y.to(device)
        n = int((y != -1).sum())
        with amp():
            if chunked:
                total += head_loss(net(x, return_hidden=True), net.lm_head.weight, y).item() * n
            else:
                total += loss_fn(net(x), y, "sum").item()
        count += n
    net.train(was)
    total, count = dist.sum([total, float(count)], device)
    return (total / count if count else math.nan), int(count)


def probe_prompts(ds: Dataset, val_range, eot: int, n_tokens: int = 16) -> list[list[int]]:
    """Fixed prompts: the opening of the first document that starts inside the validation range
    (for instruction data, its prompt) and the opening of the first training document."""
    out = []
    lo, hi = val_range
    import numpy as np

    ends = np.flatnonzero(np.asarray(ds.tokens[lo : min(hi, lo + 200_000)]) == eot)[:1].tolist()
    for start in ([lo + ends[0] + 1] if ends and lo + ends[0] + 1 < hi - 1 else [lo]) + [0]:
        stop = min(start + n_tokens, hi if start >= lo else lo)
        if ds.mask is not None:  # the prompt part of an instruction example
            j = start
            while j < stop and ds.mask[j] == 0:
                j += 1
            stop = max(j, start + 1)
        ids = [int(t) for t in ds.tokens[start:stop] if int(t) != eot]
        if ids and ids not in out:
            out.append(ids)
    return out


def sample(net, prompt: list[int], max_new: int, block: int, n_vocab: int, eot: int, device, amp,
           seed: int = 0, temperature: float = 0.8, top_k: int = 40) -> list[int]:
    """A short seeded sample with the training model, through the engine's one decode loop.

    The engine borrows the model (its training layout is kept, the KV cache is freed afterwards);
    eval mode only while sampling. Under FSDP every rank must call this (each forward gathers the
    shards). The model sees at most ``block`` tokens, the window it was trained on: when the
    sample reaches it, the last half block is prefilled again and decoding goes on from there.
    """
    was = net.training
    net.eval()
    params = SamplingParams(temperature=temperature, top_k=top_k)
    out: list[int] = []
    try:
        with amp():
            kind = torch.device(device).type  # under autocast the cache holds what attention computes in
            dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
            engine = Engine(net, device=device, dtype=dtype, borrowed=True, n_ctx=block, vocab_limit=n_vocab,
                            eos_id=eot)
            for chunk in range(max_new):  # one pass per window; the first one's seed is ``seed`` itself
                ctx = (prompt + out)[-max(1, block // 2 if out else block - 1):]
                new = [rt.token for step in engine.generate([ctx], params, max_new - len(out),
                                                            seeds=[seed + (chunk << 32)]) for rt in step]
                ended = eot in new
                out += new[: new.index(eot)] if ended else new
                if ended or len(out) >= max_new:
                    break
    finally:
        net.train(was)
    return out


def amp_context(device, dtype):
    """autocast to 16-bit on GPU (and on CPU when asked for bf16); plain fp32 otherwise."""
    if dtype == torch.float32:
        return nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)
