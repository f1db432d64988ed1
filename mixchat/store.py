"""The conversation store: conversations and their messages, in SQLite (WAL, one short
transaction per write) under the data folder.

Domain dataclasses in, rows out. Every write commits before it returns, so a crash, Ctrl+C or
kill -9 loses at most what was not yet handed to the store. Opening the file, and turning each
sqlite3 or OS failure into a one-line StoreError that names the file and the fix, is storefile.py's
job: no sqlite3 exception leaves either module raw.

`Store(path, readonly=True)` is for commands that only read (list, show, export): it never
creates, migrates or writes anything, so it also works on a store in a read-only folder, on one
from a newer mixchat (as far as the columns it reads still exist) and before any store exists.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixchat import migrations
from mixchat.safetext import one_line
from mixchat.storefile import DEFAULT_TIMEOUT as DEFAULT_TIMEOUT  # re-exported: callers import these from here
from mixchat.storefile import SQLITE_MAGIC as SQLITE_MAGIC
from mixchat.storefile import ConversationDeleted, StoreError, StoreFile
from mixchat.storefile import db_timeout as db_timeout

TITLE_CHARS = 60
ID_ALPHABET = frozenset("0123456789abcdef")
MIN_PREFIX = 4  # like git's abbreviations: shorter prefixes match too much to act on, `rm` above all


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
    context_start: int = 0  # position of the first message the model still sees (older turns dropped)


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


def _shown(cid: str) -> str:
    """An id as typed, quoted and escaped (it may hold anything), and not too long."""
    return repr(cid if len(cid) <= 40 else cid[:40] + "…")


def check_id(cid: str) -> str:
    """A conversation id or prefix as typed, lower-cased; StoreError unless it is one (so that no
    LIKE or GLOB wildcard, and no empty string, can stand for every id)."""
    shown = _shown(cid)
    if not cid.strip():
        raise StoreError("no conversation id given; `mixchat list` shows them")
    lowered = cid.strip().lower()
    if not set(lowered) <= ID_ALPHABET:
        # Worded like an id that is not there (which it is not), plus why no id can look like it.
        raise StoreError(f"no conversation {shown}: conversation ids are hexadecimal (0-9 and a-f), "
                         "as `mixchat list` shows them")
    return lowered


class Store:
    """The conversation store at `path`.

    readonly=False (chat, rm, rename): creates the folder (0700) and file (0600) if missing,
    migrates an older schema, and refuses, at once and with the reason, a file it must not write:
    not a store, corrupt, from a newer mixchat, in a read-only place.
    readonly=True (list, show, export): reads whatever can be read and never writes; a missing
    store reads as empty. Its writes raise StoreError.
    timeout: seconds to wait for another process's write lock (default: db_timeout()).
    `file` is the StoreFile that opened it: its connection and the translation of its errors.
    """

    def __init__(self, path: Path, readonly: bool = False, timeout: float | None = None) -> None:
        self.file = StoreFile(path, readonly, timeout)
        self._columns: str | None = None

    def close(self) -> None:
        self.file.close()

    # What a Store always offered its callers; the file holds them.

    @property
    def path(self) -> Path:
        return self.file.path

    @property
    def readonly(self) -> bool:
        return self.file.readonly

    @property
    def timeout(self) -> float:
        return self.file.timeout

    @property
    def newer(self) -> migrations.NewerSchemaError | None:
        """Set when reading a newer mixchat's store."""
        return self.file.newer

    @property
    def db(self) -> sqlite3.Connection:
        return self.file.db

    def _explain(self, exc: sqlite3.Error, action: str) -> StoreError:
        """The StoreError that a sqlite3 error during `action` ("open", "read", "write") becomes."""
        return self.file.explain(exc, action)

    # -- conversations ---------------------------------------------------------------------------

    def create(self, model_path: str, fingerprint: str, system: str | None = None,
               settings: dict[str, Any] | None = None, title: str = "") -> Conversation:
        now = time.time()
        conv = Conversation(new_id(), title, model_path, fingerprint, system, settings or {}, now, now)
        with self.file.tx() as db:
            db.execute("INSERT INTO conversations (id, title, model_path, model_fingerprint, system, settings,"
                       " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (conv.id, conv.title, conv.model_path, conv.model_fingerprint, conv.system,
                        json.dumps(conv.settings), now, now))
        return conv

    def _conversation(self, row: tuple) -> Conversation:
        cid, title, model_path, fp, system, settings, created, updated, context_start = row
        try:
            parsed = json.loads(settings or "{}")
        except json.JSONDecodeError:
            raise StoreError(f"{self.path}: conversation {cid} has corrupt settings; "
                             f"`mixchat rm {cid}` removes it") from None
        return Conversation(cid, title, model_path, fp, system, parsed, created, updated,
                            context_start if isinstance(context_start, int) and context_start >= 0 else 0)

    @property
    def _COLUMNS(self) -> str:  # noqa: N802 - read like the constant it was
        """The conversation columns; a store opened read-only before migration 3 has no context_start."""
        if self._columns is None:
            names = {row[1] for row in self.db.execute("PRAGMA table_info(conversations)")}
            self._columns = ("id, title, model_path, model_fingerprint, system, settings, created_at, updated_at, "
                             + ("context_start" if "context_start" in names else "0"))
        return self._columns

    def _find(self, db: sqlite3.Connection, cid: str) -> Conversation:
        prefix = check_id(cid)
        row = db.execute(f"SELECT {self._COLUMNS} FROM conversations WHERE id = ?", (prefix,)).fetchone()
        if row is not None:
            return self._conversation(row)
        if len(prefix) < MIN_PREFIX:
            raise StoreError(f"{_shown(cid)} is too short to pick a conversation: give at least {MIN_PREFIX} "
                             "characters of its id (`mixchat list` shows them)")
        # substr, not LIKE: LIKE ignores case and has wildcards; the prefix is plain hex anyway.
        (count,) = db.execute("SELECT COUNT(*) FROM conversations WHERE substr(id, 1, ?) = ?",
                              (len(prefix), prefix)).fetchone()
        if count == 0:
            raise StoreError(f"no conversation {_shown(cid)} in {self.path}; `mixchat list` shows them")
        rows = db.execute(f"SELECT {self._COLUMNS} FROM conversations WHERE substr(id, 1, ?) = ? ORDER BY id DESC "
                          "LIMIT 3", (len(prefix), prefix)).fetchall()
        if count > 1:
            shown = ", ".join(f"{r[0]} ({one_line(r[1] or '(untitled)')[:30]})" for r in rows)
            more = f" and {count - len(rows)} more" if count > len(rows) else ""
            raise StoreError(f"{_shown(cid)} matches {count} conversations: {shown}{more}; give more of the id")
        return self._conversation(rows[0])

    def get(self, cid: str) -> Conversation:
        """By full id or a unique prefix of at least MIN_PREFIX characters (like git)."""
        with self.file.using():
            return self._find(self.db, cid)

    def latest(self) -> Conversation | None:
        with self.file.using():
            row = self.db.execute(f"SELECT {self._COLUMNS} FROM conversations "
                                  "ORDER BY updated_at DESC, id DESC LIMIT 1").fetchone()
            return self._conversation(row) if row else None

    def list(self) -> list[Summary]:
        with self.file.using():
            rows = self.db.execute("""
                SELECT c.id, c.title, c.model_path, COUNT(m.id), c.updated_at FROM conversations c
                LEFT JOIN messages m ON m.conversation_id = c.id AND m.role = 'user'
                GROUP BY c.id ORDER BY c.updated_at DESC, c.id DESC""").fetchall()
        return [Summary(*r) for r in rows]

    def rename(self, cid: str, title: str) -> Conversation:
        """Found and renamed in one transaction, so it is the conversation the id named then."""
        with self.file.tx() as db:
            conv = self._find(db, cid)
            conv.title, conv.updated_at = make_title(title), time.time()
            db.execute("UPDATE conversations SET title = ?, updated_at = ? WHERE id = ?",
                       (conv.title, conv.updated_at, conv.id))
        return conv

    def update_settings(self, cid: str, system: str | None, settings: dict[str, Any]) -> None:
        with self.file.tx() as db:
            cur = db.execute("UPDATE conversations SET system = ?, settings = ? WHERE id = ?",
                             (system, json.dumps(settings), cid))
            if cur.rowcount == 0:
                raise self._deleted(cid, "its settings were not saved")

    def set_context_start(self, cid: str, position: int) -> None:
        """Record that the model sees this conversation from message `position` on (a full context
        dropped the turns before it; 0: all of it)."""
        with self.file.tx() as db:
            cur = db.execute("UPDATE conversations SET context_start = ? WHERE id = ?", (max(0, int(position)), cid))
            if cur.rowcount == 0:
                raise self._deleted(cid, "where its context starts was not saved")

    def delete(self, cid: str) -> Conversation:
        """Returns what it deleted, for the caller to say so."""
        with self.file.tx() as db:
            conv = self._find(db, cid)
            db.execute("DELETE FROM conversations WHERE id = ?", (conv.id,))  # messages cascade
        return conv

    @staticmethod
    def _deleted(cid: str, what: str) -> ConversationDeleted:
        return ConversationDeleted(cid, f"conversation {cid} was deleted (with `mixchat rm` or in another window), "
                                        f"so {what}; start a new conversation to keep chatting")

    def _require(self, db: sqlite3.Connection, cid: str, what: str) -> None:
        if db.execute("SELECT 1 FROM conversations WHERE id = ?", (cid,)).fetchone() is None:
            raise self._deleted(cid, what)

    # -- messages --------------------------------------------------------------------------------

    def messages(self, cid: str) -> list[StoredMessage]:
        with self.file.using():
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
        with self.file.tx() as db:
            self._require(db, cid, "this message was not saved")
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
        with self.file.tx() as db:
            cur = db.execute("UPDATE messages SET content = ?, token_ids = ?, experts = ?, stop = ?, timings = ? "
                             "WHERE id = ?", (content, json.dumps(token_ids), json.dumps(experts) if experts else None,
                                              stop, json.dumps(timings) if timings else None, mid))
            if cur.rowcount == 0:
                # Its conversation was deleted (or the reply edited away) elsewhere: saying nothing
                # would drop the rest of the reply silently.
                raise ConversationDeleted(None, f"the reply being saved (message {mid}) no longer exists: its "
                                                "conversation was deleted (with `mixchat rm` or in another window), "
                                                "so the reply was not saved; start a new conversation to keep chatting")
            db.execute("UPDATE conversations SET updated_at = ? WHERE id = "
                       "(SELECT conversation_id FROM messages WHERE id = ?)", (time.time(), mid))

    def truncate(self, cid: str, position: int) -> None:
        """Drop messages from `position` on (edit and regenerate replace the tail)."""
        with self.file.tx() as db:
            self._require(db, cid, "the edit was not saved")
            db.execute("DELETE FROM messages WHERE conversation_id = ? AND position >= ?", (cid, position))
