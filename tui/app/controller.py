"""The chat screen's controller: slash commands, setting changes and the budget preview.

The screen (screens/chat.py) is the view: it lays out widgets, streams replies and calls this for
everything a user types that is not a message. Settings are parsed by core (``ChatSettings.with_value``
over the one options module), so ``/set top-p 1``, ``/set temp 0.5`` and ``/set topk 5`` mean what the
CLI's ``--top-p``, ``--temperature`` and ``--top-k`` mean. No slash command can close the app: every
error becomes a notification. The budget preview tokenizes in a thread worker, never on the UI thread.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from functools import partial

from textual.message import Message

from gptchat.core import config
from gptchat.core.errors import GptchatError, UsageError
from gptchat.core.session import prefs
from gptchat.core.session.chat import ChatSession, ReplyDelta, ReplyDone, ReplyStarted, Turn, render_prompt
from gptchat.core.session.pool import Loaded
from gptchat.core.session.settings import ChatSettings, setting_name
from gptchat.core.prompting.templates import get_template
from gptchat.core.session.store import export_file
from gptchat.core.weights.discover import local_models

from gptchat.tui.app import engine_thread, slash
from gptchat.tui.app.screens.experiment import ExperimentScreen
from gptchat.tui.app.screens.finetune import open_finetune
from gptchat.tui.app.messages import (
    ModelLoading, ModelMissing, ModelReady, PromptRendered, ReplyBegan, ReplyChunk, ReplyEnded,
)
from gptchat.tui.format import budget_segments

# The reply worker posts streamed text at most this often (the first piece at once). Each post repaints the
# message (and lays the screen out when the text outgrows its box: MessageView._paint) on the UI thread,
# which holds the GIL the decode thread needs between kernels. Fed a 35 tok/s stream on a 2-core EPYC, the
# UI thread took 10-13% of a core at 10 posts a second and 7-10% at 5; the app's decode rate over the same
# decode in a worker thread 0.87x and 0.90x (two alternating runs of 3 rounds each; `python -m gptchat.tui.app.bench`).
BATCH_S = 0.2
USER_ERRORS = (GptchatError, ValueError, OSError)  # what a user can cause: shown as the message alone


@dataclass
class BudgetComputed(Message, bubble=False):
    """The budget preview for the input as it was at ``seq`` (stale ones are dropped)."""

    seq: int
    segments: list[tuple[str, int]] = field(default_factory=list)
    n_ctx: int = 0
    dropped: list[str] = field(default_factory=list)
    note: str = ""  # set when there is nothing to draw (the message says why)
    turns_dropped: int = 0  # the oldest chat turns the next prompt leaves out
    reserve_note: str = ""  # set when the reply reserve is smaller than max new tokens


@dataclass
class InspectReady(Message, bubble=False):
    """A reply's prompt and token ids, ready for the inspect view (screens/inspect.py)."""

    lm: object  # the LoadedModel that scores it
    context_ids: list[int]
    reply_ids: list[int]
    params: object  # the settings' SamplingParams


class ChatController:
    def __init__(self, screen) -> None:
        self.screen = screen  # the ChatScreen this controls
        self.budget_seq = 0
        self.before_switch: ChatSettings | None = None  # the settings before a model switch started
        self.remember_failed = False  # the settings file could not be written (said once)

    @property
    def session(self):
        return self.screen.app.session

    def notify_error(self, e: Exception) -> None:
        msg = str(e) if isinstance(e, USER_ERRORS) else f"{type(e).__name__}: {e}"
        self.screen.notify(msg or type(e).__name__, severity="error")

    # -- slash commands -------------------------------------------------------------------------

    def run_slash(self, text: str) -> None:
        """Run one slash command. Any error is a notification: a slash command never closes the app."""
        try:
            self._dispatch(*slash.parse(text))
        except Exception as e:  # noqa: BLE001 - the app must outlive any command; the error is shown
            self.notify_error(e)

    def _dispatch(self, name: str, arg: str) -> None:
        cmd = slash.COMMANDS[name]
        if cmd.setting and (arg or not cmd.action):
            self.apply_setting(cmd.setting, arg)
        elif cmd.action:
            action = getattr(self.screen, f"action_{cmd.action}")
            action(arg) if arg and cmd.args else action()
        else:
            getattr(self, f"cmd_{name}")(arg)

    def cmd_set(self, arg: str) -> None:
        name, _, value = arg.partition(" ")
        if not name:
            raise UsageError("usage: /set NAME VALUE, e.g. /set temperature 0.7")
        self.apply_setting(name, value)

    def cmd_var(self, arg: str) -> None:
        name, _, value = arg.partition(" ")
        if not name:
            raise UsageError("usage: /var NAME VALUE, e.g. /var task Translate to French; /var NAME alone unsets it")
        self.set_var(name, value.strip())

    def set_var(self, name: str, value: str, quiet: bool = False) -> None:
        """Set a template variable (``quiet``: typed in the panel, which already shows it)."""
        self.session.settings = self.session.settings.with_var(name, value)
        self.remember()
        if not quiet:
            self.screen.sync_settings()
            self.screen.notify(f"{name} = {value!r}" if value else f"{name} unset")
        self.refresh_budget()

    def cmd_markdown(self, arg: str) -> None:
        words = {"on": True, "true": True, "yes": True, "": True, "off": False, "false": False, "no": False}
        if arg.lower() not in words:
            raise UsageError("usage: /markdown on|off")
        self.screen.set_markdown(words[arg.lower()])
        self.screen.notify(f"markdown {'on' if words[arg.lower()] else 'off'}")

    def cmd_finetune(self, arg: str) -> None:
        open_finetune(self.screen.app, arg)

    def cmd_experiment(self, arg: str) -> None:
        self.screen.app.push_screen(ExperimentScreen(arg or None))

    def cmd_unload(self, arg: str) -> None:
        if not arg:
            raise UsageError("usage: /unload NAME")
        self.screen.app.pool.unload(arg)
        self.screen.model_unloaded(arg)
        self.screen.notify(f"unloaded {arg}")

    def _saved_conversation(self) -> str:
        if not self.session.conv_id or self.session.store is None:
            raise UsageError("send a message first: this chat is not saved yet")
        return self.session.conv_id

    def cmd_rename(self, arg: str) -> None:
        conv_id = self._saved_conversation()
        if not arg:
            raise UsageError("usage: /rename NAME")
        self.session.store.rename(conv_id, arg)
        self.screen.notify(f"renamed to {arg!r}")

    def cmd_export(self, arg: str) -> None:
        """/export [md|json] [PATH]; a PATH alone takes its format from its suffix (/export notes.json)."""
        conv_id = self._saved_conversation()
        first, _, rest = arg.strip().partition(" ")
        if first.lower().lstrip(".") in ("md", "markdown", "json"):
            fmt, path = first, rest.strip()
        else:
            fmt, path = None, arg.strip()
        self.screen.notify(f"exported to {export_file(self.session.store, conv_id, fmt, path or None)}")

    # -- settings ---------------------------------------------------------------------------------

    def apply_setting(self, spelling: str, value: str, quiet: bool = False) -> bool:
        """Set one setting from text, any spelling. ``quiet`` (typing in the panel): no notifications."""
        scr, old = self.screen, self.session.settings
        try:
            name = setting_name(spelling)
            new = old.with_value(name, value)
        except USER_ERRORS as e:
            if not quiet:
                self.notify_error(e)
            return False
        self.session.settings = new
        self.remember()
        if name in ("model", "device", "dtype", "quantize") and (getattr(new, name) != getattr(old, name) or scr.loaded is None):
            self.before_switch = old  # the working model stays until the new one is ready
            scr.start_load()
        if not quiet:
            scr.sync_settings()
            v = getattr(new, name)
            scr.notify(f"{name} = {'default' if v is None else v}")
        elif name == "template":
            scr.sync_settings()
        self.refresh_budget()
        return True

    def remember(self) -> None:
        """Keep the settings for the next launch (core/session/prefs.py); a failure is said once."""
        if not self.screen.app.remember:
            return
        try:
            prefs.save(self.session.settings)
        except (GptchatError, OSError) as e:
            if not self.remember_failed:
                self.remember_failed = True
                self.screen.notify(f"settings will not be kept for the next launch: {e}", severity="warning")

    # -- replies ----------------------------------------------------------------------------------

    def generate(self, loaded: Loaded, cancel: threading.Event) -> None:
        """Stream the reply to the last user message in a thread worker (group "generate")."""
        self.screen.run_worker(partial(self._generate, self.session, loaded, cancel), name="generate",
                               group="generate", thread=True, exclusive=True, exit_on_error=False)

    def _generate(self, session: ChatSession, loaded: Loaded, cancel: threading.Event) -> None:
        engine_thread.run(self._stream, session, loaded, cancel)  # see engine_thread: one OpenMP team

    def _stream(self, session: ChatSession, loaded: Loaded, cancel: threading.Event) -> None:
        post = self.screen.post_message
        buf: list[str] = []
        last = float("-inf")  # the first text is shown as soon as it is there
        for ev in session.reply(loaded, cancel):
            if isinstance(ev, ReplyDelta):
                buf.append(ev.text)
                if time.monotonic() - last >= BATCH_S:
                    post(ReplyChunk("".join(buf)))
                    buf.clear()
                    last = time.monotonic()
            elif isinstance(ev, ReplyStarted):
                post(ReplyBegan(ev.reply_id, ev.prompt_tokens, ev.dropped, ev.turns_dropped))
            elif isinstance(ev, ReplyDone):
                if buf:
                    post(ReplyChunk("".join(buf)))
                post(ReplyEnded(ev.turn.text, ev.turn.status, ev.turn.info))

    # -- models -----------------------------------------------------------------------------------

    def load_model(self) -> None:
        """Load the settings' model in a thread worker; the screen hears ModelReady or ModelMissing."""
        s = self.session.settings
        self.screen.run_worker(partial(self._load, s.model, s.device, s.dtype, s.quantize), name="load", group="load",
                               thread=True, exclusive=True, exit_on_error=False)

    def keep_loaded_model(self, loaded) -> ChatSettings:
        """The settings after a failed switch: model, device, dtype and quantize as they were for ``loaded``."""
        prev = self.before_switch or self.session.settings
        return replace(self.session.settings, model=loaded.spec, device=prev.device, dtype=prev.dtype,
                       quantize=prev.quantize)

    def _load(self, spec: str | None, device: str | None, dtype: str | None, quantize: str | None = None) -> None:
        post = self.screen.post_message
        post(ModelLoading(spec or "a local model"))
        local: list[str] = []
        if spec is None:
            try:
                spec, local = startup_model()
            except GptchatError as e:  # a bad config.toml: its one line, where the model's name would be
                post(ModelMissing(str(e), []))
                return
            if spec is None:
                post(ModelMissing("no GPT-2 checkpoint was found on this machine", local))
                return
        try:
            m = engine_thread.run(self.screen.app.pool.load, spec, device, dtype, quantize)
        except USER_ERRORS as e:  # a bad path, device or dtype: say so, and keep any working model
            post(ModelMissing(str(e), local or [lm.name for lm in _scan()]))
            return
        post(ModelReady(spec, {**m.lm.describe(), "hash": m.checkpoint_hash}))

    # -- the budget preview -----------------------------------------------------------------------

    def refresh_budget(self) -> None:
        """Recompute the budget bar for the current input in a thread worker."""
        self.budget_seq += 1
        scr = self.screen
        if scr.loaded is None:
            scr.post_message(BudgetComputed(self.budget_seq, note="budget: no model loaded yet"))
            return
        text = scr.input_text()
        text = "" if slash.is_slash(text) else text
        job = partial(self._compute_budget, self.budget_seq, self.session.settings, list(self.session.turns),
                      scr.loaded.lm, text)
        scr.run_worker(job, name="budget", group="budget", thread=True, exclusive=True, exit_on_error=False)

    def _compute_budget(self, seq: int, settings: ChatSettings, turns: list[Turn], lm, text: str) -> None:
        """Runs in a worker thread on a snapshot of the settings and turns; talks back by message only."""
        try:
            r, _ = render_prompt(settings, lm.tokenizer, lm.engine.n_ctx, text, turns)
        except GptchatError as e:
            self.screen.post_message(BudgetComputed(seq, note=f"budget: {e}"))
            return
        wanted = int(settings.resolved(get_template(settings.template).options)["max_new_tokens"])
        note = (f"reply capped at {r.reserve} tokens (max new tokens {wanted}): half the window at most"
                if r.reserve < wanted else "")
        self.screen.post_message(BudgetComputed(seq, budget_segments(r), r.n_ctx, list(r.dropped),
                                                turns_dropped=r.turns_dropped, reserve_note=note))

    # -- the exact prompt -------------------------------------------------------------------------

    def show_prompt(self) -> None:
        """Render the prompt for the input (or, when it is empty, for the last message) in a worker;
        the screen opens the prompt view when PromptRendered arrives."""
        scr = self.screen
        if scr.loaded is None:
            raise UsageError("no model is loaded: the prompt depends on the model's window")
        turns = list(self.session.turns)
        text = scr.input_text()
        what = "the message you are typing"
        if not text.strip() or slash.is_slash(text):
            while turns and turns[-1].role == "assistant":
                turns.pop()
            if not turns:
                raise UsageError("type a message first: the prompt view shows what it will send")
            text, what, turns = turns[-1].text, "your last message", turns[:-1]
        job = partial(self._render_prompt, self.session.settings, turns, scr.loaded.lm, text, what)
        scr.run_worker(job, name="prompt", group="prompt", thread=True, exclusive=True, exit_on_error=False)

    def _render_prompt(self, settings: ChatSettings, turns: list[Turn], lm, text: str, what: str) -> None:
        r, _ = render_prompt(settings, lm.tokenizer, lm.engine.n_ctx, text, turns)
        self.screen.post_message(PromptRendered(r, what))

    # -- inspecting a reply -----------------------------------------------------------------------

    def inspect(self, index: int) -> None:
        """Open the inspect view on the reply at ``index`` of the conversation. Its prompt is rendered
        again from the turns before it (in a worker, like every tokenization); the screen opens the view
        when InspectReady arrives."""
        scr = self.screen
        if scr.loaded is None:
            raise UsageError("no model is loaded: the model scores the reply")
        turns = self.session.turns
        if not 0 < index < len(turns) or turns[index].role != "assistant" or turns[index - 1].role != "user":
            raise UsageError("only a reply to a message can be inspected")
        reply = turns[index]
        if not reply.text and not reply.info.get("token_ids"):
            raise UsageError("this reply is empty: nothing to inspect")
        job = partial(self._inspect, self.session.settings, turns[:index], reply, scr.loaded.lm)
        scr.run_worker(job, name="inspect", group="inspect-prompt", thread=True, exclusive=True, exit_on_error=False)

    def _inspect(self, settings: ChatSettings, before: list[Turn], reply: Turn, lm) -> None:
        r, tpl = render_prompt(settings, lm.tokenizer, lm.engine.n_ctx, before[-1].text, before[:-1])
        # the ids as generated when this session wrote the reply; a reopened one has only its text
        ids = reply.info.get("token_ids") or lm.tokenizer.encode(reply.text)
        params = settings.gen_options(tpl.options, stop=r.stop).params
        self.screen.post_message(InspectReady(lm, list(r.ids), list(ids), params))


def _scan():
    try:
        return local_models()
    except OSError:
        return []


def startup_model() -> tuple[str | None, list[str]]:
    """The model to open when none is given or remembered: config.toml's, else gpt2 from the Hugging Face cache if it
    is there, else the first checkpoint found on this machine (and the names found)."""
    configured = config.load().model
    if configured is not None:
        return configured, []
    names = [m.name for m in _scan()]
    if "gpt2" in names:
        return "gpt2", names
    return (names[0] if names else None), names
