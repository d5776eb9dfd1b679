"""`gptchat batch` end to end on tiny random-weight checkpoints: inputs, outputs, grids, resume, bad rows.

The CLI runs in-process through ``cli.main`` (the same error handling as the console script); the
kill-and-resume test runs the real entry point in a subprocess. References are computed one prompt
at a time with ``textgen.complete`` (itself checked against transformers in test_parity.py).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.factory import hf_model, save

PROMPTS = ["Hello there", "The capital of France is", "", "Once upon a time", "1, 2, 3,", "A" * 40, "x"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save(hf_model(seed=11), tmp_path_factory.mktemp("tiny-a"))


@pytest.fixture(scope="module")
def tiny_b(tmp_path_factory) -> Path:
    return save(hf_model(seed=12), tmp_path_factory.mktemp("tiny-b"))


@pytest.fixture(scope="module")
def lm(tiny):
    from gptchat.core.generate.loaded import open_model

    return open_model(str(tiny), device="cpu")


def cli(capfd, *args, stdin: bytes | None = None, monkeypatch=None):
    """Run `gptchat ARGS` in-process; (exit code, stdout, stderr)."""
    from gptchat.tui.cli import main as cli_mod

    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    code = 0
    try:
        cli_mod.main([str(a) for a in args])
    except SystemExit as e:
        code = e.code or 0
    out, err = capfd.readouterr()
    return code, out, err


def records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def strip_timings(recs):
    return [{k: v for k, v in r.items() if k != "timings"} for r in recs]


def one_at_a_time(lm, prompt: str, n: int, seed: int, greedy: bool, stop=()) -> dict:
    from gptchat.core.generate.sampling import SamplingParams
    from gptchat.core.generate.text import GenOptions, complete

    params = SamplingParams(temperature=0.8, top_k=40, greedy=greedy)
    return complete(lm.engine, lm.tokenizer, lm.tokenizer.encode(prompt), GenOptions(params, n, seed, tuple(stop)))


def test_row_seed_is_sha256_of_base_and_id():
    from gptchat.core.batch.jobs import row_seed

    want = int.from_bytes(hashlib.sha256(b"7:q-12").digest()[:8], "big") & (2**63 - 1)
    assert row_seed(7, "q-12") == want
    assert row_seed(7, "q-12") != row_seed(8, "q-12") != row_seed(7, "q-13")


def test_txt_input_greedy_equals_one_at_a_time(tmp_path, tiny, lm, capfd):
    src = tmp_path / "prompts.txt"
    src.write_text("\n".join(PROMPTS) + "\n")
    code, out, err = cli(capfd, "batch", src, "--model", tiny, "--greedy", "-n", "7", "--stop", "ing",
                         "--batch-size", "4")
    assert code == 0, err
    recs = records(out)
    lines = [i + 1 for i, p in enumerate(PROMPTS) if p]  # blank line 3 is not a prompt
    assert sorted(int(r["id"]) for r in recs) == lines
    for r in recs:
        prompt = PROMPTS[int(r["id"]) - 1]
        ref = one_at_a_time(lm, prompt, 7, r["seed"], greedy=True, stop=("ing",))
        assert (r["completion"], r["finish_reason"], r["completion_tokens"]) == (
            ref.text, ref.finish_reason, ref.completion_tokens), prompt
        assert r["prompt"] == prompt and r["prompt_tokens"] == len(lm.tokenizer.encode(prompt))
        assert r["model"] == str(tiny) and r["template"] is None and r["sampling"]["greedy"] is True
        assert set(r["timings"]) == {"prefill_s", "decode_s", "batch_size", "rank"}
    assert "batch: 6 results" in err


def test_sampled_rows_do_not_depend_on_batching_and_file_is_in_input_order(tmp_path, tiny, lm, capfd):
    src = tmp_path / "prompts.txt"
    src.write_text("\n".join(p for p in PROMPTS if p) + "\n")
    outs = []
    for bs in ("1", "3", "16"):
        out = tmp_path / f"out-{bs}.jsonl"
        code, _, err = cli(capfd, "batch", src, "-m", tiny, "-n", "6", "--seed", "5", "--batch-size", bs, "-o", out)
        assert code == 0, err
        outs.append(records(out.read_text()))
    assert strip_timings(outs[0]) == strip_timings(outs[1]) == strip_timings(outs[2])
    assert [r["id"] for r in outs[0]] == [str(i) for i in range(1, 7)]
    for r in outs[0][:3]:  # a sampled row equals running it alone with its derived seed
        from gptchat.core.batch.jobs import row_seed

        assert r["seed"] == row_seed(5, r["id"])
        ref = one_at_a_time(lm, r["prompt"], 6, r["seed"], greedy=False)
        assert r["completion"] == ref.text


def test_jsonl_rows_template_examples_and_overrides(tmp_path, tiny, lm, capfd):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps(r) for r in [
        {"id": "q1", "question": "What is the tallest mountain?"},
        {"id": "q2", "prompt": "Who painted the Mona Lisa?", "max_new_tokens": 3, "greedy": True},
        {"question": "Name a prime number.", "temperature": 0, "stop": "\n"},
    ]) + "\n")
    ex = tmp_path / "ex.jsonl"
    ex.write_text("\n".join(json.dumps({"id": f"e{i}", "question": f"Q{i}?", "answer": f"A{i}."}) for i in range(4)))
    out = tmp_path / "out.jsonl"
    code, stdout, err = cli(capfd, "batch", rows, "-m", tiny, "-t", "few-shot-qa", "--shots", "2", "--examples", ex,
                            "-o", out, "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["done"] == 3 and summary["bad"] == [] and summary["output"] == str(out)
    recs = {r["id"]: r for r in records(out.read_text())}
    assert list(recs) == ["q1", "q2", "3"]  # an id-less row is keyed by its line number
    for r in recs.values():
        assert r["template"] == "few-shot-qa" and r["shots"] == 2 and len(r["examples"]) == 2
        assert set(r["examples"]) <= {"e0", "e1", "e2", "e3"}
        assert r["stop"][-2:] == ["\nQ:", "\n\n"]  # the template's stops
    assert recs["q1"]["sampling"]["temperature"] == 0.3  # the template's option
    assert recs["q1"]["max_new_tokens"] == 48 and recs["q2"]["max_new_tokens"] == 3
    assert recs["q2"]["sampling"]["greedy"] is True and recs["q2"]["completion_tokens"] <= 3
    assert recs["3"]["sampling"]["temperature"] == 0.0 and recs["3"]["stop"][0] == "\n"
    # the rendered prompt is the one `generate --template` would build: same examples, same ids
    from gptchat.core.prompting.templates import Budget, get_template, load_examples, render

    tpl = get_template("few-shot-qa")
    q2 = recs["q2"]
    r = render(tpl, {"question": "Who painted the Mona Lisa?"}, None, lm.tokenizer, Budget(lm.engine.n_ctx, 3),
               examples=load_examples(ex, tpl.example_fields), shots=2, seed=q2["seed"])
    assert r.example_ids == q2["examples"] and len(r.ids) == q2["prompt_tokens"]
    from gptchat.core.generate.sampling import SamplingParams
    from gptchat.core.generate.text import GenOptions, complete

    ref = complete(lm.engine, lm.tokenizer, r.ids, GenOptions(SamplingParams(greedy=True), 3, 0, tuple(q2["stop"])))
    assert q2["completion"] == ref.text


def test_stdin_txt_and_jsonl(tiny, capfd, monkeypatch):
    code, out, err = cli(capfd, "batch", "-", "-m", tiny, "--greedy", "-n", "3", stdin=b"first prompt\nsecond\n",
                         monkeypatch=monkeypatch)
    assert code == 0, err
    assert sorted(r["prompt"] for r in records(out)) == ["first prompt", "second"]
    data = b'{"id": "a", "prompt": "alpha"}\n{"id": "b", "prompt": "beta"}\n'
    code, out, err = cli(capfd, "batch", "-", "-m", tiny, "--greedy", "-n", "3", stdin=data, monkeypatch=monkeypatch)
    assert code == 0, err
    assert sorted((r["id"], r["prompt"]) for r in records(out)) == [("a", "alpha"), ("b", "beta")]


def test_grid_models_templates_shots(tmp_path, tiny, tiny_b, capfd):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"id": "r1", "prompt": "What is 2+2?"}\n{"id": "r2", "prompt": "Name a colour."}\n')
    out = tmp_path / "grid.jsonl"
    code, _, err = cli(capfd, "batch", rows, "-o", out, "-m", tiny, "-m", tiny_b, "-t", "few-shot-qa", "-t",
                       "zero-shot", "--shots", "0", "--shots", "2", "--greedy", "-n", "4", "--seed", "7")
    assert code == 0, err
    recs = records(out.read_text())
    cells = [(str(tiny), "few-shot-qa", 0), (str(tiny), "few-shot-qa", 2), (str(tiny), "zero-shot", None),
             (str(tiny_b), "few-shot-qa", 0), (str(tiny_b), "few-shot-qa", 2), (str(tiny_b), "zero-shot", None)]
    assert [(r["id"], r["model"], r["template"], r["shots"]) for r in recs] == \
        [(i,) + c for i in ("r1", "r2") for c in cells]  # row by row, cells in command-line order
    assert "zero-shot" in err and "--shots does not apply" in err
    by = {(r["id"], r["model"], r["template"], r["shots"]): r for r in recs}
    assert len(by[("r1", str(tiny), "few-shot-qa", 2)]["examples"]) == 2
    assert by[("r1", str(tiny), "few-shot-qa", 0)]["examples"] == []
    a = [by[("r1", str(tiny), "few-shot-qa", 2)], by[("r1", str(tiny_b), "few-shot-qa", 2)]]
    assert a[0]["prompt_tokens"] == a[1]["prompt_tokens"] and a[0]["completion"] != a[1]["completion"]


def test_csv_output_and_resume(tmp_path, tiny, capfd):
    src = tmp_path / "p.jsonl"
    src.write_text('{"id": "1", "prompt": "say \\"hi\\", twice"}\n{"id": "2", "prompt": "line\\nbreak"}\n')
    out = tmp_path / "out.csv"
    code, _, err = cli(capfd, "batch", src, "-m", tiny, "-n", "5", "-o", out, "--format", "csv")
    assert code == 0, err
    first = out.read_bytes()
    rows = list(csv.DictReader(io.StringIO(first.decode())))
    assert [r["id"] for r in rows] == ["1", "2"] and all(r["finish_reason"] for r in rows)
    src.write_text(src.read_text() + '{"id": "3", "prompt": "third"}\n')
    out.write_bytes(first + b'3,partial,"unfinished')  # a crash in the middle of a record
    code, stdout, err = cli(capfd, "batch", src, "-m", tiny, "-n", "5", "-o", out, "--format", "csv", "--resume",
                            "--json")
    assert code == 0, err
    s = json.loads(stdout)
    assert (s["done"], s["resumed"]) == (1, 2)
    rows2 = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [r["id"] for r in rows2] == ["1", "2", "3"]
    assert rows2[:2] == rows  # finished records are kept byte for byte


def test_resume_reuses_rows_only_from_the_same_quantize(tmp_path, tiny, capfd):
    src = tmp_path / "p.txt"
    src.write_text("Hello there\nOnce upon a time\n")
    out = tmp_path / "out.jsonl"
    code, _, err = cli(capfd, "batch", src, "-m", tiny, "-n", "3", "-o", out, "--device", "cpu")
    assert code == 0, err
    first = out.read_bytes()
    src.write_text("Hello there\nOnce upon a time\nx\n")
    code, stdout, err = cli(capfd, "batch", src, "-m", tiny, "-n", "3", "-o", out, "--device", "cpu", "--resume",
                            "--quantize", "int8")
    assert code != 0 and stdout == "" and "--quantize none" in err and len(err.strip().splitlines()) == 1
    assert out.read_bytes() == first  # the fp32 rows stand, untouched, and none passed for int8 ones
    out.unlink()
    code, _, err = cli(capfd, "batch", src, "-m", tiny, "-n", "3", "-o", out, "--device", "cpu", "--quantize", "int8")
    assert code == 0, err
    code, stdout, err = cli(capfd, "batch", src, "-m", tiny, "-n", "3", "-o", out, "--device", "cpu", "--resume",
                            "--quantize", "int8", "--json")
    assert code == 0, err
    assert (json.loads(stdout)["done"], json.loads(stdout)["resumed"]) == (0, 3)  # same setting: all reused


@pytest.mark.slow
def test_resume_after_kill(tmp_path, tiny, capfd):
    src = tmp_path / "p.txt"
    src.write_text("\n".join(f"prompt number {i}" for i in range(24)) + "\n")
    out = tmp_path / "out.jsonl"
    args = ["batch", str(src), "-m", str(tiny), "-n", "6", "--seed", "3", "--batch-size", "1", "-o", str(out)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    proc = subprocess.Popen([sys.executable, "-m", "gptchat.tui", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    part = out.with_name(out.name + ".part-0-of-1")  # results go beside the output until the run ends
    deadline = time.time() + 60
    while time.time() < deadline and (not part.exists() or part.read_bytes().count(b"\n") < 3):
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # the output is only ever replaced whole
    before = part.read_bytes()
    n_before = before.count(b"\n")
    assert 3 <= n_before < 24
    with open(part, "ab") as f:
        f.write(b'{"id": "39", "model": "half a rec')  # as if killed in the middle of a write
    code, stdout, err = cli(capfd, "batch", *args[1:], "--resume", "--json")
    assert code == 0, err
    s = json.loads(stdout)
    assert s["resumed"] == n_before and s["done"] == 24 - n_before
    resumed = records(out.read_text())
    assert not part.exists() and not out.with_name(out.name + ".lock").exists()
    fresh_out = tmp_path / "fresh.jsonl"
    code, _, err = cli(capfd, "batch", *args[1:-1], fresh_out)
    assert code == 0, err
    assert strip_timings(resumed) == strip_timings(records(fresh_out.read_text()))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_stop_with_a_line_saying_how_to_finish(tmp_path, tiny, capfd, sig):
    """SIGTERM (a scheduler, `timeout`) ends a batch as Ctrl+C does: exit 130, the rows done kept, one line saying
    to rerun with --resume (SIGTERM killed it without a word, Ctrl+C said nothing of the results)."""
    src = tmp_path / "p.txt"
    src.write_text("\n".join(f"prompt number {i}" for i in range(40)) + "\n")
    out = tmp_path / "out.jsonl"
    args = ["batch", str(src), "-m", str(tiny), "-n", "6", "--seed", "3", "--batch-size", "1", "-o", str(out)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    proc = subprocess.Popen([sys.executable, "-m", "gptchat.tui", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    part = out.with_name(out.name + ".part-0-of-1")
    deadline = time.time() + 60
    while time.time() < deadline and (not part.exists() or part.read_bytes().count(b"\n") < 2):
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == (f"batch: stopped; the results done so far are kept beside {out}: run the "
                                            "same command with --resume to finish")
    kept = len(records(part.read_text()))
    code, stdout, err = cli(capfd, "batch", *args[1:], "--resume", "--json")
    assert code == 0, err
    assert json.loads(stdout)["resumed"] == kept and len(records(out.read_text())) == 40


def test_bad_rows_fail_with_line_number_or_are_skipped(tmp_path, tiny, capfd):
    src = tmp_path / "rows.jsonl"
    src.write_text('{"prompt": "good one"}\n\n{"prompt": "broken"\n{"prompt": 5}\n{"prompt": "ok", "top_k": -1}\n'
                   '{"prompt": "fine", "id": "x"}\n{"prompt": "dup", "id": "x"}\n')
    code, out, err = cli(capfd, "batch", src, "-m", tiny, "-n", "2")
    assert code == 1 and out == ""
    assert err.strip().splitlines()[-1].startswith("error: rows.jsonl:3: not valid JSON")
    assert len(err.strip().splitlines()) == 1
    code, out, err = cli(capfd, "batch", src, "-m", tiny, "-n", "2", "--skip-bad")
    assert code == 0, err
    assert sorted(r["id"] for r in records(out)) == ["1", "x"]
    skipped = [ln for ln in err.splitlines() if ln.startswith("skipped:")]
    assert [ln.split(":")[2] for ln in skipped] == ["3", "4", "7", "5"]  # reading first, then rendering
    assert "top_k must be" in skipped[3] and "used by an earlier row" in skipped[2]


@pytest.mark.parametrize("args, message", [
    (["nope.txt"], "error: no such input file: nope.txt"),
    (["{src}", "--format", "xml"], "error: unknown --format 'xml'; use jsonl or csv"),
    (["{src}", "--shots", "2"], "error: --shots needs a --template"),
    (["{src}", "--temperature", "-1"], "error: temperature must be a number >= 0"),
    (["{src}", "--resume"], "error: --resume needs -o FILE"),
    (["{src}", "-t", "no-such-template"], "error: "),
    (["{rows}"], "error: rows.jsonl:1: unknown key 'question'; without --template"),
    (["{src}", "--input-format", "csv"], "error: unknown --input-format 'csv'"),
])
def test_usage_errors_are_one_line(tmp_path, tiny, capfd, args, message):
    src = tmp_path / "p.txt"
    src.write_text("hello\n")
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"question": "why?"}\n')
    args = [a.format(src=src, rows=rows) for a in args]
    code, out, err = cli(capfd, "batch", *args, "-m", tiny)
    assert code in (1, 2) and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith(message), err


def test_fresh_run_keeps_the_old_output_until_done_and_resume_ignores_lock_files(tmp_path, tiny, capfd):
    src = tmp_path / "p.txt"
    src.write_text("one\ntwo\n")
    out = tmp_path / "out.jsonl"
    out.write_bytes(b"earlier results\n")
    code, _, err = cli(capfd, "batch", src, "-m", tiny, "-n", "2", "-o", out, "--device", "tpu")
    assert code == 1 and out.read_bytes() == b"earlier results\n"  # a failed start leaves it whole
    code, _, err = cli(capfd, "batch", src, "-m", tiny, "-n", "2", "-o", out)
    assert code == 0, err
    first = out.read_bytes()
    (tmp_path / "out.jsonl.part-1-of-2.lock").write_text("4242\n")  # another rank's lock, not results
    code, stdout, err = cli(capfd, "batch", src, "-m", tiny, "-n", "2", "-o", out, "--resume", "--json")
    assert code == 0, err
    assert json.loads(stdout)["resumed"] == 2 and out.read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out.jsonl.")) == ["out.jsonl.part-1-of-2.lock"]


def test_at_a_terminal_the_rows_count_up_on_one_stderr_line(tmp_path, tiny, capfd, monkeypatch):
    """Progress (rows done, rows/s, tok/s, the model) is redrawn in place on stderr and ended before the summary;
    stdout keeps the records alone."""
    import gptchat.tui.cli.batch as batch_cli

    class Terminal(batch_cli.Bar):
        def __init__(self, enabled: bool):
            super().__init__(True)

    monkeypatch.setattr(batch_cli, "Bar", Terminal)
    src = tmp_path / "prompts.txt"
    src.write_text("one\ntwo\nthree\n")
    code, out, err = cli(capfd, "batch", src, "--model", tiny, "--greedy", "-n", "3", "--batch-size", "2")
    assert code == 0, err
    assert "\r[" in err and "] 3/3 rows  " in err and "tok/s" in err and str(tiny) in err
    assert "  \nbatch: 3 results" in err and "\r" not in out and len(records(out)) == 3
