"""A chat session independent of any front end: settings, loaded models, prompts, replies, history.

The TUI holds one ``ChatSession`` and calls it from worker threads; nothing here knows about
Textual. A reply is a generator of small events (``ReplyStarted``, ``ReplyDelta``, ``ReplyDone``)
so the caller decides how often to repaint. Every user message is stored before generation starts
and the reply row is updated while it streams, so a killed process keeps what was shown.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Iterator

from gptchat.core.errors import GptchatError, UsageError
from gptchat.core.session.store import Store

FLUSH_S = 0.5  # how often a streaming reply is written to the database


# -- settings -----------------------------------------------------------------------------------


@dataclass
class ChatSettings:
    """What the next message uses. ``None`` for a sampling option means: the template's default."""

    model: str | None = None
    template: str = "chat"
    shots: int | None = None
    examples: str | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    greedy: bool = False
    max_new_tokens: int | None = None
    seed: int | None = None
    device: str | None = None
    dtype: str | None = None

    def resolved(self, template_options: dict) -> dict:
        """Concrete sampling values: the setting, else the template's option, else gptchat's default."""
        base = dict(temperature=0.8, top_k=40, top_p=1.0, repetition_penalty=1.0, max_new_tokens=128)
        return {k: getattr(self, k) if getattr(self, k) is not None else template_options.get(k, v) for k, v in base.items()}

    def gen_options(self, template_options: dict, stop=(), seed: int | None = None):
        from gptchat.core.generate.sampling import SamplingParams
        from gptchat.core.generate.text import GenOptions

        o = self.resolved(template_options)
        try:
            params = SamplingParams(temperature=float(o["temperature"]), top_k=int(o["top_k"]), top_p=float(o["top_p"]),
                                    repetition_penalty=float(o["repetition_penalty"]), greedy=self.greedy)
            return GenOptions(params=params, max_new_tokens=int(o["max_new_tokens"]), seed=seed, stop=tuple(stop))
        except ValueError as e:
            raise UsageError(str(e)) from None

    def with_value(self, name: str, text: str) -> "ChatSettings":
        """A copy with one setting parsed from text (``/set temperature 0.7``); UsageError if bad."""
        name = name.strip().replace("-", "_").lower()
        aliases = {"temp": "temperature", "topk": "top_k", "topp": "top_p", "max_tokens": "max_new_tokens",
                   "max": "max_new_tokens", "n": "max_new_tokens", "rep": "repetition_penalty"}
        name = aliases.get(name, name)
        if name not in SETTING_TYPES:
            raise UsageError(f"no setting {name!r}; settings are {', '.join(SETTING_TYPES)}")
        return replace(self, **{name: parse_setting(name, text)})

    def to_dict(self) -> dict:
        return asdict(self)


SETTING_TYPES = {f.name: f.type for f in fields(ChatSettings)}
_INTS = {"shots", "top_k", "max_new_tokens", "seed"}
_FLOATS = {"temperature", "top_p", "repetition_penalty"}
_OFF = ("", "none", "default", "auto", "-")


def parse_setting(name: str, text: str):
    text = str(text).strip()
    if name == "greedy":
        if text.lower() in ("", "on", "true", "yes", "1"):
            return True
        if text.lower() in ("off", "false", "no", "0"):
            return False
        raise UsageError(f"greedy is on or off, got {text!r}")
    if text.lower() in _OFF:
        if name == "template":
            return "chat"
        return None
    if name in _INTS:
        try:
            v = int(text)
        except ValueError:
            raise UsageError(f"{name} must be a whole number, got {text!r}") from None
        if v < 0 or (name == "max_new_tokens" and v < 1):
            raise UsageError(f"{name} must be >= {1 if name == 'max_new_tokens' else 0}, got {v}")
        return v
    if name in _FLOATS:
        try:
            v = float(text)
        except ValueError:
            raise UsageError(f"{name} must be a number, got {text!r}") from None
        from gptchat.core.generate.sampling import check_repetition_penalty, check_temperature, check_top_p

        check = {"temperature": check_temperature, "top_p": check_top_p, "repetition_penalty": check_repetition_penalty}[name]
        try:
            check(v)
        except ValueError as e:
            raise UsageError(str(e)) from None
        return v
    if name == "template":
        from gptchat.core.prompting.templates import get_template

        get_template(text)  # TemplateError names what is wrong
        return text
    if name == "examples":
        if not Path(text).expanduser().is_file():
            raise UsageError(f"examples file {text} does not exist")
        return str(Path(text).expanduser())
    return text


# -- loaded models --------------------------------------------------------------------------------


@dataclass
class Loaded:
    spec: str
    lm: object  # LoadedModel
    checkpoint_hash: str
    bytes: int  # parameter memory

    @property
    def key(self) -> tuple:
        d = self.lm.describe()
        return (self.spec, d["device"], d["dtype"])


class ModelPool:
    """Models stay loaded (several at once) until unloaded; loading is blocking: call it in a worker."""

    def __init__(self):
        self._models: dict[tuple, Loaded] = {}
        self._lock = threading.Lock()

    def get(self, spec: str | None, device: str | None = None, dtype: str | None = None) -> Loaded | None:
        spec = spec or "gpt2"
        with self._lock:
            for (s, dev, dt), m in self._models.items():
                if s == spec and (device in (None, "auto") or dev.startswith(device)) and (dtype in (None, "auto") or dt == dtype):
                    return m
        return None

    def load(self, spec: str | None, device: str | None = None, dtype: str | None = None) -> Loaded:
        spec = spec or "gpt2"
        got = self.get(spec, device, dtype)
        if got is not None:
            return got
        from gptchat.core.generate.loaded import open_model

        lm = open_model(spec, device=None if device == "auto" else device, dtype=None if dtype == "auto" else dtype)
        n_bytes = sum(p.numel() * p.element_size() for p in lm.engine.model.parameters())
        m = Loaded(spec, lm, checkpoint_hash(lm.checkpoint), n_bytes)
        with self._lock:
            self._models[m.key] = m
        return m

    def unload(self, spec: str) -> None:
        with self._lock:
            for k in [k for k in self._models if k[0] == spec]:
                del self._models[k]

    def loaded(self) -> list[Loaded]:
        with self._lock:
            return list(self._models.values())

    def memory(self) -> tuple[int, int]:
        """(bytes of parameters held, resident memory of this process)."""
        return sum(m.bytes for m in self.loaded()), process_rss()


def process_rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource
        import sys

        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r if sys.platform == "darwin" else r * 1024


def checkpoint_hash(ck, sample: int = 1 << 22) -> str:
    """A sha256 over the config and weight files: whole files up to 64 MB, else size + head + tail."""
    h = hashlib.sha256()
    files = sorted(set(ck.files) | ({Path(ck.folder) / "config.json"} if (Path(ck.folder) / "config.json").is_file() else set()))
    for f in files:
        f = Path(f)
        try:
            size = f.stat().st_size
            h.update(f"{f.name}:{size}\n".encode())
            with open(f, "rb") as fh:
                if size <= 16 * sample:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        h.update(block)
                else:
                    h.update(fh.read(sample))
                    fh.seek(size - sample)
                    h.update(fh.read(sample))
        except OSError:
            continue
    return h.hexdigest()[:16]


# -- the conversation ---------------------------------------------------------------------------


@dataclass
class Turn:
    role: str  # user | assistant
    text: str
    msg_id: str | None = None
    status: str = "done"  # done | streaming | stopped | error
    info: dict = field(default_factory=dict)  # assistant: tokens/s, finish reason, seed...


@dataclass
class ReplyStarted:
    reply_id: str | None
    prompt_tokens: int
    dropped: list[str]


@dataclass
class ReplyDelta:
    text: str


@dataclass
class ReplyDone:
    turn: Turn
    completion: object  # textgen.Completion


class ChatSession:
    def __init__(self, store: Store | None = None, settings: ChatSettings | None = None):
        self.store = store
        self.settings = settings or ChatSettings()
        self.turns: list[Turn] = []
        self.conv_id: str | None = None

    # -- conversation management --

    def new(self) -> None:
        self.turns, self.conv_id = [], None

    def open(self, conv_id: str) -> None:
        if self.store is None:
            raise GptchatError("no history database")
        conv = self.store.conversation(conv_id)
        if conv is None:
            raise GptchatError(f"conversation {conv_id} no longer exists")
        self.conv_id = conv_id
        self.turns = []
        for m in self.store.messages(conv_id):
            if m.status == "replaced" or m.pane is not None:
                continue
            status = "stopped" if m.status == "streaming" else m.status  # a reply cut off by a crash
            self.turns.append(Turn(m.role, m.content, m.id, status, _info(m)))

    def _ensure_conv(self) -> str:
        if self.conv_id is None and self.store is not None:
            self.conv_id = self.store.new_conversation(meta={"settings": self.settings.to_dict()}).id
        return self.conv_id

    def add_user(self, text: str) -> Turn:
        """Record the user's message (stored at once, before any generation)."""
        if not text.strip():
            raise UsageError("the message is empty")
        t = Turn("user", text)
        if self.store is not None:
            t.msg_id = self.store.add_message(self._ensure_conv(), "user", text).id
        self.turns.append(t)
        return t

    def _replace(self, turn: Turn) -> None:
        if self.store is not None and turn.msg_id:
            self.store.update_message(turn.msg_id, status="replaced")

    def pop_reply(self) -> Turn | None:
        """Take back the last reply (to regenerate it); the stored row is kept, marked replaced."""
        if self.turns and self.turns[-1].role == "assistant":
            t = self.turns.pop()
            self._replace(t)
            return t
        return None

    def pop_exchange(self) -> str | None:
        """Take back the last user message and its reply (to edit and resend); returns its text."""
        self.pop_reply()
        if self.turns and self.turns[-1].role == "user":
            t = self.turns.pop()
            self._replace(t)
            return t.text
        return None

    def branch(self, index: int) -> str:
        """Take back the user message at ``index`` and everything after it, to edit it and continue from
        there (the next prompt's history is the turns before it). The stored rows are kept, marked
        replaced. Returns the message's text."""
        if not 0 <= index < len(self.turns) or self.turns[index].role != "user":
            raise UsageError("only a message you sent can be edited and resent")
        text = self.turns[index].text
        for t in self.turns[index:]:
            self._replace(t)
        del self.turns[index:]
        return text

    def pending_input(self) -> str | None:
        """The last user message when it has no reply yet (what regenerate answers)."""
        return self.turns[-1].text if self.turns and self.turns[-1].role == "user" else None

    # -- prompts --

    def render(self, tokenizer, n_ctx: int, text: str, history: list[Turn] | None = None, settings: ChatSettings | None = None):
        """The prompt for ``text`` after ``history`` (default: the whole conversation), fitted to n_ctx."""
        from gptchat.core.prompting.templates import Budget, get_template, load_examples, render

        s = settings or self.settings
        tpl = get_template(s.template)
        history = self.turns if history is None else history
        turns = [(t.role, t.text) for t in history if t.text.strip()] if tpl.kind == "chat" else None
        pool = load_examples(s.examples, tpl.example_fields) if s.examples else None
        reserve = int(s.resolved(tpl.options)["max_new_tokens"])
        return render(tpl, {tpl.input_variable: text}, turns, tokenizer, Budget(n_ctx=n_ctx, reserve=min(reserve, n_ctx // 2)),
                      examples=pool, shots=s.shots, seed=s.seed or 0), tpl

    def preview(self, tokenizer, n_ctx: int, text: str):
        """The budget the next message would use (what the budget bar draws). Raises GptchatError."""
        return self.render(tokenizer, n_ctx, text or " ")[0]

    # -- replies --

    def reply(self, loaded: Loaded, cancel: threading.Event) -> Iterator[ReplyStarted | ReplyDelta | ReplyDone]:
        """Answer the last user message, streaming. The reply row is written as it grows."""
        from gptchat.core.generate.text import new_seed, stream

        if not self.turns or self.turns[-1].role != "user":
            raise UsageError("nothing to reply to: send a message first")
        s = self.settings
        lm = loaded.lm
        text = self.turns[-1].text
        rendered, tpl = self.render(lm.tokenizer, lm.engine.n_ctx, text, self.turns[:-1])
        seed = s.seed if s.seed is not None else new_seed()
        opts = s.gen_options(tpl.options, stop=rendered.stop, seed=seed)
        prov = provenance(loaded, s, tpl, rendered, opts)
        turn = Turn("assistant", "", status="streaming")
        if self.store is not None:
            turn.msg_id = self.store.add_message(self._ensure_conv(), "assistant", "", status="streaming", **prov).id
        self.turns.append(turn)
        yield ReplyStarted(turn.msg_id, len(rendered.ids), list(rendered.dropped))
        parts: list[str] = []
        last_flush = time.monotonic()
        comp = None
        try:
            for chunk in stream(lm.engine, lm.tokenizer, rendered.ids, opts, cancel):
                if chunk.text:
                    parts.append(chunk.text)
                    turn.text = "".join(parts)
                    yield ReplyDelta(chunk.text)
                    if self.store is not None and time.monotonic() - last_flush > FLUSH_S:
                        self.store.update_message(turn.msg_id, content=turn.text)
                        last_flush = time.monotonic()
                comp = chunk.completion or comp
        except BaseException:
            turn.status = "error"
            if self.store is not None:
                self.store.update_message(turn.msg_id, content=turn.text, status="error")
            raise
        turn.text = comp.text
        turn.status = "stopped" if comp.finish_reason == "cancelled" else "done"
        turn.info = completion_info(comp, loaded)
        if self.store is not None:
            self.store.update_message(
                turn.msg_id, content=comp.text, status=turn.status, prompt_tokens=comp.prompt_tokens,
                completion_tokens=comp.completion_tokens, finish_reason=comp.finish_reason,
                timings={"prefill_s": round(comp.prefill_s, 4), "decode_s": round(comp.decode_s, 4),
                         "tokens_per_s": round(comp.tokens_per_s, 2), "load_s": round(lm.load_s, 3)})
        yield ReplyDone(turn, comp)


def provenance(loaded: Loaded, s: ChatSettings, tpl, rendered, opts) -> dict:
    d = loaded.lm.describe()
    return dict(
        model=loaded.spec, checkpoint_hash=loaded.checkpoint_hash, template=tpl.name, seed=opts.seed,
        examples_used=list(rendered.example_ids), prompt_tokens=len(rendered.ids),
        options={**opts.params.to_dict(), "max_new_tokens": opts.max_new_tokens, "stop": list(opts.stop),
                 "shots": s.shots, "examples": s.examples, "device": d["device"], "dtype": d["dtype"],
                 "checkpoint_path": d["path"], "dropped": list(rendered.dropped)},
    )


def completion_info(comp, loaded: Loaded) -> dict:
    d = loaded.lm.describe()
    return {"tokens": comp.completion_tokens, "tokens_per_s": comp.tokens_per_s, "finish": comp.finish_reason,
            "seed": comp.seed, "device": d["device"], "dtype": d["dtype"], "model": loaded.spec,
            "prompt_tokens": comp.prompt_tokens}


def _info(m) -> dict:
    if m.role != "assistant":
        return {}
    return {"tokens": m.completion_tokens or 0, "tokens_per_s": (m.timings or {}).get("tokens_per_s", 0.0),
            "finish": m.finish_reason or m.status, "seed": m.seed, "model": m.model,
            "device": (m.options or {}).get("device", "?"), "dtype": (m.options or {}).get("dtype", "?")}


def budget_segments(rendered) -> list[tuple[str, int]]:
    """(kind, tokens) for the budget bar: instruction, examples, history, input, reply reserve, free."""
    totals = {"instruction": 0, "example": 0, "history": 0, "input": 0}
    for p in rendered.parts:
        totals[p.kind] = totals.get(p.kind, 0) + p.tokens
    segs = [(k, v) for k, v in totals.items()]
    segs.append(("reserve", rendered.reserve))
    segs.append(("free", max(rendered.free, 0)))
    return segs


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


__all__ = ["ChatSettings", "ChatSession", "ModelPool", "Loaded", "Turn", "ReplyStarted", "ReplyDelta", "ReplyDone",
           "budget_segments", "checkpoint_hash", "parse_setting", "fmt_bytes"]
