"""The chat screen: messages, the budget bar, the input, the settings panel and the status line.

Model loading and generation run in thread workers that post small messages (tui/messages.py);
this screen turns them into widget updates. Replies arrive in batches (~25 a second at most).
"""

from __future__ import annotations

import threading
import time

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer
from textual.worker import WorkerState

from gptchat.core.session.chat import budget_segments, fmt_bytes
from gptchat.core.errors import GptchatError

from gptchat.tui.app import slash
from gptchat.tui.app.messages import ModelLoading, ModelMissing, ModelReady, ReplyBegan, ReplyChunk, ReplyEnded
from gptchat.tui.app.widgets.budget_bar import BudgetBar
from gptchat.tui.app.widgets.chat_input import ChatInput
from gptchat.tui.app.widgets.message_view import MessageView
from gptchat.tui.app.widgets.no_model import NoModelPanel
from gptchat.tui.app.widgets.settings_panel import SettingsPanel
from gptchat.tui.app.widgets.status_line import StatusLine

BATCH_S = 0.04  # the worker posts streamed text at most this often


class ChatScreen(Screen):
    BINDINGS = [
        Binding("escape", "stop", "Stop reply"),
        Binding("ctrl+r", "regenerate", "Regenerate"),
        Binding("ctrl+b", "edit_last", "Edit last"),
        Binding("ctrl+t", "copy_last", "Copy reply"),
        Binding("ctrl+n", "new_chat", "New chat"),
        Binding("ctrl+o", "pick_model", "Model"),
        Binding("f2", "toggle_settings", "Settings"),
        Binding("f3", "history", "History"),
        Binding("f4", "compare", "Compare"),
        Binding("f1", "help", "Help"),
    ]

    def __init__(self, **kw):
        super().__init__(**kw)
        self.loaded = None  # core.chat.Loaded
        self.generating = False
        self.cancel = threading.Event()
        self.reply_view: MessageView | None = None
        self._budget_timer = None

    @property
    def session(self):
        return self.app.session

    def compose(self) -> ComposeResult:
        from gptchat.core.prompting.templates import list_templates

        names = [t.name for t in list_templates()[0]]
        with Horizontal(id="main"):
            with Vertical(id="chat-col"):
                with VerticalScroll(id="messages"):
                    yield NoModelPanel(id="no-model", classes="hidden")
                yield BudgetBar(id="budget")
                yield ChatInput(id="input")
            yield SettingsPanel(names, id="settings")
        yield StatusLine(id="status")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#messages", VerticalScroll).anchor()
        self.show_turns()
        self.sync_settings()
        self.query_one("#input", ChatInput).focus()
        if self.app.autoload:
            self.start_load()

    # -- model loading ------------------------------------------------------------------------

    def start_load(self, spec: str | None = None) -> None:
        s = self.session.settings
        self.load_model(spec or s.model, s.device, s.dtype)

    @work(thread=True, exclusive=True, group="load", exit_on_error=False)
    def load_model(self, spec: str | None, device: str | None, dtype: str | None) -> None:
        self.post_message(ModelLoading(spec or "a local model"))
        local: list[str] = []
        if spec is None:
            spec, local = default_model()
            if spec is None:
                self.post_message(ModelMissing("no GPT-2 checkpoint was found on this machine", local))
                return
        try:
            m = self.app.pool.load(spec, device, dtype)
        except GptchatError as e:
            if not local:
                local = [lm.name for lm in _scan()]
            self.post_message(ModelMissing(str(e), local))
            return
        self.post_message(ModelReady(spec, {**m.lm.describe(), "hash": m.checkpoint_hash}))

    def on_model_loading(self, msg: ModelLoading) -> None:
        st = self.query_one(StatusLine)
        st.state, st.model = "loading", f"loading {msg.spec}…"

    def on_model_ready(self, msg: ModelReady) -> None:
        i = msg.info
        self.loaded = self.app.pool.get(msg.spec, i["device"], i["dtype"])
        s = self.session.settings
        if s.model != msg.spec:
            from dataclasses import replace

            self.session.settings = replace(s, model=msg.spec)
            self.sync_settings()
        self.query_one("#no-model").add_class("hidden")
        st = self.query_one(StatusLine)
        st.state = "generating" if self.generating else "ready"
        st.model = f"{msg.spec} · {i['device']} {i['dtype']} · {i['params'] / 1e6:.1f}M params · ctx {i['n_ctx']}"
        self.update_memory()
        self.update_budget()

    def on_model_missing(self, msg: ModelMissing) -> None:
        self.loaded = None
        panel = self.query_one("#no-model", NoModelPanel)
        panel.set_reason(msg.reason, msg.local)
        panel.remove_class("hidden")
        st = self.query_one(StatusLine)
        st.state, st.model = "no model", msg.reason
        self.query_one(BudgetBar).show_note("budget: load a model to see the context window")
        self.notify(msg.reason, title="No model", severity="warning")

    def update_memory(self) -> None:
        params, rss = self.app.pool.memory()
        n = len(self.app.pool.loaded())
        self.query_one(StatusLine).memory = f"{n} model{'s' if n != 1 else ''} loaded, {fmt_bytes(params)} weights, {fmt_bytes(rss)} RSS"

    # -- sending and streaming ----------------------------------------------------------------

    @on(ChatInput.Submitted)
    def on_submit(self, event: ChatInput.Submitted) -> None:
        text = event.text
        box = self.query_one("#input", ChatInput)
        if slash.is_slash(text):
            box.clear()
            self.run_slash(text)
            return
        if not text.strip():
            return
        if self.generating:
            self.notify("a reply is still streaming: press Escape to stop it first", severity="warning")
            return
        if self.loaded is None:
            self.notify("no model is loaded yet: wait for it, or pick one with Ctrl+O", severity="warning")
            return
        if text.startswith("//"):
            text = text[1:]
        turn = self.session.add_user(text)
        self.messages.mount(MessageView("user", turn.text))
        box.clear()
        self.start_reply()

    @property
    def messages(self) -> VerticalScroll:
        return self.query_one("#messages", VerticalScroll)

    def start_reply(self) -> None:
        self.reply_view = MessageView("assistant", "", status="streaming")
        self.messages.mount(self.reply_view)
        self.messages.anchor()
        self.generating = True
        self.query_one(StatusLine).state = "generating"
        self.cancel = threading.Event()
        self.generate(self.session, self.loaded, self.cancel)

    @work(thread=True, exclusive=True, group="generate", exit_on_error=False)
    def generate(self, session, loaded, cancel: threading.Event) -> None:
        from gptchat.core.session.chat import ReplyDelta, ReplyDone, ReplyStarted

        buf: list[str] = []
        last = time.monotonic()
        for ev in session.reply(loaded, cancel):
            if isinstance(ev, ReplyDelta):
                buf.append(ev.text)
                if time.monotonic() - last >= BATCH_S:
                    self.post_message(ReplyChunk("".join(buf)))
                    buf.clear()
                    last = time.monotonic()
            elif isinstance(ev, ReplyStarted):
                self.post_message(ReplyBegan(ev.reply_id, ev.prompt_tokens, ev.dropped))
            elif isinstance(ev, ReplyDone):
                if buf:
                    self.post_message(ReplyChunk("".join(buf)))
                self.post_message(ReplyEnded(ev.turn.text, ev.turn.status, ev.turn.info))

    def on_reply_began(self, msg: ReplyBegan) -> None:
        if msg.dropped:
            self.notify("; ".join(msg.dropped), title="Dropped to fit the window")

    def on_reply_chunk(self, msg: ReplyChunk) -> None:
        if self.reply_view is not None:
            self.reply_view.append(msg.text)

    def on_reply_ended(self, msg: ReplyEnded) -> None:
        if self.reply_view is not None:
            self.reply_view.finish(msg.text, msg.status, msg.info)
        self.generating = False
        i = msg.info
        st = self.query_one(StatusLine)
        st.state = "ready"
        st.last = (f"{i.get('tokens', 0)} tok · {i.get('tokens_per_s', 0):.1f} tok/s · {i.get('device')} "
                   f"{i.get('dtype')} · {'stopped' if msg.status == 'stopped' else i.get('finish')} · seed {i.get('seed')}")
        self.update_memory()
        self.update_budget()

    def on_worker_state_changed(self, event) -> None:
        # The app shows worker errors as notifications; here we only leave the "generating" state.
        w = event.worker
        if w.group == "generate" and event.state in (WorkerState.ERROR, WorkerState.CANCELLED):
            self.generating = False
            if self.reply_view is not None and self.reply_view.status == "streaming":
                self.reply_view.set_status("error")
            self.query_one(StatusLine).state = "ready" if self.loaded else "no model"

    # -- actions --------------------------------------------------------------------------------

    def action_stop(self) -> None:
        if self.generating:
            self.cancel.set()
            if self.reply_view is not None:
                self.reply_view.border_subtitle = "stopping…"
        elif self.focused is not None and self.focused.id != "input":
            self.query_one("#input", ChatInput).focus()

    def _busy(self) -> bool:
        if self.generating:
            self.notify("a reply is streaming: press Escape to stop it first", severity="warning")
        return self.generating

    def action_regenerate(self) -> None:
        if self._busy():
            return
        if self.loaded is None:
            self.notify("no model is loaded", severity="warning")
            return
        if self.session.pop_reply() is not None:
            views = self.messages.query(MessageView)
            if views and views.last().role == "assistant":
                views.last().remove()
        if self.session.pending_input() is None:
            self.notify("nothing to regenerate yet", severity="warning")
            return
        self.start_reply()

    def action_edit_last(self) -> None:
        if self._busy():
            return
        text = self.session.pop_exchange()
        if text is None:
            self.notify("no message to edit", severity="warning")
            return
        views = list(self.messages.query(MessageView))
        while views and views[-1].role == "assistant":
            views.pop().remove()
        if views:
            views.pop().remove()
        box = self.query_one("#input", ChatInput)
        box.text = text
        box.focus()
        box.move_cursor(box.document.end)
        self.update_budget()

    def action_copy_last(self) -> None:
        for t in reversed(self.session.turns):
            if t.role == "assistant":
                self.copy(t.text)
                return
        self.notify("no reply to copy yet", severity="warning")

    def copy(self, text: str) -> None:
        self.app.copy_to_clipboard(text)
        self.notify(f"copied {len(text)} characters")

    @on(MessageView.Action)
    def on_message_action(self, event: MessageView.Action) -> None:
        if event.action == "copy":
            self.copy(event.view.text)
        elif event.action == "edit":
            views = list(self.messages.query(MessageView))
            users = [v for v in views if v.role == "user"]
            if users and event.view is users[-1]:
                self.action_edit_last()
            elif event.view.role == "user":
                self.edit_from(views, event.view)
            else:  # a reply: bring its text back to send it as a message
                box = self.query_one("#input", ChatInput)
                box.text = event.view.text
                box.focus()

    def edit_from(self, views: list[MessageView], view: MessageView) -> None:
        """Branch at an older message of yours: it and everything after it leave the view (kept in
        history, marked replaced), its text goes to the input, and sending continues from there."""
        if self._busy():
            return
        i = views.index(view)
        turns = self.session.turns
        if len(views) != len(turns) or turns[i].role != "user" or turns[i].text != view.text:
            self.notify("this view is out of step with the conversation: reopen it from History (F3)",
                        severity="warning")
            return
        n_later = len(turns) - i - 1
        text = self.session.branch(i)
        for v in views[i:]:
            v.remove()
        self.reply_view = None
        box = self.query_one("#input", ChatInput)
        box.text = text
        box.focus()
        box.move_cursor(box.document.end)
        self.update_budget()
        self.notify(f"editing an earlier message: the {n_later} after it are set aside (kept in history)")

    def action_new_chat(self) -> None:
        if self.generating:
            self.cancel.set()
        self.session.new()
        self.show_turns()
        self.query_one(StatusLine).last = ""
        self.query_one("#input", ChatInput).focus()
        self.update_budget()

    def action_toggle_settings(self) -> None:
        panel = self.query_one(SettingsPanel)
        panel.toggle_class("hidden")
        if not panel.has_class("hidden"):
            panel.query_one("#set-template").focus()
        else:
            self.query_one("#input", ChatInput).focus()

    def action_pick_model(self) -> None:
        from gptchat.tui.app.screens.model_picker import ModelPicker

        self.app.push_screen(ModelPicker(), self._picked)

    def _picked(self, spec: str | None) -> None:
        if spec:
            self.apply_setting("model", spec)

    def action_history(self) -> None:
        if self.app.session.store is None:
            self.notify("history is off: the database could not be opened", severity="error")
            return
        from gptchat.tui.app.screens.history import HistoryScreen

        self.app.push_screen(HistoryScreen(), self._reopen)

    def _reopen(self, conv_id: str | None) -> None:
        if not conv_id:
            return
        if self.generating:
            self.cancel.set()
        self.session.open(conv_id)
        self.show_turns()
        self.update_budget()

    def action_compare(self, spec: str = "") -> None:
        from gptchat.tui.app.screens.compare import CompareScreen

        self.app.push_screen(CompareScreen(spec, self.query_one("#input", ChatInput).text))

    def action_help(self) -> None:
        from gptchat.tui.app.screens.help import HelpScreen

        self.app.push_screen(HelpScreen())

    # -- views, settings, budget ------------------------------------------------------------------

    def show_turns(self) -> None:
        """Rebuild the message list from the session (after new chat or reopening one)."""
        self.messages.query(MessageView).remove()
        self.reply_view = None
        views = [MessageView(t.role, t.text, t.status, t.info) for t in self.session.turns]
        if views:
            self.messages.mount_all(views)
        self.messages.anchor()

    def sync_settings(self) -> None:
        from gptchat.core.prompting.templates import get_template

        s = self.session.settings
        try:
            resolved = s.resolved(get_template(s.template).options)
        except GptchatError:
            resolved = {}
        self.query_one(SettingsPanel).sync(s, resolved)

    @on(SettingsPanel.Changed)
    def on_setting(self, event: SettingsPanel.Changed) -> None:
        if event.name == "pick_model":
            self.action_pick_model()
            return
        self.apply_setting(event.name, event.value, quiet=not event.final)

    def apply_setting(self, name: str, value: str, quiet: bool = False) -> bool:
        s = self.session.settings
        try:
            new = s.with_value(name, value)
        except GptchatError as e:
            if not quiet:
                self.notify(str(e), severity="error")
            return False
        self.session.settings = new
        if name in ("model", "device", "dtype") and (getattr(new, name) != getattr(s, name) or self.loaded is None):
            self.loaded = None
            self.start_load()
        if not quiet:
            self.sync_settings()
            self.notify(f"{name} = {getattr(new, name) if getattr(new, name) is not None else 'default'}")
        elif name == "template":
            self.sync_settings()
        self.update_budget()
        return True

    def on_text_area_changed(self, event) -> None:
        if self._budget_timer is not None:
            self._budget_timer.stop()
        self._budget_timer = self.set_timer(0.15, self.update_budget)

    def update_budget(self) -> None:
        bar = self.query_one(BudgetBar)
        if self.loaded is None:
            bar.show_note("budget: no model loaded yet")
            return
        lm = self.loaded.lm
        text = self.query_one("#input", ChatInput).text
        if slash.is_slash(text):
            text = ""
        try:
            r = self.session.preview(lm.tokenizer, lm.engine.n_ctx, text)
        except GptchatError as e:
            bar.show_note(f"budget: {e}")
            return
        bar.show(budget_segments(r), r.n_ctx, r.dropped)

    # -- slash commands ---------------------------------------------------------------------------

    def run_slash(self, text: str) -> None:
        try:
            name, arg = slash.parse(text)
            getattr(self, f"slash_{name}")(arg)
        except GptchatError as e:
            self.notify(str(e), severity="error")

    def slash_model(self, arg: str) -> None:
        self.apply_setting("model", arg) if arg else self.action_pick_model()

    def slash_template(self, arg: str) -> None:
        self.apply_setting("template", arg)

    def slash_shots(self, arg: str) -> None:
        self.apply_setting("shots", arg)

    def slash_examples(self, arg: str) -> None:
        self.apply_setting("examples", arg)

    def slash_set(self, arg: str) -> None:
        name, _, value = arg.partition(" ")
        if not name:
            from gptchat.core.errors import UsageError

            raise UsageError("usage: /set NAME VALUE, e.g. /set temperature 0.7")
        self.apply_setting(name, value)

    def slash_compare(self, arg: str) -> None:
        self.action_compare(arg)

    def slash_finetune(self, arg: str) -> None:
        from gptchat.tui.app.screens.finetune import open_finetune

        open_finetune(self.app, arg)

    def slash_new(self, arg: str) -> None:
        self.action_new_chat()

    def slash_history(self, arg: str) -> None:
        self.action_history()

    def slash_regen(self, arg: str) -> None:
        self.action_regenerate()

    def slash_edit(self, arg: str) -> None:
        self.action_edit_last()

    def slash_copy(self, arg: str) -> None:
        self.action_copy_last()

    def slash_help(self, arg: str) -> None:
        self.action_help()

    def slash_unload(self, arg: str) -> None:
        self.app.pool.unload(arg)
        if self.loaded is not None and self.loaded.spec == arg:
            self.loaded = None
            self.query_one(StatusLine).state = "no model"
        self.update_memory()
        self.notify(f"unloaded {arg}")

    def slash_rename(self, arg: str) -> None:
        from gptchat.core.errors import UsageError

        if not self.session.conv_id or self.session.store is None:
            raise UsageError("send a message first: this chat is not saved yet")
        if not arg:
            raise UsageError("usage: /rename NAME")
        self.session.store.rename(self.session.conv_id, arg)
        self.notify(f"renamed to {arg!r}")

    def slash_export(self, arg: str) -> None:
        from gptchat.core.errors import UsageError

        from gptchat.core.session.store import export_file

        if not self.session.conv_id or self.session.store is None:
            raise UsageError("send a message first: this chat is not saved yet")
        fmt, _, path = arg.partition(" ")
        self.notify(f"exported to {export_file(self.session.store, self.session.conv_id, fmt or 'md', path or None)}")


def _scan():
    from gptchat.core.weights.discover import local_models

    try:
        return local_models()
    except OSError:
        return []


def default_model() -> tuple[str | None, list[str]]:
    """gpt2 from the Hugging Face cache if it is there, else the first checkpoint found on this machine."""
    found = _scan()
    names = [m.name for m in found]
    if "gpt2" in names:
        return "gpt2", names
    return (names[0] if names else None), names
