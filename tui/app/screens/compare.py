"""Compare: one prompt to 2-4 panes (model x template x shots), same seed and sampler, streaming together."""

from __future__ import annotations

import threading
import time

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Input, Label
from textual.worker import WorkerState

from gptchat.core.config import default_model
from gptchat.core.errors import GptchatError

from gptchat.tui.app import engine_thread
from gptchat.tui.app.messages import PaneChunk, PaneEnded
from gptchat.tui.app.widgets.chat_input import ChatInput
from gptchat.tui.app.widgets.message_view import MessageView

BATCH_S = 0.04


def pane_speed(tokens: int, first: float | None, end: float, fallback: float | None) -> float | None:
    """A pane's own tokens per second, from its first text to its last. Panes of different models run one
    after another, so a figure timed from the comparison's start counts the wait for the panes before."""
    if first is None or tokens < 2 or end <= first:
        return fallback
    return (tokens - 1) / (end - first)


class CompareScreen(Screen):
    BINDINGS = [
        Binding("escape", "stop_or_back", "Stop / back"),
        Binding("ctrl+s", "save_note", "Saved to history", show=False),
    ]

    def __init__(self, spec: str = "", prompt: str = "", saved: dict | None = None):
        super().__init__()
        self.spec = spec
        self.prompt = prompt
        self.saved = saved  # from history: {"panes": [...], "prompt": str, "replies": {i: (text, status, info)}}
        self.running = False
        self.cancel = threading.Event()
        self.views: list[MessageView] = []
        self.completions: dict = {}  # pane -> its Completion, for what a footer's score was taken over

    @classmethod
    def from_history(cls, store, conv_id: str) -> "CompareScreen":
        from gptchat.core.session.compare import Pane

        c = store.conversation(conv_id)
        panes = [Pane(**p) for p in c.meta.get("panes", [])]
        spec = ", ".join(f"{p.model or ''}:{p.template}:{'' if p.shots is None else p.shots}" for p in panes)
        msgs = store.messages(conv_id)
        prompt = next((m.content for m in msgs if m.role == "user"), "")
        replies = {m.pane: (m.content, "stopped" if m.status == "stopped" else "done",
                            {"tokens": m.completion_tokens, "tokens_per_s": (m.timings or {}).get("tokens_per_s"),
                             "finish": m.finish_reason, "seed": m.seed})
                   for m in msgs if m.role == "assistant" and m.pane is not None}
        return cls(spec, prompt, {"panes": panes, "replies": replies})

    def default_spec(self) -> str:
        s = self.app.session.settings
        m = s.model or default_model()
        return f"{m}:{s.template}, {m}:few-shot:3"

    def compose(self) -> ComposeResult:
        yield Label("Compare  (panes: MODEL:TEMPLATE:SHOTS separated by commas; Enter in the box below runs)",
                    classes="panel-title")
        yield Input(self.spec, placeholder="gpt2:chat, gpt2:few-shot:3, ./my-finetune:chat", id="panes")
        yield Horizontal(id="pane-row")
        yield ChatInput(id="prompt")
        yield Footer()

    def on_mount(self) -> None:
        panes_in = self.query_one("#panes", Input)
        if not panes_in.value:
            panes_in.value = self.default_spec()
        box = self.query_one("#prompt", ChatInput)
        box.text = self.prompt
        box.focus()
        if self.saved:
            self.build(self.saved["panes"])
            for i, (text, status, info) in self.saved["replies"].items():
                if i is not None and i < len(self.views):
                    self.views[i].finish(text, status, info)

    def build(self, panes) -> None:
        row = self.query_one("#pane-row", Horizontal)
        row.remove_children()
        # footers inside the box: a narrow pane cuts a border subtitle, the body wraps
        self.views = [MessageView("assistant", "", status="done", label=p.label(), footer_inside=True) for p in panes]
        for v in self.views:
            row.mount(VerticalScroll(v, classes="pane"))

    @on(ChatInput.Submitted, "#prompt")
    def run(self, event: ChatInput.Submitted) -> None:
        from gptchat.core.session.compare import parse_panes

        if self.running:
            self.notify("a comparison is running: press Escape to stop it", severity="warning")
            return
        if not event.text.strip():
            return
        try:
            panes = parse_panes(self.query_one("#panes", Input).value)
        except GptchatError as e:
            self.notify(str(e), severity="error")
            return
        self.build(panes)
        self.completions = {}
        for v in self.views:
            v.set_status("streaming")
        self.running = True
        self.cancel = threading.Event()
        self.compare(panes, event.text, self.cancel)

    @work(thread=True, exclusive=True, group="compare", exit_on_error=False)
    def compare(self, panes, text: str, cancel: threading.Event) -> None:
        engine_thread.run(self._compare, panes, text, cancel)  # the models run on the one engine thread

    def _compare(self, panes, text: str, cancel: threading.Event) -> None:
        from gptchat.core.session.compare import PaneDelta, run_compare

        app = self.app
        bufs: dict[int, list[str]] = {}
        first: dict[int, float] = {}  # when each pane's first text came
        last = time.monotonic()
        # score: each pane's footer shows its reply's mean log p under its own model
        for ev in run_compare(app.pool, panes, text, app.session.settings, cancel, app.session.store, score=True):
            if isinstance(ev, PaneDelta):
                first.setdefault(ev.pane, time.monotonic())
                bufs.setdefault(ev.pane, []).append(ev.text)
                if time.monotonic() - last >= BATCH_S:
                    for i, b in bufs.items():
                        if b:
                            self.post_message(PaneChunk(i, "".join(b)))
                    bufs.clear()
                    last = time.monotonic()
            else:
                if bufs.get(ev.pane):
                    self.post_message(PaneChunk(ev.pane, "".join(bufs.pop(ev.pane))))
                c = self.completions[ev.pane] = ev.completion
                info = {**ev.info, "tokens_per_s": pane_speed(c.completion_tokens, first.get(ev.pane), time.monotonic(),
                                                              ev.info.get("tokens_per_s"))}
                self.post_message(PaneEnded(ev.pane, c.text, "stopped" if c.finish_reason == "cancelled" else "done", info))

    def on_pane_chunk(self, msg: PaneChunk) -> None:
        self.views[msg.pane].append(msg.text)

    def on_pane_ended(self, msg: PaneEnded) -> None:
        self.views[msg.pane].finish(msg.text, msg.status, msg.info)

    def on_worker_state_changed(self, event) -> None:
        self.app.report_worker_error(event)  # why it failed (a pane's model not found): the panes only say "error"
        if event.worker.group != "compare" or event.state not in (WorkerState.SUCCESS, WorkerState.ERROR, WorkerState.CANCELLED):
            return
        self.running = False
        for v in self.views:
            if v.status == "streaming":
                v.set_status("error" if event.state == WorkerState.ERROR else "stopped")
        if event.state == WorkerState.SUCCESS and self.app.session.store is not None:
            self.notify("comparison saved to history")

    def action_stop_or_back(self) -> None:
        if self.running:
            self.cancel.set()
        else:
            self.dismiss()

    def action_save_note(self) -> None:
        self.notify("comparisons are saved to history as they run")
