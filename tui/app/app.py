"""The Textual app: holds the session, the loaded models and the store; screens do the rest."""

from __future__ import annotations

from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.worker import WorkerState

from gptchat.core import config
from gptchat.core.session.chat import ChatSession
from gptchat.core.session.pool import ModelPool
from gptchat.core.session.settings import ChatSettings
from gptchat.core.errors import GptchatError

from gptchat.tui.app.commands import GptchatCommands
from gptchat.tui.app.screens.chat import ChatScreen
from gptchat.tui.app.screens.finetune import FinetuneScreen, open_finetune


class GptchatApp(App):
    TITLE = "gptchat"
    CSS_PATH = "app.tcss"
    BINDINGS = [Binding("ctrl+q", "quit", "Quit", priority=True)]
    COMMANDS = App.COMMANDS | {GptchatCommands}

    def __init__(self, settings: ChatSettings | None = None, store=None, pool: ModelPool | None = None,
                 autoload: bool = True, store_error: str | None = None, remember: bool = True):
        super().__init__()
        self.remember = remember  # keep the settings for the next launch (core/session/prefs.py)
        self.session = ChatSession(store, settings or ChatSettings())
        self.pool = pool or ModelPool()
        self.autoload = autoload
        self.store_error = store_error

    def notify(self, message: str, *, title: str = "", severity="information", timeout: float | None = None,
               markup: bool = True) -> None:
        """Every notification is plain text: they show paths, model names, settings and errors as typed
        (``[compare]`` in a name stays). Widget.notify always passes markup=True, so it is ignored here."""
        super().notify(message, title=title, severity=severity, timeout=timeout, markup=False)

    def on_mount(self) -> None:
        bad_config = config.tolerate()  # a config.toml edited wrong never stops the app: said, then ignored
        self.push_screen(ChatScreen())
        if bad_config:
            self.notify(f"{bad_config}; the built-in defaults apply until it is fixed", severity="error", timeout=10)
        if self.store_error:
            self.notify(self.store_error + "; history is off for this session", severity="error", timeout=8)

    def on_worker_state_changed(self, event) -> None:
        self.report_worker_error(event)

    def report_worker_error(self, event) -> None:
        """The one place worker errors become notifications (the app keeps running). Worker.StateChanged
        does not bubble, so screens running workers forward their events here."""
        if event.state == WorkerState.ERROR:
            err = event.worker.error
            msg = str(err) if isinstance(err, (GptchatError, ValueError, OSError)) else f"{type(err).__name__}: {err}"
            self.notify(msg or type(err).__name__, title="Error", severity="error", timeout=8)

    def get_system_commands(self, screen):
        yield from super().get_system_commands(screen)
        if not isinstance(screen, FinetuneScreen):
            yield SystemCommand("Finetune…", "Finetune a model on text files, or follow a run (/finetune, /runs)",
                                lambda: open_finetune(self))
        if isinstance(screen, ChatScreen):
            for title, help, action in [
                ("New chat", "Start a new conversation (Ctrl+N)", screen.action_new_chat),
                ("Regenerate", "Regenerate the last reply (Ctrl+R)", screen.action_regenerate),
                ("Edit last message", "Edit the last message and send it again (Ctrl+B)", screen.action_edit_last),
                ("Copy last reply", "Copy the last reply to the clipboard (Ctrl+T)", screen.action_copy_last),
                ("Settings", "Show or hide the settings panel (F2)", screen.action_toggle_settings),
                ("History", "Reopen, rename, delete, export or search conversations (F3)", screen.action_history),
                ("Compare", "Send one prompt to 2-4 panes side by side (F4)", screen.action_compare),
                ("Show prompt", "The exact prompt the model sees, part by part (F5)", screen.action_show_prompt),
                ("Pick model", "Choose a local checkpoint or type a path (Ctrl+O)", screen.action_pick_model),
                ("Help", "Every key and slash command (F1)", screen.action_help),
            ]:
                yield SystemCommand(title, help, action)
