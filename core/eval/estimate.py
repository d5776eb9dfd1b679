"""The arithmetic of models: memory, compute and time, before anything runs.

Pure functions of a ``GPTConfig`` (or a bare parameter count) and plain numbers; only
``measure_cpu_flops`` touches torch. ``core/train/plan.py`` plans finetune runs with these same
functions, so ``gptchat estimate`` and the plan a run prints cannot disagree.

Memory (bytes per parameter, Adam in fp32 as every trainer keeps it):

    fp32 training:   weights 4 + gradients 4 + Adam moments 8                     = 16
    mixed 16-bit:    + 16-bit weight copies 2 (autocast keeps fp32 master weights)  = 18
    LoRA:            frozen base at its dtype; adapters 4 + 4 + 8

Activations per transformer block and token, in values of the activation dtype, for our GPT-2
with a fused attention kernel (SDPA keeps no T x T matrix, only its output and a log-sum-exp):
block input 1 + ln_1 1 + qkv 3 + attention output 1 + its contiguous copy 1 + residual 1 + ln_2 1
+ c_fc 4 + GELU 4 = 17 * n_embd (Korthikanti et al. 2022 count 34 bytes at 16-bit: the same 17
values), plus n_head log-sum-exp floats. gptchat's own full-weight training keeps 10 in fp32
(core/model/fused.py recomputes the two layer norms and the GELU in backward: block input 1 + qkv 3
+ attention output 1 + residual 1 + c_fc 4) and under autocast 12 in 16-bit units (the same, with
the block input and the residual kept fp32: 2 units each); LoRA runs keep the 17 (or LoRA's fewer).
Under autocast the fused steps cast the block's weights per use, so of autocast's 16-bit weight
copies only the token table's (the head's) and the attention output projections' stay cached, where
a bare parameter count (no shape known) assumes every weight's.

The head: gptchat's trainer never holds the batch's logits (core/train/evaluate.head_loss: the tied head and
the cross-entropy by chunks of HEAD_CHUNK rows, the gradients computed on the way), so it keeps one chunk's
fp32 logits and the final hidden states' gradient (n_embd floats a token) besides the head's weight gradient.
FSDP over several processes computes the full logits inside its forward: the log-softmax, then at the start
of backward its gradient and the logits' (the logits themselves are freed once the loss is taken), 3 x vocab
floats a token. With gradient checkpointing a block keeps only its input; one block's working set is rebuilt
at a time during backward.

tests/eval/test_estimate.py measures these against real training steps on CPU with the trainer's loss
(fp32, bf16 autocast, checkpointing, LoRA; and the full logits' loss): within 15% in every measured shape.
GPT-2 124M, 4 x 1024 tokens, fp32: 3.30 GB estimated, 3.30 GB of tensors at the measured peak (the process's
peak RSS 4.16 GB, with PyTorch's libraries and the allocator's slack); counting full logits had said 6.48 GB.
Checkpointing under mixed precision comes out ~18% high (gradients counted whole while blocks are rebuilt),
a safe side for a plan; 16-bit activations on CUDA are not measured here (no GPU in the tests).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from gptchat.core.model.config import GPTConfig

GB = 1e9
BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}
ADAM_BYTES = 8  # two fp32 moments per trained parameter
ADAM_STEP_TEMP_BYTES = 6.4  # foreach AdamW's step temporaries per trained parameter (measured, torch 2.x)
BLOCK_VALUES = 17  # activation values a block keeps per token, in units of n_embd (see above)
FUSED_BLOCK_VALUES = 10  # the same with the layer norms and GELU recomputed (fp32 training, no LoRA)
FUSED_MIXED_BLOCK_VALUES = 12  # likewise under autocast, in 16-bit units (fp32 block input and residual: 2 each)
HEAD_COPIES = 3  # full logits (FSDP): the log-softmax, then its gradient and the logits' (the logits freed), in fp32
HEAD_CHUNK = 512  # rows of logits at a time in the trainer's chunked head loss (core/train/evaluate.head_loss)
CHINCHILLA_TOKENS_PER_PARAM = 20  # Hoffmann et al. 2022: compute-optimal training tokens
DEFAULT_UTILISATION = 0.4  # model FLOPs utilisation a well-tuned GPU run reaches (Llama 2 7B: ~0.41)
# with LoRA a frozen Linear keeps no input for its weight gradient: these block values (see above) are
# kept only when an adapter on that Linear reads them
FROZEN_INPUTS = {"attn.c_attn": (("q", "k", "v"), 1), "attn.c_proj": (("o",), 1), "mlp.c_fc": (("fc",), 1),
                 "mlp.c_proj": (("proj",), 4)}
LORA_WIDTH = {"q": 2, "k": 2, "v": 2, "o": 2, "fc": 5, "proj": 5}  # (in + out) / n_embd per adapted matrix


@dataclass(frozen=True)
class Accelerator:
    name: str
    peak_flops: float  # dense 16-bit tensor throughput, FLOP/s
    memory_b: int
    source: str


# dense bf16 (fp16 on T4, which has no bf16) tensor-core peaks from the vendors' datasheets, no sparsity
DEVICES: dict[str, Accelerator] = {
    "a100": Accelerator("NVIDIA A100 80GB", 312e12, 80 * 10**9, "A100 datasheet: BF16 312 TFLOPS dense"),
    "h100": Accelerator("NVIDIA H100 SXM", 989e12, 80 * 10**9, "H100 datasheet: BF16 1979 TFLOPS with sparsity, 989 dense"),
    "h200": Accelerator("NVIDIA H200 SXM", 989e12, 141 * 10**9, "H200 datasheet: BF16 1979 TFLOPS with sparsity, 989 dense"),
    "l4": Accelerator("NVIDIA L4", 121e12, 24 * 10**9, "L4 datasheet: BF16 242 TFLOPS with sparsity, 121 dense"),
    "t4": Accelerator("NVIDIA T4", 65e12, 16 * 10**9, "T4 datasheet: FP16 mixed precision 65 TFLOPS (no bf16)"),
}


def check_precision(precision: str) -> int:
    if precision not in BYTES:
        raise ValueError(f"precision must be one of {', '.join(BYTES)}, got {precision!r}")
    return BYTES[precision]


# -- inference ------------------------------------------------------------------------------------

def weight_bytes(params: int, precision: str = "fp32") -> int:
    return int(params) * check_precision(precision)


def kv_cache_bytes(cfg: GPTConfig, batch: int = 1, tokens: int | None = None, precision: str = "fp32") -> int:
    """Keys and values of every layer for ``tokens`` positions (default: the whole window)."""
    tokens = cfg.n_positions if tokens is None else tokens
    return 2 * cfg.n_layer * batch * tokens * cfg.n_embd * check_precision(precision)


# -- training memory ------------------------------------------------------------------------------

def lora_params(cfg: GPTConfig, rank: int, targets: list[str]) -> int:
    """Adapter parameters: rank x (in + out) for each adapted matrix in each layer."""
    bad = [t for t in targets if t not in LORA_WIDTH]
    if bad:
        raise ValueError(f"unknown LoRA target {bad[0]!r}; use {', '.join(LORA_WIDTH)}")
    return cfg.n_layer * rank * cfg.n_embd * sum(LORA_WIDTH[t] for t in targets)


def block_values(lora_targets: list[str] | None = None, fused: bool = False, mixed: bool = False) -> int:
    """Values per token (in n_embd units of the activation dtype) a block keeps: 17, fewer under LoRA
    (``lora_targets``), 10 with ``fused`` (full-weight training), 12 fused under autocast (``mixed``)."""
    if lora_targets is None:
        return (FUSED_MIXED_BLOCK_VALUES if mixed else FUSED_BLOCK_VALUES) if fused else BLOCK_VALUES
    return BLOCK_VALUES - sum(n for used_by, n in FROZEN_INPUTS.values() if not set(used_by) & set(lora_targets))


def block_activation_bytes(cfg: GPTConfig, batch: int, block: int, act_bytes: int = 4,
                           lora_targets: list[str] | None = None) -> int:
    """What one transformer block keeps for backward: block_values x n_embd values per token + the attention LSE."""
    tokens = batch * block
    fused = lora_targets is None  # full-weight training: the fused steps run (fused.usable)
    return tokens * (block_values(lora_targets, fused, act_bytes < 4) * cfg.n_embd * act_bytes + cfg.n_head * 4)


def head_bytes(cfg: GPTConfig, tokens: int, chunked: bool = True) -> int:
    """The head loss's memory at its peak (fp32): one chunk's logits and the hidden states' gradient (``chunked``,
    the trainer's head_loss), or the whole batch's logits, log-softmax and their gradients."""
    if chunked:
        return min(HEAD_CHUNK, tokens) * cfg.vocab_size * 4 + tokens * cfg.n_embd * 4
    return HEAD_COPIES * tokens * cfg.vocab_size * 4


def activation_bytes(cfg: GPTConfig, batch: int, block: int, act_bytes: int = 4,
                     grad_checkpointing: bool = False, lora_targets: list[str] | None = None,
                     chunked_head: bool = True) -> int:
    """Peak activation memory of one micro-batch: what is kept, plus the larger transient at the peak.

    Without checkpointing every block's tensors are kept and the head's working set sits on top. With it,
    only block inputs are kept; backward rebuilds one block at a time, and the head's logits are
    freed before that starts, so the peak holds the larger of the two. ``chunked_head``: the trainer's
    chunked head loss (False: FSDP's full logits).
    """
    tokens = batch * block
    head = head_bytes(cfg, tokens, chunked_head)
    embed = 2 * tokens * cfg.n_embd * 4  # embedding sum and final LayerNorm input
    per_block = block_activation_bytes(cfg, batch, block, act_bytes, lora_targets)
    if grad_checkpointing:
        return cfg.n_layer * tokens * cfg.n_embd * act_bytes + embed + max(head, per_block)
    return cfg.n_layer * per_block + embed + head


@dataclass
class TrainMemory:
    """Bytes per device of one training step.

    ``weights``, ``adam`` and ``ddp_buckets`` live through the whole step, ``weight_copies`` through
    forward and backward; the rest peaks in one of three phases, and ``total`` (what must fit) is the persistent part plus the largest:
    the start of backward (every activation live, only the head's gradient yet; with checkpointing,
    gradients grow while blocks are rebuilt), the end of backward (all gradients, plus two transient
    copies of the tied embedding's gradient, which arrives twice and is summed out of place), and
    the optimizer step (all gradients plus foreach AdamW's temporaries).
    """
    weights: int  # the parameters as stored (fp32 master for trained ones, frozen ones at their dtype)
    weight_copies: int  # 16-bit copies autocast makes of the weights under mixed precision
    grads: int
    adam: int
    activations: int
    ddp_buckets: int  # DDP all-reduces gradients through buckets the size of the gradients
    backward_start: int
    backward_end: int
    optimizer_step: int
    params: int
    trainable: int

    @property
    def persistent(self) -> int:
        return self.weights + self.adam + self.ddp_buckets

    @property
    def total(self) -> int:
        # autocast's 16-bit weight copies live from the forward until backward has used them
        backward = self.weight_copies + max(self.backward_start, self.backward_end)
        return self.persistent + max(backward, self.optimizer_step)

    @property
    def bytes_per_param(self) -> float:
        """The seeds' figure: weights + gradients + Adam per parameter (16 in fp32, 18 mixed)."""
        return (self.weights + self.weight_copies + self.grads + self.adam) / max(1, self.params)

    def to_dict(self) -> dict:
        return {**asdict(self), "persistent": self.persistent, "total": self.total}


def training_memory(cfg: GPTConfig | None, *, params: int | None = None, batch: int = 1, block: int | None = None,
                    mixed: bool = False, trainable: int | None = None, frozen_bytes: int = 4,
                    grad_checkpointing: bool = False, ddp: bool = False, fsdp_shards: int = 1,
                    lora_targets: list[str] | None = None, chunked_head: bool | None = None) -> TrainMemory:
    """Memory per device for one training step.

    ``cfg`` None: a bare parameter count (``params``), no activations. ``mixed``: bf16/fp16 autocast
    over fp32 master weights (activations at 2 bytes). ``trainable``: parameters that get gradients
    and Adam moments (LoRA adapters, which are extra parameters on top of ``params``); None: all.
    ``lora_targets``: the adapted matrices, which decide what frozen layers keep (None: as if all).
    ``fsdp_shards`` > 1: weights, gradients and Adam are split over that many devices, and one
    block's weights are gathered whole at a time. ``chunked_head``: the loss by the trainer's chunks (None: as the
    trainer does, everywhere but FSDP over several devices; False: the full logits).
    """
    n = cfg.n_params() if cfg is not None else int(params or 0)
    lora = trainable is not None
    t = trainable if lora else n
    weights = t * 4 + (n * frozen_bytes if lora else 0)
    copies = n * 2 if mixed and (not lora or frozen_bytes == 4) else 0
    if mixed and not lora and cfg is not None:  # the fused steps' casts are per use (see the module docstring)
        copies = 2 * (cfg.vocab_size * cfg.n_embd + cfg.n_layer * cfg.n_embd**2)
    grads, adam = t * 4, t * ADAM_BYTES
    if fsdp_shards > 1:
        gathered = 12 * cfg.n_embd**2 * 4 if cfg is not None else 0
        weights, grads, adam = weights // fsdp_shards + gathered, grads // fsdp_shards, adam // fsdp_shards
        copies //= fsdp_shards
    acts = head_grad = tied = 0
    if cfg is not None:
        if chunked_head is None:  # as core/train/loop._chunked_head decides
            chunked_head = fsdp_shards <= 1
        acts = activation_bytes(cfg, batch, block or cfg.n_positions, 2 if mixed else 4, grad_checkpointing,
                                lora_targets if lora else None, chunked_head)
        if not lora:
            head_grad = tied = cfg.vocab_size * cfg.n_embd * 4 // max(1, fsdp_shards)
    start = acts + (grads if grad_checkpointing else head_grad)
    step_temp = int(t * ADAM_STEP_TEMP_BYTES) // max(1, fsdp_shards)
    buckets = grads if ddp and fsdp_shards <= 1 else 0
    return TrainMemory(weights, copies, grads, adam, acts, buckets, start, grads + 2 * tied, grads + step_temp, n, t)


# -- compute --------------------------------------------------------------------------------------

def flops_per_token(params: int, cfg: GPTConfig | None = None, block: int | None = None,
                    trainable: int | None = None) -> float:
    """Training FLOPs per token: 6 per parameter (forward 2, backward 4) plus attention's 12 x L x T x d
    (PaLM's accounting, Chowdhery et al. 2022, appendix B); a bare parameter count has no attention term.
    ``trainable`` (LoRA): frozen weights get no weight gradient, so they cost 4, the adapters 6."""
    attn = 12.0 * cfg.n_layer * (block or cfg.n_positions) * cfg.n_embd if cfg is not None else 0.0
    dense = 6.0 * params if trainable is None else 4.0 * params + 6.0 * trainable
    return dense + attn


def compute_optimal_tokens(params: int) -> int:
    return int(CHINCHILLA_TOKENS_PER_PARAM * params)


def petaflop_s_days(flops: float) -> float:
    return flops / (1e15 * 86400)


def seconds_on(flops: float, peak_flops: float, utilisation: float = DEFAULT_UTILISATION) -> float:
    if not 0 < utilisation <= 1:
        raise ValueError(f"utilisation must be in (0, 1], got {utilisation!r}")
    return flops / (peak_flops * utilisation)


def measure_cpu_flops(seconds: float = 1.0, n: int = 1024) -> float:
    """This machine's fp32 matmul throughput, measured live (FLOP/s): an n x n matmul for ``seconds``."""
    import torch  # only here: the formulas above need no torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up: thread pool and kernel selection
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2.0 * n**3 * reps / (time.perf_counter() - t0)


def compute_report(params: int, tokens: int, cfg: GPTConfig | None = None, block: int | None = None,
                   utilisation: float = DEFAULT_UTILISATION, devices: list[str] | None = None,
                   cpu_flops: float | None = None, n_devices: int = 1, trainable: int | None = None) -> dict:
    """Training FLOPs for ``tokens``, the compute-optimal count, and time on each named device
    (``seconds``: on ``n_devices`` of them, scaling perfectly; ``device_hours``: the total)."""
    fpt = flops_per_token(params, cfg, block, trainable)
    flops = fpt * tokens
    optimal = compute_optimal_tokens(params)
    times = {}
    for key in devices if devices is not None else list(DEVICES):
        dev = DEVICES[key]
        times[key] = {"device": dev.name, "peak_flops": dev.peak_flops, "utilisation": utilisation,
                      "seconds": seconds_on(flops, dev.peak_flops, utilisation) / n_devices,
                      "device_hours": seconds_on(flops, dev.peak_flops, utilisation) / 3600, "source": dev.source}
    if cpu_flops:  # measured, so the achieved rate is the peak: utilisation 1 of the measured matmul
        times["cpu"] = {"device": "this machine's CPU (fp32 matmul, measured)", "peak_flops": cpu_flops,
                        "utilisation": 1.0, "seconds": seconds_on(flops, cpu_flops, 1.0),
                        "device_hours": seconds_on(flops, cpu_flops, 1.0) / 3600, "source": "measured live"}
    return {"params": params, "tokens": tokens, "flops_per_token": fpt, "flops": flops,
            "petaflop_s_days": petaflop_s_days(flops), "compute_optimal_tokens": optimal,
            "tokens_vs_optimal": tokens / optimal if optimal else None, "n_devices": n_devices, "time": times}


def inference_memory(cfg: GPTConfig | None, params: int, batch: int = 1) -> dict:
    """Weights in each precision and, with a shape, the KV cache for the full window at ``batch``."""
    out = {"params": params, "batch": batch, "weights": {p: weight_bytes(params, p) for p in BYTES}}
    if cfg is not None:
        out["kv_tokens"] = cfg.n_positions
        out["kv_cache"] = {p: kv_cache_bytes(cfg, batch, None, p) for p in ("fp32", "fp16", "bf16")}
    return out
