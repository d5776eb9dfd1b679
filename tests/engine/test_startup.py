"""Start-up: what `gptchat generate` imports and builds before its first token, and the start-up bench.

Speed itself is shown by `python -m gptchat.core.bench.startup`; these tests pin the causes: nothing heavy
imported on the way (torch._dynamo, transformers, textual, rich), safetensors weights used from the
mapped file without a copy, and the bench's own plumbing.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptchat.core.weights.checkpoints import sniff
from gptchat.core.weights.readers import read_safetensors, safetensors_header
from tests.factory import hf_model, save

# `gptchat generate` run in a fresh process; prints the modules it ended up importing.
GENERATE_THEN_LIST_MODULES = """
import json, sys
from gptchat.tui.cli.main import main
try:
    main(["generate", "Hello there", "--model", sys.argv[1], "--max-new-tokens", "2", "--greedy"])
except SystemExit as e:
    assert not e.code, e.code
print(json.dumps(sorted(sys.modules)))
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save(hf_model(n_layer=2, n_head=4, n_embd=64, n_positions=128, seed=3), tmp_path_factory.mktemp("tiny"))


def _modules_after_generate(model: Path) -> set[str]:
    r = subprocess.run([sys.executable, "-c", GENERATE_THEN_LIST_MODULES, str(model)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return set(json.loads(r.stdout.strip().splitlines()[-1]))


@pytest.mark.slow  # a fresh process per format (imports torch)
@pytest.mark.parametrize("fmt", ["safetensors", "bin", "nanogpt"])
def test_generate_imports_nothing_it_does_not_need(tmp_path, fmt):
    # torch._dynamo: building the model on the meta device ran nn.init.normal_, whose meta fallback
    # imports torch._dynamo (~1 s, most of a 124M load); transformers/textual: never on this path.
    model = save(hf_model(n_layer=1, n_head=2, n_embd=32, n_positions=64, seed=1), tmp_path / fmt, fmt=fmt)
    mods = _modules_after_generate(model)
    assert "torch" in mods  # it did run the model
    for heavy in ("torch._dynamo", "transformers", "textual", "sympy"):
        assert heavy not in mods, f"`gptchat generate` imported {heavy}"


def _mapping_of(ptr: int) -> str:
    """The file (or '' for anonymous memory) backing address ``ptr`` in this process (Linux)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if lo <= ptr < hi:
            return parts[5] if len(parts) > 5 else ""
    return ""


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps")
def test_safetensors_weights_are_used_from_the_mapped_file_without_a_copy(tiny):
    from gptchat.core.generate.engine import Engine

    engine = Engine.load(str(tiny))
    model = engine.model
    weights = str((tiny / "model.safetensors").resolve())
    # HF's Conv1D weights are stored [in, out]: the inference layout, so they are the file's bytes themselves
    for w in (model.transformer.h[0].attn.c_attn.weight, model.transformer.h[1].mlp.c_proj.weight):
        assert _mapping_of(w.data_ptr()) == weights
    assert _mapping_of(model.transformer.ln_f.weight.data_ptr()) == weights
    # the tied head: read by rows from the file's [vocab, embd] where the C step runs it, else one [in, out] copy
    from gptchat.core.model import native

    on_file = _mapping_of(model.transformer.wte.weight.data_ptr()) == weights
    assert on_file == (native.kernel() is not None)


def test_mapped_tensors_equal_read_ones_and_writes_never_reach_the_file(tiny):
    path = tiny / "model.safetensors"
    before = path.read_bytes()
    base, entries = safetensors_header(path)
    mapped = dict(read_safetensors(path, base, entries))
    read = dict(read_safetensors(path, base, entries, mapped=False))
    assert mapped.keys() == read.keys()
    for k in read:
        assert torch.equal(mapped[k], read[k]), k
    mapped["transformer.h.0.attn.c_attn.weight"].add_(1.0)  # copy-on-write: the process's own page
    del mapped
    assert path.read_bytes() == before


def _safetensors_misaligned(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A valid safetensors file whose data section starts 2 bytes off a 4-byte boundary."""
    header, data, pos = {}, b"", 0
    for k, t in tensors.items():
        raw = t.contiguous().numpy().tobytes()
        header[k] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [pos, pos + len(raw)]}
        data, pos = data + raw, pos + len(raw)
    text = json.dumps(header).encode()
    text += b" " * ((2 - (8 + len(text))) % 4)  # pad so that 8 + len(header) = 2 (mod 4)
    assert (8 + len(text)) % 4 == 2
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def test_misaligned_tensors_are_read_not_mapped(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.float32)}
    path = tmp_path / "model.safetensors"
    _safetensors_misaligned(path, tensors)
    base, entries = safetensors_header(path)
    got = dict(read_safetensors(path, base, entries))
    for k, t in tensors.items():
        assert torch.equal(got[k], t), k
        if Path("/proc/self/maps").exists():
            assert _mapping_of(got[k].data_ptr()) != str(path.resolve())  # read into a buffer of its own


def test_a_checkpoint_whose_tensors_are_misaligned_still_loads(tiny, tmp_path):
    from safetensors.torch import load_file

    from gptchat.core.weights.checkpoints import load_model

    folder = tmp_path / "odd"
    folder.mkdir()
    for name in ("config.json", "vocab.json", "merges.txt"):
        (folder / name).write_bytes((tiny / name).read_bytes())
    _safetensors_misaligned(folder / "model.safetensors", load_file(str(tiny / "model.safetensors")))
    a, b = load_model(sniff(tiny)), load_model(sniff(folder))
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), k


@pytest.mark.slow
def test_startup_bench_runs_and_breaks_the_time_down(tiny):
    from gptchat.core.bench import startup

    r = startup.run(tiny, rounds=1)
    d = r.to_dict()
    assert set(d["breakdown"]) == set(startup.STEPS)
    assert all(v >= 0 for v in d["breakdown"].values())
    assert 0 < r.help_s and 0 < r.torch_s and 0 < r.first_token_s
    assert r.breakdown["import_torch"] > 0 and r.breakdown["weights"] > 0
    text = startup.format_startup(r)
    assert "first token" in text and "import_torch" in text
    json.dumps(d)  # plain data all through


def test_skip_init_skips_only_initialisation_and_only_in_its_own_thread():
    import threading

    from gptchat.core.weights.checkpoints import skip_init

    inside, release = threading.Event(), threading.Event()
    skipped = torch.zeros(64)

    def load_elsewhere():
        with skip_init():
            torch.nn.init.normal_(skipped)
            skipped.add_(0.5)  # other torch functions still run
            inside.set()
            release.wait(30)

    t = threading.Thread(target=load_elsewhere)
    t.start()
    try:
        assert inside.wait(30)
        here = torch.zeros(64)
        torch.nn.init.normal_(here)  # a training thread initialising LoRA weights meanwhile
        assert here.abs().sum() > 0
    finally:
        release.set()
        t.join()
    assert torch.equal(skipped, torch.full((64,), 0.5))


def test_a_command_runs_from_an_app_of_that_command_alone_with_the_same_help():
    from typer.main import get_command
    from typer.testing import CliRunner

    from gptchat.tui.cli import main as cli

    runner = CliRunner()
    for name in cli.COMMANDS:
        one = cli._app_for([name, "--help"])
        assert one is not cli.app and list(get_command(one).commands) == [name]
        slim, whole = runner.invoke(one, [name, "--help"]), runner.invoke(cli.app, [name, "--help"])
        assert slim.exit_code == whole.exit_code == 0 and slim.output == whole.output, name
    for args in ([], ["--help"], ["templates", "list"], ["generat", "x"], ["--model", "gpt2"]):
        assert cli._app_for(args) is cli.app  # the whole app: its help, a sub-app, a misspelt command, the callback
