"""Ordered schema migrations for the conversation store, each applied once and recorded in
`_migrations`. Never edit a released migration: add a new one."""

from __future__ import annotations

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


def migrate(db: sqlite3.Connection, upto: int | None = None) -> list[str]:
    """Apply what is missing (up to migration number `upto`, for tests); returns their names."""
    db.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
    done = {row[0] for row in db.execute("SELECT name FROM _migrations")}
    applied = []
    for fn in MIGRATIONS[:upto]:
        if fn.__name__ in done:
            continue
        # One transaction per migration, DDL included (the connection is in autocommit mode, so
        # sqlite3's implicit transactions do not split it): all of it or none.
        db.execute("BEGIN IMMEDIATE")
        try:
            fn(db)
            db.execute("INSERT INTO _migrations VALUES (?, strftime('%s', 'now'))", (fn.__name__,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        applied.append(fn.__name__)
    return applied
