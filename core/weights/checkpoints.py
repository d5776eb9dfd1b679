"""Find, sniff, load and save GPT-2 checkpoints.

Formats: Hugging Face folders (safetensors, pytorch_model.bin, sharded with an index; keys with or
without ``transformer.``), nanoGPT ``ckpt.pt``, gptchat's own finetune output (an HF folder plus
gptchat.json), and hub names resolved through the local HF cache. Loading is safe (safetensors or
``torch.load(weights_only=True)``) and builds the model on the meta device, so weights are
materialised once, already in the target dtype and device.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from gptchat.core.model.config import GPTConfig
from gptchat.core.errors import CheckpointError, ModelNotFound

# Hugging Face stores these as Conv1D, i.e. [in, out]: transposed relative to nn.Linear. Matched by
# name because attn.c_proj is square and a shape check cannot tell.
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # HF/nanoGPT causal-mask buffers, not weights
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass
class Checkpoint:
    """A checkpoint found on disk: what it is and where, before any weights are read."""

    path: Path  # the folder (HF) or the file (nanoGPT)
    format: str  # hf-safetensors | hf-bin | hf-sharded | nanogpt | gptchat
    name: str  # what the user called it
    config: GPTConfig
    folder: Path  # where tokenizer files would be
    files: list[Path] = field(default_factory=list)
    # a nanoGPT file is unpickled once, when sniffed; loading reuses it (memory-mapped, not read twice)
    _payload: dict | None = field(default=None, repr=False, compare=False)

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files if f.exists())


# -- finding ------------------------------------------------------------------------------------


def resolve(spec: str | os.PathLike | None, *, download: bool = True) -> Checkpoint:
    """A path, a finetune run or registered model name, or a hub name -> a Checkpoint."""
    from gptchat.core.weights import hub
    from gptchat.core.paths import get_paths

    spec = str(spec or "gpt2")
    p = Path(spec).expanduser()
    if p.exists():
        return sniff(p, name=spec)
    paths = get_paths()
    for root in (paths.models, paths.runs):
        cand = root / spec
        if cand.is_dir():
            return sniff(_run_output(cand), name=spec)
    if hub.looks_like_repo_id(spec):
        snap = hub.cached_snapshot(spec)
        if snap is None and download:
            snap = hub.download(spec)
        if snap is not None:
            return sniff(snap, name=spec)
        raise ModelNotFound(f"{spec} is not in the local Hugging Face cache; run `gptchat pull {spec}`")
    if os.sep in spec or spec.startswith((".", "~")):
        raise ModelNotFound(f"{spec} does not exist; pass a checkpoint folder or a nanoGPT ckpt.pt")
    raise ModelNotFound(
        f"no model {spec!r}: not a path, a finetune run or a hub name; `gptchat models` lists what is here"
    )


def _run_output(run: Path) -> Path:
    """A finetune run folder holds best/ and last/ checkpoints; chat with best by default."""
    for sub in ("best", "last", "final"):
        if (run / sub / "config.json").is_file() and (run / sub / "DONE").exists():
            return run / sub
    if (run / "config.json").is_file():
        return run
    raise CheckpointError(f"{run} holds no finished checkpoint yet (no best/ or last/ with a DONE marker)")


def sniff(path: Path, name: str | None = None) -> Checkpoint:
    """Decide what a path holds without reading any weights."""
    path = Path(path)
    name = name or str(path)
    if path.is_file():
        if path.suffix in (".pt", ".pth", ".ckpt"):
            return _sniff_nanogpt(path, name)
        if path.name in WEIGHT_FILES or path.name in INDEX_FILES or path.name == "config.json":
            return sniff(path.parent, name)
        raise CheckpointError(f"{path} is not a checkpoint gptchat knows (a model folder or a nanoGPT ckpt.pt)")
    if not path.is_dir():
        raise ModelNotFound(f"{path} does not exist")
    if (path / "config.json").is_file():
        return _sniff_hf(path, name)
    if (path / "ckpt.pt").is_file():
        return _sniff_nanogpt(path / "ckpt.pt", name)
    raise CheckpointError(f"{path} holds no config.json or ckpt.pt; it is not a GPT-2 checkpoint folder")


def _sniff_hf(folder: Path, name: str) -> Checkpoint:
    try:
        raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder / 'config.json'} is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{folder / 'config.json'} is not a model config")
    cfg = GPTConfig.from_hf(raw, where=str(folder / "config.json"))
    for index in INDEX_FILES:
        if (folder / index).is_file():
            try:
                weight_map = json.loads((folder / index).read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError):
                raise CheckpointError(f"{folder / index} is not a valid shard index") from None
            files = [folder / f for f in sorted(set(weight_map.values()))]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{folder}: shard {missing[0]} named in {index} is missing")
            return Checkpoint(folder, "hf-sharded", name, cfg, folder, files)
    for fname, fmt in (("model.safetensors", "hf-safetensors"), ("pytorch_model.bin", "hf-bin")):
        if (folder / fname).is_file():
            if (folder / "gptchat.json").is_file():
                fmt = "gptchat"
            return Checkpoint(folder, fmt, name, cfg, folder, [folder / fname])
    raise CheckpointError(f"{folder} has a config.json but no model.safetensors or pytorch_model.bin")


def _torch_load(path: Path):
    import pickle

    import torch

    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # files from before torch 1.6's zip format cannot be memory-mapped
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsafe content"
        raise CheckpointError(
            f"{path} holds objects other than tensors and plain data, which gptchat never unpickles ({first[:120]})"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path} is truncated or corrupt: {str(e).splitlines()[0][:160]}") from None


def _sniff_nanogpt(path: Path, name: str) -> Checkpoint:
    ck = _torch_load(path)
    if not isinstance(ck, dict) or "model_args" not in ck or "model" not in ck:
        raise CheckpointError(f"{path} is not a nanoGPT checkpoint (expected 'model_args' and 'model')")
    cfg = GPTConfig.from_nanogpt(ck["model_args"], where=str(path))
    if (path.parent / "meta.pkl").exists() and cfg.vocab_size < 50257:
        raise CheckpointError(f"{path} uses a character vocabulary (meta.pkl); gptchat needs GPT-2's BPE vocabulary")
    return Checkpoint(path, "nanogpt", name, cfg, path.parent, [path], _payload=ck)


# -- reading weights ----------------------------------------------------------------------------


_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def _read_safetensors(path: Path):
    """Tensors of a .safetensors file, each read straight into its own buffer.

    Reading with readinto instead of memory-mapping keeps the file's pages out of our resident
    memory, so peak memory while loading is the model plus one tensor, not the model twice.
    """
    import struct

    import torch

    try:
        size = path.stat().st_size
        with open(path, "rb", buffering=0) as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path} is truncated or corrupt: no header")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100_000_000):
                raise CheckpointError(f"{path} is truncated or corrupt: bad header length")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise CheckpointError(f"{path} is truncated or corrupt: unreadable header") from None
            header.pop("__metadata__", None)
            base = 8 + n
            ends = [int(v["data_offsets"][1]) for v in header.values()]
            if ends and base + max(ends) > size:
                raise CheckpointError(
                    f"{path} is truncated or corrupt: {size} bytes, but its header needs {base + max(ends)}"
                )
            for key, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                if info["dtype"] not in _ST_DTYPES:
                    raise CheckpointError(f"{path}: tensor {key} has unsupported dtype {info['dtype']}")
                begin, end = (int(x) for x in info["data_offsets"])
                t = torch.empty(info["shape"], dtype=getattr(torch, _ST_DTYPES[info["dtype"]]))
                if t.numel() * t.element_size() != end - begin:
                    raise CheckpointError(f"{path}: tensor {key} has the wrong byte size")
                f.seek(base + begin)
                view = memoryview(t.view(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
                got = f.readinto(view) if t.numel() else 0
                if got != end - begin:
                    raise CheckpointError(f"{path} is truncated or corrupt while reading {key}")
                yield key, t
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path} is truncated or corrupt: malformed header ({e})") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


def _read_file(path: Path):
    if path.suffix == ".safetensors":
        yield from _read_safetensors(path)
        return
    sd = _torch_load(path)
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    yield from sd.items()


def iter_tensors(ck: Checkpoint):
    """(our parameter name, tensor) pairs: prefixes fixed, Conv1D weights transposed, buffers dropped."""
    if ck.format == "nanogpt":
        raw = (ck._payload or _torch_load(ck.path))["model"].items()
        conv1d = False
    else:
        raw = (kv for f in ck.files for kv in _read_file(f))
        conv1d = True
    for key, t in raw:
        for prefix in ("_orig_mod.", "module."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        if key.endswith(IGNORED_SUFFIXES):
            continue
        if not (key.startswith("transformer.") or key.startswith("lm_head.")):
            key = "transformer." + key
        if conv1d and key.endswith(CONV1D) and t.dim() == 2:
            t = t.t()
        yield key, t


def load_model(ck: Checkpoint, device=None, dtype=None, inference_layout: bool = False):
    """Build the GPT on the meta device and fill it from the checkpoint; returns it in eval mode.

    ``inference_layout`` stores 2-D weights as [in, out] in memory (see GPT.to_inference_layout):
    HF's Conv1D weights already are, so they are used as read, with no copy.
    """
    import torch

    from gptchat.core.model.gpt import GPT

    device = torch.device(device or "cpu")
    dtype = dtype or torch.float32
    with torch.device("meta"):
        model = GPT(ck.config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    sd: dict[str, torch.Tensor] = {}
    for key, t in iter_tensors(ck):
        if key == "lm_head.weight":
            sd[key] = t  # tied to wte; compared below, not loaded twice
            continue
        if key not in expected:
            raise CheckpointError(f"{ck.path}: unexpected tensor {key!r}; this is not a GPT-2 checkpoint")
        if tuple(t.shape) != tuple(expected[key]):
            raise CheckpointError(
                f"{ck.path}: {key} has shape {tuple(t.shape)}, but the config implies {tuple(expected[key])}"
            )
        t = t.to(device=device, dtype=dtype)
        if inference_layout and t.dim() == 2 and key != "transformer.wpe.weight":
            if t.is_contiguous():
                t = t.t().contiguous().t()  # [out, in] -> [in, out] in memory, same shape
        else:
            t = t.contiguous()
        sd[key] = t
    head = sd.pop("lm_head.weight", None)
    missing = [k for k in expected if k not in sd and k != "lm_head.weight"]
    if missing:
        raise CheckpointError(f"{ck.path}: missing {len(missing)} tensors (first: {missing[0]}); the file is incomplete")
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    model.load_state_dict(sd, strict=True, assign=True)
    model.lm_head.weight = model.transformer.wte.weight  # assign=True replaced the Parameter: re-tie
    if head is not None and head.shape == sd["transformer.wte.weight"].shape:
        # a few exports carry an untied head; gptchat's GPT-2 is always tied, so say so rather than guess
        if not torch.equal(head.to(device=device, dtype=dtype), model.lm_head.weight.detach()):
            raise CheckpointError(f"{ck.path}: lm_head.weight differs from wte; untied GPT-2 heads are not supported")
    return model.eval()


def load(spec, device=None, dtype=None, download: bool = True, inference_layout: bool = False):
    """resolve + load_model: (model, checkpoint)."""
    ck = resolve(spec, download=download)
    return load_model(ck, device=device, dtype=dtype, inference_layout=inference_layout), ck


# -- saving ---------------------------------------------------------------------------------------


def hf_state_dict(model) -> dict:
    """Our weights under Hugging Face names and layouts (Conv1D transposed back, no tied head)."""
    out = {}
    for key, t in model.state_dict().items():
        if key == "lm_head.weight":
            continue
        t = t.detach().cpu()
        if key.endswith(CONV1D):
            t = t.t()
        out[key] = t.contiguous()
    return out


def save_hf(model, folder: Path, tokenizer_folder: Path | None = None, provenance: dict | None = None) -> Path:
    """Write a folder transformers' ``GPT2LMHeadModel.from_pretrained`` loads: config, weights, vocab.

    Files are written under temporary names and moved into place, so a crash never leaves a
    half-written model.safetensors behind.
    """
    import shutil

    from safetensors.torch import save_file

    from gptchat.core.text.tokenizer import find_vocab_files

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".model.safetensors.tmp"
    save_file(hf_state_dict(model), str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / "model.safetensors")
    _write_json(folder / "config.json", model.config.to_hf())
    found = find_vocab_files(tokenizer_folder) if tokenizer_folder else None
    if found:
        vocab, merges = found
        shutil.copyfile(vocab, folder / ".vocab.tmp")
        os.replace(folder / ".vocab.tmp", folder / "vocab.json")
        if merges:
            shutil.copyfile(merges, folder / ".merges.tmp")
            os.replace(folder / ".merges.tmp", folder / "merges.txt")
    if provenance is not None:
        _write_json(folder / "gptchat.json", provenance)
    return folder


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
