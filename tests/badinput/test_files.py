"""Corrupt and hostile checkpoint files, through the real CLI: one line naming the file and the field.

Each case saves a tiny real GPT-2 (tests/factory.py), breaks one thing in it, and runs
`gptchat generate hi --model BAD -n 2` in-process: exit code 1, exactly one `error: ` line on stderr,
nothing on stdout, no traceback. Pickle payloads must be refused without running, and the refusal must
never suggest torch's `weights_only=False`.
"""

from __future__ import annotations

import json
import os
import pickle
import shlex
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gptchat.core.errors import CheckpointError
from gptchat.core.weights.readers import torch_load
from gptchat.tui.cli.main import main
from tests.factory import hf_model, save

SHAPE = dict(n_layer=1, n_head=2, n_embd=8, n_positions=16)  # n_embd 8: wte is 50257 x 8, 1.6 MB


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return save(hf_model(**SHAPE, seed=3), tmp_path_factory.mktemp("good"))


@pytest.fixture(scope="module")
def good_nanogpt(tmp_path_factory) -> Path:
    return save(hf_model(**SHAPE, seed=4), tmp_path_factory.mktemp("nano"), fmt="nanogpt")


@pytest.fixture(scope="module")
def good_sharded_bin(tmp_path_factory) -> Path:
    return save(hf_model(**SHAPE, seed=5), tmp_path_factory.mktemp("shbin"), fmt="sharded-bin")


def refused(capsys, model, code: int = 1) -> str:
    """Run generate on ``model``; assert one error line, the exit code and no traceback; return the line."""
    with pytest.raises(SystemExit) as ex:
        main(["generate", "hi", "--model", str(model), "-n", "2"])
    out, err = capsys.readouterr()
    assert ex.value.code == code, (ex.value.code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and out == ""
    assert "weights_only" not in err  # never torch's advice to load unsafely
    assert len(lines[0]) < 400, lines[0]  # a hostile value is cut short, not echoed whole
    return lines[0]


def copy(src: Path, tmp_path: Path, name: str = "bad") -> Path:
    return Path(shutil.copytree(src, tmp_path / name))


def with_config(good: Path, tmp_path: Path, name: str = "bad", **changes) -> Path:
    folder = copy(good, tmp_path, name)
    cfg = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is DELETE:
            cfg.pop(k)
        else:
            cfg[k] = v
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


DELETE = object()


# -- config.json --------------------------------------------------------------------------------------

CONFIG_CASES = {
    "n_layer null": ({"n_layer": None}, "n_layer must be a whole number, not null"),
    "n_layer string": ({"n_layer": "12"}, 'n_layer must be a whole number, not "12"'),
    "n_layer bool": ({"n_layer": True}, "n_layer must be a whole number, not true"),
    "n_layer 50 million": ({"n_layer": 50_000_000}, "n_layer is 50000000, outside 1..256"),
    "n_layer huge string": ({"n_layer": "x" * 100_000}, 'n_layer must be a whole number, not "xxx'),
    "n_head zero": ({"n_head": 0}, "n_head is 0, outside"),
    "n_embd not divisible": ({"n_head": 3}, "n_embd (8) must be divisible by n_head (3)"),
    "n_embd fraction": ({"n_embd": 8.5}, "n_embd must be a whole number, not 8.5"),
    "n_embd NaN": ({"n_embd": float("nan")}, "n_embd must be a whole number, not NaN"),
    "vocab_size negative": ({"vocab_size": -5}, "vocab_size is -5, outside"),
    "n_positions huge": ({"n_positions": 10**12}, "n_positions is 1000000000000, outside"),
    "n_positions null": ({"n_positions": None}, "n_positions must be a whole number, not null"),
    "n_ctx only, a string": ({"n_positions": DELETE, "n_ctx": "1024"}, "n_ctx must be a whole number"),
    "layer_norm_epsilon string": ({"layer_norm_epsilon": "tiny"}, 'layer_norm_epsilon must be a number, not "tiny"'),
    "layer_norm_epsilon negative": ({"layer_norm_epsilon": -1}, "layer_norm_epsilon is -1, outside"),
    "activation a list": ({"activation_function": ["gelu"]}, 'unsupported activation_function ["gelu"]'),
    "flag a string": ({"scale_attn_by_inverse_layer_idx": "no"}, "scale_attn_by_inverse_layer_idx must be true or false"),
    "too many parameters": ({"n_layer": 256, "n_head": 128, "n_embd": 16384}, "parameters, more than the"),
    "not GPT-2": ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "describes a 'llama' model, not GPT-2"),
    "architectures not a list": ({"model_type": None, "architectures": 7}, "describes a 'unknown' model"),
    "n_layer missing": ({"n_layer": DELETE}, "lacks 'n_layer'"),
}


@pytest.mark.parametrize("changes,expected", CONFIG_CASES.values(), ids=CONFIG_CASES.keys())
def test_config_value_refused(good, tmp_path, capsys, changes, expected):
    folder = with_config(good, tmp_path, **changes)
    t0 = time.monotonic()
    line = refused(capsys, folder)
    assert str(folder / "config.json") in line and expected in line, line
    assert time.monotonic() - t0 < 60  # 50 M layers used to be built before any check (minutes, 5 GB)


CONFIG_FILES = {
    "a JSON list": (b"[1, 2, 3]", "holds a JSON list, not an object"),
    "not JSON": (b'{"n_layer": 12', "is not valid JSON (line 1"),
    "not UTF-8": (b'{"n_layer": "\xff\xfe"}', "is not UTF-8 text"),
    "nested 100k deep": (b"[" * 100_000 + b"]" * 100_000, "is not a usable model config"),
    "a 5000-digit number": (b'{"n_layer": ' + b"9" * 5000 + b"}", "is not a usable model config"),
}


@pytest.mark.parametrize("content,expected", CONFIG_FILES.values(), ids=CONFIG_FILES.keys())
def test_config_file_refused(good, tmp_path, capsys, content, expected):
    folder = copy(good, tmp_path)
    (folder / "config.json").write_bytes(content)
    line = refused(capsys, folder)
    assert str(folder / "config.json") in line and expected in line, line


def test_config_file_too_large_is_not_read(good, tmp_path, capsys):
    folder = copy(good, tmp_path)
    with open(folder / "config.json", "r+b") as f:
        f.truncate(64 << 20)  # sparse: 64 MB of zeros that are never read
    assert "far too large for a model config" in refused(capsys, folder)


# -- nanoGPT ckpt.pt -------------------------------------------------------------------------------


def nanogpt_with(good_nanogpt: Path, tmp_path: Path, edit) -> Path:
    ck = torch.load(good_nanogpt, weights_only=True)
    edit(ck)
    out = tmp_path / "ckpt.pt"
    torch.save(ck, out)
    return out


NANOGPT_CASES = {
    "n_layer not a number": (lambda ck: ck["model_args"].update(n_layer="abc"), 'model_args: n_layer must be a whole number, not "abc"'),
    "block_size null": (lambda ck: ck["model_args"].update(block_size=None), "model_args: block_size must be a whole number, not null"),
    "bias a string": (lambda ck: ck["model_args"].update(bias="yes"), "model_args: bias must be true or false"),
    "n_embd huge": (lambda ck: ck["model_args"].update(n_embd=10**9), "model_args: n_embd is 1000000000, outside"),
    "n_head missing": (lambda ck: ck["model_args"].pop("n_head"), "model_args lacks 'n_head'"),
    "model_args a list": (lambda ck: ck.update(model_args=[1, 2]), "model_args is list, not a mapping"),
    "model a list": (lambda ck: ck.update(model=[1, 2]), "'model' is list, not a state dict"),
    "model entry not a tensor": (lambda ck: ck["model"].update({"_orig_mod.transformer.wte.weight": 3}), "is not a tensor (int)"),
    "tensor of the wrong shape": (
        lambda ck: ck["model"].update({"_orig_mod.transformer.wpe.weight": torch.zeros(9, 8)}),
        "transformer.wpe.weight has shape (9, 8), but the config implies (16, 8)",
    ),
}


@pytest.mark.parametrize("edit,expected", NANOGPT_CASES.values(), ids=NANOGPT_CASES.keys())
def test_nanogpt_checkpoint_refused(good_nanogpt, tmp_path, capsys, edit, expected):
    path = nanogpt_with(good_nanogpt, tmp_path, edit)
    line = refused(capsys, path)
    assert str(path) in line and expected in line, line


def test_nanogpt_not_a_dict(tmp_path, capsys):
    torch.save([1, 2, 3], tmp_path / "ckpt.pt")
    assert "is not a nanoGPT checkpoint" in refused(capsys, tmp_path / "ckpt.pt")


def test_nanogpt_garbage_is_corrupt(tmp_path, capsys):
    (tmp_path / "ckpt.pt").write_bytes(b"hello, this is not a checkpoint")
    assert "is truncated or corrupt, or not a PyTorch file" in refused(capsys, tmp_path / "ckpt.pt")


# -- safetensors headers ----------------------------------------------------------------------------


def write_st(folder: Path, header, data: bytes = b"", raw: bytes | None = None) -> Path:
    body = raw if raw is not None else json.dumps(header).encode()
    path = folder / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


def st(shape, offsets, dtype="F32") -> dict:
    return {"transformer.wte.weight": {"dtype": dtype, "shape": shape, "data_offsets": offsets}}


HEADER_CASES = {
    "negative shape": (st([-1, 8], [0, 32]), "has shape [-1, 8]: not a list of sizes >= 0"),
    "shape not a list": (st("50257x8", [0, 32]), "not a list of sizes >= 0"),
    "huge shape, matching offsets": (st([2**40, 8], [0, 2**45]), "is truncated or corrupt: 150 bytes, but its header needs 35,184,372,088,950"),
    "huge shape, small offsets": (st([2**31, 2**31], [0, 16]), "bytes, but data_offsets span 16"),
    "no dtype": (st([2, 2], [0, 16], dtype=None), "has dtype 'None', which is not a safetensors dtype"),
    "made-up dtype": (st([2, 2], [0, 16], dtype="F128"), "has dtype 'F128', which is not a safetensors dtype"),
    "offsets reversed": (st([2, 2], [16, 0]), "data_offsets [16, 0]"),
    "entry not an object": ({"transformer.wte.weight": 5}, "has no dtype/shape/data_offsets"),
    "overlapping tensors": (
        {**st([2, 2], [0, 16]), "transformer.wpe.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 24]}},
        "overlaps another tensor's bytes",
    ),
    "header a list": ([1, 2], "its header is not a JSON object"),
    "shape fits file, not config": (st([2, 2], [0, 16]), "tensor transformer.wte.weight has shape [2, 2], but the config implies [50257, 8]"),
    "unknown tensor": ({"transformer.h.7.attn.c_attn.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
                       "unexpected tensor 'transformer.h.7.attn.c_attn.weight'"),
}


@pytest.mark.parametrize("header,expected", HEADER_CASES.values(), ids=HEADER_CASES.keys())
def test_safetensors_header_refused(good, tmp_path, capsys, header, expected):
    folder = copy(good, tmp_path)
    path = write_st(folder, header, data=bytes(32))
    line = refused(capsys, folder)
    assert str(path) in line and expected in line, line


@pytest.mark.parametrize("dtype,size", [("F8_E5M2", 1), ("I64", 8), ("BOOL", 1)])
def test_safetensors_dtype_gptchat_cannot_read(good, tmp_path, capsys, dtype, size):
    folder = copy(good, tmp_path)  # the header is consistent and the shape is right; only the dtype is not
    write_st(folder, st([50257, 8], [0, 50257 * 8 * size], dtype=dtype), data=bytes(50257 * 8 * size))
    assert f"tensor transformer.wte.weight has dtype '{dtype}', which gptchat cannot read" in refused(capsys, folder)


def test_mask_buffers_of_any_dtype_are_skipped_unread(good, tmp_path):
    from gptchat.core.weights.checkpoints import load

    folder = copy(good, tmp_path)
    sd = load_file(folder / "model.safetensors")
    sd["transformer.h.0.attn.bias"] = torch.ones(1, 1, 16, 16, dtype=torch.bool)  # older exports keep the mask
    save_file(sd, str(folder / "model.safetensors"))
    model, _ = load(folder, download=False)
    assert torch.equal(model.transformer.wte.weight, sd["transformer.wte.weight"])


def test_safetensors_header_length_beyond_file(good, tmp_path, capsys):
    folder = copy(good, tmp_path)
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 2**63) + b"{}")
    assert "its header claims 9,223,372,036,854,775,808 bytes" in refused(capsys, folder)


def test_safetensors_header_not_json(good, tmp_path, capsys):
    folder = copy(good, tmp_path)
    write_st(folder, None, raw=b"{not json\xff")
    assert "unreadable header" in refused(capsys, folder)


def test_safetensors_truncated(good, tmp_path, capsys):
    folder = copy(good, tmp_path)
    path = folder / "model.safetensors"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    line = refused(capsys, folder)
    assert str(path) in line and "is truncated" in line


def test_safetensors_shape_differs_from_config(good, tmp_path, capsys):
    folder = with_config(good, tmp_path, n_positions=32)  # the file's wpe has 16 rows
    line = refused(capsys, folder)
    assert "tensor transformer.wpe.weight has shape [16, 8], but the config implies [32, 8]" in line


def test_safetensors_conv1d_shape_checked_in_hf_layout(good, tmp_path, capsys):
    folder = copy(good, tmp_path)
    sd = load_file(folder / "model.safetensors")
    sd["transformer.h.0.attn.c_attn.weight"] = sd["transformer.h.0.attn.c_attn.weight"].t().contiguous()  # [24, 8]
    save_file(sd, str(folder / "model.safetensors"))
    assert "c_attn.weight has shape [24, 8], but the config implies [8, 24]" in refused(capsys, folder)


def test_safetensors_missing_tensor(good, tmp_path, capsys):
    folder = copy(good, tmp_path)
    sd = load_file(folder / "model.safetensors")
    del sd["transformer.ln_f.weight"]
    save_file(sd, str(folder / "model.safetensors"))
    assert "missing 1 tensors (first: transformer.ln_f.weight)" in refused(capsys, folder)


# -- shard indexes -----------------------------------------------------------------------------------


def with_index(good: Path, tmp_path: Path, index, name="model.safetensors.index.json") -> Path:
    folder = copy(good, tmp_path)
    (folder / name).write_text(index if isinstance(index, str) else json.dumps(index))
    return folder


INDEX_CASES = {
    "traversal to /etc/passwd": ({"weight_map": {"transformer.wte.weight": "../../../../etc/passwd"}},
                                 "weight_map names '../../../../etc/passwd', outside the model folder; refused"),
    "traversal with the right suffix": ({"weight_map": {"a": "../other/model.safetensors"}}, "outside the model folder"),
    "absolute path": ({"weight_map": {"a": "/tmp/model.safetensors"}}, "outside the model folder"),
    "hidden file": ({"weight_map": {"a": ".model.safetensors"}}, "outside the model folder"),
    "index a list": ([1, 2], "holds a JSON list, not an object; it is not a shard index"),
    "index not JSON": ("{weight_map", "is not valid JSON"),
    "no weight_map": ({"metadata": {}}, "weight_map must be a non-empty object"),
    "weight_map a list": ({"weight_map": ["model.safetensors"]}, "weight_map must be a non-empty object"),
    "shard name a number": ({"weight_map": {"a": 7}}, "weight_map['a'] is 7, not a shard file name"),
    "shard of the other format": ({"weight_map": {"a": "pytorch_model.bin"}}, "is 'pytorch_model.bin', not a .safetensors file"),
    "shard missing": ({"weight_map": {"a": "model-00002-of-00002.safetensors"}}, "shard model-00002-of-00002.safetensors"),
}


@pytest.mark.parametrize("index,expected", INDEX_CASES.values(), ids=INDEX_CASES.keys())
def test_shard_index_refused(good, tmp_path, capsys, index, expected):
    folder = with_index(good, tmp_path, index)
    line = refused(capsys, folder)
    assert "model.safetensors.index.json" in line and expected in line, line


def test_bin_shard_index_traversal(good, tmp_path, capsys):
    folder = with_index(good, tmp_path, {"weight_map": {"a": "../../pytorch_model.bin"}}, "pytorch_model.bin.index.json")
    assert "outside the model folder; refused" in refused(capsys, folder)


# -- pickle payloads ----------------------------------------------------------------------------------


class Payload:
    """Unpickling this runs a shell command that creates ``marker``: the proof a loader ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def test_payload_really_runs_when_unpickled_unsafely(tmp_path):
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker)))  # the control: what every loader below must never do
    assert marker.exists()


def _evil_nanogpt(folder: Path, marker: Path, **save_kw) -> Path:
    ck = {"model_args": {"n_layer": 1, "n_head": 2, "n_embd": 8}, "model": {"w": Payload(marker)}}
    torch.save(ck, folder / "ckpt.pt", **save_kw)
    return folder / "ckpt.pt"


def _raw_pickle(folder: Path, marker: Path) -> Path:
    (folder / "ckpt.pt").write_bytes(pickle.dumps({"model_args": {}, "model": Payload(marker)}))
    return folder / "ckpt.pt"


def _evil_bin(folder: Path, marker: Path, good: Path) -> Path:
    for f in ("config.json", "vocab.json", "merges.txt"):
        shutil.copy(good / f, folder / f)
    torch.save({"transformer.wte.weight": torch.zeros(2), "x": Payload(marker)}, folder / "pytorch_model.bin")
    return folder


PICKLES = {  # what the refusal names: the function the payload calls, or the opcode torch stopped at
    "ckpt.pt": (lambda folder, marker, good: _evil_nanogpt(folder, marker), "it references posix.system"),
    "ckpt.pt, legacy format": (
        lambda folder, marker, good: _evil_nanogpt(folder, marker, _use_new_zipfile_serialization=False),
        "it references posix.system",
    ),
    "ckpt.pt, a bare pickle": (lambda folder, marker, good: _raw_pickle(folder, marker), "Unsupported operand"),
    "pytorch_model.bin": (_evil_bin, "it references posix.system"),
}


@pytest.mark.parametrize("make,reason", PICKLES.values(), ids=PICKLES.keys())
def test_pickle_payload_refused_and_not_run(good, tmp_path, capsys, make, reason):
    marker = tmp_path / "ran"
    target = make(tmp_path, marker, good)
    line = refused(capsys, target)
    assert "contains code or objects, which gptchat never unpickles" in line and reason in line, line
    assert not marker.exists()


def test_sharded_bin_payload_refused_and_not_run(good_sharded_bin, tmp_path, capsys):
    folder = copy(good_sharded_bin, tmp_path)
    marker = tmp_path / "ran"
    torch.save({"transformer.ln_f.weight": Payload(marker)}, folder / "pytorch_model-00002-of-00002.bin")
    line = refused(capsys, folder)
    assert "pytorch_model-00002-of-00002.bin contains code or objects, which gptchat never unpickles" in line
    assert not marker.exists()


def test_trainer_state_payload_refused_and_not_run(tmp_path):
    """trainer.pt (optimizer, RNG, data position) goes through the same loader on resume."""
    marker = tmp_path / "ran"
    torch.save({"step": 3, "rng": Payload(marker)}, tmp_path / "trainer.pt")
    with pytest.raises(CheckpointError) as e:
        torch_load(tmp_path / "trainer.pt")
    assert "never unpickles" in str(e.value) and "weights_only" not in str(e.value)
    assert "\n" not in str(e.value) and not marker.exists()


# -- `gptchat models` over a folder of bad checkpoints ----------------------------------------------


def test_models_listing_survives_bad_folders(good, good_nanogpt, tmp_path, capsys, monkeypatch):
    shutil.copytree(good, tmp_path / "fine")
    with_config(good, tmp_path, "nulls", n_layer=None)
    with_config(good, tmp_path, "huge", n_layer=50_000_000)
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "config.json").write_bytes(b"\xff\x00not json")
    (tmp_path / "evil").mkdir()
    _evil_nanogpt(tmp_path / "evil", tmp_path / "ran")
    (tmp_path / "args").mkdir()
    nanogpt_with(good_nanogpt, tmp_path / "args", lambda ck: ck["model_args"].update(n_layer=None))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as ex:
        main(["models", "--json"])
    out, err = capsys.readouterr()
    assert ex.value.code == 0 and "Traceback" not in err, err
    assert [m["name"] for m in json.loads(out)] == ["fine"]
    assert not (tmp_path / "ran").exists()
