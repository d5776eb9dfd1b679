"""GPT-2 shapes: the config dataclass, the published presets, and Hugging Face config conversion."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from gptchat.core.errors import CheckpointError

GPT2_VOCAB = 50257


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
        if min(self.n_layer, self.n_head, self.n_embd, self.n_positions, self.vocab_size) <= 0:
            raise CheckpointError(f"invalid GPT-2 shape {self}")
        if self.n_embd % self.n_head:
            raise CheckpointError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.activation not in ("gelu_tanh", "gelu", "relu"):
            raise CheckpointError(f"unsupported activation {self.activation!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def n_params(self) -> int:
        """Parameters with the lm_head tied to wte (counted once), as GPT-2's sizes are quoted."""
        d, L, b = self.n_embd, self.n_layer, int(self.bias)
        per_block = 12 * d * d + b * 9 * d + (2 + 2 * b) * d  # weights, biases, two LayerNorms
        return self.vocab_size * d + self.n_positions * d + L * per_block + (1 + b) * d

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
        archs = cfg.get("architectures") or []
        if mt != "gpt2" and not any(a.startswith("GPT2") for a in archs):
            kind = mt or (archs[0] if archs else "unknown")
            raise CheckpointError(f"{where} describes a {kind!r} model, not GPT-2; gptchat runs GPT-2 checkpoints only")
        act = cfg.get("activation_function", "gelu_new")
        acts = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
        if act not in acts:
            raise CheckpointError(f"{where}: unsupported activation_function {act!r}")
        if cfg.get("add_cross_attention"):
            raise CheckpointError(f"{where}: GPT-2 with cross-attention (an encoder-decoder part) is not supported")
        try:
            return cls(
                n_layer=int(cfg["n_layer"]),
                n_head=int(cfg["n_head"]),
                n_embd=int(cfg["n_embd"]),
                n_positions=int(cfg.get("n_positions", cfg.get("n_ctx", 1024))),
                vocab_size=int(cfg.get("vocab_size", GPT2_VOCAB)),
                layer_norm_epsilon=float(cfg.get("layer_norm_epsilon", 1e-5)),
                activation=acts[act],
                scale_attn_by_inverse_layer_idx=bool(cfg.get("scale_attn_by_inverse_layer_idx", False)),
            )
        except KeyError as e:
            raise CheckpointError(f"{where} lacks {e.args[0]!r}; it is not a GPT-2 config") from None

    @classmethod
    def from_nanogpt(cls, args: dict, where: str = "ckpt.pt") -> "GPTConfig":
        try:
            return cls(
                n_layer=int(args["n_layer"]),
                n_head=int(args["n_head"]),
                n_embd=int(args["n_embd"]),
                n_positions=int(args.get("block_size", 1024)),
                vocab_size=int(args.get("vocab_size", GPT2_VOCAB)),
                bias=bool(args.get("bias", True)),
            )
        except KeyError as e:
            raise CheckpointError(f"{where}: model_args lacks {e.args[0]!r}") from None


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
