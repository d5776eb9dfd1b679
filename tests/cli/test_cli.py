"""`gptchat` end to end in subprocesses, on tiny random checkpoints: output, JSON, and every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.factory import hf_model, save

pytestmark = pytest.mark.slow  # each case starts a Python that imports torch


def run(*args, stdin: str | None = None, env: dict | None = None, cwd=None):
    full_env = {**os.environ, **(env or {})}
    full_env.pop("GPTCHAT_DEBUG", None) if not (env and "GPTCHAT_DEBUG" in env) else None
    return subprocess.run([sys.executable, "-m", "gptchat.tui", *map(str, args)], input=stdin,
                          capture_output=True, text=True, env=full_env, timeout=180, cwd=cwd)


def one_line_error(r, code=1):
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save(hf_model(n_layer=2, n_head=4, n_embd=64, n_positions=128, seed=21), tmp_path_factory.mktemp("tiny"))


def test_generate_streams_text(tiny):
    r = run("generate", "Ganymede is a moon of", "--model", tiny, "--max-new-tokens", "12", "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip()) > 0
    again = run("generate", "Ganymede is a moon of", "--model", tiny, "--max-new-tokens", "12", "--seed", "3")
    assert again.stdout == r.stdout  # same seed, same text


def test_generate_json_from_stdin_matches_library(tiny):
    r = run("generate", "-", "--model", tiny, "--greedy", "--json", "-n", "15", stdin="The capital of France is\n")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)  # one JSON object and nothing else on stdout
    assert out["prompt"] == "The capital of France is"
    assert out["finish_reason"] in ("length", "eos")
    assert out["format"] == "hf-safetensors" and out["device"] == "cpu" and out["dtype"] == "fp32"
    assert out["sampling"]["greedy"] is True

    from gptchat.core.generate.loaded import open_model
    from gptchat.core.generate.sampling import SamplingParams
    from gptchat.core.generate.text import GenOptions, complete

    lm = open_model(str(tiny))
    ref = complete(lm.engine, lm.tokenizer, lm.tokenizer.encode(out["prompt"]),
                   GenOptions(SamplingParams(greedy=True), max_new_tokens=15))
    assert out["completion"] == ref.text and out["completion_tokens"] == ref.completion_tokens


def test_nanogpt_checkpoint_and_stop(tmp_path):
    ck = save(hf_model(seed=4), tmp_path / "nano", "nanogpt")
    r = run("generate", "Hello", "--model", ck, "--greedy", "--json", "-n", "20")
    assert r.returncode == 0, r.stderr
    text = json.loads(r.stdout)["completion"]
    stop = text[5:8]
    r2 = run("generate", "Hello", "--model", ck, "--greedy", "--json", "-n", "20", "--stop", stop)
    out = json.loads(r2.stdout)
    assert out["completion"] == text[: text.find(stop)] and out["finish_reason"] == "stop"


def test_bert_directory_is_refused(tmp_path):
    d = tmp_path / "bert"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"],
                                               "hidden_size": 64}))
    from safetensors.torch import save_file

    save_file({"embeddings.word_embeddings.weight": torch.zeros(10, 4)}, str(d / "model.safetensors"))
    line = one_line_error(run("generate", "hi", "--model", d))
    assert "bert" in line and "not GPT-2" in line


@pytest.mark.parametrize("fmt,fname", [("safetensors", "model.safetensors"), ("bin", "pytorch_model.bin")])
def test_truncated_weights_are_refused(tmp_path, fmt, fname):
    d = save(hf_model(seed=5), tmp_path / "m", fmt)
    data = (d / fname).read_bytes()
    (d / fname).write_bytes(data[: len(data) // 2])
    line = one_line_error(run("generate", "hi", "--model", d))
    assert "truncated or corrupt" in line and fname in line


def test_pickled_code_is_never_run(tmp_path):
    ck = tmp_path / "ckpt.pt"
    torch.save({"model_args": {"n_layer": 1}, "model": {}, "evil": Path("/etc")}, ck)
    line = one_line_error(run("generate", "hi", "--model", ck))
    assert "never unpickles" in line


def test_missing_path_and_unknown_hub_name(tmp_path):
    line = one_line_error(run("generate", "hi", "--model", tmp_path / "nope"))
    assert "does not exist" in line
    line = one_line_error(run("generate", "hi", "--model", "gpt2-medium"))
    assert "gptchat pull gpt2-medium" in line and "HF_HUB_OFFLINE" in line


def test_bad_options_exit_2(tiny):
    line = one_line_error(run("generate", "hi", "--model", tiny, "--temperature", "-1"), code=2)
    assert "temperature" in line
    line = one_line_error(run("generate", "", "--model", tiny), code=2)
    assert "empty" in line
    line = one_line_error(run("generate", "hi", "--model", tiny, "--device", "cuda"))
    assert "CUDA is not available" in line


def test_prompt_longer_than_window(tiny):
    line = one_line_error(run("generate", "word " * 300, "--model", tiny))
    assert "window is 128" in line


def test_debug_shows_traceback(tmp_path):
    r = run("generate", "hi", "--model", tmp_path / "nope", env={"GPTCHAT_DEBUG": "1"})
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_models_lists_hf_cache_and_local_folders(tmp_path, tiny):
    hf_home = Path(os.environ["HF_HOME"])
    snap = hf_home / "hub" / "models--openai-community--gpt2" / "snapshots" / "abc123"
    save(hf_model(seed=7), snap)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("abc123")
    work = tmp_path / "work"
    save(hf_model(seed=8), work / "my-gpt2-dir")
    save(hf_model(seed=9), work / "nano", "nanogpt")
    (work / "not-a-model").mkdir()
    r = run("models", "--json", cwd=work)
    assert r.returncode == 0, r.stderr
    found = {m["name"]: m for m in json.loads(r.stdout)}
    assert set(found) == {"gpt2", "my-gpt2-dir", "nano"}
    assert found["gpt2"]["source"] == "hf-cache" and found["nano"]["format"] == "nanogpt"
    assert found["my-gpt2-dir"]["params"] == sum(p.numel() for p in hf_model(seed=8).parameters())
    table = run("models", cwd=work)
    assert "my-gpt2-dir" in table.stdout and "hf-safetensors" in table.stdout
    # the hub name now resolves from the cache, offline
    r = run("generate", "hi", "--model", "gpt2", "-n", "3", "--json", cwd=work)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["path"] == str(snap)


def test_pull_offline_fails_fast():
    line = one_line_error(run("pull", "gpt2"))
    # pull is the download: its advice is to run it again online, not "run `gptchat pull gpt2`" (itself)
    assert "HF_HUB_OFFLINE is set" in line and "run this again with the network up" in line and "pull gpt2" not in line
    line = one_line_error(run("pull", "./some/path"), code=2)


def test_pull_unreachable_hub_fails_fast():
    import time

    t0 = time.time()
    r = run("pull", "gpt2", env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"})
    line = one_line_error(r)
    assert "cannot be reached" in line and time.time() - t0 < 30


def test_paths_follow_gptchat_home(tmp_path):
    r = run("paths", "--json", env={"GPTCHAT_HOME": str(tmp_path / "h")})
    d = json.loads(r.stdout)
    assert d["history"].startswith(str(tmp_path / "h")) and d["datasets"].startswith(str(tmp_path / "h"))
