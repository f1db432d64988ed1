"""Messages the worker threads post to the UI (post_message is thread-safe and never waits)."""

from __future__ import annotations

from dataclasses import dataclass, field

from textual.message import Message


@dataclass
class ModelProgress(Message):
    done: int
    total: int


@dataclass
class ModelLoaded(Message):
    engine: object  # mixchat.engine.Engine, opaque to the UI


@dataclass
class ModelFailed(Message):
    error: str


@dataclass
class Prefilling(Message):
    pane_id: str
    done: int
    total: int


@dataclass
class TokenStreamed(Message):
    pane_id: str
    token: int
    text: str
    experts: list | None
    weights: list | None
    tokens_per_second: float
    count: int


@dataclass
class GenerationFinished(Message):
    pane_id: str
    text: str
    reason: str  # eos | length | interrupted (not "stop": Message.stop is a method)
    stats: dict
    conversation_id: str | None
    notes: list[str] = field(default_factory=list)  # e.g. the KV cache could not be saved


@dataclass
class GenerationFailed(Message):
    pane_id: str
    error: str
