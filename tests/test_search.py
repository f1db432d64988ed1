"""Searching inside conversations: the FTS5 index (migration 4) kept in step with every change to
the messages, titles matched too, the user's text taken as plain words whatever it holds, the scan
without FTS5, and `mixchat search` on the command line."""

from __future__ import annotations

import sqlite3

import pytest
from test_cli import mixchat, one_error_line

from mixchat import paths
from mixchat.conversations import migrations
from mixchat.conversations.migrations import MIGRATIONS, migrate
from mixchat.conversations.store import SearchHit, Store, StoreError, short_id


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "c.sqlite3")
    yield s
    s.close()


def talk(s: Store, title: str, *texts: str) -> str:
    c = s.create("/models/m", "fp", title=title)
    for i, text in enumerate(texts):
        s.add_message(c.id, "user" if i % 2 == 0 else "assistant", text)
    return c.id


def found(s: Store, text: str) -> list[tuple[str, int, str]]:
    return [(h.conversation_id, h.position, h.role) for h in s.search(text)]


def index_is_consistent(s: Store) -> None:
    # FTS5 compares its index with the messages table: raises SQLITE_CORRUPT_VTAB if they differ.
    s.db.execute("INSERT INTO message_search (message_search) VALUES ('integrity-check')")


def test_messages_and_titles_are_found_newest_conversation_first(store):
    old = talk(store, "Dragons", "Tell me about dragons.", "A dragon hoards gold in the mountains.")
    other = talk(store, "Cooking", "How long do I boil an egg?", "Seven minutes.")
    new = talk(store, "More", "And what do dragons eat?")
    hits = store.search("dragon")
    assert [(h.conversation_id, h.position, h.role) for h in hits] == [
        (new, 0, "user"), (old, -1, "title"), (old, 0, "user"), (old, 1, "assistant")]
    assert hits[0] == SearchHit(new, "More", 0, "user", "And what do dragons eat?",
                                store.get(new).updated_at)
    assert hits[1].snippet == "Dragons"
    assert found(store, "gold mountain") == [(old, 1, "assistant")]  # every word, each a word's start
    assert found(store, "gold egg") == []
    assert found(store, "BOIL") == [(other, 0, "user")]
    assert found(store, "oil") == []  # words or their starts, not any substring
    assert store.search("dragon", limit=2) == hits[:2]


def test_case_and_accents_are_ignored(store):
    cid = talk(store, "t", "Un café à Noël, señor", "ÉLAN")
    assert found(store, "cafe noel SENOR") == [(cid, 0, "user")]
    assert found(store, "élan") == [(cid, 1, "assistant")]


def test_a_long_message_gives_a_snippet_around_the_match(store):
    text = " ".join(f"word{i}" for i in range(200)) + " needle " + " ".join(f"tail{i}" for i in range(200))
    talk(store, "", text)
    [hit] = store.search("needle")
    assert "needle" in hit.snippet and hit.snippet.startswith("…") and hit.snippet.endswith("…")
    assert len(hit.snippet) < 200


HOSTILE = ['"', '""', '"unclosed', "*", "drag*", "-", "-dragon", "NOT dragon", "dragon AND", "OR", "NEAR",
           "NEAR(dragon gold)", "NEAR(dragon gold, 2)", "content:dragon", "{content}:dragon", "^dragon", "dragon +",
           "(dragon", ")", "dragon'); DROP TABLE messages; --", "%", "_", "\\", "\x00", "\x1b[2J", "🐉",
           "dragon" * 1000, "a" * 100_000]


@pytest.mark.parametrize("text", HOSTILE)
def test_the_users_text_is_words_never_query_syntax(store, text):
    cid = talk(store, "plain", "the dragon NEAR the gold, NOT the content: AND OR")
    hits = store.search(text)  # must not raise, whatever FTS5 would make of it
    assert all(h.conversation_id == cid for h in hits)
    assert store.db.execute("SELECT COUNT(*) FROM messages").fetchone() == (1,)


@pytest.mark.parametrize("text, hit", [("NEAR", True), ("NOT", True), ("AND OR", True), ("content", True),
                                       ('"dragon"', True), ("dragon*", True), ("-gold", True), ("NEAR(x)", False)])
def test_operator_words_are_searched_for_as_words(store, text, hit):
    cid = talk(store, "t", "the dragon NEAR the gold, NOT the content: AND OR")
    assert found(store, text) == ([(cid, 0, "user")] if hit else [])


def test_too_many_words_is_one_error(store):
    with pytest.raises(StoreError, match="give at most 32"):
        store.search(" ".join(f"w{i}" for i in range(33)))
    assert store.search("") == [] and store.search("?!") == []


def test_the_index_follows_every_change(store):
    keep = talk(store, "kept", "the river flows")
    cid = talk(store, "first title", "hello")
    mid = store.add_message(cid, "assistant", "", [])
    for text in ("The", "The harbour", "The harbour is full of boats"):  # a reply saved as it streams
        store.update_message(mid, text, [1])
    store.update_message(mid, "The harbour is full of boats", [1, 2], stop="eos")  # same text: no re-index
    index_is_consistent(store)
    assert found(store, "boats") == [(cid, 1, "assistant")]
    store.update_message(mid, "The quay is empty", [3])
    assert found(store, "boats") == [] and found(store, "quay") == [(cid, 1, "assistant")]
    store.rename(cid, "Harbours")
    assert found(store, "harbour") == [(cid, -1, "title")]
    store.truncate(cid, 1)  # edit and regenerate drop the tail
    assert found(store, "quay") == []
    index_is_consistent(store)
    store.delete(cid)  # its messages go by ON DELETE CASCADE, and out of the index with them
    assert found(store, "hello") == [] and found(store, "harbour") == []
    index_is_consistent(store)
    assert found(store, "river") == [(keep, 0, "user")]
    assert store.db.execute("SELECT COUNT(*) FROM message_search_docsize").fetchone() == (1,)


def test_the_migration_indexes_what_an_older_store_holds(tmp_path):
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path, isolation_level=None)
    migrate(db, upto=3)
    db.execute("INSERT INTO conversations (id, title, model_path, model_fingerprint, created_at, updated_at) "
               "VALUES ('19a4c3e01f2a1b2c3', 'old', '/m', 'fp', 1, 2)")
    db.execute("INSERT INTO messages (conversation_id, position, role, content, created_at) "
               "VALUES ('19a4c3e01f2a1b2c3', 0, 'user', 'an old lighthouse', 1)")
    db.close()

    ro = Store(path, readonly=True)  # read-only: migrated in memory, the file untouched
    assert found(ro, "lighthouse") == [("19a4c3e01f2a1b2c3", 0, "user")]
    ro.close()
    assert migrations.pending(sqlite3.connect(path)) == ["m004_message_search"]

    s = Store(path)
    assert found(s, "lighthouse") == [("19a4c3e01f2a1b2c3", 0, "user")]
    index_is_consistent(s)
    assert [fn.__name__ for fn in MIGRATIONS][-1] == "m004_message_search"


def test_without_fts5_a_scan_finds_the_same(store):
    talk(store, "Dragons", "Tell me about dragons.", "A dragon hoards gold in the mountains.")
    talk(store, "Cooking", "How long do I boil an egg?", "Seven minutes, said the dragon.")
    talk(store, "", "100% sure_thing\\ it is")  # titled by its first message: titles are searched too
    queries = ["dragon", "drag gold", "BOIL", "oil", "seven minutes", "sure", "100", "thing", "is"]
    with_index = [store.search(q) for q in queries]
    assert all(with_index[:3]) and not with_index[3]
    # As on an SQLite without FTS5: no index, no triggers
    for name in ("message_search_insert", "message_search_delete", "message_search_update"):
        store.db.execute(f"DROP TRIGGER {name}")
    store.db.execute("DROP TABLE message_search")
    assert [store.search(q) for q in queries] == with_index
    [hit] = store.search("hoards")
    assert hit.snippet == "A dragon hoards gold in the mountains."


def test_a_migration_on_an_sqlite_without_fts5_leaves_no_index(monkeypatch):
    class NoFts:
        """A connection whose SQLite says what one built without FTS5 says."""

        def __init__(self, db: sqlite3.Connection) -> None:
            self.db = db

        def execute(self, sql: str, *args):
            if "USING fts5" in sql:
                raise sqlite3.OperationalError("no such module: fts5")
            return self.db.execute(sql, *args)

    db = sqlite3.connect(":memory:", isolation_level=None)
    migrate(db, upto=3)
    m004 = MIGRATIONS[3]
    assert m004.__name__ == "m004_message_search"
    m004(NoFts(db))
    assert db.execute("SELECT COUNT(*) FROM sqlite_master WHERE name LIKE 'message_search%'").fetchone() == (0,)


# -- the command line --------------------------------------------------------------------------------


def test_search_prints_one_line_per_hit_with_controls_made_visible():
    s = Store(paths.store_path())
    cid = talk(s, "Sea \x1b]0;pwned\x07 songs", "sing me a song of the sea", "The sea \x1b[2J is wide\r and deep")
    s.close()
    proc = mixchat("search", "sea")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.decode()
    assert "\x1b" not in out and "\x07" not in out and "\r" not in out
    lines = out.splitlines()
    assert len(lines) == 3 and all(line.startswith(short_id(cid) + " ") for line in lines)
    assert "Sea ␛]0;pwned␇ songs" in lines[0] and lines[0].endswith("| title")
    assert lines[1].endswith("| user #0: sing me a song of the sea")
    assert lines[2].endswith("| assistant #1: The sea ␛[2J is wide␍ and deep")
    assert mixchat("search", "sea", "-n", "1").stdout.decode().splitlines() == lines[:1]


def test_search_with_no_match_says_so_and_exits_0():
    Store(paths.store_path()).close()
    proc = mixchat("search", 'NEAR("x" AND *')
    assert proc.returncode == 0
    assert proc.stdout.decode() == 'no match: no conversation holds every word of NEAR("x" AND *\n'
    proc = mixchat("search", '"*"')
    assert proc.returncode == 2 and "has no letters or digits" in one_error_line(proc)
    proc = mixchat("search", "sea", "--limit", "0")
    assert proc.returncode == 2 and "--limit 0" in one_error_line(proc)


def test_search_only_reads(tmp_path):
    assert mixchat("search", "anything").returncode == 0
    assert not paths.store_path().exists()  # no store: nothing found, nothing created
    s = Store(paths.store_path())
    cid = talk(s, "t", "a message about whales")
    s.close()
    db = sqlite3.connect(paths.store_path())
    db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")  # from a newer mixchat: never written
    db.close()
    before = paths.store_path().read_bytes()
    proc = mixchat("search", "whale")
    assert proc.returncode == 0 and proc.stdout.decode().startswith(short_id(cid))
    assert paths.store_path().read_bytes() == before
