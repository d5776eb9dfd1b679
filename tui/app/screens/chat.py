"""The chat screen (the view): messages, the budget bar, the input, the settings panel, the status line.

Model loading and generation run in thread workers that post small messages (tui/app/messages.py);
this screen turns them into widget updates. Replies arrive in batches (~25 a second at most). Slash
commands, setting changes and the budget preview belong to the controller (tui/app/controller.py).
"""

from __future__ import annotations

import threading

from dataclasses import replace

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer
from textual.worker import WorkerState

from gptchat.core.errors import GptchatError
from gptchat.core.prompting.templates import get_template, list_templates

from gptchat.tui.app import slash
from gptchat.tui.app.controller import BudgetComputed, ChatController
from gptchat.tui.app.screens.compare import CompareScreen
from gptchat.tui.app.screens.help import HelpScreen
from gptchat.tui.app.screens.history import HistoryScreen
from gptchat.tui.app.screens.model_picker import ModelPicker
from gptchat.tui.app.messages import ModelLoading, ModelMissing, ModelReady, ReplyBegan, ReplyChunk, ReplyEnded
from gptchat.tui.app.widgets.budget_bar import BudgetBar
from gptchat.tui.app.widgets.chat_input import ChatInput
from gptchat.tui.app.widgets.message_view import MessageView
from gptchat.tui.app.widgets.no_model import NoModelPanel
from gptchat.tui.app.widgets.settings_panel import SettingsPanel
from gptchat.tui.app.widgets.status_line import StatusLine
from gptchat.tui.format import human_bytes

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
        self.controller = ChatController(self)

    @property
    def session(self):
        return self.app.session

    def compose(self) -> ComposeResult:
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

    def start_load(self) -> None:
        self.controller.load_model()

    def on_model_loading(self, msg: ModelLoading) -> None:
        st = self.query_one(StatusLine)
        st.state, st.model = "loading", f"loading {msg.spec}…"

    def on_model_ready(self, msg: ModelReady) -> None:
        i = msg.info
        self.loaded = self.app.pool.get(msg.spec, i["device"], i["dtype"])
        s = self.session.settings
        if s.model != msg.spec:
            self.session.settings = replace(s, model=msg.spec)
            self.sync_settings()
        self.query_one("#no-model").add_class("hidden")
        self.show_model(msg.spec, i)
        self.update_memory()
        self.update_budget()

    def show_model(self, spec: str, i: dict) -> None:
        st = self.query_one(StatusLine)
        st.state = "generating" if self.generating else "ready"
        st.model = f"{spec} · {i['device']} {i['dtype']} · {i['params'] / 1e6:.1f}M params · ctx {i['n_ctx']}"

    def on_model_missing(self, msg: ModelMissing) -> None:
        if self.loaded is not None:  # a switch failed: keep working with the model we have
            self.session.settings = self.controller.keep_loaded_model(self.loaded)
            self.sync_settings()
            self.show_model(self.loaded.spec, self.loaded.lm.describe())
            self.notify(f"{msg.reason}; still using {self.loaded.spec}", title="Model not switched", severity="warning")
            return
        panel = self.query_one("#no-model", NoModelPanel)
        panel.set_reason(msg.reason, msg.local)
        panel.remove_class("hidden")
        st = self.query_one(StatusLine)
        st.state, st.model = "no model", msg.reason
        self.controller.budget_seq += 1  # any preview still on its way is for a model we no longer have
        self.query_one(BudgetBar).show_note("budget: load a model to see the context window")
        self.notify(msg.reason, title="No model", severity="warning")

    def update_memory(self) -> None:
        params, rss = self.app.pool.memory()
        n = len(self.app.pool.loaded())
        self.query_one(StatusLine).memory = f"{n} model{'s' if n != 1 else ''} loaded, {human_bytes(params)} weights, {human_bytes(rss)} RSS"

    # -- sending and streaming ----------------------------------------------------------------

    @on(ChatInput.Submitted)
    def on_submit(self, event: ChatInput.Submitted) -> None:
        text = event.text
        box = self.query_one("#input", ChatInput)
        if slash.is_slash(text):
            box.clear()
            self.controller.run_slash(text)
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
        self.controller.generate(self.loaded, self.cancel)

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
        self.app.report_worker_error(event)  # the app shows worker errors; here we leave "generating"
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
        self.put_input(text)

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
                self.put_input(event.view.text)

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
        self.put_input(text)
        self.notify(f"editing an earlier message: the {n_later} after it are set aside (kept in history)")

    def put_input(self, text: str) -> None:
        box = self.query_one("#input", ChatInput)
        box.text = text
        box.focus()
        box.move_cursor(box.document.end)
        self.update_budget()

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
        self.app.push_screen(ModelPicker(), self._picked)

    def _picked(self, spec: str | None) -> None:
        if spec:
            self.controller.apply_setting("model", spec)

    def action_history(self) -> None:
        if self.app.session.store is None:
            self.notify("history is off: the database could not be opened", severity="error")
            return
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
        self.app.push_screen(CompareScreen(spec, self.query_one("#input", ChatInput).text))

    def action_help(self) -> None:
        self.app.push_screen(HelpScreen(self.BINDINGS))

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
        self.controller.apply_setting(event.name, event.value, quiet=not event.final)

    def model_unloaded(self, spec: str) -> None:
        if self.loaded is not None and self.loaded.spec == spec:
            self.loaded = None
            self.query_one(StatusLine).state = "no model"
        self.update_memory()
        self.update_budget()

    def input_text(self) -> str:
        return self.query_one("#input", ChatInput).text

    def on_text_area_changed(self, event) -> None:
        if self._budget_timer is not None:
            self._budget_timer.stop()
        self._budget_timer = self.set_timer(0.15, self.update_budget)

    def update_budget(self) -> None:
        self.controller.refresh_budget()

    def on_budget_computed(self, msg: BudgetComputed) -> None:
        if msg.seq != self.controller.budget_seq:
            return  # the input or the settings changed since: a newer preview is on its way
        bar = self.query_one(BudgetBar)
        if msg.note:
            bar.show_note(msg.note)
        else:
            bar.show(msg.segments, msg.n_ctx, msg.dropped)
