"""GPT-2 shapes: the config dataclass, the published presets, and Hugging Face config conversion.

Every value a checkpoint declares is typed and bounded here, before anything is built from it: a
corrupt or hostile config.json or nanoGPT ``model_args`` fails in one line naming the file and field.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields

from gptchat.core.errors import CheckpointError

GPT2_VOCAB = 50257

# The largest shapes accepted: GPT-2's family (at most 48 layers, 25 heads, 1600 wide, 1024 positions,
# 50257 tokens) with a wide margin, so a config claiming 50 million layers is refused at once instead of
# building them. MAX_PARAMS bounds the product (about 13x GPT-2 XL).
LIMITS = {"n_layer": 256, "n_head": 256, "n_embd": 16384, "n_positions": 65536, "vocab_size": 1 << 20}
MAX_PARAMS = 20_000_000_000
ACTIVATIONS = ("gelu_tanh", "gelu", "relu")


@dataclass
class GPTConfig:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_positions: int = 1024  # GPT-2's learned position table: the context window
    vocab_size: int = GPT2_VOCAB  # nanoGPT pads to 50304 for speed; ids >= 50257 are never sampled
    bias: bool = True  # nanoGPT can train without biases in Linear and LayerNorm
    layer_norm_epsilon: float = 1e-5
    activation: str = "gelu_tanh"  # GPT-2's "gelu_new"; "gelu" (exact) and "relu" also load
    scale_attn_by_inverse_layer_idx: bool = False  # a Hugging Face option some checkpoints set
    dropout: float = 0.0  # only used in training

    def __post_init__(self) -> None:
        for name, value in _validate(asdict(self), "GPT-2 config").items():
            setattr(self, name, value)  # 12.0 -> 12: the shapes are ints from here on

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def n_params(self) -> int:
        """Parameters with the lm_head tied to wte (counted once), as GPT-2's sizes are quoted."""
        return _count_params(self.n_layer, self.n_embd, self.n_positions, self.vocab_size, self.bias)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_hf(self) -> dict:
        """A config.json that transformers' GPT2LMHeadModel loads."""
        act = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}[self.activation]
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_embd": self.n_embd,
            "n_positions": self.n_positions,
            "n_ctx": self.n_positions,
            "vocab_size": self.vocab_size,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "activation_function": act,
            "scale_attn_by_inverse_layer_idx": self.scale_attn_by_inverse_layer_idx,
            "bos_token_id": 50256,
            "eos_token_id": 50256,
            "tie_word_embeddings": True,
            "torch_dtype": "float32",
        }

    @classmethod
    def from_hf(cls, cfg: dict, where: str = "config.json") -> "GPTConfig":
        mt = cfg.get("model_type")
        archs = cfg.get("architectures")
        archs = [a for a in archs if isinstance(a, str)] if isinstance(archs, list) else []
        if mt != "gpt2" and not any(a.startswith("GPT2") for a in archs):
            kind = mt if isinstance(mt, str) else (archs[0] if archs else "unknown")
            raise CheckpointError(f"{where} describes a {kind[:40]!r} model, not GPT-2; gptchat runs GPT-2 checkpoints only")
        act = cfg.get("activation_function", "gelu_new")
        acts = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
        if not isinstance(act, str) or act not in acts:
            raise CheckpointError(f"{where}: unsupported activation_function {_show(act)}")
        if cfg.get("add_cross_attention"):
            raise CheckpointError(f"{where}: GPT-2 with cross-attention (an encoder-decoder part) is not supported")
        for key in ("n_layer", "n_head", "n_embd"):
            if key not in cfg:
                raise CheckpointError(f"{where} lacks {key!r}; it is not a GPT-2 config")
        pos_key = "n_positions" if "n_positions" in cfg else "n_ctx"
        n_positions = cfg.get(pos_key, 1024)
        values = dict(
            n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=cfg["n_embd"], n_positions=n_positions,
            vocab_size=cfg.get("vocab_size", GPT2_VOCAB), layer_norm_epsilon=cfg.get("layer_norm_epsilon", 1e-5),
            activation=acts[act],
            scale_attn_by_inverse_layer_idx=cfg.get("scale_attn_by_inverse_layer_idx", False),
        )
        return cls(**_validate(values, where, {"n_positions": pos_key}))

    @classmethod
    def from_nanogpt(cls, args: dict, where: str = "ckpt.pt") -> "GPTConfig":
        if not isinstance(args, dict):
            raise CheckpointError(f"{where}: model_args is {type(args).__name__}, not a mapping of model settings")
        for key in ("n_layer", "n_head", "n_embd"):
            if key not in args:
                raise CheckpointError(f"{where}: model_args lacks {key!r}")
        values = dict(
            n_layer=args["n_layer"], n_head=args["n_head"], n_embd=args["n_embd"],
            n_positions=args.get("block_size", 1024), vocab_size=args.get("vocab_size", GPT2_VOCAB),
            bias=args.get("bias", True),
        )
        return cls(**_validate(values, f"{where}: model_args", {"n_positions": "block_size"}))


def _count_params(n_layer: int, d: int, n_positions: int, vocab_size: int, bias: bool) -> int:
    b = int(bias)
    per_block = 12 * d * d + b * 9 * d + (2 + 2 * b) * d  # weights, biases, two LayerNorms
    return vocab_size * d + n_positions * d + n_layer * per_block + (1 + b) * d


def _show(value) -> str:
    """A value as a config file would spell it, cut short (a hostile value may be megabytes long)."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _whole(value, name: str, where: str, label: str) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"{where}: {label} must be a whole number, not {_show(value)}")
    hi = LIMITS[name]
    if not 1 <= value <= hi:
        raise CheckpointError(f"{where}: {label} is {value}, outside 1..{hi} (GPT-2's sizes with a wide margin)")
    return value


def _flag(value, name: str, where: str) -> bool:
    if value is None or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise CheckpointError(f"{where}: {name} must be true or false, not {_show(value)}")


def _real(value, name: str, where: str, lo: float, hi: float, lo_allowed: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CheckpointError(f"{where}: {name} must be a number, not {_show(value)}")
    if not (lo < value < hi or (lo_allowed and value == lo)):
        raise CheckpointError(f"{where}: {name} is {value}, outside {'[' if lo_allowed else '('}{lo}, {hi})")
    return float(value)


def _validate(values: dict, where: str, labels: dict[str, str] | None = None) -> dict:
    """``values`` (GPTConfig fields) typed and bounded; raises CheckpointError naming ``where`` and the field.

    ``labels``: what the file calls a field, where that is not our name (nanoGPT's block_size).
    """
    out = dict(values)
    for name in LIMITS:
        if name in out:
            out[name] = _whole(out[name], name, where, (labels or {}).get(name, name))
    for name in ("bias", "scale_attn_by_inverse_layer_idx"):
        if name in out:
            out[name] = _flag(out[name], name, where)
    if "layer_norm_epsilon" in out:
        out["layer_norm_epsilon"] = _real(out["layer_norm_epsilon"], "layer_norm_epsilon", where, 0.0, 1.0, False)
    if "dropout" in out:
        out["dropout"] = _real(out["dropout"], "dropout", where, 0.0, 1.0, True)
    if "activation" in out and out["activation"] not in ACTIVATIONS:
        raise CheckpointError(f"{where}: unsupported activation {_show(out['activation'])}")
    if "n_embd" in out and "n_head" in out and out["n_embd"] % out["n_head"]:
        raise CheckpointError(f"{where}: n_embd ({out['n_embd']}) must be divisible by n_head ({out['n_head']})")
    if all(k in out for k in LIMITS):
        n = _count_params(out["n_layer"], out["n_embd"], out["n_positions"], out["vocab_size"], out.get("bias", True))
        if n > MAX_PARAMS:
            raise CheckpointError(f"{where}: these sizes make {n:,} parameters, more than the {MAX_PARAMS:,} gptchat accepts")
    return out


PRESETS: dict[str, GPTConfig] = {
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    "distilgpt2": GPTConfig(n_layer=6, n_head=12, n_embd=768),  # 82M
    # from-scratch sizes for small corpora and tests
    "tiny": GPTConfig(n_layer=4, n_head=4, n_embd=256, n_positions=1024),
    "mini": GPTConfig(n_layer=6, n_head=6, n_embd=384, n_positions=1024),
    "nano": GPTConfig(n_layer=2, n_head=2, n_embd=64, n_positions=1024),  # seconds on a CPU; for tests
}

CONFIG_FIELDS = {f.name for f in fields(GPTConfig)}
