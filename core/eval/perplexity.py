"""Perplexity of a model on held-out text: sliding windows, batched, the head and the loss in chunks.

The windows are Hugging Face's perplexity-guide scheme: windows of ``window`` tokens start every
``stride`` tokens; each scores only the tokens the previous one did not reach, so every token after the
first is scored exactly once, with as much left context as the window allows. Here several windows go
through the model in one forward (right-padded: attention is causal, so padding after a row never
changes it), and the final hidden states of the scored positions only go through the head, 512 rows
at a time, so full-vocabulary logits for a whole batch never sit in memory at once. The scored
positions are the end of each window: the last block computes its keys and values for every
position and the rest for those rows alone (GPT.forward's ``tail``).

Where the time goes (GPT-2 124M, window 1024, stride 512, fp32 on a 2-core AVX2 CPU, one window per
forward): the body 1.88 s a window, the head and the loss on its 512 scored rows 0.38 s (77 MFLOP a
row against the body's ~190 MFLOP a token). So window tokens cost ~1.2x a prefill's at the same
FLOP rate: at fp32's rate the head alone keeps eval under 0.9x of the engine's prefill rate. Where AMX tiles
are there (Xeons from Sapphire Rapids on) a long eval's head runs as three bf16 products (split3, ~2^-16 of
each term; a loss moved by 3e-7 nats); on a 2-core Xeon eval's window tokens/s went 0.86x -> 0.94x the prefill's.

With a ``prefix`` (in-context examples, see shots.py) each window starts with those tokens: they are
context only, never scored, and the held-out context shrinks to make room, so the scored tokens are
the same as without examples.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn

from gptchat.core.errors import ContextOverflow, UsageError
from gptchat.core.eval.heldout import HeldOut
from gptchat.core.eval.shots import InContext
from gptchat.core.model import native, packed, split3
from gptchat.core.model.gpt import EXP_FLOOR, HEAD_VOCAB_BLOCK

HEAD_ROWS = 512  # scored positions per head chunk
HEAD_BLOCK = 2048  # vocabulary rows per packed head block (_Head)
COPY_SLACK = 512 * 2**20  # see _room_for_copy
PACK_FROM_TOKENS = 16 * 1024  # window tokens from which eval packs the weights (see score_windows)
CPU_ACTIVATION_BYTES = 16 << 20  # see batch_tokens_for
GPU_BATCH_TOKENS = 8192


@dataclass(frozen=True)
class Window:
    """Held-out tokens ``[begin, end)`` as context; ``[first, end)`` of them are scored."""

    begin: int
    end: int
    first: int

    @property
    def n_scored(self) -> int:
        return self.end - self.first


def plan_windows(n_tokens: int, window: int, stride: int) -> list[Window]:
    """The perplexity guide's windows over ``n_tokens`` tokens (token 0 has no context: never scored)."""
    if window < 2:
        raise UsageError(f"the window is {window} tokens; it must be at least 2")
    if not 1 <= stride < window:
        # stride == window would leave each window's first token without context, hence unscored
        raise UsageError(f"--stride is {stride}; it must be at least 1 and less than the window ({window} tokens)")
    if n_tokens < 2:
        raise UsageError(f"the held-out text is {n_tokens} token{'s' if n_tokens != 1 else ''}; scoring needs at least 2")
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        out.append(Window(begin, end, max(prev_end, 1)))
        prev_end = end
        if end == n_tokens:
            break
    return out


@dataclass
class Score:
    """Sums over the scored tokens, and the normalisations lm-evaluation-harness reports."""

    model: str
    tokens: int  # held-out tokens scored
    nats: float  # sum of -log p over them
    bytes: int  # UTF-8 bytes of the held-out text
    words: int  # whitespace-separated words of the held-out text
    windows: int
    window: int
    stride: int
    seconds: float
    forwarded: int  # tokens through the model (context included)
    params: int = 0
    shots: int = 0
    context_tokens: list[int] = field(default_factory=list)  # example tokens per window (shots > 0)
    scored_per_window: list[int] = field(default_factory=list)
    quantize: str = "none"  # the model's weights: "none" (as loaded) or "int8" (core/model/quant.py)

    @property
    def loss(self) -> float:
        return self.nats / self.tokens

    @property
    def ppl(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        return self.nats / math.log(2) / max(self.bytes, 1)

    @property
    def word_ppl(self) -> float:
        return math.exp(min(self.nats / max(self.words, 1), 700.0))

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(loss=self.loss, ppl=self.ppl, bits_per_byte=self.bits_per_byte, word_ppl=self.word_ppl,
                 tokens_per_s=self.tokens_per_s)
        return d


@dataclass(frozen=True)
class Rows:
    """One forward's inputs: right-padded ids; per row, where its scored tokens' predictors start and how many."""

    ids: torch.Tensor  # (B, T)
    spans: list[tuple[int, int]]  # (column of the position predicting the first scored token, scored tokens)
    targets: torch.Tensor  # (N,) the scored tokens, row after row


def _batch(ids: list[int], windows: list[Window], prefixes: list[list[int]]) -> Rows:
    seqs = [p + ids[w.begin : w.end] for w, p in zip(windows, prefixes)]
    T = max(map(len, seqs))
    x = torch.zeros(len(seqs), T, dtype=torch.long)  # right padding: causal rows never read it
    for b, s in enumerate(seqs):
        x[b, : len(s)] = torch.tensor(s)
    spans = [(len(p) + w.first - w.begin - 1, w.n_scored) for w, p in zip(windows, prefixes)]
    targets = torch.tensor([t for w in windows for t in ids[w.first : w.end]])
    return Rows(x, spans, targets)


def _groups(lengths: list[int], per: int) -> list[range]:
    """Consecutive windows in batches of at most ``per``; a window more than 1/8 shorter or longer than its
    batch's first starts a new batch (the short last window would mostly be padding)."""
    out: list[range] = []
    lo = 0
    for i in range(1, len(lengths) + 1):
        if i == len(lengths) or i - lo == per or abs(lengths[i] - lengths[lo]) * 8 > lengths[lo]:
            out.append(range(lo, i))
            lo = i
    return out


class _Head:
    """The head and the loss over scored rows, ``HEAD_ROWS`` at a time.

    A plain fp32 head (tied to wte) goes by vocabulary blocks of ``HEAD_VOCAB_BLOCK`` (core/model/gpt.py): each block's logits
    land in one small buffer reused by every block (1024 columns x 512 rows = 2 MB, which stays in
    cache), its log-sum-exp is taken there in place, and the blocks' are combined; the target's logit
    is its own dot product. No (rows, V) logits are ever written: measured on a 2-core EPYC, 512 rows
    x 50257 in 330 ms against 592 ms for the product into a full buffer and ``log_softmax`` over it
    (equal to 1.3e-6 nats a token); blocks of 1024 columns against 4096: 2048 rows in 1.42 s against
    1.61 s (medians of 6 alternating runs). Any other head (int8 QuantLinear, bf16) goes through its module, then an fp32
    log-sum-exp (``lse_``), ``HEAD_ROWS`` at a time."""

    def __init__(self, model, vocab: int, fast=None):
        head = model.lm_head
        w = getattr(head, "weight", None)
        plain = isinstance(head, nn.Linear) and head.bias is None and w.dtype == torch.float32
        self.rows = w[:vocab] if plain else None  # (V, C): blocks of rows give blocks of logits
        # where eval packs the weights (packed_for_eval) it packs the head's blocks too: as three bf16 products on
        # AMX tiles (split3; 512 rows x 50257 0.134 -> 0.089 s), else MKL's (0.17 -> 0.14-0.16 s)
        self.how = head_products(model, fast) if plain else None
        self.blocks = fast.blocks(self.rows, HEAD_BLOCK, HEAD_ROWS, self.how) if self.how else None
        self.model, self.vocab = model, vocab
        self.room: torch.Tensor | None = None  # fp32, flat: each block's logits in turn

    def _room(self, n: int, device) -> torch.Tensor:
        if self.room is None or self.room.numel() < n or self.room.device != torch.device(device):
            self.room = torch.empty(n, device=device)
        return self.room

    def nats(self, h: torch.Tensor, targets: torch.Tensor) -> float:
        """Sum of -log p(target) over the rows of ``h`` (N, C), the final hidden states."""
        total = 0.0
        for i in range(0, h.shape[0], HEAD_ROWS):
            x, t = h[i : i + HEAD_ROWS], targets[i : i + HEAD_ROWS]
            if self.rows is not None:
                lse = torch.stack(self._block_lses(x), 1).logsumexp(1)  # (n,)
                target = (x * self.rows.index_select(0, t)).sum(1)  # (n,) the target's logit
            else:
                logits = self.model.lm_head(x)[:, : self.vocab].float()  # (n, V)
                target = logits.gather(1, t[:, None])[:, 0]
                lse = lse_(logits)
            total += float((lse - target).double().sum())
        return total

    def _block_lses(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each vocabulary block's log-sum-exp of ``x``'s logits (n,)."""
        n = x.shape[0]
        if self.how == "bf16x3":
            x3, room = split3.inputs(x), self._room(n * HEAD_BLOCK, x.device)
            return [lse_(split3.product(p, x3, wb.shape[0], room)) for p, wb in self.blocks]
        if self.blocks is not None:
            x = x.contiguous()
            return [lse_(packed.mkl_product(p, wb, None, x)) for p, wb in self.blocks]
        room = self._room(n * HEAD_VOCAB_BLOCK, x.device)
        return [lse_(torch.mm(x, wb, out=room[: n * wb.shape[1]].view(n, -1)))
                for wb in self.rows.t().split(HEAD_VOCAB_BLOCK, dim=1)]


def head_products(model, fast) -> str | None:
    """How eval multiplies by ``model``'s plain fp32 CPU head given the packed weights ``fast`` (packed_for_eval):
    "bf16x3" (split3, where AMX is there), "mkl" (MKL's packed blocks, with MKL's packed body), or None (by
    HEAD_VOCAB_BLOCK blocks of the plain weight)."""
    w = model.lm_head.weight
    if fast is None or w.device.type != "cpu":
        return None
    return "bf16x3" if split3.usable(w.shape[1]) else "mkl" if fast.kind == "mkl" else None


def lse_(z: torch.Tensor) -> torch.Tensor:
    """The log-sum-exp of each row of the fp32 ``z`` (n, V), computed in place (``z`` is overwritten; ``z - max``
    clamped at EXP_FLOOR, see core/model/gpt.py: in eval's 124M head for 512 rows of random weights, the
    unclamped exp took ~270 of ~540 ms)."""
    m = z.amax(1, keepdim=True)
    return z.sub_(m).clamp_(min=EXP_FLOOR).exp_().sum(1).log_().add_(m[:, 0])


@torch.inference_mode()
def _nats(model, head: _Head, batch: Rows, device, spent: list[float] | None = None) -> float:
    """-log p summed over the batch's scored tokens; ``spent`` (if given) gains the seconds of the model's body and
    of the head with the loss."""
    # only the positions that predict a scored token go through the head, and through the last block
    # after its keys and values (GPT.forward's ``tail``): they are the end of each window
    t0 = time.perf_counter()
    T = batch.ids.shape[1]
    skip = min(c for c, _ in batch.spans)
    hidden = model(batch.ids.to(device), return_hidden=True, tail=T - skip)  # (B, T - skip, C)
    h = torch.cat([hidden[b, c - skip : c - skip + n] for b, (c, n) in enumerate(batch.spans)])  # (N, C)
    t1 = time.perf_counter()
    nats = head.nats(h, batch.targets.to(device))
    if spent is not None:
        spent[0] += t1 - t0
        spent[1] += time.perf_counter() - t1
    return nats


def batch_tokens_for(engine) -> int:
    """Tokens per forward (whole windows; at least one). On a GPU, 8192. On the CPU, as many as keep
    the MLP's widest activation within ``CPU_ACTIVATION_BYTES`` (16 MB): glibc gives every buffer over
    32 MB its own mapping, faulted in page by page each time it is allocated, so a 4096-token batch of
    GPT-2 124M (MLP activations of 50 MB) ran slower per token than one 1024-token window at a time:
    eval window tokens/s over prefill tokens/s, medians of 5 same-process rounds on a 2-core EPYC,
    0.73 at 4096 tokens, 0.77 at 2048, 0.82 at 1024 (and ``x + 1`` on such a tensor: 26 ms at 4096
    rows against 1.5 ms at 1024)."""
    if engine.device.type != "cpu":
        return GPU_BATCH_TOKENS
    cfg = engine.model.config
    return max(1, CPU_ACTIVATION_BYTES // (4 * cfg.n_embd * engine.dtype.itemsize))


def packed_for_eval(engine, tokens: int):
    """A packed copy of the weights for an fp32 CPU eval of ``tokens`` window tokens, or None. Packing 124M takes
    0.3-0.5 s and ~0.5 GB and a 1024-token window gains 0.03-0.05 s (MKL's copy on a 2-core Xeon) to ~0.1 s (the
    panels on a 2-core Zen 4): built for PACK_FROM_TOKENS or more, used once built (kept by the engine).

    Which copy: the engine's panels (packed.py, as batched decode uses them) where gptchat's panel product beats
    PyTorch's GEMM at many rows (``native.gemm_beats_panels``; its blocks' products took 0.88-0.92x PyTorch's time on
    a 1024-token window of a 2-core Zen 4), else MKL's packed copy (``engine.mkl_packed``: a 2-core Xeon with
    AVX-512, where the panels ran eval at 0.55x the prefill's rate: eval scored 1.52x and 1.56x transformers' loop on
    it against 1.48x and 1.51x on PyTorch's plain GEMM, alternating runs), the head's blocks included (_Head)."""
    fast = engine.packed_linears(engine.n_ctx)
    if fast is None or fast.kind != "panels" or native.gemm_beats_panels():
        fast = engine.mkl_packed()  # None but in fp32 on the CPU
    if fast is None or not fast.built and (tokens < PACK_FROM_TOKENS or not _room_for_copy(engine)):
        return None
    return fast


def _room_for_copy(engine) -> bool:
    """Whether a second copy of the weights keeps eval within its memory budget (peak RSS under 1.5 x the weights
    + 1 GB, core/bench/eval.py; eval holds ~0.5 GB beside the weights: COPY_SLACK) and fits the memory free now.
    124M's copy does (peak 0.86 -> 1.47 GB of a 1.75 GB budget; 1.57 GB with split3's head blocks, 231 MB against
    MKL's 154); from 355M on eval multiplies unpacked."""
    from gptchat.core.session.pool import weight_bytes
    from gptchat.core.train.plan import available_bytes  # (train imports eval's estimate: here, not at the top)

    size = weight_bytes(engine.model)
    free = available_bytes(engine.device)
    return size <= size // 2 + COPY_SLACK and (free is None or 2 * size <= free)


def score_windows(engine, ids: list[int], windows: list[Window], prefixes: list[list[int]] | None = None,
                  batch_tokens: int | None = None, progress: Callable[[int, int], None] | None = None,
                  spent: list[float] | None = None) -> float:
    """Sum of -log p over the scored tokens of ``windows`` of ``ids``, each after its prefix (default none).
    ``spent``: [body seconds, head seconds], added to (core/bench/eval.py's split).

    Windows go through the model in batches of about ``batch_tokens`` tokens (default: batch_tokens_for).
    """
    if not windows:
        return 0.0
    batch_tokens = batch_tokens or batch_tokens_for(engine)
    model, prefixes = engine.model, prefixes or [[] for _ in windows]
    lengths = [len(p) + w.end - w.begin for w, p in zip(windows, prefixes)]
    fast = packed_for_eval(engine, sum(lengths))
    head = _Head(model, engine.vocab_limit, fast)
    total = 0.0
    with engine._lock, fast.use() if fast is not None else nullcontext():  # the engine's one-model-at-a-time rule; scoring uses no cache
        model.drop_cache()
        if progress:
            progress(0, len(windows))  # the start: a progress display can time from here
        for g in _groups(lengths, max(1, batch_tokens // max(lengths))):
            batch = _batch(ids, windows[g.start : g.stop], prefixes[g.start : g.stop])
            total += _nats(model, head, batch, engine.device, spent)
            if progress:
                progress(g.stop, len(windows))
    return total


@dataclass(frozen=True)
class Plan:
    windows: list[Window]
    window: int  # tokens per window, examples included
    stride: int


def resolve_window(engine, window: int | None) -> int:
    """--window as eval uses it: the model's context where not given, else checked to be 2 to that context."""
    if window is not None and not 2 <= window <= engine.n_ctx:
        raise UsageError(f"--window is {window}; it must be 2 to {engine.n_ctx} tokens (the model's context)")
    return window or engine.n_ctx


def score_ids(engine, ids: list[int], *, stride: int | None = None, window: int | None = None,
              shots: InContext | None = None, batch_tokens: int | None = None,
              progress: Callable[[int, int], None] | None = None) -> tuple[float, Plan]:
    """Sum of -log p over held-out ``ids`` with ``engine``'s model, and the windows it used.

    ``window`` defaults to the model's context; ``stride`` to half the held-out part of the window.
    With ``shots``, window i starts with ``shots.prefix(i)`` (context only, never scored), at most
    ``shots.room`` tokens: the held-out part of every window is ``window - shots.room`` tokens, so
    every window fits whatever examples it draws. ``batch_tokens``: tokens per forward (whole
    windows; default batch_tokens_for). ``progress(done, total)`` at the start (0) and after each batch.
    """
    window = resolve_window(engine, window)
    room = window - (shots.room if shots else 0)
    if room < 2:
        raise ContextOverflow(
            f"the examples alone take up to {shots.room} tokens of the {window}-token window, leaving no room "
            f"for held-out text; use fewer --shots or shorter examples"
        )
    if stride is not None and stride < 1:
        raise UsageError(f"--stride is {stride}; it must be at least 1")
    if stride is not None and stride >= room:
        raise UsageError(f"--stride is {stride}; it must be less than the {room} held-out tokens of each window")
    plan = Plan(plan_windows(len(ids), room, stride or max(room // 2, 1)), window, stride or max(room // 2, 1))
    pre = [shots.prefix(i) for i in range(len(plan.windows))] if shots else None
    return score_windows(engine, ids, plan.windows, pre, batch_tokens, progress), plan


def evaluate(lm, text: HeldOut, *, stride: int | None = None, window: int | None = None,
             shots: InContext | None = None, progress=None) -> Score:
    """Score ``lm`` (a LoadedModel) on held-out text, zero-shot or with ``shots`` (see shots.py)."""
    ids = text.ids(lm.tokenizer)
    t0 = time.perf_counter()
    nats, plan = score_ids(lm.engine, ids, stride=stride, window=window, shots=shots, progress=progress)
    seconds = time.perf_counter() - t0
    ws = plan.windows
    n_pre = [len(shots.prefix(i)) for i in range(len(ws))] if shots else []
    return Score(
        model=lm.name, tokens=sum(w.n_scored for w in ws), nats=nats, bytes=text.n_bytes, words=text.n_words,
        windows=len(ws), window=plan.window, stride=plan.stride, seconds=seconds,
        forwarded=sum(w.end - w.begin for w in ws) + sum(n_pre), params=lm.checkpoint.config.n_params(),
        shots=shots.k if shots else 0, context_tokens=n_pre, scored_per_window=[w.n_scored for w in ws],
        quantize=lm.engine.quantize,
    )


def mean_logprob(engine, prompt_ids: list[int], completion_ids: list[int]) -> float | None:
    """Mean log p of a completion's tokens after its prompt, under ``engine``'s model (None if empty)."""
    if not completion_ids:
        return None
    lp = engine.score(list(prompt_ids) + list(completion_ids))[-len(completion_ids):]
    return sum(lp) / len(lp)
