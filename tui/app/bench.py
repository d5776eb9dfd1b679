"""The chat app's streaming speed against `gptchat generate`'s, and how long the app takes to get a model ready.

    .venv/bin/python -m gptchat.tui.app.bench                     # random-weight GPT-2 124M
    .venv/bin/python -m gptchat.tui.app.bench --model gpt2 --tokens 128 --rounds 3 --json

In one process it alternates (a) decoding the reply's prompt exactly as `gptchat generate` does (the engine's
text stream, each piece written and flushed), on the app's engine thread (tui/app/engine_thread.py: the one
thread the app runs its models on, which leaves the process one OpenMP team, as `gptchat generate`'s main
thread does; measured as fast as a main thread), and (b) the real app, headless: a Pilot types the prompt and
presses Enter, and the bench waits on the app's messages until the reply has ended (states, never a fixed
sleep or a polling loop). The app's rate is the one it reports itself (tokens after the first / decode seconds,
as in the status line); its wall rate is the same tokens over the time between the first and the last piece of
text the UI handled. Both sides decode
the same prompt ids with the same options and seed. Ratios, never absolute seconds: machines and their load
differ. It also gives the UI thread's CPU time while streaming, as a share of a core: that thread holds the
GIL the decode thread needs between kernels, so it is the app's cost to decoding. Model ready is timed twice: in a
new process from its start (imports included, as `gptchat chat` launches; with the first screen's paint, which
comes before torch is imported), and inside this process with the imports done (the app's own part: screens,
history, load, hash). The new processes share one home whose caches (the tokenizer's fast form) a first,
unrecorded launch fills: a user's every launch but the first finds them there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

PROMPT = "Tell me about the moons of Jupiter."


@dataclass
class AppBench:
    model: str
    threads: int
    tokens: int  # max new tokens asked of each reply
    load: tuple[float, float, float] = (0.0, 0.0, 0.0)  # os.getloadavg() at the start
    generate_tps: list[float] = field(default_factory=list)  # as `gptchat generate` reports it, per round
    app_tps: list[float] = field(default_factory=list)  # as the app reports it (status line), per round
    app_wall_tps: list[float] = field(default_factory=list)  # tokens over first-to-last text the UI handled
    app_tokens: list[int] = field(default_factory=list)
    app_chunks: list[int] = field(default_factory=list)  # ReplyChunk messages per reply
    ui_cpu: list[float] = field(default_factory=list)  # the UI thread's CPU time / wall time while streaming
    ready_s: list[float] = field(default_factory=list)  # this process: app start to model ready
    launch_ready_s: list[float] = field(default_factory=list)  # a new process: its start to model ready
    launch_paint_s: list[float] = field(default_factory=list)  # a new process: its start to the first screen
    launch_parts: dict = field(default_factory=dict)  # the last launch's steps, seconds from process start

    @property
    def ratio(self) -> float | None:
        """Median app rate / median generate rate (>= 0.9 is the target)."""
        if not self.app_tps or not self.generate_tps:
            return None
        return statistics.median(self.app_tps) / statistics.median(self.generate_tps)

    @property
    def wall_ratio(self) -> float | None:
        if not self.app_wall_tps or not self.generate_tps:
            return None
        return statistics.median(self.app_wall_tps) / statistics.median(self.generate_tps)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ratio"] = _round(self.ratio)
        d["wall_ratio"] = _round(self.wall_ratio)
        return d


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def _med(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f}" if xs else "-"


def format_report(b: AppBench) -> str:
    lines = [
        f"model {b.model} · {b.threads} torch threads · {b.tokens} new tokens · load avg {b.load[0]:.2f}",
        f"generate decode     {_med(b.generate_tps):>8} tok/s   rounds {[round(x, 1) for x in b.generate_tps]}",
        f"app decode          {_med(b.app_tps):>8} tok/s   rounds {[round(x, 1) for x in b.app_tps]}"
        f"   ratio {b.ratio:.3f}" if b.ratio is not None else "app decode          -",
        f"app wall (UI seen)  {_med(b.app_wall_tps):>8} tok/s   ratio "
        + (f"{b.wall_ratio:.3f}" if b.wall_ratio is not None else "-")
        + f"   ({b.app_tokens} tokens, {b.app_chunks} chunks)",
        f"UI thread while streaming  {_med([100 * x for x in b.ui_cpu])}% of a core",
    ]
    if b.ready_s:
        lines.append(f"model ready, in process (imports done)  {_med(b.ready_s)} s   rounds {[round(x, 2) for x in b.ready_s]}")
    if b.launch_ready_s:
        parts = "  ".join(f"{k} {v:.2f}" for k, v in b.launch_parts.items())
        lines.append(f"model ready, new process from its start  {_med(b.launch_ready_s)} s   "
                     f"rounds {[round(x, 2) for x in b.launch_ready_s]}")
        lines.append(f"first screen, new process from its start {_med(b.launch_paint_s)} s   "
                     f"rounds {[round(x, 2) for x in b.launch_paint_s]}")
        lines.append(f"  last launch (s from process start): {parts}")
    return "\n".join(lines)


# -- the reference: `gptchat generate` ----------------------------------------------------------------


def _settings(model: str, tokens: int):
    from gptchat.core.session.settings import ChatSettings

    return ChatSettings(model=model, device="cpu", max_new_tokens=tokens, greedy=True, seed=1234)


def generate_rate(lm, settings, prompt: str = PROMPT) -> float:
    """Decode the app's prompt the way `gptchat generate` streams (text written and flushed per piece);
    returns its tokens/s as generate reports it."""
    from gptchat.core.generate.text import stream
    from gptchat.core.session.chat import ChatSession

    rendered, tpl = ChatSession(None, settings).render(lm.tokenizer, lm.engine.n_ctx, prompt, [])
    opts = settings.gen_options(tpl.options, stop=rendered.stop, seed=settings.seed)
    comp = None
    with open(os.devnull, "w") as out:
        for chunk in stream(lm.engine, lm.tokenizer, rendered.ids, opts):
            if chunk.text:
                out.write(chunk.text)
                out.flush()
            comp = chunk.completion or comp
    return comp.tokens_per_s


# -- the app, headless --------------------------------------------------------------------------------


class _Seen:
    """The app's messages as the UI thread handles them (a ``message_hook``), with an event per kind, so
    the bench waits on states, never by polling (a polling loop would take CPU from the decode it times)."""

    def __init__(self, *kinds):
        self.kinds = kinds
        self.items: list[tuple[float, float, object]] = []  # (wall, UI thread CPU, message)
        self.events: dict[type, asyncio.Event] = {k: asyncio.Event() for k in kinds}

    def __call__(self, msg) -> None:
        if isinstance(msg, self.kinds):
            self.items.append((time.perf_counter(), time.thread_time(), msg))
            self.events[type(msg)].set()

    async def wait(self, pilot, kind, timeout: float) -> None:
        try:
            await asyncio.wait_for(self.events[kind].wait(), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"timed out waiting for {kind.__name__}") from None
        await pilot.pause()  # let its handler run

    def of(self, kind) -> list[tuple[float, float, object]]:
        return [x for x in self.items if isinstance(x[2], kind)]


def _chat_screen(app):
    from gptchat.tui.app.screens.chat import ChatScreen

    return next((s for s in app.screen_stack if isinstance(s, ChatScreen)), None)


def _ready(app) -> bool:
    scr = _chat_screen(app)
    return scr is not None and scr.loaded is not None


async def _app_reply(settings, pool, store, prompt: str, timeout: float) -> dict:
    """One reply in a new headless app on ``pool``'s model: the app's own rate, its wall rate as the UI saw
    the text, and the UI thread's CPU time over the reply."""
    from gptchat.tui.app.app import GptchatApp
    from gptchat.tui.app.messages import ModelReady, ReplyChunk, ReplyEnded

    app = GptchatApp(settings, store=store, pool=pool, remember=False)
    seen = _Seen(ModelReady, ReplyChunk, ReplyEnded)
    async with app.run_test(size=(120, 40), message_hook=seen) as pilot:
        await seen.wait(pilot, ModelReady, timeout)
        box = _chat_screen(app).query_one("#input")
        box.focus()
        box.text = prompt
        await pilot.press("enter")
        await seen.wait(pilot, ReplyEnded, timeout)
    chunks = seen.of(ReplyChunk)
    (end_t, end_cpu, end), = seen.of(ReplyEnded)
    n = int(end.info.get("tokens", 0))
    wall = end_t - chunks[0][0] if chunks else 0.0
    return {"tps": float(end.info.get("tokens_per_s", 0.0)), "tokens": n, "chunks": len(chunks),
            "wall_tps": (n - 1) / wall if wall > 0 and n > 1 else 0.0,
            "ui_cpu": (end_cpu - chunks[0][1]) / wall if wall > 0 else 0.0}


async def _app_ready(settings, store, timeout: float) -> float:
    """App start to model ready with a fresh pool (the model is loaded from disk again)."""
    from gptchat.core.session.pool import ModelPool
    from gptchat.tui.app.app import GptchatApp
    from gptchat.tui.app.messages import ModelReady

    t0 = time.perf_counter()
    app = GptchatApp(settings, store=store, pool=ModelPool(), remember=False)
    seen = _Seen(ModelReady)
    async with app.run_test(size=(120, 40), message_hook=seen) as pilot:
        await seen.wait(pilot, ModelReady, timeout)
        if not _ready(app):
            raise RuntimeError("the app heard ModelReady but has no model")
        return time.perf_counter() - t0


# -- launch to ready, in a new process ----------------------------------------------------------------


def launch_ready(model: str, home: str | Path | None = None, timeout: float = 120.0) -> tuple[float, dict]:
    """Start a new Python process that opens the app as `gptchat chat` does and reports, in seconds from its
    start, when its imports were done, when the chat screen was up, and when the model was ready.
    ``home``: its GPTCHAT_HOME (default: a new, empty one)."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "GPTCHAT_HOME": str(home or tmp)}
        t0 = time.time()
        out = subprocess.run([sys.executable, "-m", "gptchat.tui.app.bench", "--child", model, "--t0", repr(t0)],
                             env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"the launch child failed: {out.stderr.strip()[-2000:]}")
    parts = json.loads(out.stdout.strip().splitlines()[-1])
    return parts["model ready"], parts


def _child(model: str, t0: float) -> None:
    """The launch child: what `gptchat chat` does before and after it starts the app, timed from ``t0``."""
    from gptchat.core.session.prefs import startup_settings
    from gptchat.core.session.store import Store

    marks: dict[str, float] = {}
    settings = startup_settings({"model": model, "device": "cpu"})
    store = Store.open_default()
    from gptchat.tui.app.app import GptchatApp
    from gptchat.tui.app.messages import ModelLoading, ModelReady

    marks["imports done"] = time.time() - t0
    app = GptchatApp(settings, store=store, remember=False)
    seen = _Seen(ModelLoading, ModelReady)

    async def go() -> None:
        async with app.run_test(size=(120, 40), message_hook=seen) as pilot:
            marks["first screen up"] = time.time() - t0
            await seen.wait(pilot, ModelReady, 120)
            if not _ready(app):
                raise RuntimeError("the app heard ModelReady but has no model")
            marks["model ready"] = time.time() - t0
            marks["open_model took"] = _chat_screen(app).loaded.lm.load_s

    asyncio.run(go())
    print(json.dumps(marks))


# -- the whole run ------------------------------------------------------------------------------------


def run(model: str | None = None, shape: str = "gpt2", tokens: int = 128, rounds: int = 3, launches: int = 2,
        log=print) -> AppBench:
    """Alternate `gptchat generate`-style decoding and the app streaming the same reply; then time model ready."""
    import torch

    from gptchat.core.session.pool import ModelPool
    from gptchat.core.session.store import Store
    from gptchat.tui.app import engine_thread

    with tempfile.TemporaryDirectory() as tmp:
        if model is None:
            from gptchat.core.bench.engine import random_checkpoint

            log(f"building a random-weight {shape} checkpoint (no model given)")
            model = str(random_checkpoint(shape, Path(tmp) / "model"))
            name = f"random {shape}"
        else:
            name = model
        settings = _settings(model, tokens)
        pool = ModelPool()
        lm = engine_thread.run(pool.load, model, "cpu").lm
        store = Store(Path(tmp) / "history.sqlite3")
        b = AppBench(model=name, threads=torch.get_num_threads(), tokens=tokens, load=os.getloadavg())
        engine_thread.run(generate_rate, lm, settings)  # warm-up: the first decode pays one-time costs
        for i in range(rounds):
            b.generate_tps.append(engine_thread.run(generate_rate, lm, settings))
            r = asyncio.run(_app_reply(settings, pool, store, PROMPT, 300))
            b.app_tps.append(r["tps"])
            b.app_wall_tps.append(r["wall_tps"])
            b.app_tokens.append(r["tokens"])
            b.app_chunks.append(r["chunks"])
            b.ui_cpu.append(r["ui_cpu"])
            log(f"round {i + 1}: generate {b.generate_tps[-1]:.1f} tok/s, "
                f"app {r['tps']:.1f} tok/s (wall {r['wall_tps']:.1f}, {r['tokens']} tokens in {r['chunks']} chunks, "
                f"UI thread {100 * r['ui_cpu']:.0f}% of a core)")
        del pool, lm
        home = Path(tmp) / "launch-home"
        if launches:
            launch_ready(model, home)  # fills the home's caches, as a user's first launch does
        for _ in range(launches):
            b.ready_s.append(asyncio.run(_app_ready(settings, store, 300)))
            s, parts = launch_ready(model, home)
            b.launch_ready_s.append(s)
            b.launch_paint_s.append(parts["first screen up"])
            b.launch_parts = parts
        store.close()
    return b


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a checkpoint; default: random weights of --shape")
    ap.add_argument("--shape", default="gpt2")
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per reply")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--launches", type=int, default=2, help="model-ready timings (0: skip)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        _child(a.child, a.t0)
        return
    if a.tokens < 2 or a.rounds < 1 or a.launches < 0:
        ap.error("--tokens must be at least 2, --rounds at least 1 and --launches at least 0")
    from gptchat.core.errors import GptchatError
    from gptchat.core.model.config import PRESETS

    if a.model is None and a.shape not in PRESETS:
        ap.error(f"unknown --shape {a.shape!r}; use one of {', '.join(PRESETS)}")
    try:
        b = run(a.model, a.shape, a.tokens, a.rounds, a.launches, log=lambda s: print(s, file=sys.stderr, flush=True))
    except GptchatError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    print(json.dumps(b.to_dict(), indent=2) if a.json else format_report(b))


if __name__ == "__main__":
    main()
