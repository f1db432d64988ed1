"""Exporting the open conversation from the app: mixchat.conversations.exporting's Markdown or JSON, written to a
new file in the current folder (or the user's documents folder when the current one cannot be
written), named after the conversation's title and short id, never over an existing file."""

from __future__ import annotations

import os
import re
from pathlib import Path

from mixchat.conversations import exporting
from mixchat.conversations.store import Store, short_id

SUFFIX = {"markdown": ".md", "json": ".json"}


def file_stem(title: str, cid: str) -> str:
    """A safe file name from a title: letters, digits and dashes, at most 40 of them, then the short id."""
    words = re.sub(r"[^\w]+", "-", title, flags=re.ASCII).strip("-").lower()[:40].strip("-")
    return f"{words or 'conversation'}-{short_id(cid)}"


def folders() -> list[Path]:
    """Where an export may go, in order: the current folder, then the documents folder, then home."""
    out = [Path.cwd()]
    try:
        from platformdirs import user_documents_dir

        out.append(Path(user_documents_dir()))
    except Exception:  # noqa: BLE001 - no documents folder known: home will do
        pass
    out.append(Path.home())
    return out


def export_to_file(store: Store, cid: str, kind: str, where: list[Path] | None = None) -> Path:
    """Write conversation `cid` as `kind` ("markdown" or "json") and return the file's path.
    OSError when no folder can take it; the store's MixchatError when the conversation is gone."""
    conv = store.get(cid)
    text = exporting.export_markdown(store, conv.id) if kind == "markdown" else \
        exporting.dumps(exporting.export_json(store, conv.id))
    stem, suffix = file_stem(conv.title, conv.id), SUFFIX[kind]
    error: OSError | None = None
    for folder in where or folders():
        for n in range(100):
            path = folder / (stem + (f"-{n}" if n else "") + suffix)
            try:
                # O_EXCL: an export never replaces a file, even one made a moment ago by someone else.
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                continue
            except OSError as exc:  # a folder we cannot write: try the next one
                error = exc
                break
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            return path
    raise error or OSError(f"no free file name for {stem}{suffix}")
