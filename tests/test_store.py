from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap

import pytest

from mixchat.conversations.migrations import MIGRATIONS, migrate
from mixchat.conversations.store import Store, StoreError


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "c.sqlite3")
    yield s
    s.close()


def test_conversation_life_cycle(store):
    a = store.create("/models/mistral", "fp1", system="Be brief.")
    store.add_message(a.id, "user", "What is the tallest mountain on Earth, and how tall is it in metres? " * 2)
    mid = store.add_message(a.id, "assistant", "", [])
    store.update_message(mid, "Everest, 8849 m.", [10, 11, 12], [[[0, 1]], [[2, 3]], [[1, 0]]], "eos",
                         {"decode_tokens_per_second": 3.0})
    b = store.create("/models/mixtral", "fp2")
    store.add_message(b.id, "user", "hi")

    assert store.latest().id == b.id
    assert [s.id for s in store.list()] == [b.id, a.id]
    got = store.get(a.id[:13])  # a unique prefix is enough
    assert got.title.startswith("What is the tallest mountain") and got.title.endswith("…") and len(got.title) == 60
    assert got.system == "Be brief."
    msgs = store.messages(a.id)
    assert [(m.position, m.role) for m in msgs] == [(0, "user"), (1, "assistant")]
    assert msgs[1].token_ids == [10, 11, 12] and msgs[1].experts[0] == [[0, 1]] and msgs[1].stop == "eos"
    assert msgs[1].timings == {"decode_tokens_per_second": 3.0}

    store.rename(a.id, "Mountains")
    assert store.get(a.id).title == "Mountains"
    store.truncate(a.id, 1)
    assert len(store.messages(a.id)) == 1
    store.delete(a.id)
    assert store.db.execute("SELECT COUNT(*) FROM messages WHERE conversation_id = ?", (a.id,)).fetchone() == (0,)
    with pytest.raises(StoreError, match="no conversation"):
        store.get(a.id)


def test_ambiguous_prefix(store):
    a, b = store.create("m", "f"), store.create("m", "f")
    common = next(i for i in range(len(a.id)) if a.id[i] != b.id[i])
    with pytest.raises(StoreError, match="matches 2 conversations"):
        store.get(a.id[:common])


def test_store_from_an_older_schema_is_migrated_with_its_data(tmp_path):
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path, isolation_level=None)
    assert migrate(db, upto=1) == ["m001_initial"]
    db.execute("INSERT INTO conversations VALUES ('0001', 'old talk', '/m', 'fp', NULL, 1.0, 2.0)")
    db.execute("INSERT INTO messages (conversation_id, position, role, content, token_ids, stop, created_at) "
               "VALUES ('0001', 0, 'user', 'hello', NULL, NULL, 1.0)")
    db.close()

    store = Store(path)
    names = [r[0] for r in store.db.execute("SELECT name FROM _migrations ORDER BY name")]
    assert names == [fn.__name__ for fn in MIGRATIONS]
    conv = store.get("0001")
    assert conv.title == "old talk" and conv.settings == {}
    assert [m.content for m in store.messages("0001")] == ["hello"]
    assert store.messages("0001")[0].experts is None
    assert migrate(store.db) == []  # nothing left to do


def test_a_file_that_is_not_a_database_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "c.sqlite3"
    junk = b"this is not sqlite" * 100
    path.write_bytes(junk)
    with pytest.raises(StoreError, match="cannot open the conversation store .* not a mixchat store.* Move it aside"):
        Store(path)
    assert path.read_bytes() == junk


def test_corrupt_message_names_the_conversation(store):
    c = store.create("m", "f")
    store.add_message(c.id, "assistant", "x", [1])
    store.db.execute("UPDATE messages SET token_ids = '[1, 2' WHERE conversation_id = ?", (c.id,))
    with pytest.raises(StoreError, match=f"conversation {c.id} is corrupt"):
        store.messages(c.id)


def test_two_processes_writing_at_once_corrupt_nothing(tmp_path):
    path = tmp_path / "shared.sqlite3"
    Store(path).close()
    script = textwrap.dedent(f"""
        from pathlib import Path
        from mixchat.conversations.store import Store
        s = Store(Path({str(path)!r}))
        c = s.create("m", "f")
        for i in range(60):
            mid = s.add_message(c.id, "user", f"message {{i}}")
            s.update_message(mid, f"message {{i}} edited", [i])
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script]) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    store = Store(path)
    assert store.db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    convs = store.list()
    assert len(convs) == 2 and all(c.turns == 60 for c in convs)
    assert all(m.content.endswith("edited") for c in convs for m in store.messages(c.id))
