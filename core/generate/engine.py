"""Token-level generation over the KV cache: the one decode loop, and scoring.

The engine knows nothing about text: it takes and yields token ids. ``text.py`` turns ids into
text, applies stop strings and measures time; ``batching.py`` holds the rows of a running batch.
"""

from __future__ import annotations

import gc
import threading
import time
from collections import deque
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator

import torch

from gptchat.core.errors import ContextOverflow, DeviceError, UsageError
from gptchat.core.generate.batching import LiveBatch
from gptchat.core.generate.sampling import SamplingParams, greedy, sample
from gptchat.core.model import hugepages, native, packed, quant, step1
from gptchat.core.model.device import keep_freed_buffers, switched_off
from gptchat.core.model.words import QUANT_MODES
from gptchat.core.weights.checkpoints import Checkpoint, load

GPT2_VOCAB = 50257  # ids from here up (nanoGPT pads to 50304) are never sampled
GPT2_EOS = 50256


@dataclass
class RowToken:
    """One row's new token; ``done`` marks the row's last token."""

    row: int
    token: int
    done: bool


class Engine:
    """Generation for one model. ``borrowed``: the model belongs to a training run, so keep its
    memory layout and train/eval mode, decode under ``no_grad`` (``inference_mode`` tensors could
    not take part in a later backward), never pack its weights, and free the cache afterwards.
    ``n_ctx`` narrows the window (a model trained on shorter blocks); ``vocab_limit`` and
    ``eos_id`` override GPT-2's (a tokenizer of its own). ``quantize`` "int8": every Linear and the
    head become int8 (quant.py; CPU only). ``compile``: batch-1 decode steps run through
    torch.compile of ``GPT.decode_step`` (on CUDA as CUDA graphs); see compile_step."""

    def __init__(self, model, checkpoint: Checkpoint | None = None, device=None, dtype=None, *,
                 borrowed: bool = False, n_ctx: int | None = None, vocab_limit: int | None = None,
                 eos_id: int | None = None, quantize: str = "none", compile: bool = False):
        if quantize != "none":
            if borrowed:
                raise ValueError("a training run's model cannot be quantized in place")
            quant.quantize_model(model, quantize)
        self.quantize = quantize
        self.model = model if borrowed else model.eval().to_inference_layout()
        self.checkpoint = checkpoint
        self.borrowed = borrowed
        p = next(model.parameters())
        self.device = device or p.device
        self.dtype = dtype or p.dtype
        self.n_ctx = min(n_ctx or model.config.n_positions, model.config.n_positions)
        self.vocab_limit = vocab_limit or min(model.config.vocab_size, GPT2_VOCAB)
        self.eos_id = eos_id if eos_id is not None else (GPT2_EOS if model.config.vocab_size > GPT2_EOS else None)
        self._lock = threading.Lock()  # one generation at a time per loaded model
        self._packed = None
        self._mkl = None  # mkl_packed's copy
        self.compile = compile and not borrowed  # a training run's model changes under it: never compiled
        self._step = None  # the compiled decode step, built on first use
        self.compile_s = 0.0  # seconds spent in warm_up (compiling), 0 before it
        if self.device.type == "cpu" and self.dtype == torch.float32:
            native.kernel()  # built (once per machine) or loaded now, with the model, not in the first reply
        if self.device.type == "cpu" and not borrowed:
            keep_freed_buffers()
        if quantize == "int8" and not switched_off("GPTCHAT_KV_BF16"):
            # int8 weights: keys and values cached in bf16, read widened to fp32 (a 124M decode step at slot
            # 900 read 66 MB of fp32 cache beside 125 MB of weights). GPTCHAT_KV_BF16=0 keeps them fp32.
            model.kv_dtype = torch.bfloat16
        self.kv_dtype = model.kv_dtype or self.dtype
        # int8 weights, and bf16 ones where the C step reads them (fp32: nothing moves), into 2 MB pages: batch-1
        # decode streams them all every token
        if not borrowed:
            hugepages.rehome_streamed(model, bf16=self.device.type == "cpu" and native.kernel() is not None)

    @classmethod
    def load(cls, spec, device: str | None = None, dtype: str | None = None, download: bool = True,
             quantize: str | None = None, compile: bool | None = None) -> "Engine":
        """``compile`` None: on where it is measured faster (compile_default)."""
        from gptchat.core.model.device import compile_default, pick_device, pick_dtype, set_threads

        quantize = quantize or "none"
        if quantize not in QUANT_MODES:
            raise UsageError(f"unknown --quantize {quantize!r}; use {' or '.join(QUANT_MODES)}")
        dev = pick_device(device)
        set_threads()
        if quantize != "none" and dev.type != "cpu":
            raise DeviceError(f"--quantize {quantize} runs on the CPU only; use --device cpu")
        dt = torch.float32 if quantize != "none" else pick_dtype(dtype, dev)  # int8 computes in fp32
        # quantized models keep the [out, in] layout their int8 kernel packs from
        model, ck = load(spec, device=dev, dtype=dt, download=download, inference_layout=quantize == "none")
        if compile is None:
            compile = compile_default(dev)
        return cls(model, ck, dev, dt, quantize=quantize, compile=compile)

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, pos: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        """Run the prompt (B, T) through the model into a fresh cache; logits of the last slot (B, V)."""
        B, T = ids.shape
        self.model.setup_cache(B, self.n_ctx)
        logits = self.model(ids.to(self.device), pos, mask, start=0, kv_len=T, last_only=True)
        return logits[:, -1, :]

    def check_window(self, prompt_len: int, max_new_tokens: int) -> int:
        """The number of new tokens that fit after the prompt in the context window."""
        if prompt_len == 0:
            raise ContextOverflow("the prompt is empty; give the model at least one token of text")
        if prompt_len >= self.n_ctx:
            raise ContextOverflow(
                f"the prompt is {prompt_len} tokens but the model's window is {self.n_ctx}, with room "
                f"needed for the reply; shorten the prompt (or use a template, which cuts it to fit)"
            )
        return min(max_new_tokens, self.n_ctx - prompt_len)

    # -- the decode loop ----------------------------------------------------------------------

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        max_new_tokens: int | list[int],
        seeds: list[int] | None = None,
        stop_ids: set[int] | None = None,
        cancel: threading.Event | None = None,
        drop: set[int] | None = None,
        refill: deque | None = None,
        ignore_eos: bool = False,
    ) -> Iterator[list[RowToken]]:
        """Prefill the prompts (any lengths) and decode; yields, per step, one RowToken for every row
        still running. Rows never see each other, so a row's output does not depend on its batch.

        ``row`` numbers the rows: ``prompts`` first, then rows taken from ``refill`` in the order
        taken. ``max_new_tokens`` is one limit for all rows or one per row. A row's last token has
        ``done`` set: it is eos (unless ``ignore_eos``) or a ``stop_ids`` token, or the row reached
        its limit, ``min(max_new_tokens, n_ctx - prompt length)``. Rows the caller adds to ``drop``
        (on a stop string, say) leave after the step; ``seeds`` are per row (default 0); ``cancel``
        is checked between steps.

        Finished rows are compacted out of the KV cache once they are a quarter of the batch. With
        ``refill``, a deque of (prompt ids, max_new_tokens, seed), their places are given to waiting
        prompts: each is prefilled alone and put in the cache so that its prompt ends at the current
        slot (it must not be longer than the slots so far; sort prompts longest first). Prompts left
        in the deque (the cache bound, twice the first batch's, was reached) are for the next call.
        """
        if not prompts:
            return
        limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        for p in prompts:
            self.check_window(len(p), 1)
        if len(limits) != len(prompts) or min(limits) < 1:
            raise ValueError("max_new_tokens must be >= 1, one for every row")
        stop = set(stop_ids or ()) | ({self.eos_id} if self.eos_id is not None and not ignore_eos else set())
        drop = drop if drop is not None else set()
        seeds = list(seeds) if seeds is not None else [0] * len(prompts)
        T = max(map(len, prompts))
        # cache slots: the longest prompt plus the most tokens any row may add (this can pass n_ctx:
        # slots are shared, positions are each row's own and stay inside its window)
        cap = T + max(min(m, self.n_ctx - len(p)) for p, m in zip(prompts, limits))
        if self.compile and len(prompts) == 1:
            cap = self.n_ctx  # one cache size, so the compiled step is compiled once (its shapes are the cache's)
        no_grad = torch.no_grad if self.borrowed else torch.inference_mode
        with self._lock, no_grad(), step1.held(self.model, pick_below=self.vocab_limit), no_full_collections():
            try:
                b = LiveBatch(self, params, cap)
                logits = b.admit(list(zip(prompts, limits, seeds)), T)
                yield from self._decode(b, logits, params, stop, cancel, drop, refill, 2 * cap)
            finally:
                if self.borrowed:
                    self.model.drop_cache()

    def _decode(self, b: LiveBatch, logits, params, stop, cancel, drop, refill, cap_max) -> Iterator[list[RowToken]]:
        B0 = len(b.rows)
        fast = self.packed_linears(B0)
        fast_from = self._packed_from()
        V = self.vocab_limit
        argmax = params.is_greedy and b.seen is None  # all the greedy sampler does then: one argmax
        while True:
            lg = logits[:, :V]
            if argmax:  # the step's own pick where it took one (batch 1 on the CPU)
                tok = step1.picked(self.model, lg)
                tok = greedy(lg) if tok is None else tok
            else:
                tok = sample(lg, params, b.gens, b.seen)  # (B',)
            ids = tok.tolist()  # the one host sync of a step: the caller needs the tokens
            if b.seen is not None:
                b.seen.scatter_(1, tok[:, None], True)
            out = []
            for j, (r, t) in enumerate(zip(b.rows, ids)):
                if b.alive[j]:
                    b.count[r] += 1
                    done = t in stop or b.count[r] >= b.limits[r]
                    out.append(RowToken(r, t, done))
                    b.alive[j] = not done
            yield out
            b.alive = [a and r not in drop for a, r in zip(b.alive, b.rows)]
            if cancel is not None and cancel.is_set():
                return
            n_alive = sum(b.alive)
            dead = len(b.rows) - n_alive
            waiting = self._take(b, refill, n_alive, B0, cap_max)
            if n_alive == 0 and not waiting:
                return
            if dead and (4 * dead >= len(b.rows) or waiting):
                tok = b.compact(tok)
            if n_alive and self.compile and b.dense and len(b.rows) == 1:
                logits = b.decode(tok, self.compiled_step())
            elif n_alive:
                with fast.use() if fast is not None and len(b.rows) >= fast_from else nullcontext():
                    logits = b.decode(tok)
            if waiting:
                new = b.admit(waiting, b.s_end)
                logits = torch.cat([logits, new]) if n_alive else new

    def _take(self, b: LiveBatch, refill: deque | None, n_alive: int, B0: int, cap_max: int) -> list:
        """Waiting prompts that take finished rows' places now (once a quarter of the batch is free)."""
        waiting: list = []
        if not refill or not (n_alive == 0 or 4 * (B0 - n_alive) >= B0):
            return waiting
        s_after = b.s_end + (1 if n_alive else 0)  # where new prompts end, after this step
        while refill and n_alive + len(waiting) < B0:
            ids, m, _ = refill[0]
            limit = min(m, self.n_ctx - len(ids))
            if len(ids) > s_after or s_after + limit - 1 > cap_max:
                break  # does not fit this cache: left for the next call
            self.check_window(len(ids), 1)
            waiting.append(refill.popleft())
        return waiting

    def compiled_step(self):
        """torch.compile of GPT.decode_step: built once, compiled at its first call (see warm_up)."""
        if self._step is None:
            from gptchat.core.model.device import compile_mode

            self._step = torch.compile(self.model.decode_step, mode=compile_mode(self.device), fullgraph=True)
        return self._step

    def warm_up(self) -> float:
        """Compile the decode step now rather than during the first reply (one short throwaway
        generation: a single prompt always gets an n_ctx-slot cache, so one graph serves every
        later reply). Returns the seconds spent (also compile_s)."""
        if not self.compile or self.compile_s:
            return self.compile_s
        t0 = time.perf_counter()
        greedy = SamplingParams(greedy=True)
        for _ in self.generate([[0, 0]], greedy, 3, ignore_eos=True):
            pass
        self.compile_s = time.perf_counter() - t0
        return self.compile_s

    def packed_linears(self, batch_size: int):
        """Packed weights for batched CPU decode (see packed.py; eval's windows use them too), or None where
        they do not help."""
        kind = packed.kind(self.device, self.dtype)
        if self.borrowed or kind is None or batch_size < self._packed_from():
            return None
        if self._packed is None:
            self._packed = packed.PackedLinears(self.model, batch_hint=1 if self.dtype == torch.bfloat16 else 16,
                                                kind=kind)
        return self._packed

    def mkl_packed(self):
        """MKL-packed copies of the fp32 weights for products of many rows (eval's windows; packed.py's "mkl"), or
        None: not fp32 on the CPU, a borrowed model, or no MKL packing in this PyTorch."""
        if self.borrowed or self.device.type != "cpu" or self.dtype != torch.float32 or not packed.mkl_packs():
            return None
        if self._mkl is None:
            self._mkl = packed.PackedLinears(self.model, batch_hint=self.n_ctx, kind="mkl")  # a window's rows
        return self._mkl

    def _packed_from(self) -> int:
        """The smallest batch decoded on packed weights: packed.min_batch, but 2 where the one-call step runs
        batch 1 (it reads the model's own weights; bf16 would otherwise pack a second copy for nothing)."""
        return max(packed.min_batch(self.dtype), 2 if step1.plan(self.model) is not None else 1)

    # -- scoring ------------------------------------------------------------------------------

    @torch.inference_mode()
    def score(self, ids: list[int]) -> list[float]:
        """log p(ids[t] | ids[:t]) for t = 1..n-1 (the first token has no context to be scored in)."""
        if len(ids) < 2:
            return []
        if len(ids) > self.n_ctx:
            raise ContextOverflow(f"cannot score {len(ids)} tokens in a {self.n_ctx}-token window")
        with self._lock:
            self.model.drop_cache()
            x = torch.tensor([ids], dtype=torch.long, device=self.device)
            logits = self.model(x).float()[0, :-1, : self.vocab_limit]  # (T-1, V)
            logp = torch.log_softmax(logits, dim=-1)
            out = logp.gather(1, x[0, 1:, None]).squeeze(1)
        return out.tolist()

    @torch.inference_mode()
    def logits(self, ids: list[int]) -> torch.Tensor:
        """fp32 logits (T, V) at every position of ``ids``, one pass without the cache (gptchat inspect)."""
        if len(ids) > self.n_ctx:
            raise ContextOverflow(f"cannot read {len(ids)} tokens in a {self.n_ctx}-token window")
        with self._lock:  # one model call at a time: a generation may be using the cache
            self.model.drop_cache()
            x = torch.tensor([ids], dtype=torch.long, device=self.device)
            return self.model(x).float()[0, :, : self.vocab_limit]


_quiet_lock = threading.Lock()
_quiet = [0, None]  # generations running, the thresholds they replaced


@contextmanager
def no_full_collections():
    """While any generation runs, Python's collector does not start a full (oldest-generation) collection by
    itself; young ones go on, and the full one comes after. A full collection holds the GIL for as long as it
    walks every object the process has (torch's, Textual's: 8 in four chat app replies, up to 180 ms each,
    0.77 s in all), and a decode step needs the GIL between its kernels: the chat app's decode rate fell to
    0.85x `gptchat generate`'s in the replies one landed in (5% of a core on the UI thread became 15%)."""
    with _quiet_lock:
        if _quiet[0] == 0:
            _quiet[1] = gc.get_threshold()
            gc.set_threshold(_quiet[1][0], _quiet[1][1], 1 << 30)
        _quiet[0] += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet[0] -= 1
            if _quiet[0] == 0:
                gc.set_threshold(*_quiet[1])
