"""The conversation sidebar: a filter field over a list of saved conversations."""

from __future__ import annotations

from rich.text import Text
from textual import events
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import Input, ListView

from mixchat.safetext import one_line


def conversation_row(title: str, turns: int, cid: str) -> Text:
    """A sidebar row: the title as written (it is the user's first message), then the details."""
    row = Text(one_line(title) or "(untitled)")
    row.append(f"\n{turns} turns · {one_line(cid[-6:])}", style="dim")
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
