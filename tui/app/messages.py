"""The small messages worker threads post back to the UI (never widgets or models)."""

from __future__ import annotations

from dataclasses import dataclass, field

from textual.message import Message


@dataclass
class ModelLoading(Message, bubble=False):
    spec: str


@dataclass
class ModelReady(Message, bubble=False):
    spec: str
    info: dict  # LoadedModel.describe() plus the checkpoint hash


@dataclass
class ModelMissing(Message, bubble=False):
    """No model could be loaded (or none is on this machine): show how to get one."""

    reason: str
    local: list[str] = field(default_factory=list)


@dataclass
class ReplyBegan(Message, bubble=False):
    reply_id: str | None
    prompt_tokens: int
    dropped: list[str]
    turns_dropped: int = 0


@dataclass
class ReplyChunk(Message, bubble=False):
    text: str  # new text since the last chunk (batched: at most 10 per second)


@dataclass
class ReplyEnded(Message, bubble=False):
    text: str
    status: str  # done | stopped
    info: dict


@dataclass
class PaneChunk(Message, bubble=False):
    pane: int
    text: str


@dataclass
class PaneEnded(Message, bubble=False):
    pane: int
    text: str
    status: str
    info: dict


@dataclass
class PromptRendered(Message, bubble=False):
    """The exact prompt for the input (or the last message), for the prompt view."""

    rendered: object  # core.prompting.templates.Rendered
    what: str


@dataclass
class ModelsScanned(Message, bubble=False):
    models: list  # discover.LocalModel
