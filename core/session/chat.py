"""A chat conversation independent of any front end: turns, prompts, replies and their history rows.

The TUI holds one ``ChatSession`` and calls it from worker threads; nothing here knows about
Textual. A reply is a generator of small events (``ReplyStarted``, ``ReplyDelta``, ``ReplyDone``)
so the caller decides how often to repaint. Every user message is stored before generation starts
and the reply row is updated while it streams, so a killed process keeps what was shown.
Settings live in settings.py, loaded models in pool.py.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

from gptchat.core.errors import GptchatError, UsageError
from gptchat.core.generate.text import Completion, new_seed, stream
from gptchat.core.prompting.templates import Budget, Rendered, Template, get_template, load_examples, render
from gptchat.core.session.pool import Loaded
from gptchat.core.session.prefs import conversation_settings
from gptchat.core.session.settings import ChatSettings
from gptchat.core.session.store import Store

__all__ = ["ChatSession", "ChatSettings", "Turn", "ReplyStarted", "ReplyDelta", "ReplyDone", "render_prompt",
           "provenance", "completion_info"]

FLUSH_S = 0.5  # how often a streaming reply is written to the database


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
    turns_dropped: int = 0  # the oldest chat turns left out of the prompt to fit the window


@dataclass
class ReplyDelta:
    text: str


@dataclass
class ReplyDone:
    turn: Turn
    completion: Completion


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
        messages = self.store.messages(conv_id)
        for m in messages:
            if m.status == "replaced" or m.pane is not None:
                continue
            status = "stopped" if m.status == "streaming" else m.status  # a reply cut off by a crash
            self.turns.append(Turn(m.role, m.content, m.id, status, _info(m)))
        self.settings = conversation_settings(self.settings, _saved_settings(conv, messages))

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

    def render(self, tokenizer, n_ctx: int, text: str, history: list[Turn] | None = None) -> tuple[Rendered, Template]:
        """The prompt for ``text`` after ``history`` (default: the whole conversation), fitted to n_ctx."""
        return render_prompt(self.settings, tokenizer, n_ctx, text, self.turns if history is None else history)

    # -- replies --

    def reply(self, loaded: Loaded, cancel: threading.Event) -> Iterator[ReplyStarted | ReplyDelta | ReplyDone]:
        """Answer the last user message, streaming. The reply row is written as it grows."""
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
        yield ReplyStarted(turn.msg_id, len(rendered.ids), list(rendered.dropped), rendered.turns_dropped)
        parts: list[str] = []
        flusher = _Flusher(self.store, turn.msg_id) if self.store is not None else None
        last_flush = time.monotonic()
        comp = None
        try:
            for chunk in stream(lm.engine, lm.tokenizer, rendered.ids, opts, cancel):
                if chunk.text:
                    parts.append(chunk.text)
                    yield ReplyDelta(chunk.text)
                    if time.monotonic() - last_flush > FLUSH_S:  # the text so far, for readers and the store
                        turn.text = "".join(parts)
                        if flusher is not None:
                            flusher.put(turn.text)
                        last_flush = time.monotonic()
                comp = chunk.completion or comp
        except BaseException:
            turn.status, turn.text = "error", "".join(parts)
            if flusher is not None:
                flusher.close(quiet=True)  # the error being raised is the one to report
                self.store.update_message(turn.msg_id, content=turn.text, status="error")
            raise
        if flusher is not None:
            flusher.close()  # its last write lands before the final one below
        turn.text = comp.text
        turn.status = "stopped" if comp.finish_reason == "cancelled" else "done"
        # the ids as sampled (stop string included) for the inspect view; in memory only, never stored
        turn.info = {**completion_info(comp, loaded), "token_ids": list(comp.token_ids)}
        if self.store is not None:
            self.store.update_message(
                turn.msg_id, content=comp.text, status=turn.status, prompt_tokens=comp.prompt_tokens,
                completion_tokens=comp.completion_tokens, finish_reason=comp.finish_reason,
                timings={"prefill_s": round(comp.prefill_s, 4), "decode_s": round(comp.decode_s, 4),
                         "tokens_per_s": round(comp.tokens_per_s, 2), "load_s": round(lm.load_s, 3)})
        yield ReplyDone(turn, comp)


class _Flusher:
    """Writes a streaming reply's text to the store from its own thread, so the decode thread never waits on
    SQLite (each commit syncs the WAL: milliseconds). Only the newest text is written; ``close`` waits for
    the last write and raises any error it hit, on the caller's thread."""

    def __init__(self, store: Store, msg_id: str):
        self.store, self.msg_id = store, msg_id
        self._text: str | None = None
        self._closed = False
        self._error: BaseException | None = None
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="gptchat-reply-flush", daemon=True)
        self._thread.start()

    def put(self, text: str) -> None:
        with self._cv:
            self._text = text
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._text is None and not self._closed:
                    self._cv.wait()
                text, self._text = self._text, None
            if text is None:
                return
            try:
                self.store.update_message(self.msg_id, content=text)
            except BaseException as e:  # noqa: BLE001 - raised again by close(), on the reply's thread
                self._error = e
                return

    def close(self, quiet: bool = False) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join()
        if self._error is not None and not quiet:
            raise self._error


def render_prompt(settings: ChatSettings, tokenizer, n_ctx: int, text: str,
                  history: list[Turn]) -> tuple[Rendered, Template]:
    """The prompt for ``text`` after ``history`` under ``settings``, fitted to n_ctx (half of it at most
    reserved for the reply). Used by the conversation and by compare."""
    tpl = get_template(settings.template)
    turns = [(t.role, t.text) for t in history if t.text.strip()] if tpl.kind == "chat" else None
    pool = load_examples(settings.examples, tpl.example_fields) if settings.examples else None
    reserve = int(settings.resolved(tpl.options)["max_new_tokens"])
    budget = Budget(n_ctx=n_ctx, reserve=min(reserve, n_ctx // 2))
    used = set(tpl.variable_names())  # variables set for another template are kept, not passed to this one
    values = {k: v for k, v in settings.vars.items() if k in used and k != tpl.input_variable}
    return render(tpl, {**values, tpl.input_variable: text}, turns, tokenizer, budget, examples=pool,
                  shots=settings.shots, seed=settings.seed or 0), tpl


def provenance(loaded: Loaded, s: ChatSettings, tpl, rendered, opts) -> dict:
    d = loaded.lm.describe()
    return dict(
        model=loaded.spec, checkpoint_hash=loaded.checkpoint_hash, template=tpl.name, seed=opts.seed,
        examples_used=list(rendered.example_ids), prompt_tokens=len(rendered.ids),
        options={**opts.params.to_dict(), "max_new_tokens": opts.max_new_tokens, "stop": list(opts.stop),
                 "shots": s.shots, "examples": s.examples, "device": d["device"], "dtype": d["dtype"],
                 "checkpoint_path": d["path"], "dropped": list(rendered.dropped), "settings": s.to_dict()},
    )


def _saved_settings(conv, messages) -> dict:
    """The settings a conversation last replied with: the newest reply's, else those it was created with,
    else (replies saved before settings were) the newest reply's model and template."""
    replies = [m for m in messages if m.role == "assistant" and m.pane is None]
    for m in reversed(replies):
        if isinstance((m.options or {}).get("settings"), dict):
            return m.options["settings"]
    if isinstance(conv.meta.get("settings"), dict):
        return conv.meta["settings"]
    return {"model": replies[-1].model, "template": replies[-1].template} if replies else {}


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
