"""The conversation store: SQLite (WAL, one short transaction per write) under the data folder.

Domain dataclasses in, rows out, in this one module. Every write commits before it returns, so a
crash, Ctrl+C or kill -9 loses at most what was not yet handed to the store.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixchat.errors import MixchatError
from mixchat.migrations import migrate

TITLE_CHARS = 60


class StoreError(MixchatError):
    """The store cannot be opened or a conversation cannot be found."""


@dataclass
class Conversation:
    id: str
    title: str
    model_path: str
    model_fingerprint: str
    system: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0


@dataclass
class StoredMessage:
    id: int
    conversation_id: str
    position: int
    role: str
    content: str
    token_ids: list[int] | None = None
    experts: list | None = None
    stop: str | None = None  # None: still generating, or the process died mid-reply
    timings: dict[str, Any] | None = None
    created_at: float = 0.0


@dataclass
class Summary:
    id: str
    title: str
    model_path: str
    turns: int
    updated_at: float


def new_id() -> str:
    """Milliseconds since the epoch, then randomness: ids sort by creation time."""
    return f"{int(time.time() * 1000):011x}{secrets.token_hex(3)}"


def make_title(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1].rstrip() + "…"


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # Autocommit mode: transactions are explicit (see `_tx`), so none is ever left open.
            self.db = sqlite3.connect(path, isolation_level=None, timeout=30, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self.db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across app crashes
            migrate(self.db)
        except sqlite3.DatabaseError as exc:
            raise StoreError(
                f"{path}: cannot open the conversation store ({exc}); move the file aside to start a new one "
                "(your other files are untouched)"
            ) from None

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    # -- conversations ---------------------------------------------------------------------------

    def create(self, model_path: str, fingerprint: str, system: str | None = None,
               settings: dict[str, Any] | None = None, title: str = "") -> Conversation:
        now = time.time()
        conv = Conversation(new_id(), title, model_path, fingerprint, system, settings or {}, now, now)
        with self._tx() as db:
            db.execute("INSERT INTO conversations (id, title, model_path, model_fingerprint, system, settings,"
                       " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (conv.id, conv.title, conv.model_path, conv.model_fingerprint, conv.system,
                        json.dumps(conv.settings), now, now))
        return conv

    def _conversation(self, row: tuple) -> Conversation:
        cid, title, model_path, fp, system, settings, created, updated = row
        try:
            parsed = json.loads(settings or "{}")
        except json.JSONDecodeError:
            raise StoreError(f"{self.path}: conversation {cid} has corrupt settings; "
                             f"`mixchat rm {cid}` removes it") from None
        return Conversation(cid, title, model_path, fp, system, parsed, created, updated)

    _COLUMNS = "id, title, model_path, model_fingerprint, system, settings, created_at, updated_at"

    def get(self, cid: str) -> Conversation:
        """By full id or unique prefix (like git)."""
        rows = self.db.execute(f"SELECT {self._COLUMNS} FROM conversations WHERE id LIKE ? ORDER BY id",
                               (cid.replace("%", "").replace("_", "") + "%",)).fetchall()
        if not rows:
            raise StoreError(f"no conversation {cid!r} in {self.path}; `mixchat list` shows them")
        if len(rows) > 1 and rows[0][0] != cid:
            raise StoreError(f"{cid!r} matches {len(rows)} conversations; give more of the id")
        return self._conversation(rows[0])

    def latest(self) -> Conversation | None:
        row = self.db.execute(f"SELECT {self._COLUMNS} FROM conversations "
                              "ORDER BY updated_at DESC, id DESC LIMIT 1").fetchone()
        return self._conversation(row) if row else None

    def list(self) -> list[Summary]:
        rows = self.db.execute("""
            SELECT c.id, c.title, c.model_path, COUNT(m.id), c.updated_at FROM conversations c
            LEFT JOIN messages m ON m.conversation_id = c.id AND m.role = 'user'
            GROUP BY c.id ORDER BY c.updated_at DESC, c.id DESC""").fetchall()
        return [Summary(*r) for r in rows]

    def rename(self, cid: str, title: str) -> Conversation:
        conv = self.get(cid)
        with self._tx() as db:
            db.execute("UPDATE conversations SET title = ?, updated_at = ? WHERE id = ?",
                       (make_title(title), time.time(), conv.id))
        return self.get(conv.id)

    def update_settings(self, cid: str, system: str | None, settings: dict[str, Any]) -> None:
        with self._tx() as db:
            db.execute("UPDATE conversations SET system = ?, settings = ? WHERE id = ?",
                       (system, json.dumps(settings), cid))

    def delete(self, cid: str) -> Conversation:
        conv = self.get(cid)
        with self._tx() as db:
            db.execute("DELETE FROM conversations WHERE id = ?", (conv.id,))  # messages cascade
        return conv

    # -- messages --------------------------------------------------------------------------------

    def messages(self, cid: str) -> list[StoredMessage]:
        rows = self.db.execute(
            "SELECT id, conversation_id, position, role, content, token_ids, experts, stop, timings, created_at "
            "FROM messages WHERE conversation_id = ? ORDER BY position", (cid,)).fetchall()
        out = []
        for r in rows:
            try:
                ids, experts, timings = (json.loads(x) if x else None for x in (r[5], r[6], r[8]))
            except json.JSONDecodeError:
                raise StoreError(f"{self.path}: message {r[2]} of conversation {cid} is corrupt; "
                                 f"`mixchat rm {cid}` removes the conversation") from None
            out.append(StoredMessage(r[0], r[1], r[2], r[3], r[4], ids, experts, r[7], timings, r[9]))
        return out

    def add_message(self, cid: str, role: str, content: str, token_ids: list[int] | None = None,
                    stop: str | None = None) -> int:
        """Append a message and commit; the first user message titles an untitled conversation."""
        now = time.time()
        with self._tx() as db:
            (position,) = db.execute("SELECT COALESCE(MAX(position) + 1, 0) FROM messages WHERE conversation_id = ?",
                                     (cid,)).fetchone()
            cur = db.execute("INSERT INTO messages (conversation_id, position, role, content, token_ids, stop,"
                             " created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (cid, position, role, content, json.dumps(token_ids) if token_ids is not None else None,
                              stop, now))
            db.execute("UPDATE conversations SET updated_at = ?, title = CASE WHEN title = '' AND ? = 'user' "
                       "THEN ? ELSE title END WHERE id = ?", (now, role, make_title(content), cid))
        return cur.lastrowid

    def update_message(self, mid: int, content: str, token_ids: list[int], experts: list | None = None,
                       stop: str | None = None, timings: dict[str, Any] | None = None) -> None:
        """Save a reply as it streams (called every few tokens and at the end)."""
        with self._tx() as db:
            db.execute("UPDATE messages SET content = ?, token_ids = ?, experts = ?, stop = ?, timings = ? "
                       "WHERE id = ?", (content, json.dumps(token_ids), json.dumps(experts) if experts else None,
                                        stop, json.dumps(timings) if timings else None, mid))
            db.execute("UPDATE conversations SET updated_at = ? WHERE id = "
                       "(SELECT conversation_id FROM messages WHERE id = ?)", (time.time(), mid))

    def truncate(self, cid: str, position: int) -> None:
        """Drop messages from `position` on (edit and regenerate replace the tail)."""
        with self._tx() as db:
            db.execute("DELETE FROM messages WHERE conversation_id = ? AND position >= ?", (cid, position))
