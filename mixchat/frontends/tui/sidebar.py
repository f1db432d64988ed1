"""The conversation sidebar: a filter field over a list of saved conversations."""

from __future__ import annotations

import time

from rich.text import Text
from textual import events
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import Input, ListView

from mixchat.conversations.store import SearchHit, Summary, short_id
from mixchat.safetext import one_line


def when(ts: float) -> str:
    """A conversation's last change: the time today, else the date."""
    if time.strftime("%Y-%m-%d", time.localtime(ts)) == time.strftime("%Y-%m-%d"):
        return time.strftime("today %H:%M", time.localtime(ts))
    return time.strftime("%Y-%m-%d", time.localtime(ts))


def model_name(model_path: str) -> str:
    return one_line(model_path.rstrip("/").rsplit("/", 1)[-1]) or "?"


def conversation_row(s: Summary) -> Text:
    """A sidebar row: the whole title as written (it is the user's first message; the row wraps),
    then when, how long, the model it was written with and the short id `mixchat show` takes."""
    row = Text(one_line(s.title) or "(untitled)")
    row.append(f"\n{when(s.updated_at)} · {s.turns} turn{'' if s.turns == 1 else 's'}", style="dim")
    row.append(f"\n{model_name(s.model_path)} · {short_id(s.id)}", style="dim")
    return row


def hit_row(hit: SearchHit) -> Text:
    """A search hit in a conversation's messages: the conversation, then the words around the match."""
    row = Text(one_line(hit.title) or "(untitled)")
    who = "you" if hit.role == "user" else "assistant"
    row.append(f"\n{who}: ", style="dim")
    row.append(one_line(hit.snippet), style="italic")
    row.append(f"\n{when(hit.updated_at)} · {short_id(hit.conversation_id)}", style="dim")
    return row


class ConversationList(ListView):
    """The saved conversations. No printable key is a command here: the filter word "today" once
    meant d(elete) + y(es). Whatever is typed goes to the filter box; deleting and renaming are on
    keys that typing does not produce."""

    BINDINGS = [
        Binding("delete", "app.delete_conversation", "Delete"),
        Binding("f6", "app.rename_conversation", "Rename"),
    ]

    def __init__(self, typing_goes_to: Input, **kw) -> None:
        super().__init__(**kw)
        self.typing_goes_to = typing_goes_to

    def on_key(self, event: events.Key) -> None:
        if not (event.is_printable and event.character):
            return
        event.stop()
        event.prevent_default()
        box = self.typing_goes_to
        box.cursor_position = len(box.value)
        box.insert_text_at_cursor(event.character)
        # Now, not via focus() (which waits a message round): keys typed right after this one
        # must already go to the box, in order.
        self.screen.set_focus(box)


class Sidebar(Vertical):
    DEFAULT_CSS = """
    Sidebar { width: 32; border-right: solid $primary; }
    Sidebar > Input { margin: 0; }
    Sidebar > ListView { height: 1fr; }
    """
