"""What the user typed, shared with line mode: prompt_toolkit's FileHistory format ("# date"
lines, then each line of an entry prefixed with "+"), in the per-user data folder."""

from __future__ import annotations

import time

from mixchat import paths


def load(limit: int = 500) -> list[str]:
    path = paths.input_history_path()
    if not path.is_file():
        return []
    entries, current = [], []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("+"):
            current.append(line[1:])
        elif current:
            entries.append("\n".join(current))
            current = []
    if current:
        entries.append("\n".join(current))
    return entries[-limit:]


def append(text: str) -> None:
    path = paths.private_file(paths.input_history_path())  # every prompt typed: the owner's only
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')}\n" + "".join(f"+{x}\n" for x in text.split("\n")))
