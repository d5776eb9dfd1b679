"""The small messages worker threads post back to the UI (never widgets or models)."""

from __future__ import annotations

from dataclasses import dataclass, field

from textual.message import Message


@dataclass
class ModelLoading(Message):
    spec: str


@dataclass
class ModelReady(Message):
    spec: str
    info: dict  # LoadedModel.describe() plus the checkpoint hash


@dataclass
class ModelMissing(Message):
    """No model could be loaded (or none is on this machine): show how to get one."""

    reason: str
    local: list[str] = field(default_factory=list)


@dataclass
class ReplyBegan(Message):
    reply_id: str | None
    prompt_tokens: int
    dropped: list[str]


@dataclass
class ReplyChunk(Message):
    text: str  # new text since the last chunk (batched, ~25 per second at most)


@dataclass
class ReplyEnded(Message):
    text: str
    status: str  # done | stopped
    info: dict


@dataclass
class PaneChunk(Message):
    pane: int
    text: str


@dataclass
class PaneEnded(Message):
    pane: int
    text: str
    status: str
    info: dict


@dataclass
class ModelsScanned(Message):
    models: list  # discover.LocalModel
