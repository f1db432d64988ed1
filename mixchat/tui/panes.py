"""ChatPane: one open conversation in a tab."""

from __future__ import annotations

import threading
from collections import Counter

from textual.app import ComposeResult
from textual.widgets import TabPane

from mixchat.tui.widgets import ChatLog, MessageView


class ChatPane(TabPane):
    """One open conversation: its messages on screen, its Chat (engine side) and its live figures."""

    def __init__(self, pane_id: str, title: str, cid: str | None = None) -> None:
        super().__init__(title[:24] or "new chat", id=pane_id)
        self.cid = cid
        self.chat = None  # mixchat.chat.Chat, made once the model is loaded
        self.cancel = threading.Event()
        self.busy = False
        self.reply: MessageView | None = None
        self.usage: list[Counter] = []
        self.last_token: tuple | None = None
        self.stats: dict = {}
        self.phase = ""
        self.editing: int | None = None

    def compose(self) -> ComposeResult:
        yield ChatLog()

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
