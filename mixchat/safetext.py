"""Text from users, models and files is data: before it reaches a terminal, control characters are
made visible so that none of them acts.

A model reply, a conversation title or a file name can hold ESC sequences (clear the screen, set
the window title with OSC 0, write the clipboard with OSC 52), a carriage return that overwrites
what was printed, or C1 controls that some terminals obey as CSI. `visible` shows each of them as
a harmless glyph instead: C0 controls as the Unicode control pictures (ESC as ␛), DEL as ␡, C1
controls as `<9b>`. Newlines and tabs are kept; a CR that ends a line (CR LF) is dropped, any other
CR shown as ␍. JSON output keeps the exact text, every control character escaped (`json_text`).
"""

from __future__ import annotations

import json
import re
from typing import Any

_CONTROL = re.compile(r"\r\n|[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _picture(m: re.Match) -> str:
    c = m.group()
    if c == "\r\n":
        return "\n"
    code = ord(c)
    if code < 0x20:
        return chr(0x2400 + code)  # ␀ … ␟ (␛ for ESC)
    if code == 0x7F:
        return "\u2421"  # ␡
    return f"<{code:02x}>"  # C1: no control picture exists


_JSON_UNESCAPED = re.compile(r"[\x7f-\x9f]")


def json_text(obj: Any, **kw: Any) -> str:
    """json.dumps keeping non-ASCII text readable, with DEL and the C1 controls escaped too (json.dumps escapes
    only those below U+0020, and a terminal may obey U+009B as CSI when the JSON is read on one)."""
    return _JSON_UNESCAPED.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(obj, ensure_ascii=False, **kw))


def visible(text: str) -> str:
    """`text` with every control character but newline and tab shown as a visible glyph."""
    return _CONTROL.sub(_picture, text)


def one_line(text: str) -> str:
    """`visible`, and newlines and tabs as spaces too: for titles, labels and list rows."""
    return visible(" ".join(text.split()) if any(c in text for c in "\n\t") else text)
