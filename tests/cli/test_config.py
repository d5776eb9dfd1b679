"""config.toml: the user's defaults for the model, device, dtype and sampling, under every flag; a bad file is one
line naming the file and the key, never half applied."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from tests.factory import hf_model, save


def cli(*args) -> tuple[int, str, str]:
    """`gptchat ARGS` through its real entry point, in this process."""
    from gptchat.tui.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return code, out.getvalue(), err.getvalue()


def write_config(text: str):
    from gptchat.core.paths import get_paths

    path = get_paths().config_file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return [save(hf_model(n_layer=1, n_head=2, n_embd=32, n_positions=64, seed=s), root / f"m{s}") for s in (1, 2)]


def test_the_config_model_device_and_sampling_are_the_defaults_and_a_flag_wins(two, tmp_path):
    a, b = two
    write_config(f'model = "{a}"\ndevice = "cpu"\n[sampling]\ntemperature = 0.5\ntop_k = 7\nmax_new_tokens = 3\n')
    code, out, err = cli("generate", "hello", "--json", "--seed", "1")
    got = json.loads(out)
    assert code == 0, err
    assert got["path"] == str(a) and got["device"] == "cpu"
    assert (got["sampling"]["temperature"], got["sampling"]["top_k"], got["completion_tokens"]) == (0.5, 7, 3)
    code, out, err = cli("generate", "hello", "--json", "--seed", "1", "-m", b, "--temperature", "0.9", "-n", "2")
    got = json.loads(out)
    assert code == 0, err
    assert (got["path"], got["sampling"]["temperature"], got["sampling"]["top_k"]) == (str(b), 0.9, 7)
    # a template's own [options] are tuned to its task: they sit above the config (few-shot sets temperature 0.3)
    code, out, err = cli("generate", "up", "--json", "--seed", "1", "-t", "few-shot")
    assert code == 0, err
    assert json.loads(out)["sampling"]["temperature"] == 0.3
    # every command that runs a model takes the config's when none is named
    held = tmp_path / "held.txt"
    held.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    code, out, err = cli("eval", held, "--json")
    assert code == 0, err
    assert [r["model"] for r in json.loads(out)["results"]] == [str(a)]
    from gptchat.core.session.pool import ModelPool

    assert ModelPool().load(None).spec == str(a)  # the chat app, with no model remembered


@pytest.mark.parametrize("text, message", [
    ('model = "x"\ncolour = "red"\n', "unknown key 'colour'; the keys are model, device, dtype"),
    ('device = "gpu"\n', "device = 'gpu': use auto, cpu, cuda, cuda:N or mps"),
    ('dtype = "fp64"\n', "dtype = 'fp64': use auto, fp32, fp16, bf16"),
    ('model = 5\n', "model = 5: use a checkpoint folder"),
    ('[sampling]\ntemperature = -1\n', "key sampling.temperature: temperature must be a number >= 0"),
    ('[sampling]\nheat = 1\n', "unknown key sampling.'heat'"),
    ('sampling = 3\n', "sampling must be a table"),
    ('model = "x\n', "not valid TOML"),
])
def test_a_bad_config_is_one_line_naming_the_file_and_the_key(text, message, two):
    path = write_config(text)
    code, out, err = cli("generate", "hello", "-m", two[0], "-n", "2")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {path}: ") and message in lines[0], err
    assert out == ""
    assert cli("paths")[0] == 0  # where the file is can still be asked
    code, _, err = cli("chat")  # refused before the app opens (inside the app it is said, then ignored)
    assert code == 2 and err.strip().splitlines() == lines, err


def test_a_config_device_the_machine_lacks_is_named_as_the_configs(two):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    path = write_config('device = "cuda"\n')
    code, _, err = cli("generate", "hello", "-m", two[0], "-n", "2")
    assert code == 1 and f"error: {path}: device = 'cuda': CUDA is not available" in err, err
    code, _, err = cli("generate", "hello", "-m", two[0], "-n", "2", "--device", "cpu")  # the flag wins
    assert code == 0, err
