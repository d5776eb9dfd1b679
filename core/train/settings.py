"""What a run was asked to do, checked, and completed with defaults that fit the model and the data.

``Settings`` holds the user's choices (None = decide for me); ``resolve`` turns them into concrete
numbers once the model size and data size are known. The resolved settings are stored in the run's
``run.json`` and are what ``--resume`` uses.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields

from gptchat.core.errors import UsageError

LORA_TARGETS = ("q", "k", "v", "o", "fc", "proj")  # attn q/k/v parts of c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass
class Settings:
    data: list[str] = field(default_factory=list)
    model: str | None = None  # base checkpoint spec; None = gpt2 (or --arch with from_scratch)
    from_scratch: bool = False
    arch: str | None = None  # a preset name for from_scratch
    steps: int | None = None
    epochs: float | None = None
    lr: float | None = None
    min_lr_ratio: float = 0.1
    warmup: int | None = None
    weight_decay: float | None = None
    batch_size: int | None = None  # per device, per micro-step
    grad_accum: int | None = None
    block_size: int | None = None
    val_fraction: float = 0.1
    eval_every: int | None = None
    eval_batches: int = 8  # micro-batches in the fixed validation window
    save_every: int | None = None  # default: every eval
    save_minutes: float = 10.0  # also save when this long has passed since the last save; 0 = by steps only
    patience: int | None = None  # evals without a better val loss before stopping
    format: str = "text"
    template: str | None = None
    lora: bool = False
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: str = "q,k,v"
    compile: bool = False
    grad_checkpointing: bool = False
    fsdp: bool = False
    device: str | None = None
    dtype: str | None = None
    seed: int = 1337
    clip: float = 1.0
    dropout: float = 0.0
    sample_tokens: int = 32  # tokens generated per probe prompt at each eval; 0 = no samples
    name: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Settings":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def check(self) -> None:
        """Reject bad values before anything is loaded."""
        def pos(name, v, allow_zero=False):
            if v is not None and (v < 0 or (v == 0 and not allow_zero)):
                raise UsageError(f"--{name.replace('_', '-')} must be {'>= 0' if allow_zero else '> 0'}, not {v}")

        for n in ("steps", "epochs", "lr", "batch_size", "grad_accum", "block_size", "eval_every", "save_every",
                  "patience", "lora_rank", "lora_alpha", "eval_batches"):
            pos(n, getattr(self, n))
        pos("warmup", self.warmup, allow_zero=True)
        pos("weight_decay", self.weight_decay, allow_zero=True)
        pos("sample_tokens", self.sample_tokens, allow_zero=True)
        pos("save_minutes", self.save_minutes, allow_zero=True)
        if self.steps is not None and self.epochs is not None:
            raise UsageError("pass --steps or --epochs, not both")
        if not 0 < self.val_fraction < 1:
            raise UsageError(f"--val-fraction must be between 0 and 1 (exclusive), not {self.val_fraction}")
        if self.block_size is not None and self.block_size > 1024:
            raise UsageError(f"--block-size {self.block_size} is over GPT-2's 1024 positions")
        if self.lr is not None and self.lr >= 1:
            raise UsageError(f"--lr {self.lr} is far too large; typical values are 1e-5 to 1e-3")
        if not 0 <= self.dropout < 1:
            raise UsageError(f"dropout must be in [0, 1), not {self.dropout}")
        if self.format not in ("text", "jsonl"):
            raise UsageError(f"--format must be text or jsonl, not {self.format!r}")
        if self.template is not None and self.format != "jsonl":
            raise UsageError("--template needs --format jsonl (prompt/completion pairs)")
        if self.from_scratch and self.model is not None:
            raise UsageError("--from-scratch trains new weights; use --arch for its shape, not --model")
        if self.arch is not None and not self.from_scratch:
            raise UsageError("--arch picks the shape for --from-scratch; to finetune a model use --model")
        if self.arch is not None:
            from gptchat.core.model.config import PRESETS

            if self.arch not in PRESETS:
                raise UsageError(f"unknown --arch {self.arch!r}; choose one of {', '.join(PRESETS)}")
        if self.lora and self.from_scratch:
            raise UsageError("--lora adapts a pretrained model; it makes no sense with --from-scratch")
        if self.lora:
            targets = [t.strip() for t in self.lora_targets.split(",") if t.strip()]
            bad = [t for t in targets if t not in LORA_TARGETS]
            if bad or not targets:
                raise UsageError(
                    f"--lora-targets: unknown {', '.join(bad) or '(empty)'}; use a comma list of {', '.join(LORA_TARGETS)}"
                )
        if self.name is not None and not NAME_RE.match(self.name):
            raise UsageError(f"--name {self.name!r}: use letters, digits, '.', '_' and '-' (at most 64)")


@dataclass
class Resolved:
    """Concrete numbers for a run (stored in run.json)."""

    block_size: int
    batch_size: int
    grad_accum: int
    world: int
    steps: int
    lr: float
    min_lr: float
    warmup: int
    weight_decay: float
    eval_every: int
    save_every: int
    tokens_per_step: int
    n_chunks: int  # training windows per epoch

    def to_dict(self) -> dict:
        return asdict(self)


def default_block(n_positions: int, n_tokens: int, val_fraction: float) -> int:
    """The model's window, made smaller (power of two, >= 32) until the data holds >= 8 windows."""
    block = min(n_positions, 1024)
    while block > 32 and n_tokens * (1 - val_fraction) < 8 * (block + 1):
        block //= 2
    return block


def default_lr(n_params: int, from_scratch: bool, lora: bool, n_tokens: int) -> float:
    if lora:
        return 3e-4
    if from_scratch:
        return 1e-3 if n_params < 50e6 else 6e-4 if n_params < 200e6 else 3e-4
    # finetuning: smaller for larger models and for small corpora (less to learn, easy to overfit)
    lr = 6e-5 if n_params < 200e6 else 3e-5 if n_params < 500e6 else 2e-5
    return lr / 2 if n_tokens < 200_000 else lr


def default_epochs(from_scratch: bool, n_tokens: int) -> float:
    if from_scratch:
        return 20.0 if n_tokens < 1_000_000 else 5.0 if n_tokens < 20_000_000 else 1.0
    return 3.0 if n_tokens < 1_000_000 else 2.0 if n_tokens < 10_000_000 else 1.0


def resolve(s: Settings, *, n_positions: int, n_params: int, n_tokens: int, world: int, device_type: str) -> Resolved:
    block = s.block_size or default_block(n_positions, n_tokens, s.val_fraction)
    if block > n_positions:
        raise UsageError(f"--block-size {block} is larger than the model's {n_positions} positions")
    batch = s.batch_size or (8 if device_type == "cuda" else 4)
    accum = s.grad_accum or 1
    train_tokens = int(n_tokens * (1 - s.val_fraction))
    n_chunks = max(1, (train_tokens - 1) // block)
    per_step = batch * accum * world
    if s.steps is not None:
        steps = s.steps
    else:
        epochs = s.epochs if s.epochs is not None else default_epochs(s.from_scratch, n_tokens)
        steps = max(1, math.ceil(epochs * n_chunks / per_step))
        if s.epochs is None:
            steps = min(steps, 20_000)
    lr = s.lr or default_lr(n_params, s.from_scratch, s.lora, n_tokens)
    warmup = s.warmup if s.warmup is not None else min(200, max(0, steps // 20))
    wd = s.weight_decay if s.weight_decay is not None else (0.0 if s.lora else 0.1 if s.from_scratch else 0.01)
    eval_every = s.eval_every or max(1, min(250, steps // 10))
    save_every = s.save_every or eval_every
    return Resolved(block, batch, accum, world, steps, lr, lr * s.min_lr_ratio, min(warmup, steps), wd,
                    eval_every, save_every, per_step * block, n_chunks)


def lr_at(step: int, r: Resolved) -> float:
    """Linear warmup to ``lr``, then cosine down to ``min_lr`` at the last step."""
    if r.warmup and step < r.warmup:
        return r.lr * (step + 1) / r.warmup
    span = max(1, r.steps - r.warmup)
    t = min(1.0, (step - r.warmup) / span)
    return r.min_lr + 0.5 * (1 + math.cos(math.pi * t)) * (r.lr - r.min_lr)
