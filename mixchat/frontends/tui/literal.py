"""User, model and file text as the app's widgets show it.

Textual parses a plain `str` given to a Static, a tab, a notification or a Rich Table title as
markup: "[/INST]" raised MarkupError and "[@click=app.quit]" was a live action. And neither
Textual nor Rich removes ESC, so an OSC or CSI sequence in a reply reached the terminal. Every
piece of such text therefore goes through here: a Text or Content object (never parsed as
markup), with control characters shown by mixchat.safetext.
"""

from __future__ import annotations

from rich.text import Text
from textual.content import Content

from mixchat.safetext import one_line, visible


def literal(text: str, style: str = "") -> Text:
    """`text` exactly as written (newlines kept), for Statics and Rich renderables."""
    return Text(visible(text), style=style)


def literal_line(text: str, limit: int | None = None) -> Content:
    """`text` on one line, cut to `limit` characters, for tab labels and other one-line places."""
    line = one_line(text)
    return Content(line[:limit] if limit else line)
