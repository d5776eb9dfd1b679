"""What the chat screen does to messages already sent: regenerate, edit and resend, branch at an older
one, copy, inspect. A mixin of ChatScreen (screens/chat.py), kept apart so each file reads on its own; it uses the
screen's session, transcript (``messages``), input and ``start_reply``."""

from __future__ import annotations

from gptchat.core.errors import GptchatError
from gptchat.tui.app.controller import InspectReady
from gptchat.tui.app.screens.inspect import InspectView
from gptchat.tui.app.widgets.chat_input import ChatInput
from gptchat.tui.app.widgets.message_view import MessageView


class MessageEdits:
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
            views = self.messages.views
            if views and views[-1].role == "assistant":
                views[-1].remove()
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
        views = self.messages.views
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

    def action_inspect_last(self) -> None:
        turns = self.session.turns
        last = max((i for i, t in enumerate(turns) if t.role == "assistant"), default=None)
        if last is None:
            self.notify("no reply to inspect yet", severity="warning")
            return
        self.inspect(last)

    def inspect(self, index: int) -> None:
        if self._busy():
            return
        try:
            self.controller.inspect(index)
        except GptchatError as e:
            self.controller.notify_error(e)

    def on_inspect_ready(self, msg: InspectReady) -> None:
        self.app.push_screen(InspectView(msg.lm, msg.context_ids, msg.reply_ids, msg.params))

    def on_message_view_action(self, event: MessageView.Action) -> None:
        if event.action == "copy":
            self.copy(event.view.text)
        elif event.action == "inspect":
            self.inspect_view(event.view)
        elif event.action == "edit":
            views = self.messages.views
            users = [v for v in views if v.role == "user"]
            if users and event.view is users[-1]:
                self.action_edit_last()
            elif event.view.role == "user":
                self.edit_from(views, event.view)
            else:  # a reply: bring its text back to send it as a message
                self.put_input(event.view.text)

    def inspect_view(self, view: MessageView) -> None:
        if view.role != "assistant":
            self.notify("only a reply can be inspected: Tab to one of the model's messages", severity="warning")
        elif (i := self.turn_index(view)) is not None:
            self.inspect(i)

    def turn_index(self, view: MessageView) -> int | None:
        """The conversation index of ``view``; None (and a warning) when the view is out of step with it."""
        views, turns = self.messages.views, self.session.turns
        i = views.index(view)
        if len(views) != len(turns) or turns[i].role != view.role or turns[i].text != view.text:
            self.notify("this view is out of step with the conversation: reopen it from History (F3)",
                        severity="warning")
            return None
        return i

    def edit_from(self, views: list[MessageView], view: MessageView) -> None:
        """Branch at an older message of yours: it and everything after it leave the view (kept in
        history, marked replaced), its text goes to the input, and sending continues from there."""
        if self._busy():
            return
        i = self.turn_index(view)
        if i is None:
            return
        n_later = len(self.session.turns) - i - 1
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
