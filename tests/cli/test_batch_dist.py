"""`gptchat batch` under torchrun: two CPU processes (gloo) give the same file as one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.factory import hf_model, save

ROOT = Path(__file__).parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gptchat() -> str:
    exe = Path(sys.executable).parent / "gptchat"
    if not exe.exists():
        pytest.skip("the gptchat console script is not installed next to this Python")
    return str(exe)


def _records(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        rec.pop("timings")
        out.append(rec)
    return out


@pytest.mark.slow
def test_two_process_torchrun_equals_one_process(tmp_path):
    model = save(hf_model(seed=31), tmp_path / "m")
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"Prompt {i} " * (1 + i % 4)}) + "\n"
                           for i in range(9)))
    common = ["batch", str(src), "-m", str(model), "-n", "5", "--seed", "4", "--batch-size", "3"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    one = tmp_path / "one.jsonl"
    subprocess.run([_gptchat(), *common, "-o", str(one)], env=env, check=True, capture_output=True, timeout=120)
    two = tmp_path / "two.jsonl"
    run = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "--no-python",
           _gptchat(), *common, "-o", str(two), "--json"]
    r = subprocess.run(run, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])  # rank 0 speaks for both ranks
    assert (summary["done"], summary["world"]) == (9, 2)
    a, b = _records(one), _records(two)
    assert [x["id"] for x in b] == [f"r{i}" for i in range(9)]  # merged in input order
    assert a == b
    assert summary["tokens"] == sum(x["completion_tokens"] + (x["finish_reason"] == "eos") for x in b)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "one.jsonl", "rows.jsonl", "two.jsonl"]  # parts gone
    ranks = [json.loads(line)["timings"]["rank"] for line in two.read_text().splitlines()]
    assert ranks == [i % 2 for i in range(9)]  # row i ran on rank i % 2
