"""Start-up: from process start to the first generated token of `gptchat generate`, and where it goes.

Every figure comes from fresh Python processes (a warm process would hide the imports), run in
rounds (help, torch, generate, breakdown; then again) so that load on the machine touches them alike;
each figure is the median over the rounds. The first round only warms the disk and the caches.

- ``help_s``: `gptchat --help`, process start to exit (it must never import torch);
- ``torch_s``: `python -c "import torch"`, start to exit: the floor under every command that runs a model;
- ``first_token_s``: `gptchat generate PROMPT --model DIR --max-new-tokens 1 --greedy`, from spawning the
  process to the first byte on its stdout (the one token's text, or the newline that ends the output);
- ``breakdown``: the same steps that command takes, timed one by one inside a fresh process:
  interpreter start, CLI imports, import torch, gptchat's engine modules, weights, tokenizer, first token.

Run: ``python -m gptchat.core.bench.startup [MODEL_DIR]`` (without one: a random 124M checkpoint is
written to a temporary folder first).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"
# The steps `gptchat generate` takes, timed in a fresh process; its stdout is one JSON object of seconds.
_BREAKDOWN = r"""
import time
started, t = time.time(), [time.perf_counter()]
import json, sys
def mark():
    t.append(time.perf_counter())
    return t[-1] - t[-2]
out = {}
import gptchat.tui.cli.main
out["cli_imports"] = mark()
import torch
out["import_torch"] = mark()
from gptchat.core.generate.engine import Engine
from gptchat.core.generate.text import GenOptions, stream
from gptchat.core.generate.sampling import SamplingParams
from gptchat.core.text.tokenizer import load_tokenizer
out["engine_imports"] = mark()
engine = Engine.load(sys.argv[1])
out["weights"] = mark()
tok = load_tokenizer(engine.checkpoint.folder, engine.model.config.vocab_size)
out["tokenizer"] = mark()
ids = tok.encode(sys.argv[2])
opts = GenOptions(params=SamplingParams(temperature=0.0), max_new_tokens=1, seed=0)
for _ in stream(engine, tok, ids, opts):
    break
out["first_token"] = mark()
out["started"] = started
print(json.dumps(out))
"""
STEPS = ("interpreter", "cli_imports", "import_torch", "engine_imports", "weights", "tokenizer", "first_token")


@dataclass
class StartupResult:
    model: str
    rounds: int
    threads: int
    load_avg: tuple[float, float, float]
    help_s: float
    torch_s: float
    first_token_s: float
    breakdown: dict[str, float] = field(default_factory=dict)  # step -> median seconds
    samples: dict[str, list[float]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _cmd(*args: str) -> list[str]:
    return [sys.executable, *args]


def _wall(argv: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def _first_byte(argv: list[str], env: dict) -> float:
    """Seconds from spawning ``argv`` to the first byte on its stdout; the process is then left to finish."""
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    first = p.stdout.read(1)
    t = time.perf_counter() - t0
    rest, errs = p.communicate()
    if p.returncode != 0 or not first:
        raise RuntimeError(f"{' '.join(argv[:4])} ... failed: {errs.decode(errors='replace').strip()[-300:]}")
    return t


def _breakdown(model: str, env: dict) -> dict[str, float]:
    spawned = time.time()  # wall clock: compared with the child's own reading of it
    r = subprocess.run(_cmd("-c", _BREAKDOWN, model, PROMPT), env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"the start-up breakdown failed: {r.stderr.strip()[-300:]}")
    steps = json.loads(r.stdout.strip().splitlines()[-1])
    # from spawning the process to its first line: the interpreter starting (site, the editable finder)
    steps["interpreter"] = max(0.0, steps.pop("started") - spawned)
    return steps


def run(model_dir, rounds: int = 3, log=None) -> StartupResult:
    """Time `gptchat --help`, `import torch` and `gptchat generate` to its first token in fresh processes."""
    model = str(model_dir)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    gen = _cmd("-m", "gptchat.tui", "generate", PROMPT, "--model", model, "--max-new-tokens", "1", "--greedy")
    samples: dict[str, list[float]] = {}
    for i in range(rounds + 1):  # round 0 warms the disk, the page cache and gptchat's tokenizer cache
        got = {
            "help_s": _wall(_cmd("-m", "gptchat.tui", "--help"), env),
            "torch_s": _wall(_cmd("-c", "import torch"), env),
            "first_token_s": _first_byte(gen, env),
            **{f"step:{k}": v for k, v in _breakdown(model, env).items()},
        }
        if log:
            log(f"round {i}{' (warm-up)' if i == 0 else ''}: first token {got['first_token_s']:.2f} s")
        if i:
            for k, v in got.items():
                samples.setdefault(k, []).append(v)
    med = {k: statistics.median(v) for k, v in samples.items()}
    return StartupResult(
        model=model, rounds=rounds, threads=_threads(), load_avg=_load_avg(),
        help_s=med["help_s"], torch_s=med["torch_s"], first_token_s=med["first_token_s"],
        breakdown={k: med[f"step:{k}"] for k in STEPS}, samples=samples,
    )


def _threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _load_avg() -> tuple[float, float, float]:
    try:
        return tuple(round(x, 2) for x in os.getloadavg())
    except OSError:
        return (0.0, 0.0, 0.0)


def format_startup(r: StartupResult) -> str:
    total = sum(r.breakdown.values())
    lines = [
        f"start-up of {r.model} (median of {r.rounds} rounds; {r.threads} cores, load average "
        f"{' '.join(f'{x:.2f}' for x in r.load_avg)})",
        f"  gptchat --help                      {r.help_s:7.3f} s",
        f"  python -c 'import torch'            {r.torch_s:7.3f} s",
        f"  gptchat generate: first token       {r.first_token_s:7.3f} s  (target <= 2.0 s)",
        "  where the time goes (the same steps, timed inside one fresh process):",
    ]
    for k in STEPS:
        v = r.breakdown[k]
        lines.append(f"    {k:<18} {v:7.3f} s  {100 * v / total if total else 0:5.1f}%")
    lines.append(f"    {'total':<18} {total:7.3f} s")
    return "\n".join(lines)


def random_checkpoint(folder: Path, preset: str = "gpt2") -> Path:
    """A random-weight GPT-2 of ``preset``'s shape, saved as an HF folder with GPT-2's vocabulary files."""
    import shutil
    from importlib.resources import files

    from gptchat.core.model.config import PRESETS
    from gptchat.core.model.gpt import GPT
    from gptchat.core.weights.checkpoints import save_hf

    model = GPT(PRESETS[preset])
    model.init_weights(seed=0)
    save_hf(model, folder)
    shipped = files("gptchat.core.text") / "gpt2"
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copyfile(str(shipped / name), folder / name)
    return folder


def main(argv: list[str] | None = None) -> None:
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(prog="python -m gptchat.core.bench.startup", description=__doc__.split("\n")[0])
    ap.add_argument("model_dir", nargs="?", help="a checkpoint folder or ckpt.pt (default: a random 124M one)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = ap.parse_args(argv)
    log = lambda s: print(f"startup: {s}", file=sys.stderr)  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model_dir
        if model is None:
            log("writing a random 124M checkpoint ...")
            model = random_checkpoint(Path(tmp) / "gpt2-random")
        r = run(model, rounds=args.rounds, log=log)
    print(json.dumps(r.to_dict(), indent=2) if args.json else format_startup(r))


if __name__ == "__main__":
    main()
