"""GPT-2 in plain PyTorch, with Hugging Face's parameter names so checkpoints load by copying.

Differences from a training-only GPT-2 (nanoGPT): attention can read and write a preallocated KV
cache at explicit slots, takes explicit position ids (left-padded batches start each row at 0), and
``forward`` can compute logits for only the last positions (prefill needs one row, not 1000).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gptchat.core.errors import CheckpointError
from gptchat.core.model import flash, fused, layout, native, step1, stepn
from gptchat.core.model.config import GPTConfig
from gptchat.core.model.device import switched_off
from gptchat.core.model.kv_cache import KVCache
from gptchat.core.model.linear import Linear, plain, split_parts


# Vocabulary rows of the tied head per product when all of its logits are needed on the CPU (eval's loss,
# the finetune's head loss): a (512, 50257) product at once ran at ~80 GFLOP/s on a 2-core EPYC, blocks of
# 1024 at ~100, of 4096 at ~82; each block's logits stay in cache for what follows them.
HEAD_VOCAB_BLOCK = 1024
# Where those logits go through exp (log-sum-exp, softmax), ``z - max`` is clamped at EXP_FLOOR first:
# PyTorch's vectorised exp leaves its fast path for inputs whose result would be subnormal (below
# e^-87.3), and logits spread over more than ~87 (random weights; the tails of trained models) made the
# exp ~18x slower (a 512 x 1024 block on a 2-core Zen 4: 5.3 ms against 0.29 ms clamped). A clamped term
# adds at most e^-87 to a sum of at least 1: nothing at fp32's precision.
EXP_FLOOR = -87.0


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer_idx: int):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.c_attn = Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)
        scale = 1.0 / math.sqrt(self.head_dim)
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= layer_idx + 1
        self.scale = scale
        self.kv_cache: KVCache | None = None

    def forward(self, qkv, mask=None, start: int = 0, kv_len: int | None = None, tail: int | None = None):
        """Attention over ``qkv`` = c_attn(ln_1(x)) (B, T, 3C), which the block computes (fused.ln_linear),
        projected by c_proj. ``tail``: the outputs of the last ``tail`` positions only (every key and value is
        still written)."""
        return self._project(self.mix(qkv, mask, start, kv_len, tail))

    def mix(self, qkv, mask=None, start: int = 0, kv_len: int | None = None, tail: int | None = None, bias=None):
        """``forward`` before the output projection: the heads' outputs side by side, (B, T or tail, C).
        ``bias``: c_attn's bias where ``qkv`` was computed without it (Block's many-row paths), added here."""
        B, T, C = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        if (self.training and not self.dropout and self.kv_cache is None and mask is None and start == 0
                and tail is None and bias is None and flash.usable(qkv, self.n_head)):
            return flash.attention(qkv, self.n_head, self.scale)  # training on the CPU (AVX-512), in C
        cache = self.kv_cache
        flashed = mask is None and start == 0 and T > 1 and not self.training and flash.usable_forward(qkv, self.n_head)
        if flashed and (cache is None or flash.fills(cache, qkv)):
            # a prefill or eval window, in C: the bias added and the cache written as q, k and v are read
            return flash.forward(qkv, self.n_head, self.scale, tail, bias, cache)
        if bias is not None:
            qkv = qkv.add_(bias)
        # one view for all three (B, nh, T, hs): a third of split-then-view's cost, per layer and token
        q, k, v = qkv.view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if cache is not None:
            k, v = cache.update(start, k, v, kv_len if kv_len is not None else start + T)
        if flashed:
            return flash.forward(qkv, self.n_head, self.scale, tail)
        if tail is not None and tail < T:
            q, T = q[:, :, -tail:], tail
            if mask is not None:
                mask = mask[:, :, -tail:]
            elif start == 0 and tail > 1:  # causal from slot 0, the queries' diagonal offset by the rows dropped
                mask = torch.ones(tail, k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - tail)
            # tail == 1 with no mask: the last query sees every key, which is plain attention
        drop = self.dropout if self.training else 0.0
        if T == 1 and not self.training and native.can_attend(q, k, v, mask):
            # one query a row (decode; a padded batch's with its row of visible slots): the C kernel (fp32 or bf16)
            return native.attend(q, k, v, self.scale, mask)
        elif T == 1 and q.dtype == torch.bfloat16 and q.device.type == "cpu" and not self.training:
            # one bf16 query: the CPU flash kernel is slow here (1024 cached slots: 0.70 ms a layer
            # against 0.17 ms for these two products), and decode runs it every layer, every token
            att = (q @ k.transpose(-2, -1)) * self.scale  # (B, nh, 1, kv)
            if mask is not None:
                att = att.masked_fill(~mask, float("-inf"))
            y = att.float().softmax(dim=-1).to(v.dtype) @ v  # (B, nh, 1, hs)
        elif (mask is None and start == 0 and T > 1 and not self.training and native.can_attend_causal(q, k, v)
              and not flash.pytorch_faster(q.dtype)):
            return native.attend_causal(q, k, v, self.scale)  # the same without AVX-512 (AVX2)
        else:
            # mask None: plain causal attention from slot 0 (the fused kernel's fast path), or a
            # single decode step that may see every cached slot
            causal = mask is None and start == 0 and T > 1
            if k.dtype != q.dtype:  # a bf16 cache under fp32 activations (an int8 model's): read widened
                k, v = k.to(q.dtype), v.to(q.dtype)
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, dropout_p=drop, scale=self.scale
            )
        return y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)

    def _project(self, y):
        y = self.c_proj(y)
        return self.resid_dropout(y) if self.training and self.dropout else y  # a module call costs ~10 us


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        # GPT-2 was trained with the tanh approximation; exact GELU moves logits by ~1e-5
        self.kind = cfg.activation
        self.act = {
            "gelu_tanh": nn.GELU(approximate="tanh"),
            "gelu": nn.GELU(),
            "relu": nn.ReLU(),
        }[cfg.activation]
        self.c_proj = Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        if native.can_activate(h):  # no autograd, fp32/bf16 CPU: in place in C (tanh GELU ~5x PyTorch's)
            h = native.activate_(h, self.kind)
        elif not h.requires_grad:  # no autograd: the activation in place, no second buffer of 4 x n_embd a token
            h = torch.relu_(h) if self.kind == "relu" else torch.ops.aten.gelu_(h, approximate=self.act.approximate)
        else:
            h = self.act(h)
        h = self.c_proj(h)
        return self.dropout(h) if self.training and self.dropout.p else h


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg, layer_idx)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon, bias=cfg.bias)
        self.mlp = MLP(cfg)
        self.grad_checkpointing = False

    def _forward(self, x, mask, start, kv_len, tail=None):
        attn, mlp = self.attn, self.mlp
        if fused.usable(x, attn.c_attn, mlp.c_fc, mlp.c_proj):  # training: layer norms, GELU recomputed in backward
            x = x + attn(fused.ln_linear(x, self.ln_1, attn.c_attn), mask, start, kv_len)
            return x + mlp.dropout(fused.ln_mlp(x, self.ln_2, mlp.c_fc, mlp.c_proj, mlp.kind))
        if tail is None and _accumulates(x, attn.c_proj, mlp.c_fc, mlp.c_proj) and native.can_activate(x):
            return self._accumulate(x, mask, start, kv_len)
        if tail is not None and _accumulates(x, attn.c_attn):
            y = attn._project(attn.mix(self._tail_qkv(x, tail), mask, start, kv_len, tail, attn.c_attn.bias))
        else:
            y = attn(attn.c_attn(self.ln_1(x)), mask, start, kv_len, tail)
        x = (x if tail is None else x[:, -tail:]) + y
        return x + mlp(self.ln_2(x))

    def _accumulate(self, x, mask, start, kv_len):
        """The block for many rows of fp32 CPU inference (a prefill, an eval window), the residual stream ``x``
        updated in place: each output projection adds its product into x (x.addmm_: the product's beta = 1, no
        output of its own, no separate residual add) and then its bias; c_fc's bias goes into the GELU's pass
        (native.activate_). PyTorch's addmm copies a bias into every output row before the product; with the
        separate residual adds that came to ~17 ms of a 1000-token 124M prefill of ~0.69 s on a 2-core Xeon
        (AVX-512; A/B in one process, 11 runs each: 0.690 -> 0.673 s). The same sums in another order: the 124M
        logits moved by ~4e-6. ``GPTCHAT_ACCUMULATE=0`` turns it off."""
        attn, mlp = self.attn, self.mlp
        C = x.shape[-1]
        rows = x.view(-1, C)
        if plain(attn.c_attn):  # its bias (if any) goes in as attention reads q, k and v
            y = attn.mix(F.linear(self.ln_1(x), attn.c_attn.weight), mask, start, kv_len, bias=attn.c_attn.bias)
        else:
            y = attn.mix(attn.c_attn(self.ln_1(x)), mask, start, kv_len)
        rows.addmm_(y.reshape(-1, C), attn.c_proj.weight.t())
        if attn.c_proj.bias is not None:
            rows.add_(attn.c_proj.bias)
        h = F.linear(self.ln_2(x), mlp.c_fc.weight)
        h = native.activate_(h, mlp.kind, mlp.c_fc.bias)
        rows.addmm_(h.view(-1, h.shape[-1]), mlp.c_proj.weight.t())
        if mlp.c_proj.bias is not None:
            rows.add_(mlp.c_proj.bias)
        return x

    def _tail_qkv(self, x, tail: int):
        """c_attn(ln_1(x)) less its bias where attention reads the last ``tail`` queries only (a prefill's last block):
        keys and values for every row, queries for the tail's rows; the other rows' queries are left unset, as no
        attention path reads them. A 1000-token 124M prefill's last c_attn 12.6 -> 7.3 ms (a 2-core Xeon)."""
        w = self.attn.c_attn.weight  # [3C, C]
        B, T, C = x.shape
        a = self.ln_1(x)
        qkv = x.new_empty(B, T, 3 * C)
        torch.mm(a.view(-1, C), w[C:].t(), out=qkv.view(-1, 3 * C)[:, C:])  # MKL writes the strided rows in place
        qkv[:, -tail:, :C] = F.linear(a[:, -tail:], w[:C])
        return qkv

    def forward(self, x, mask=None, start: int = 0, kv_len: int | None = None, tail: int | None = None):
        """``tail``: compute the outputs of the last ``tail`` positions only, (B, tail, C): the keys and
        values of every position are written, the rest of the block runs on the tail's rows."""
        if self.grad_checkpointing and self.training:
            from torch.utils.checkpoint import checkpoint

            return checkpoint(self._forward, x, mask, start, kv_len, use_reentrant=False)
        return self._forward(x, mask, start, kv_len, tail)


class GPT(nn.Module):
    kv_dtype: torch.dtype | None = None  # the KV cache's dtype; None: the compute dtype (wpe's)

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
                wpe=nn.Embedding(cfg.n_positions, cfg.n_embd),
                drop=nn.Dropout(cfg.dropout),
                h=nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)]),
                ln_f=nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon, bias=cfg.bias),
            )
        )
        self.lm_head = Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in every GPT-2 checkpoint

    # -- weights ----------------------------------------------------------------------------------

    @classmethod
    def from_state_dict(cls, cfg: GPTConfig, tensors, *, device=None, dtype=None, inference_layout: bool = False,
                        source: str = "the state dict", transform=None) -> "GPT":
        """The one way to build a GPT from weights: on the meta device, filled with ``assign=True``.

        ``tensors``: a mapping or an iterable of (name, tensor) pairs under our names and [out, in]
        shapes (checkpoints.iter_tensors streams them from disk, so each is checked, then converted
        to ``device``/``dtype``, one at a time). ``lm_head.weight`` may be absent: the head is tied to
        ``wte``; when present it must equal ``wte``. Unknown, missing or misshapen tensors raise
        CheckpointError naming ``source``. ``inference_layout``: see to_inference_layout. ``transform``:
        called as transform(key, tensor) on each checked tensor, its result loaded instead (int8's
        StreamQuantizer returns meta stand-ins and installs its modules afterwards). Returns the
        model in eval mode.
        """
        with torch.device("meta"):
            model = cls(cfg)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        sd: dict[str, torch.Tensor] = {}
        head = None
        for key, t in tensors.items() if hasattr(tensors, "items") else tensors:
            if key == "lm_head.weight":
                head = t if transform is None else transform(key, t)  # tied to wte; compared below
                continue
            if key not in expected:
                raise CheckpointError(f"{source}: unexpected tensor {key!r}; this is not a GPT-2 checkpoint")
            if tuple(t.shape) != expected[key]:
                raise CheckpointError(f"{source}: {key} has shape {tuple(t.shape)}, but the config implies {expected[key]}")
            t = t.detach().to(device=device, dtype=dtype)
            sd[key] = layout.placed(t, inference_layout and key != "transformer.wpe.weight"
                                    and not layout.rows_kept(t)
                                    and not (key == "transformer.wte.weight" and layout.head_by_rows(t)))
            if transform is not None:
                sd[key] = transform(key, sd[key])
        missing = [k for k in expected if k not in sd and k != "lm_head.weight"]
        if missing:
            raise CheckpointError(f"{source}: missing {len(missing)} tensors (first: {missing[0]}); the file is incomplete")
        wte = sd["transformer.wte.weight"]
        model.load_state_dict({**sd, "lm_head.weight": wte}, strict=True, assign=True)
        model.lm_head.weight = model.transformer.wte.weight  # assign=True replaced the Parameter: re-tie
        if head is not None and not head.is_meta and head.shape == wte.shape and head.data_ptr() != wte.data_ptr():
            # a few exports carry an untied head; gptchat's GPT-2 is always tied, so say so rather than guess
            if not torch.equal(head.to(device=wte.device, dtype=wte.dtype), wte):
                raise CheckpointError(f"{source}: lm_head.weight differs from wte; untied GPT-2 heads are not supported")
        return model.eval()

    def init_weights(self, seed: int | None = None) -> None:
        """GPT-2's initialisation (normal 0.02; residual projections scaled by 1/sqrt(2 n_layer))."""
        gen = torch.Generator(device="cpu")
        if seed is not None:
            gen.manual_seed(seed)
        std_proj = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("c_proj.weight"):
                    p.copy_(torch.randn(p.shape, generator=gen) * std_proj)
                elif p.dim() == 2:  # Linear and Embedding weights
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
                elif "ln_" in name and name.endswith("weight"):
                    p.fill_(1.0)
                else:
                    p.zero_()

    def to_inference_layout(self) -> "GPT":
        """Store every 2-D weight transposed in memory, i.e. [in, out] like HF's Conv1D.

        Parameters keep their [out, in] shapes and names; only the memory order changes. On CPU a
        matrix-vector product reads an [in, out] matrix about 1.5x faster (measured: the 50257x768
        head, 12 ms -> 8 ms per decode step), and decode is that product, layer after layer. The tied
        head stays in its own order where the one-call step (step1.py) will read it (``layout.head_by_rows``).
        """
        with torch.no_grad():
            # wpe, and wte once the head is not tied to it (an int8 head, quant.py), are only looked up
            skip = {id(self.transformer.wpe.weight)}
            wte = getattr(self.transformer.wte, "weight", None)  # None: an int8 table (QuantEmbedding)
            if getattr(self.lm_head, "weight", None) is not wte or layout.head_by_rows(wte):
                skip.add(id(wte))
            for p in self.parameters():
                if p.dim() == 2 and p.is_contiguous() and id(p) not in skip and not layout.rows_kept(p):
                    p.data = p.data.t().contiguous().t()
            threads = torch.get_num_threads()
            for m in self.modules():
                if isinstance(m, Linear) and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32:
                    m.parts = split_parts(m.in_features, threads)  # batch-1 products split by thread (Linear)
        return self

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights are one parameter

    # -- cache ------------------------------------------------------------------------------------

    def setup_cache(self, batch_size: int, max_len: int | None = None) -> None:
        """(Re)allocate the KV cache; reuses the current one when it is already this size."""
        max_len = min(max_len or self.config.n_positions, self.config.n_positions)
        p = self.transformer.wpe.weight  # the compute dtype (an int8 model's wte is int8)
        dtype = self.kv_dtype or p.dtype
        first = self.transformer.h[0].attn.kv_cache
        if first is not None and first.batch_size == batch_size and first.max_len == max_len and first.k.dtype == dtype:
            return
        for block in self.transformer.h:
            block.attn.kv_cache = KVCache(batch_size, self.config.n_head, max_len, self.config.head_dim, dtype, p.device)

    def drop_cache(self) -> None:
        for block in self.transformer.h:
            block.attn.kv_cache = None

    # -- forward ----------------------------------------------------------------------------------

    def forward(
        self,
        idx: torch.Tensor,
        pos: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        start: int = 0,
        kv_len: int | None = None,
        last_only: bool = False,
        return_hidden: bool = False,
        tail: int | None = None,
    ) -> torch.Tensor:
        """Logits for ``idx`` (B, T).

        pos: position ids (B, T) or (T,); default ``start .. start+T-1``.
        mask: boolean (B, 1, T, kv_len), True where a query may attend; None means no padding:
            plain causal attention over slots [0, start+T).
        start: the cache slot of idx[:, 0]; kv_len: how many cache slots attention reads.
        last_only: compute logits for the last position only (B, 1, V); same as ``tail=1``.
        tail: outputs (hidden states or logits) for the last ``tail`` positions only, (B, tail, ...):
            the last block computes everything after its keys and values for those rows alone (a
            1000-token prefill that needs one row's logits skips ~3/4 of the last block's work).
        """
        B, T = idx.shape
        if B == 1 and T == 1 and mask is None and pos is None and not self.training and not torch.is_grad_enabled():
            out = step1.run(self, idx, start, kv_len, logits=not return_hidden)  # the whole step in C, where it applies
            if out is not None:
                return out
        elif T == 1 and not return_hidden and not self.training and not torch.is_grad_enabled():
            out = stepn.run(self, idx, pos, mask, start, kv_len)  # a batch's step in C, on packed fp32 panels
            if out is not None:
                return out
        if mask is None and start > 0 and T > 1:
            # a chunk after a cached prefix: causal within the chunk, everything before it visible
            kv = kv_len if kv_len is not None else start + T
            q_slot = torch.arange(start, start + T, device=idx.device)[:, None]
            mask = (torch.arange(kv, device=idx.device)[None, :] <= q_slot)[None, None]
        # positions start..start+T-1 are a slice of the table: no index tensor to build each step
        wpe = self.transformer.wpe(pos) if pos is not None else self.transformer.wpe.weight[start : start + T]
        x = self.transformer.wte(idx) + wpe  # (B, T, C)
        if self.training and self.transformer.drop.p:
            x = self.transformer.drop(x)
        tail = 1 if last_only else tail
        if tail is not None and (tail >= T or self.training):
            tail = None
        *body, last = self.transformer.h
        for block in body:
            x = block(x, mask, start, kv_len)
        x = last(x, mask, start, kv_len, tail=tail)
        if last_only:
            x = x[:, -1:, :]
        x = self.transformer.ln_f(x)
        if return_hidden:  # the final hidden states; eval applies the head in chunks (core/eval)
            return x  # (B, T, C)
        return self.lm_head(x)  # (B, T, V)

    def decode_step(self, idx: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) for one token a row, idx (B, 1), written at cache slot ``slot`` (a 0-d long
        tensor), every row dense (its position is the slot). Attention reads the whole cache through
        a mask of the slots written so far, so no shape depends on the slot: the step compiles once
        (and on CUDA can be replayed as a graph) for a given cache size."""
        cap = self.transformer.h[0].attn.kv_cache.max_len
        mask = (torch.arange(cap, device=idx.device) <= slot)[None, None, None]  # (1, 1, 1, cap)
        x = self.transformer.wte(idx) + self.transformer.wpe(slot.view(1, 1))  # (B, 1, C)
        for block in self.transformer.h:
            x = block(x, mask, slot)
        return self.lm_head(self.transformer.ln_f(x))[:, -1]


ACCUMULATE_FROM = 64  # rows from which Block._accumulate runs (fewer: native.few_rows' products, a decode step's)


def _accumulates(x: torch.Tensor, *linears: nn.Module) -> bool:
    """Block's many-row paths (_accumulate, _tail_qkv) apply: fp32 inference on the CPU (no gradients, not
    dropping out) over at least ACCUMULATE_FROM contiguous rows, through ``linears`` that are plain gpt.Linears
    with fp32 weights and biases (linear.plain: not LoRA, int8 or packed copies, which patch or replace them)."""
    return (x.dtype == torch.float32 and x.device.type == "cpu" and x.is_contiguous()
            and x.numel() >= ACCUMULATE_FROM * x.shape[-1] and not torch.is_grad_enabled()
            and not switched_off("GPTCHAT_ACCUMULATE") and all(plain(m) for m in linears))
