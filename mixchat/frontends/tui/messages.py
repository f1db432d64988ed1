"""Messages the worker threads post to the UI (post_message is thread-safe and never waits), and the
batch of tokens one of them carries."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from textual.message import Message


@dataclass
class ModelProgress(Message):
    label: str  # what loading is doing: "reading consolidated.00.pth", "quantizing to int4-128"
    done: int
    total: int


@dataclass
class ModelNote(Message):
    text: str  # something loading tells the user (a quantized cache made again, and why)


@dataclass
class ModelLoaded(Message):
    engine: object  # mixchat.engine.engine.Engine, opaque to the UI


@dataclass
class ModelFailed(Message):
    error: str


@dataclass
class Prefilling(Message):
    pane_id: str
    done: int
    total: int


class TokenBatch:
    """Tokens on their way to the UI. The worker adds each token to the batch it posted last until
    the UI takes that batch, then starts and posts a new one: the UI gets one message per redraw
    however fast tokens come (one message and one redraw per token kept the UI thread, and the GIL,
    busy enough to slow decoding down to a third), and no token waits in the worker for the next
    one to be sent (a stall, an expert read from disk, shows what came before it)."""

    def __init__(self, first: float) -> None:
        self._lock = threading.Lock()
        self._tokens: list[tuple[str, list | None, list | None]] = []  # (text, experts, weights)
        self._taken = False
        self.first = first  # when the reply's first token came (worker's monotonic clock)
        self.last = first  # when the last token added came
        self.count = 0  # tokens of the reply so far, these included

    def add(self, token: tuple[str, list | None, list | None], count: int, now: float) -> bool:
        """Worker side. False once the UI has taken the batch: the token then goes in a new one."""
        with self._lock:
            if self._taken:
                return False
            self._tokens.append(token)
            self.count, self.last = count, now
            return True

    def take(self) -> list[tuple[str, list | None, list | None]]:
        """UI side: the tokens so far; the worker adds no more to this batch."""
        with self._lock:
            self._taken = True
            return self._tokens

    @property
    def taken(self) -> bool:
        return self._taken

    def tokens_per_second(self) -> float:
        return (self.count - 1) / (self.last - self.first) if self.count > 1 and self.last > self.first else 0.0


@dataclass
class TokensStreamed(Message):
    pane_id: str
    batch: TokenBatch

    @property
    def count(self) -> int:
        """Tokens of the reply so far (grows until the UI takes the batch)."""
        return self.batch.count


@dataclass
class ContextCut(Message):
    """The oldest messages were dropped from what the model sees, to fit its context."""

    pane_id: str
    context_start: int  # the first message the model still sees
    dropped_tokens: int  # all the messages before context_start, as the model read them
    context: int  # the context's size in tokens


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
