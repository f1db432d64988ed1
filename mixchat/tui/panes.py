"""ChatPane: one open conversation in a tab."""

from __future__ import annotations

import threading
from collections import Counter

from textual.app import ComposeResult
from textual.content import Content
from textual.widgets import TabPane
from textual.worker import Worker

from mixchat.tui.literal import literal_line
from mixchat.tui.widgets import ChatLog, MessageView

TAB_CHARS = 24


def tab_label(title: str) -> Content:
    """A tab's label: the conversation's title (the user's first message), literally."""
    return literal_line(title or "new chat", TAB_CHARS)


class ChatPane(TabPane):
    """One open conversation: its messages on screen, its Chat (engine side) and its live figures."""

    def __init__(self, pane_id: str, title: str, cid: str | None = None) -> None:
        super().__init__(tab_label(title), id=pane_id)
        self.cid = cid
        self.chat = None  # mixchat.chat.Chat, made once the model is loaded
        self.cancel = threading.Event()
        self.busy = False
        self.worker: Worker | None = None  # the thread writing the current (or last) reply
        self.reply: MessageView | None = None
        self.usage: list[Counter] = []
        self.last_token: tuple | None = None
        self.stats: dict = {}
        self.phase = ""
        self.editing: int | None = None

    def compose(self) -> ComposeResult:
        yield ChatLog()

    def on_unmount(self) -> None:
        # A tab that goes away (closed, or the app ends) stops its reply: the worker then saves
        # it, marked interrupted, instead of decoding on unseen.
        self.cancel.set()

    def holds(self, cid: str) -> bool:
        """Whether this tab shows conversation `cid` (a new chat learns its id from its worker)."""
        return self.cid == cid or (self.chat is not None and self.chat.id == cid)

    @property
    def writing(self) -> bool:
        """Whether a worker is still running for this tab (`busy` is cleared only once the UI
        has handled its last message; this is the thread itself)."""
        return self.worker is not None and not self.worker.is_finished

    @property
    def log_view(self) -> ChatLog:
        return self.query_one(ChatLog)

    def views(self) -> list[MessageView]:
        return list(self.query(MessageView))

    def count_usage(self, experts: list | None) -> None:
        if not experts:
            return
        while len(self.usage) < len(experts):
            self.usage.append(Counter())
        for layer, chosen in enumerate(experts):
            self.usage[layer].update(chosen)
