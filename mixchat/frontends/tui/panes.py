"""ChatPane: one open conversation in a tab."""

from __future__ import annotations

import threading
from collections import Counter

from textual.app import ComposeResult
from textual.content import Content
from textual.widgets import TabPane
from textual.worker import Worker

from mixchat.frontends.tui.literal import literal_line
from mixchat.frontends.tui.messages import TokenBatch
from mixchat.frontends.tui.widgets import ChatLog, ContextDivider, MessageView

TAB_CHARS = 24


def tab_label(title: str) -> Content:
    """A tab's label: the conversation's title (the user's first message), literally."""
    return literal_line(title or "new chat", TAB_CHARS)


class ChatPane(TabPane):
    """One open conversation: its messages on screen, its Chat (engine side) and its live figures."""

    def __init__(self, pane_id: str, title: str, cid: str | None = None) -> None:
        super().__init__(tab_label(title), id=pane_id)
        self.cid = cid
        self._chat = None
        self.cancel = threading.Event()
        self.busy = False
        self.worker: Worker | None = None  # the thread writing the current (or last) reply
        self.reply: MessageView | None = None
        self.usage: list[Counter] = []
        self.last_token: tuple | None = None
        self.stats: dict = {}
        self.phase = ""
        self.editing: int | None = None
        self.panel_drawn = 0.0  # when the expert panel last followed this tab's stream
        self.drawn_at = 0.0  # when the reply last took a batch of tokens (0: not yet)
        self.drawn_cpu = 0.0  # the UI thread's CPU time then
        self.draw_every = 0.0  # seconds between two redraws of the reply, as their cost allows
        self.pending: TokenBatch | None = None  # posted by the worker, not yet drawn

    def compose(self) -> ComposeResult:
        yield ChatLog()

    def on_unmount(self) -> None:
        # A tab that goes away (closed, or the app ends) stops its reply: the worker then saves
        # it, marked interrupted, instead of decoding on unseen.
        self.cancel.set()

    @property
    def chat(self):
        """mixchat.conversations.chat.Chat, made once the model is loaded."""
        return self._chat

    @chat.setter
    def chat(self, chat) -> None:
        # A reopened conversation whose oldest messages the model no longer sees shows where that
        # starts, whoever attaches its Chat (the views are on screen by then).
        self._chat = chat
        if chat is not None and self.is_mounted:
            self.sync_context_cut()

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

    def show_context_cut(self, start: int, dropped_tokens: int | None, context: int | None) -> None:
        """The divider before message `start`, the first the model still sees (none for 0); it
        replaces any earlier one. With every message dropped it ends the log, above what comes next."""
        log = self.log_view
        for old in self.query(ContextDivider):
            old.remove()
        if start <= 0:
            return
        divider = ContextDivider(start, dropped_tokens, context)
        views = self.views()
        if start < len(views):
            log.mount(divider, before=views[start])
        else:
            log.mount(divider)

    def sync_context_cut(self) -> None:
        """The divider where the Chat's context starts now (a reopened conversation, an edit), if it
        is not there already: counting the dropped tokens tokenizes those messages again."""
        chat = self._chat
        if chat is None:
            return
        start = chat.context_start
        drawn = [d.start for d in self.query(ContextDivider)]
        if drawn == ([start] if start > 0 else []):
            return
        self.show_context_cut(start, chat.dropped_tokens() if start > 0 else None, chat.session.context_limit)
