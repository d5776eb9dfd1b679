"""Bad input to every command, through the real CLI (in-process, the console script's error handling):
one `error: ` line on stderr, the exit code, no traceback, and nothing the user had is damaged or left
half-made: an existing out.jsonl keeps its bytes after every failing batch, no lock, part or temporary
file is left beside it, and no run folder appears for a finetune that did not start.

The TUI's slash commands get the same treatment: a notification, and the app keeps running its model.
The real-process cases (a closed pipe, two batches on one output) are marked slow.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gptchat.core.outputs import OutputLock
from gptchat.tui.cli.main import main
from tests.factory import hf_model, save

PRECIOUS = b'{"id": "earlier", "completion": "results the user kept"}\n'
REPO = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save(hf_model(n_layer=1, n_head=2, n_embd=16, n_positions=64, seed=31), tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    return save(hf_model(n_layer=1, n_head=2, n_embd=16, n_positions=64, seed=32), tmp_path_factory.mktemp("nano"),
                fmt="nanogpt")


@pytest.fixture
def work(tmp_path, monkeypatch, tiny) -> Path:
    """A folder with prompts, rows, an examples file, a corrupt model and an earlier out.jsonl."""
    monkeypatch.setenv("GPTCHAT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("GPTCHAT_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text("hello\nworld\n")
    (tmp_path / "rows.jsonl").write_text('{"prompt": "fine"}\n{"prompt": 5}\n')
    (tmp_path / "ex.jsonl").write_text('{"input": "a", "output": "b"}\n')
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    (tmp_path / "data.txt").write_text("some training text. " * 50)
    (tmp_path / "many.txt").write_text("".join(f"prompt {i}\n" for i in range(40)))
    (tmp_path / "out.jsonl").write_bytes(PRECIOUS)
    bad = tmp_path / "corrupt"
    bad.mkdir()
    for f in tiny.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    st = bad / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    return tmp_path


def cli(capfd, *args, stdin: bytes | None = None, monkeypatch=None):
    """`gptchat ARGS` in-process: (exit code, stdout, stderr)."""
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        code = e.code or 0
    out, err = capfd.readouterr()
    return code, out, err


def one_line(code, out, err, want_code, want) -> str:
    assert code == want_code, (code, out, err)
    assert "Traceback" not in err and out == "", (out, err)
    lines = err.strip().splitlines()
    progress = [ln for ln in lines[:-1] if not ln.startswith(("loading ", "note: "))]  # batch logs its loads
    assert lines and lines[-1].startswith("error: ") and progress == [], err
    assert want in lines[-1], lines[-1]
    return lines[-1]


def untouched(work: Path) -> None:
    """The earlier output is byte for byte what it was, and nothing was left beside it."""
    assert (work / "out.jsonl").read_bytes() == PRECIOUS
    left = sorted(p.name for p in work.iterdir() if p.name.startswith(("out.jsonl.", ".out.jsonl")))
    assert left == [], left


# -- batch: the output survives every refusal -----------------------------------------------------

BATCH = [
    (["p.txt", "-m", "{work}/corrupt"], 1, "model.safetensors"),
    (["p.txt", "--device", "tpu"], 1, "device 'tpu'"),
    (["p.txt", "--dtype", "int4"], 1, "dtype 'int4'"),
    (["rows.jsonl"], 1, "rows.jsonl:2: 'prompt' must be a string"),
    (["rows.jsonl", "--skip-bad", "-m", "/nonexistent"], 1, "/nonexistent does not exist"),
    (["empty.txt"], 1, "no prompts in empty.txt"),
    (["blank.txt"], 1, "no prompts in blank.txt"),
    (["latin1.txt"], 2, "not UTF-8"),
    (["p.txt", "--stop", ""], 2, "stop sequences must not be empty"),
    (["p.txt", "--temperature", "-1"], 2, "temperature must be"),
    (["p.txt", "--top-p", "7"], 2, "top_p must be between 0 and 1"),
    (["p.txt", "--batch-size", "0"], 2, "--batch-size must be 1 or more"),
    (["p.txt", "--format", "xml"], 2, "unknown --format"),
    (["p.txt", "-t", "no-such-template"], 1, "no-such-template"),
    (["p.txt", "-t", "few-shot-qa", "--examples", "nope.jsonl"], 2, "--examples: no such file"),
    (["p.txt", "--var", "x=1"], 2, "need a --template"),
]


@pytest.mark.parametrize("args, code, message", BATCH, ids=[" ".join(a[0]) for a in BATCH])
def test_batch_refusal_keeps_the_output(work, tiny, capfd, args, code, message):
    args = [a.format(work=work) for a in args]
    model = [] if "-m" in args else ["-m", tiny]
    one_line(*cli(capfd, "batch", *args, *model, "-n", "2", "-o", "out.jsonl"), code, message)
    untouched(work)


OUTPUTS = [
    ("p.txt", 2, "is the input file"),
    ("./sub/../p.txt", 2, "is the input file"),
    ("link.txt", 2, "is the input file"),  # a symlink to the input
    ("ex.jsonl", 2, "is the input file"),  # the examples file is an input too
    ("/proc/gptchat-out.jsonl", 2, "cannot write in /proc"),
    ("out.jsonl/x.jsonl", 2, "out.jsonl is a file, not a folder"),
    (".", 2, "is a folder"),
    ("", 2, "give a file name"),
]


@pytest.mark.parametrize("output, code, message", OUTPUTS, ids=[o[0] or "empty" for o in OUTPUTS])
def test_batch_output_path_refused_before_loading(work, tiny, capfd, output, code, message):
    (work / "sub").mkdir()
    (work / "link.txt").symlink_to(work / "p.txt")
    before = (work / "p.txt").read_bytes()
    extra = ["-t", "few-shot-qa", "--examples", "ex.jsonl"] if output == "ex.jsonl" else []
    one_line(*cli(capfd, "batch", "p.txt", "-m", "/nonexistent", "-o", output, *extra), code, message)
    assert (work / "p.txt").read_bytes() == before
    untouched(work)


def test_batch_resume_of_a_file_that_is_not_a_batch_output(work, tiny, capfd):
    (work / "out.jsonl").write_bytes(b"my notes, not JSON\n")
    one_line(*cli(capfd, "batch", "p.txt", "-m", tiny, "-n", "2", "-o", "out.jsonl", "--resume"), 1,
             "record 1 cannot be read")
    assert (work / "out.jsonl").read_bytes() == b"my notes, not JSON\n"


def test_batch_refused_while_another_writes_the_output(work, tiny, capfd):
    with OutputLock(work / "out.jsonl", "gptchat batch"):
        line = one_line(*cli(capfd, "batch", "p.txt", "-m", tiny, "-n", "2", "-o", "out.jsonl"), 1,
                        "is being written by another gptchat batch")
        assert f"pid {os.getpid()}" in line
        assert (work / "out.jsonl").read_bytes() == PRECIOUS
    assert not (work / "out.jsonl.lock").exists()


def test_batch_replaces_the_output_whole_and_leaves_nothing_beside_it(work, tiny, capfd):
    code, out, err = cli(capfd, "batch", "p.txt", "-m", tiny, "-n", "2", "-o", "out.jsonl")
    assert code == 0, err
    assert [json.loads(ln)["id"] for ln in (work / "out.jsonl").read_text().splitlines()] == ["1", "2"]
    assert sorted(p.name for p in work.iterdir() if "out.jsonl" in p.name) == ["out.jsonl"]


# -- generate ---------------------------------------------------------------------------------------

GENERATE = [
    (["hi", "--stop", ""], 2, "stop sequences must not be empty"),
    (["hi", "--device", "tpu"], 1, "device 'tpu'"),
    (["hi", "--dtype", "int4"], 1, "dtype 'int4'"),
    (["hi", "-m", "/nonexistent"], 1, "/nonexistent does not exist"),
    (["hi", "-m", "{work}/corrupt"], 1, "model.safetensors"),
    (["hi", "--top-p", "7"], 2, "top_p must be between 0 and 1"),
    (["hi", "-n", "0"], 2, "max_new_tokens"),
    ([""], 2, "the prompt is empty"),
    ([], 2, "give a prompt"),
    (["hi", "--shots", "2"], 2, "need a --template"),
    (["hi", "-t", "nope"], 1, "nope"),
    (["hi", "-t", "few-shot-qa", "--var", "novalue"], 2, "NAME=VALUE"),
]


@pytest.mark.parametrize("args, code, message", GENERATE, ids=[" ".join(a[0]) or "none" for a in GENERATE])
def test_generate_refusal(work, tiny, capfd, args, code, message):
    args = [a.format(work=work) for a in args]
    model = [] if "-m" in args else ["-m", tiny]
    one_line(*cli(capfd, "generate", *args, *model, "-n" if "-n" not in args else "--seed", "2"), code, message)


def test_generate_huge_stdin_prompt_fails_on_size_before_tokenising(work, tiny, capfd, monkeypatch):
    t0 = time.perf_counter()
    line = one_line(*cli(capfd, "generate", "-", "-m", tiny, stdin=b"word " * (10 << 20), monkeypatch=monkeypatch),
                    2, "stdin is over 1 MiB")
    assert time.perf_counter() - t0 < 10 and "window" in line


def test_generate_json_reports_the_clamped_max_new_tokens(work, tiny, capfd):
    code, out, err = cli(capfd, "generate", "hello there", "-m", tiny, "-n", "5000", "--json", "--greedy")
    assert code == 0, err
    d = json.loads(out)
    assert d["max_new_tokens"] == 64 - d["prompt_tokens"] and d["completion_tokens"] <= d["max_new_tokens"]
    assert any("lowered from 5000" in n for n in d["notes"]) and "lowered from 5000" in err


# -- chat start: checked before the app starts -------------------------------------------------------

CHAT = [
    (["chat", "--device", "tpu"], "device 'tpu'"),
    (["chat", "--dtype", "int4"], "dtype 'int4'"),
    (["chat", "--model", "/nonexistent"], "/nonexistent does not exist"),
    (["--model", "/nonexistent"], "/nonexistent does not exist"),
    (["chat", "--top-p", "7"], "top_p must be between 0 and 1"),
    (["chat", "--device", "cuda:7"], "cuda"),
]


@pytest.mark.parametrize("args, message", CHAT, ids=[" ".join(a[0]) for a in CHAT])
def test_chat_start_refused_before_the_app(work, capfd, args, message):
    one_line(*cli(capfd, *args), 2, message)


# -- finetune, runs, models, templates, paths, bench, pull ---------------------------------------------

OTHERS = [
    (["finetune", "missing.txt", "-m", "{tiny}"], 1, "missing.txt"),
    (["finetune", "data.txt", "-m", "/nonexistent", "--steps", "2"], 1, "/nonexistent"),
    (["finetune", "data.txt", "-m", "{tiny}", "--val-fraction", "2"], 2, "val"),
    (["finetune", "data.txt", "-m", "{tiny}", "--lora-targets", "zz", "--lora"], 2, "zz"),
    (["templates", "show", "nope"], 1, "nope"),
    (["bench", "--shape", "nope"], 2, "unknown --shape 'nope'"),
    (["bench", "--batch-sizes", "x"], 2, "--batch-sizes must be numbers"),
    (["bench", "--model", "/nonexistent", "--no-reference"], 1, "/nonexistent does not exist"),
    (["pull", "./some/path"], 2, ""),
]


@pytest.mark.parametrize("args, code, message", OTHERS, ids=[" ".join(a[0][:2]) + f"-{i}" for i, a in enumerate(OTHERS)])
def test_other_command_refusal(work, tiny, capfd, args, code, message):
    args = [a.format(tiny=tiny) for a in args]
    one_line(*cli(capfd, *args), code, message)
    runs = work / "home" / "data" / "runs"
    assert not runs.exists() or not any(runs.iterdir())  # no run folder left half-made


def test_click_level_bad_number_is_a_usage_error_without_traceback(work, capfd):
    code, out, err = cli(capfd, "finetune", "data.txt", "--steps", "x")
    assert code == 2 and "Traceback" not in err and "Invalid value for '--steps'" in err
    assert not (work / "home" / "data" / "runs").exists()


@pytest.mark.parametrize("command", [["finetune", "data.txt", "--steps", "2"], ["runs"], ["templates", "list"],
                                     ["models"], ["paths"]])
def test_gptchat_home_a_file(work, tiny, capfd, monkeypatch, command):
    """A command that must write there says so in one line; one that only reads goes on."""
    (work / "homefile").write_text("not a folder")
    monkeypatch.setenv("GPTCHAT_HOME", str(work / "homefile"))
    code, out, err = cli(capfd, *command, *(["-m", tiny] if command[0] == "finetune" else []))
    if command[0] == "finetune":
        assert "homefile is a file, not a folder" in one_line(code, out, err, 1, "GPTCHAT_HOME")
    else:
        assert code == 0 and "Traceback" not in err, err
    assert (work / "homefile").read_text() == "not a folder"


@pytest.mark.parametrize("status", ['["a", "list"]', '"text"', "{broken", "42"])
def test_runs_lists_an_unreadable_status(work, capfd, status):
    run = work / "home" / "data" / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "run.json").write_text('{"settings": {}}')
    (run / "status.json").write_text(status)
    code, out, err = cli(capfd, "runs", "--json")
    assert code == 0 and "Traceback" not in err, err
    assert [r["state"] for r in json.loads(out)] == ["unreadable"]


def test_bench_of_a_nanogpt_file_leaves_no_copy_in_tmpdir(work, tiny_ckpt, capfd, monkeypatch):
    import tempfile

    scratch = work / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    code, out, err = cli(capfd, "bench", "--model", tiny_ckpt, "--prompt-tokens", "8", "--new-tokens", "4",
                         "--batch-sizes", "1", "--repeats", "1", "--json")
    assert code == 0, err
    assert json.loads(out)["results"] and list(scratch.iterdir()) == []


# -- the TUI's slash commands never close the app -------------------------------------------------------

SLASH = [
    ("/model /nonexistent", "/nonexistent"),
    ("/set top-p 7", "top_p must be between 0 and 1"),
    ("/shots -1", "shots"),
    ("/examples /nope", "/nope"),
    ("/template nope", "nope"),
    ("/finetune --steps x", "--steps"),
]


@pytest.mark.parametrize("command, message", SLASH, ids=[s[0] for s in SLASH])
def test_slash_command_refusal_is_a_notification(tiny, work, command, message):
    from tests.tui.helpers import chat_screen, make_app, notifications, run, send, wait_for, wait_ready

    app = make_app(str(tiny), None)

    async def go():
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_ready(pilot, app)
            loaded = chat_screen(app).loaded
            await send(pilot, app, command)
            await wait_for(pilot, lambda: any(message in n for n in notifications(app)), 30, "the notification")
            await pilot.pause()
            return app.is_running, loaded, chat_screen(app).loaded

    running, before, after = run(go())
    assert running and after is not None and after.spec == before.spec  # the working model is kept


# -- real processes ---------------------------------------------------------------------------------------

def _gptchat(*args, **kw):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("GPTCHAT_DEBUG", None)
    return subprocess.Popen([sys.executable, "-m", "gptchat.tui", *map(str, args)], env=env, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["generate", "batch"])
def test_closed_stdout_is_a_normal_end(work, tiny, command):
    args = (["generate", "hello", "-n", "40", "--ignore-eos"] if command == "generate"
            else ["batch", "many.txt", "-n", "8"])
    proc = _gptchat(*args, "-m", tiny, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=work)
    proc.stdout.read(1)  # the first output arrived: now `head` goes away
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and "Error" not in err and "Traceback" not in err, err


@pytest.mark.slow
def _holder_written(lock) -> bool:
    try:
        return lock.read_text().strip().isdigit()
    except FileNotFoundError:
        return False


def test_two_batches_on_one_output(work, tiny):
    args = ["batch", "many.txt", "-m", tiny, "-n", "8", "--batch-size", "1", "-o", "same.jsonl"]
    first = _gptchat(*args, stderr=subprocess.PIPE, cwd=work)
    deadline = time.time() + 120
    lock = work / "same.jsonl.lock"
    # the first holds the lock before it loads the model; the file exists a moment before it is locked, and
    # gets the holder's pid once it is (stopping the first in between let the second take it, under load)
    while not _holder_written(lock):
        assert first.poll() is None and time.time() < deadline, first.stderr.read().decode()
        time.sleep(0.02)
    first.send_signal(signal.SIGSTOP)  # the first is surely still writing while the second starts
    try:
        second = subprocess.run([sys.executable, "-m", "gptchat.tui", *map(str, args)], capture_output=True,
                                text=True, cwd=work, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=180)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 1 and "Traceback" not in second.stderr
    assert "is being written by another gptchat batch" in second.stderr.strip().splitlines()[-1]
    assert first.wait(timeout=300) == 0, first.stderr.read().decode()
    ids = [json.loads(ln)["id"] for ln in (work / "same.jsonl").read_text().splitlines()]
    assert ids == [str(i) for i in range(1, 41)]


def test_batch_output_through_a_symlink_lands_in_its_target(work, tiny, capfd):
    (work / "kept").mkdir()
    (work / "kept" / "real.jsonl").write_bytes(PRECIOUS)
    (work / "via.jsonl").symlink_to(work / "kept" / "real.jsonl")
    code, out, err = cli(capfd, "batch", "p.txt", "-m", tiny, "-n", "2", "-o", "via.jsonl")
    assert code == 0, err
    assert (work / "via.jsonl").is_symlink() and len((work / "via.jsonl").read_text().splitlines()) == 2


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temporary(tmp_path):
    from gptchat.core.outputs import replace_atomic

    target = tmp_path / "out.jsonl"
    target.write_bytes(PRECIOUS)

    def half_then_fail(f):
        f.write(b'{"id": "1"}\n')
        raise KeyboardInterrupt  # Ctrl+C in the middle of writing the final file

    with pytest.raises(KeyboardInterrupt):
        replace_atomic(target, half_then_fail)
    assert target.read_bytes() == PRECIOUS and sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]
    with OutputLock(target):
        pass
    with OutputLock(target):  # released and removed: the next writer gets it
        assert (tmp_path / "out.jsonl.lock").read_text().strip() == str(os.getpid())
