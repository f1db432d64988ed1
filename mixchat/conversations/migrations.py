"""Ordered schema migrations for the conversation store, each applied once and recorded in
`_migrations`. Never edit a released migration: add a new one."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable

MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = []
migration = MIGRATIONS.append


@migration
def m001_initial(db: sqlite3.Connection) -> None:
    db.execute("""
        CREATE TABLE conversations (
            id TEXT PRIMARY KEY,          -- time-sortable: newest = greatest
            title TEXT NOT NULL,
            model_path TEXT NOT NULL,
            model_fingerprint TEXT NOT NULL,
            system TEXT,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )""")
    db.execute("""
        CREATE TABLE messages (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            position INTEGER NOT NULL,
            role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
            content TEXT NOT NULL,
            token_ids TEXT,               -- JSON list; the ids the model generated (assistant)
            stop TEXT,                    -- NULL while generating; eos | length | interrupted
            created_at REAL NOT NULL,
            UNIQUE (conversation_id, position)
        )""")


@migration
def m002_settings_routing_timings(db: sqlite3.Connection) -> None:
    db.execute("ALTER TABLE conversations ADD COLUMN settings TEXT NOT NULL DEFAULT '{}'")
    db.execute("ALTER TABLE messages ADD COLUMN experts TEXT")  # JSON [token][layer][k] (MoE)
    db.execute("ALTER TABLE messages ADD COLUMN timings TEXT")  # JSON: prefill/decode speeds, ttft
    db.execute("CREATE INDEX messages_by_conversation ON messages (conversation_id, position)")


@migration
def m003_context_start(db: sqlite3.Connection) -> None:
    # The first message the model still sees once a full context dropped the oldest turns (the
    # system prompt is always kept): saved, so a reopened conversation makes the same cut and its
    # saved KV cache still matches.
    db.execute("ALTER TABLE conversations ADD COLUMN context_start INTEGER NOT NULL DEFAULT 0")


@migration
def m004_message_search(db: sqlite3.Connection) -> None:
    # Full-text search over what was said (`mixchat search`, the app's filter). An FTS5 index with
    # external content: it reads the text from `messages` instead of keeping a second copy, so the
    # triggers below must tell it every change, old text included. unicode61 (the default) splits
    # on what is not a letter or digit and ignores case and accents.
    try:
        db.execute("CREATE VIRTUAL TABLE message_search USING fts5(content, content='messages', content_rowid='id')")
    except sqlite3.OperationalError as exc:
        if "no such module" not in str(exc):
            raise
        # This SQLite was built without FTS5 (rare: Python's builds and the distributions' have it):
        # no index, and Store.search falls back to a LIKE scan of the messages. The migration still
        # counts as applied, so such a store is not migrated again when opened by an SQLite with
        # FTS5; its searches stay scans.
        return
    db.execute("""
        CREATE TRIGGER message_search_insert AFTER INSERT ON messages BEGIN
            INSERT INTO message_search (rowid, content) VALUES (new.id, new.content);
        END""")
    # Also on the deletes that ON DELETE CASCADE makes when a conversation is deleted.
    db.execute("""
        CREATE TRIGGER message_search_delete AFTER DELETE ON messages BEGIN
            INSERT INTO message_search (message_search, rowid, content) VALUES ('delete', old.id, old.content);
        END""")
    # A streaming reply is saved every few tokens, often with the same text (a token that is not yet
    # a whole character): re-indexed only when its text changed.
    db.execute("""
        CREATE TRIGGER message_search_update AFTER UPDATE OF content ON messages
        WHEN old.content IS NOT new.content BEGIN
            INSERT INTO message_search (message_search, rowid, content) VALUES ('delete', old.id, old.content);
            INSERT INTO message_search (rowid, content) VALUES (new.id, new.content);
        END""")
    db.execute("INSERT INTO message_search (message_search) VALUES ('rebuild')")  # the messages already there


class NewerSchemaError(Exception):
    """The file was written by a newer mixchat: this one must not write to it, let alone migrate it."""

    def __init__(self, found: int, unknown: list[str]) -> None:
        self.found, self.known, self.unknown = found, len(MIGRATIONS), unknown
        super().__init__(f"written by a newer mixchat (schema {found}, this one knows {self.known}); "
                         "upgrade mixchat (pip install -U mixchat)")


def applied(db: sqlite3.Connection) -> list[str]:
    """Names recorded in `_migrations` (none when the table does not exist yet)."""
    if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_migrations'").fetchone() is None:
        return []
    return [row[0] for row in db.execute("SELECT name FROM _migrations ORDER BY name")]


def schema_version(db: sqlite3.Connection) -> int:
    """The schema the file says it has: the larger of `user_version` and the migrations recorded
    (stores written before `user_version` was kept have it at 0)."""
    (user_version,) = db.execute("PRAGMA user_version").fetchone()
    return max(user_version, len(applied(db)))


def check_not_newer(db: sqlite3.Connection) -> None:
    """Raise NewerSchemaError if the file has migrations this version does not know."""
    known = {fn.__name__ for fn in MIGRATIONS}
    unknown = [name for name in applied(db) if name not in known]
    found = schema_version(db)
    if unknown or found > len(MIGRATIONS):
        raise NewerSchemaError(max(found, len(MIGRATIONS) + len(unknown)), unknown)


def pending(db: sqlite3.Connection, upto: int | None = None) -> list[str]:
    done = set(applied(db))
    return [fn.__name__ for fn in MIGRATIONS[:upto] if fn.__name__ not in done]


def migrate(db: sqlite3.Connection, upto: int | None = None) -> list[str]:
    """Apply what is missing (up to migration number `upto`, for tests); returns their names.

    Refuses (NewerSchemaError) a file from a newer mixchat before changing anything. Keeps
    `PRAGMA user_version` equal to the number of migrations applied, so that any SQLite tool, and
    an older mixchat, can tell the schema without knowing the names."""
    check_not_newer(db)
    done_now = []
    for fn in MIGRATIONS[:upto]:
        if fn.__name__ not in pending(db, upto):
            continue
        # One transaction per migration, DDL included (the connection is in autocommit mode, so
        # sqlite3's implicit transactions do not split it): all of it or none.
        db.execute("BEGIN IMMEDIATE")
        try:
            # Looked at again under the write lock: another process may have applied it meanwhile.
            if fn.__name__ in applied(db):
                db.execute("ROLLBACK")
                continue
            db.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
            fn(db)
            db.execute("INSERT INTO _migrations VALUES (?, strftime('%s', 'now'))", (fn.__name__,))
            db.execute(f"PRAGMA user_version = {len(applied(db))}")
            db.execute("COMMIT")
        except BaseException:
            # SQLite rolls back by itself on some errors (a full disk, I/O): a second ROLLBACK
            # would replace the real error with 'no transaction is active'.
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):  # the first error is the one to report
                    db.execute("ROLLBACK")
            raise
        done_now.append(fn.__name__)
    (user_version,) = db.execute("PRAGMA user_version").fetchone()
    if upto is None and user_version != len(applied(db)):
        # A store from before user_version was kept: record it once.
        db.execute(f"PRAGMA user_version = {len(applied(db))}")
    return done_now
