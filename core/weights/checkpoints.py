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

from gptchat.core.config import default_model
from gptchat.core.model.config import GPTConfig
from gptchat.core.errors import CheckpointError, ModelNotFound
from gptchat.core.weights.readers import (
    ST_DTYPES, ST_NAMES, TensorEntry, read_json_object, read_safetensors, safetensors_header, torch_load,
)

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

    spec = str(spec or default_model())  # no model named: config.toml's, else gpt2
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
    raw = read_json_object(folder / "config.json", "model config")
    cfg = GPTConfig.from_hf(raw, where=str(folder / "config.json"))
    for index in INDEX_FILES:
        if (folder / index).is_file():
            return Checkpoint(folder, "hf-sharded", name, cfg, folder, _shard_files(folder / index))
    for fname, fmt in (("model.safetensors", "hf-safetensors"), ("pytorch_model.bin", "hf-bin")):
        if (folder / fname).is_file():
            if (folder / "gptchat.json").is_file():
                fmt = "gptchat"
            return Checkpoint(folder, fmt, name, cfg, folder, [folder / fname])
    raise CheckpointError(f"{folder} has a config.json but no model.safetensors or pytorch_model.bin")


def _shard_files(index: Path) -> list[Path]:
    """The shards a weight_map names: bare file names of the index's own format, in the model folder."""
    weight_map = read_json_object(index, "shard index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: weight_map must be a non-empty object of tensor name -> shard file")
    ext = ".safetensors" if index.name.startswith("model.safetensors") else ".bin"
    for key, shard in weight_map.items():
        if not isinstance(shard, str):
            raise CheckpointError(f"{index}: weight_map[{key[:60]!r}] is {str(shard)[:60]}, not a shard file name")
        # a shard lives beside its index: no folders, no "..", no absolute paths (the index is not trusted)
        if Path(shard).name != shard or "\\" in shard or shard.startswith("."):
            raise CheckpointError(f"{index}: weight_map names {shard[:80]!r}, outside the model folder; refused")
        if not shard.endswith(ext):
            raise CheckpointError(f"{index}: weight_map[{key[:60]!r}] is {shard[:60]!r}, not a {ext} file")
    files = [index.parent / f for f in sorted(set(weight_map.values()))]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{index.parent}: shard {missing[0]} named in {index.name} is missing")
    return files


def _sniff_nanogpt(path: Path, name: str) -> Checkpoint:
    ck = torch_load(path)
    if not isinstance(ck, dict) or "model_args" not in ck or "model" not in ck:
        raise CheckpointError(f"{path} is not a nanoGPT checkpoint (expected 'model_args' and 'model')")
    if not isinstance(ck["model"], dict):
        raise CheckpointError(f"{path}: 'model' is {type(ck['model']).__name__}, not a state dict of tensors")
    cfg = GPTConfig.from_nanogpt(ck["model_args"], where=str(path))
    if (path.parent / "meta.pkl").exists() and cfg.vocab_size < 50257:
        raise CheckpointError(f"{path} uses a character vocabulary (meta.pkl); gptchat needs GPT-2's BPE vocabulary")
    return Checkpoint(path, "nanogpt", name, cfg, path.parent, [path], _payload=ck)


# -- reading weights ----------------------------------------------------------------------------


def _our_key(key: str) -> str | None:
    """A checkpoint's tensor name as ours (prefixes fixed), or None for a causal-mask buffer (not a weight)."""
    for prefix in ("_orig_mod.", "module."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    if key.endswith(IGNORED_SUFFIXES):
        return None
    return key if key.startswith(("transformer.", "lm_head.")) else "transformer." + key


def expected_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a GPT-2 of ``cfg`` holds, under our names and [out, in] shapes (built on meta: no memory)."""
    import torch

    from gptchat.core.model.gpt import GPT

    with skip_init(), torch.device("meta"):
        return {k: tuple(v.shape) for k, v in GPT(cfg).state_dict().items()}


def skip_init():
    """A context in which ``torch.nn.init`` functions leave their tensor as it is.

    Building a model on the meta device still runs each module's initialisation, and ``normal_`` has
    no meta kernel: it falls back to a Python decomposition whose first use imports torch._dynamo
    (about as long as importing torch itself; most of a 124M load). Weights built on meta are replaced,
    never initialised. Thread-local, like every torch function mode: other threads initialise as usual.
    """
    from torch.overrides import TorchFunctionMode

    class _SkipInit(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__module__", None) == "torch.nn.init":
                return args[0] if args else (kwargs or {}).get("tensor")
            return func(*args, **(kwargs or {}))

    return _SkipInit()


def _checked_headers(ck: Checkpoint) -> dict[Path, tuple[int, list[TensorEntry]]]:
    """The safetensors headers of ``ck``, each tensor's name and shape checked against the config.

    Runs before any tensor is allocated: a header declaring a shape the config does not imply (a
    negative, huge or merely wrong one), an unknown or repeated tensor, or (when every file is
    safetensors) a missing one, fails here. Mask buffers are left out, so they are never read.
    """
    expected = expected_shapes(ck.config)
    out: dict[Path, tuple[int, list[TensorEntry]]] = {}
    seen: set[str] = set()
    for f in ck.files:
        if f.suffix != ".safetensors":
            continue
        base, entries = safetensors_header(f)
        keep = []
        for e in entries:
            key = _our_key(e.key)
            if key is None:
                continue
            if key not in expected:
                raise CheckpointError(f"{f}: unexpected tensor {e.key[:80]!r}; this is not a GPT-2 checkpoint")
            if e.dtype not in ST_DTYPES:
                raise CheckpointError(f"{f}: tensor {e.key} has dtype {e.dtype!r}, which gptchat cannot read (F32, F16, BF16, F64)")
            want = expected[key][::-1] if key.endswith(CONV1D) else expected[key]  # HF's Conv1D: [in, out]
            if e.shape != want:
                raise CheckpointError(f"{f}: tensor {e.key} has shape {list(e.shape)}, but the config implies {list(want)}")
            if key in seen:
                raise CheckpointError(f"{f}: tensor {e.key} appears twice in the checkpoint")
            seen.add(key)
            keep.append(e)
        out[f] = (base, keep)
    missing = [k for k in expected if k not in seen and k != "lm_head.weight"]
    if len(out) == len(ck.files) and missing:
        raise CheckpointError(f"{ck.path}: missing {len(missing)} tensors (first: {missing[0]}); the file is incomplete")
    return out


def _read_bin(path: Path):
    sd = torch_load(path)
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    return _tensor_items(path, sd, "entry")


def _tensor_items(path: Path, sd: dict, what: str):
    """(name, tensor) pairs of a loaded dict; anything that is not a named tensor is refused."""
    import torch

    for key, t in sd.items():
        if not isinstance(key, str) or not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{path}: {what} {str(key)[:60]!r} is not a tensor ({type(t).__name__})")
        yield key, t


def iter_tensors(ck: Checkpoint, mapped: bool = True):
    """(our parameter name, tensor) pairs: prefixes fixed, Conv1D weights transposed, buffers dropped.

    safetensors headers are checked against the config before the first tensor is read; pickled
    files (.bin, ckpt.pt) are memory-mapped, so their tensors cost nothing until GPT.from_state_dict
    has checked each one's shape. ``mapped=False`` reads each safetensors tensor into a buffer of its
    own instead of mapping the file: for a caller that converts every tensor and drops it (int8 at
    load), whose peak memory would otherwise count every page of the file it touched.
    """
    if ck.format == "nanogpt":
        payload = ck._payload if ck._payload is not None else torch_load(ck.path)
        raw = _nanogpt_tensors(ck.path, payload)
        conv1d = False
    else:
        headers = _checked_headers(ck)
        raw = (kv for f in ck.files
               for kv in (read_safetensors(f, *headers[f], mapped=mapped) if f in headers else _read_bin(f)))
        conv1d = True
    for key, t in raw:
        key = _our_key(key)
        if key is None:
            continue
        if conv1d and key.endswith(CONV1D) and t.dim() == 2:
            t = t.t()
        yield key, t


def _nanogpt_tensors(path: Path, payload):
    model = payload.get("model") if isinstance(payload, dict) else None
    if not isinstance(model, dict):
        raise CheckpointError(f"{path}: 'model' is not a state dict of tensors")
    return _tensor_items(path, model, "model entry")


def load_model(ck: Checkpoint, device=None, dtype=None, inference_layout: bool = False):
    """Build the GPT on the meta device and fill it from the checkpoint; returns it in eval mode.

    ``inference_layout`` stores 2-D weights as [in, out] in memory (see GPT.to_inference_layout):
    HF's Conv1D weights already are, so they are used as read, with no copy.
    """
    import torch

    from gptchat.core.model.gpt import GPT

    with skip_init():  # GPT.from_state_dict builds the model on meta before filling it
        return GPT.from_state_dict(ck.config, iter_tensors(ck), device=torch.device(device or "cpu"),
                                   dtype=dtype or torch.float32, inference_layout=inference_layout,
                                   source=str(ck.path))


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

    from gptchat.core.text.tokenizer import find_vocab_files

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".model.safetensors.tmp"
    write_safetensors(tmp, hf_state_dict(model), {"format": "pt"})
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
    elif tokenizer_folder and (Path(tokenizer_folder) / "tokenizer.json").is_file():
        # a base saved by transformers 5 carries only tokenizer.json: keep its vocabulary with the model
        shutil.copyfile(Path(tokenizer_folder) / "tokenizer.json", folder / ".tokenizer.tmp")
        os.replace(folder / ".tokenizer.tmp", folder / "tokenizer.json")
    if provenance is not None:
        _write_json(folder / "gptchat.json", provenance)
    return folder


_WRITE_CHUNK = 16 << 20


def write_safetensors(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    """``tensors`` (name -> CPU tensor) as a safetensors file at ``path``, in file order as given.

    The bytes go out in writes of 16 MB at 16 MB offsets (through one buffer) rather than one write a
    tensor: Linux (6.x, ext4/xfs) caches a file in folios as large as the writes that made it, and a
    file cached in 2 MB folios is mapped in 2 MB pages when a model is loaded from it (readers.py), which
    batch-1 decode streams ~1.05x faster (a 124M fp32 step, one process, Zen 4; see hugepages.py).
    safetensors' own save_file wrote the same file in small folios."""
    import itertools
    import struct

    import torch

    header: dict = {"__metadata__": {k: str(v) for k, v in metadata.items()}} if metadata else {}
    at = 0
    for key, t in tensors.items():
        n = t.numel() * t.element_size()
        header[key] = {"dtype": ST_NAMES[str(t.dtype).removeprefix("torch.")], "shape": list(t.shape), "data_offsets": [at, at + n]}
        at += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-aligned, as safetensors writes it
    pieces = itertools.chain([memoryview(struct.pack("<Q", len(raw)) + raw)],
                             (memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
                              for t in tensors.values()))
    buf, fill = bytearray(_WRITE_CHUNK), 0
    with open(path, "wb", buffering=0) as f:
        for view in pieces:
            while len(view):
                k = min(len(view), _WRITE_CHUNK - fill)
                buf[fill:fill + k] = view[:k]
                fill, view = fill + k, view[k:]
                if fill == _WRITE_CHUNK:
                    _write_all(f, memoryview(buf))
                    fill = 0
        _write_all(f, memoryview(buf)[:fill])


def _write_all(f, view: memoryview) -> None:
    while len(view):
        view = view[f.write(view):]


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
