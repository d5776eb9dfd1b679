"""The chat screen (the view): messages, the budget bar, the input, the settings panel, the status line.

Model loading and generation run in thread workers that post small messages (tui/app/messages.py);
this screen turns them into widget updates. Replies arrive in batches (10 a second at most). Slash
commands, setting changes and the budget preview belong to the controller (tui/app/controller.py).
"""

from __future__ import annotations

import threading

from dataclasses import replace

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Footer
from textual.worker import WorkerState

from gptchat.core.errors import GptchatError
from gptchat.core.prompting.templates import get_template, list_templates

from gptchat.tui.app import slash
from gptchat.tui.app.controller import BudgetComputed, ChatController
from gptchat.tui.app.first_run import FirstRun, ModelDownloaded
from gptchat.tui.app.screens.chat_edits import MessageEdits
from gptchat.tui.app.screens.compare import CompareScreen
from gptchat.tui.app.screens.help import HelpScreen
from gptchat.tui.app.screens.history import HistoryScreen
from gptchat.tui.app.screens.model_picker import ModelPicker
from gptchat.tui.app.screens.prompt_view import PromptView
from gptchat.tui.app.messages import (
    ModelLoading, ModelMissing, ModelReady, PromptRendered, ReplyBegan, ReplyChunk, ReplyEnded,
)
from gptchat.tui.app.widgets.budget_bar import BudgetBar
from gptchat.tui.app.widgets.chat_input import ChatInput
from gptchat.tui.app.widgets.message_view import MessageView
from gptchat.tui.app.widgets.no_model import NoModelPanel
from gptchat.tui.app.widgets.settings_panel import SettingsPanel
from gptchat.tui.app.widgets.status_line import StatusLine
from gptchat.tui.app.widgets.transcript import Transcript
from gptchat.tui.format import human_bytes

WIDE = 120  # from this many columns the settings panel is open unless the user closed it (F2)
PLACEHOLDER = "Type a message (Enter sends, Shift+Enter new line, /help lists commands)"

class ChatScreen(MessageEdits, Screen):
    # The footer shows these in this order and cuts what does not fit: Help and Quit come first so they
    # always show; the rest are in Help (F1) and the command palette.
    BINDINGS = [
        Binding("f1", "help", "Help"),
        Binding("ctrl+q", "app.quit", "Quit"),
        Binding("escape", "stop", "Stop reply"),
        Binding("ctrl+o", "pick_model", "Model"),
        Binding("f2", "toggle_settings", "Settings"),
        Binding("f3", "history", "History"),
        Binding("f4", "compare", "Compare"),
        Binding("f5", "show_prompt", "Prompt"),
        Binding("ctrl+n", "new_chat", "New chat"),
        Binding("ctrl+r", "regenerate", "Regenerate", show=False),
        Binding("ctrl+b", "edit_last", "Edit last", show=False),
        Binding("ctrl+t", "copy_last", "Copy reply", show=False),
    ]

    def __init__(self, **kw):
        super().__init__(**kw)
        self.loaded = None  # core.chat.Loaded
        self.generating = False
        self.cancel = threading.Event()
        self.reply_view: MessageView | None = None
        self.reply_began = False
        self._budget_timer = None
        self.settings_choice: bool | None = None  # the panel shown (True) or hidden by F2; None: by width
        self.controller = ChatController(self)
        self.first_run = FirstRun(self)

    @property
    def session(self):
        return self.app.session

    def compose(self) -> ComposeResult:
        names = [t.name for t in list_templates()[0]]
        with Horizontal(id="main"):
            with Vertical(id="chat-col"):
                yield Transcript(id="messages")
                yield BudgetBar(id="budget")
                yield ChatInput(id="input", placeholder=PLACEHOLDER)
            yield SettingsPanel(names, id="settings")
        yield StatusLine(id="status")
        yield Footer()

    def on_mount(self) -> None:
        self.fit_settings_panel()
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
        self.loaded = self.app.pool.get(msg.spec, i["device"], i["dtype"], i["quantize"])
        s = self.session.settings
        if s.model != msg.spec:
            self.session.settings = replace(s, model=msg.spec)
            self.sync_settings()
        self.messages.model_ready(msg.spec, self.session.settings.template)
        panel = self.query_one(NoModelPanel)
        if self.focused is None or panel in self.focused.ancestors:  # its buttons are hidden now: type a message
            self.query_one("#input", ChatInput).focus()
        self.controller.remember()
        self.show_model(msg.spec, i)
        self.update_memory()
        self.update_budget()

    def show_model(self, spec: str, i: dict) -> None:
        st = self.query_one(StatusLine)
        st.state = "generating" if self.generating else "ready"
        weights = i["dtype"] if i.get("quantize", "none") == "none" else f"{i['quantize']} weights"
        st.model = f"{spec} · {i['device']} {weights} · {i['params'] / 1e6:.1f}M params · ctx {i['n_ctx']}"

    def on_model_missing(self, msg: ModelMissing) -> None:
        if self.loaded is not None:  # a switch failed: keep working with the model we have
            self.session.settings = self.controller.keep_loaded_model(self.loaded)
            self.sync_settings()
            self.show_model(self.loaded.spec, self.loaded.lm.describe())
            self.notify(f"{msg.reason}; still using {self.loaded.spec}", title="Model not switched", severity="warning")
            return
        self.messages.show_no_model(msg.reason, msg.local)
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
            if self.query_one(StatusLine).state in ("starting", "loading"):
                self.notify("the model is still loading: send again once it is ready (or pick another with Ctrl+O)",
                            severity="warning")
            else:  # none found, or the last load failed: nothing is on its way
                self.notify("no model is loaded: pick one with Ctrl+O or /model PATH (your message is kept)",
                            severity="warning")
            return
        if text.startswith("//"):
            text = text[1:]
        turn = self.session.add_user(text)
        self.messages.add("user", turn.text)
        box.clear()
        self.start_reply()

    @property
    def messages(self) -> Transcript:
        return self.query_one("#messages", Transcript)

    def start_reply(self) -> None:
        self.reply_began = False  # set when its prompt is built and the model starts (ReplyBegan)
        self.reply_view = self.messages.add("assistant", "", status="streaming")
        self.generating = True
        self.query_one(StatusLine).state = "generating"
        self.cancel = threading.Event()
        self.controller.generate(self.loaded, self.cancel)

    def on_reply_began(self, msg: ReplyBegan) -> None:
        self.reply_began = True
        self.messages.mark_dropped(msg.turns_dropped)
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

    @on(NoModelPanel.Chosen)
    def on_first_model(self, event: NoModelPanel.Chosen) -> None:
        try:
            self.first_run.choose(event.choice)
        except GptchatError as e:
            self.controller.notify_error(e)

    def on_model_downloaded(self, msg: ModelDownloaded) -> None:
        self.controller.apply_setting("model", msg.name)

    def on_worker_state_changed(self, event) -> None:
        self.app.report_worker_error(event)  # the app shows worker errors; here we leave "generating"
        w = event.worker
        if w.group == "download" and event.state in (WorkerState.SUCCESS, WorkerState.ERROR, WorkerState.CANCELLED):
            self.first_run.ended()
        if w.group == "generate" and event.state in (WorkerState.ERROR, WorkerState.CANCELLED):
            self.generating = False
            if event.state == WorkerState.ERROR and not self.reply_began:
                self.take_back_unsent()
            elif self.reply_view is not None and self.reply_view.status == "streaming":
                self.reply_view.set_status("error")
            self.query_one(StatusLine).state = "ready" if self.loaded else "no model"

    def take_back_unsent(self) -> None:
        """A message whose prompt could not be built (a setting the template cannot take, examples that do not
        fit it) never reached the model: it leaves the conversation (its stored row marked replaced, as an edited
        one is) and goes back to the input, so fixing the setting and pressing Enter sends it."""
        text = self.session.pop_exchange()
        self.show_turns()
        box = self.query_one("#input", ChatInput)
        if text is not None and not box.text.strip():
            box.text = text
        box.focus()

    # -- actions --------------------------------------------------------------------------------

    def action_stop(self) -> None:
        if self.generating:
            self.cancel.set()
            if self.reply_view is not None:
                self.reply_view.border_subtitle = "stopping…"
        elif self.focused is not None and self.focused.id != "input":
            self.query_one("#input", ChatInput).focus()

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
        self.settings_choice = not panel.has_class("hidden")
        if self.settings_choice:
            panel.query_one("#set-template").focus()
        else:
            self.query_one("#input", ChatInput).focus()

    def fit_settings_panel(self) -> None:
        """Below WIDE columns the panel starts hidden (the chat needs the room); F2 overrides."""
        if self.settings_choice is None:
            self.query_one(SettingsPanel).set_class(self.app.size.width < WIDE, "hidden")

    def on_resize(self, event) -> None:
        self.fit_settings_panel()

    @property
    def focus_chain(self):
        """Tab from the input reaches the messages (newest first) before the settings panel."""
        chain = super().focus_chain
        views = [w for w in chain if isinstance(w, MessageView)]
        rest = [w for w in chain if not isinstance(w, MessageView)]
        box = self.query_one("#input", ChatInput)
        if box not in rest:
            return chain
        i = rest.index(box) + 1
        return rest[:i] + views[::-1] + rest[i:]

    def set_markdown(self, on: bool) -> None:
        self.messages.set_markdown(on)

    def action_show_prompt(self) -> None:
        try:
            self.controller.show_prompt()
        except GptchatError as e:
            self.controller.notify_error(e)

    def on_prompt_rendered(self, msg: PromptRendered) -> None:
        self.app.push_screen(PromptView(msg.rendered, msg.what))

    def action_pick_model(self) -> None:
        self.app.push_screen(ModelPicker(self.session.settings.model), self._picked)

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
        before = self.session.settings
        self.session.open(conv_id)  # the conversation's own settings come back with it
        self.show_turns()
        self.sync_settings()
        self.controller.remember()
        s = self.session.settings
        if s.model is not None and (s.model, s.device, s.dtype) != (before.model, before.device, before.dtype):
            self.controller.before_switch = before  # the working model stays until this one is ready
            self.start_load()
        self.update_budget()

    def action_compare(self, spec: str = "") -> None:
        self.app.push_screen(CompareScreen(spec, self.query_one("#input", ChatInput).text))

    def action_help(self) -> None:
        self.app.push_screen(HelpScreen(self.BINDINGS))

    # -- views, settings, budget ------------------------------------------------------------------

    def show_turns(self) -> None:
        """Rebuild the message list from the session (after new chat or reopening one)."""
        self.reply_view = None
        self.messages.show_turns(self.session.turns)

    def sync_settings(self) -> None:
        s = self.session.settings
        try:
            tpl = get_template(s.template)
        except GptchatError:
            resolved, variables = {}, {}
        else:
            resolved = s.resolved(tpl.options)
            variables = {n: tpl.variables.get(n, "") for n in tpl.variable_names() if n != tpl.input_variable}
        self.query_one(SettingsPanel).sync(s, resolved, variables)

    @on(SettingsPanel.Changed)
    def on_setting(self, event: SettingsPanel.Changed) -> None:
        if event.name == "pick_model":
            self.action_pick_model()
            return
        if event.name.startswith("var:"):
            self.controller.set_var(event.name[4:], event.value, quiet=not event.final)
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
            bar.show(msg.segments, msg.n_ctx, msg.dropped, msg.reserve_note)
            if not self.generating:
                self.messages.mark_dropped(msg.turns_dropped)
