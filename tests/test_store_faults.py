"""What the conversation store must survive: a file that is not a store or is corrupt, a schema from
a newer mixchat, a full disk, another process's lock, a home that is a file or read-only, ids that
are not ids, a conversation deleted while open. Each ends in one StoreError line that names the
cause and the fix, and changes nothing else."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from test_cli import mixchat, one_error_line

from mixchat.conversations import migrations
from mixchat.conversations.migrations import MIGRATIONS, NewerSchemaError, migrate
from mixchat.conversations.store import ConversationDeleted, Store, StoreError, short_id


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "c.sqlite3")
    yield s
    s.close()


def contents(s: Store, cid: str) -> list[str]:
    return [m.content for m in s.messages(cid)]


def seeded(path: Path) -> tuple[str, bytes]:
    """A closed store holding one conversation; returns its id and the file's bytes."""
    s = Store(path)
    c = s.create("/models/m", "fp", title="kept talk")
    s.add_message(c.id, "user", "hello")
    s.close()
    return c.id, path.read_bytes()


# -- files that are not a store, or are damaged ----------------------------------------------------


@pytest.mark.parametrize("readonly", [False, True])
def test_a_page_of_random_bytes_is_refused_with_how_to_move_it_and_never_written(tmp_path, readonly):
    path = tmp_path / "c.sqlite3"
    junk = os.urandom(4096)
    path.write_bytes(junk)
    with pytest.raises(StoreError) as err:
        Store(path, readonly=readonly)
    msg = str(err.value)
    assert "not a mixchat store" in msg and "has not changed it" in msg
    assert f"mv {path} {path}.bad" in msg and "new, empty store" in msg
    assert path.read_bytes() == junk and sorted(os.listdir(tmp_path)) == ["c.sqlite3"]  # no -wal, no -shm


def test_the_advice_never_names_a_file_that_would_be_overwritten(tmp_path):
    path = tmp_path / "c.sqlite3"
    path.write_bytes(b"junk" * 100)
    (tmp_path / "c.sqlite3.bad").write_bytes(b"an earlier bad store")
    with pytest.raises(StoreError, match=r"mv \S+c\.sqlite3 \S+c\.sqlite3\.bad1\)"):
        Store(path)


def test_a_damaged_page_fails_the_reads_that_need_it_and_stops_all_writes(tmp_path):
    path = tmp_path / "c.sqlite3"
    s = Store(path)
    small = s.create("m", "f")
    s.add_message(small.id, "user", "still readable")
    big = s.create("m", "f")
    for i in range(20):
        s.add_message(big.id, "user", f"{i} " + "x" * 3000)
    s.close()
    data = bytearray(path.read_bytes())
    data[-4096:] = os.urandom(4096)  # the last page: one of the big conversation's messages
    path.write_bytes(bytes(data))
    before = path.read_bytes()

    s = Store(path)
    with pytest.raises(StoreError) as err:
        s.messages(big.id)
    msg = str(err.value)
    assert "is corrupt" in msg and "will not write to it" in msg and f"mv {path} {path}.bad" in msg
    assert "not deleted" in msg and ".recover" in msg
    assert contents(s, small.id) == ["still readable"]  # what can be read still is
    with pytest.raises(StoreError, match="is corrupt"):
        s.add_message(small.id, "user", "new")  # a page that is fine, but the file is not
    with pytest.raises(StoreError, match="is corrupt"):
        s.create("m", "f")
    s.close()
    assert path.read_bytes() == before


def test_a_damaged_store_is_not_migrated(tmp_path):
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path, isolation_level=None)
    migrate(db, upto=1)
    for i in range(40):
        db.execute("INSERT INTO conversations VALUES (?, 't', '/m', 'fp', NULL, 1.0, 2.0)", (f"{i:04x}",))
        db.execute("INSERT INTO messages (conversation_id, position, role, content, created_at) "
                   "VALUES (?, 0, 'user', ?, 1.0)", (f"{i:04x}", "y" * 2000))
    db.close()
    data = bytearray(path.read_bytes())
    data[-4096:] = os.urandom(4096)
    path.write_bytes(bytes(data))
    before = path.read_bytes()
    with pytest.raises(StoreError, match="is corrupt .* will not write to it"):
        Store(path)
    assert path.read_bytes() == before


def test_another_programs_sqlite_database_is_refused(tmp_path):
    path = tmp_path / "c.sqlite3"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE photos (name TEXT)")
    db.commit()
    db.close()
    before = path.read_bytes()
    for readonly in (False, True):
        with pytest.raises(StoreError, match="another program's, so it is not a mixchat store"):
            Store(path, readonly=readonly)
    assert path.read_bytes() == before


def test_a_store_path_that_is_a_folder(tmp_path):
    (tmp_path / "c.sqlite3").mkdir()
    with pytest.raises(StoreError, match=r"c\.sqlite3 is a folder, not the conversation store file; move it aside"):
        Store(tmp_path / "c.sqlite3")


# -- schemas from another version -------------------------------------------------------------------


def newer(path: Path, drop_column: bool = False) -> bytes:
    """What a later mixchat with one more migration would leave behind."""
    seeded(path)
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("BEGIN")
    db.execute("ALTER TABLE conversations ADD COLUMN pinned INTEGER NOT NULL DEFAULT 0")
    if drop_column:
        db.execute("ALTER TABLE messages DROP COLUMN experts")
    db.execute("INSERT INTO _migrations VALUES ('m999_pinned', 0)")
    db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    db.execute("COMMIT")
    db.close()
    return path.read_bytes()


def test_user_version_counts_the_migrations(tmp_path, store):
    assert store.db.execute("PRAGMA user_version").fetchone() == (len(MIGRATIONS),)
    db = sqlite3.connect(tmp_path / "old.sqlite3", isolation_level=None)
    migrate(db, upto=1)
    assert db.execute("PRAGMA user_version").fetchone() == (1,)
    db.execute("PRAGMA user_version = 0")  # as every store was before user_version was kept
    db.close()
    Store(tmp_path / "old.sqlite3").close()
    db = sqlite3.connect(tmp_path / "old.sqlite3")
    assert db.execute("PRAGMA user_version").fetchone() == (len(MIGRATIONS),)


def test_a_newer_schema_is_never_written_or_migrated(tmp_path):
    path = tmp_path / "c.sqlite3"
    before = newer(path)
    with pytest.raises(StoreError) as err:
        Store(path)
    msg = str(err.value)
    assert f"written by a newer mixchat (schema {len(MIGRATIONS) + 1}, this one knows {len(MIGRATIONS)})" in msg
    assert "pip install -U mixchat" in msg and "`mixchat list`, `show` and `export` can still read it" in msg
    db = sqlite3.connect(path, isolation_level=None)
    with pytest.raises(NewerSchemaError):
        migrate(db)
    db.close()
    assert path.read_bytes() == before


def test_a_newer_user_version_alone_is_enough_to_refuse(tmp_path):
    path = tmp_path / "c.sqlite3"
    seeded(path)
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 70")
    db.close()
    with pytest.raises(StoreError, match="schema 70, this one knows"):
        Store(path)


def test_a_newer_schema_can_still_be_read(tmp_path):
    path = tmp_path / "c.sqlite3"
    before = newer(path)
    ro = Store(path, readonly=True)
    [summary] = ro.list()
    assert summary.title == "kept talk" and ro.get(summary.id[:8]).id == summary.id
    assert contents(ro, summary.id) == ["hello"]
    with pytest.raises(StoreError, match="opened read-only"):
        ro.rename(summary.id, "no")
    ro.close()
    assert path.read_bytes() == before


def test_a_newer_schema_without_a_column_this_version_reads_says_so(tmp_path):
    path = tmp_path / "c.sqlite3"
    newer(path, drop_column=True)
    ro = Store(path, readonly=True)
    [summary] = ro.list()  # list reads no dropped column
    with pytest.raises(StoreError, match="no such column.* written by a newer mixchat .*pip install -U mixchat"):
        ro.messages(summary.id)


def test_an_older_schema_is_read_without_touching_the_file(tmp_path):
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path, isolation_level=None)
    migrate(db, upto=1)
    db.execute("INSERT INTO conversations VALUES ('0001', 'old talk', '/m', 'fp', NULL, 1.0, 2.0)")
    db.execute("INSERT INTO messages (conversation_id, position, role, content, created_at) "
               "VALUES ('0001', 0, 'user', 'hello', 1.0)")
    db.close()
    before = path.read_bytes()
    ro = Store(path, readonly=True)
    assert ro.get("0001").settings == {} and ro.messages("0001")[0].experts is None
    assert ro.get("0001").context_start == 0 and [s.title for s in ro.list()] == ["old talk"]
    ro.close()
    assert path.read_bytes() == before
    assert migrations.pending(sqlite3.connect(path)) == [fn.__name__ for fn in MIGRATIONS[1:]]


def test_stores_opened_at_once_migrate_once(tmp_path):
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path, isolation_level=None)
    migrate(db, upto=1)
    db.close()
    script = (f"from pathlib import Path\nfrom mixchat.conversations.store import Store\n"
              f"Store(Path({str(path)!r})).close()")
    procs = [subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE) for _ in range(4)]
    assert [(p.wait(timeout=60), p.stderr.read()) for p in procs] == [(0, b"")] * 4
    assert migrations.applied(sqlite3.connect(path)) == [fn.__name__ for fn in MIGRATIONS]


# -- a full disk, a lock held too long --------------------------------------------------------------


def fill_the_disk(s: Store) -> None:
    """SQLite's own page limit: the write fails with SQLITE_FULL as on a full disk."""
    (pages,) = s.db.execute("PRAGMA page_count").fetchone()
    s.db.execute(f"PRAGMA max_page_count = {pages}")


def test_a_full_disk_names_the_folder_and_loses_nothing(store):
    c = store.create("m", "f")
    store.add_message(c.id, "user", "before")
    fill_the_disk(store)
    with pytest.raises(StoreError) as err:
        store.add_message(c.id, "user", "x" * 100_000)
    msg = str(err.value)
    assert f"the disk holding {store.path.parent} is full" in msg and "free some space there" in msg
    assert "was not saved, earlier ones are intact" in msg
    assert "cannot rollback" not in msg and not store.db.in_transaction
    assert contents(store, c.id) == ["before"]
    store.db.execute("PRAGMA max_page_count = 1073741823")  # space freed
    store.add_message(c.id, "user", "after")
    assert contents(store, c.id) == ["before", "after"]
    assert store.db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_a_full_disk_mid_reply_keeps_the_last_saved_part(store):
    c = store.create("m", "f")
    mid = store.add_message(c.id, "assistant", "", [])
    store.update_message(mid, "The first part", [1, 2, 3])
    fill_the_disk(store)
    with pytest.raises(StoreError, match="is full"):
        store.update_message(mid, "The first part" + " and more" * 20_000, list(range(50_000)))
    [reply] = store.messages(c.id)
    assert reply.content == "The first part" and reply.token_ids == [1, 2, 3]


def test_a_lock_held_past_the_timeout_says_who_and_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXCHAT_DB_TIMEOUT", "0.2")
    path = tmp_path / "c.sqlite3"
    s = Store(path)
    c = s.create("m", "f")
    s.add_message(c.id, "user", "before")
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another mixchat in the middle of a long write
    try:
        start = time.monotonic()
        with pytest.raises(StoreError) as err:
            s.add_message(c.id, "user", "blocked")
        assert 0.15 < time.monotonic() - start < 5
        msg = str(err.value)
        assert f"{path} is locked by another mixchat process (waited 0.2 s" in msg and "close it or try again" in msg
        assert not s.db.in_transaction
        assert contents(s, c.id) == ["before"]  # readers are not blocked
        assert Store(path).latest().id == c.id  # nor is opening a store that needs no migration
        assert [x.id for x in Store(path, readonly=True).list()] == [c.id]
    finally:
        other.execute("ROLLBACK")
        other.close()
    s.add_message(c.id, "user", "after")
    assert contents(s, c.id) == ["before", "after"]


def test_a_lock_held_while_an_old_store_needs_migrating(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXCHAT_DB_TIMEOUT", "0.2")
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path, isolation_level=None)
    migrate(db, upto=1)
    db.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreError, match="is locked by another mixchat process"):
            Store(path)
    finally:
        db.execute("ROLLBACK")
    assert migrations.pending(db) == [fn.__name__ for fn in MIGRATIONS[1:]]


@pytest.mark.parametrize("value", ["soon", "-1", "inf", "nan"])
def test_a_bad_timeout_setting(tmp_path, monkeypatch, value):
    monkeypatch.setenv("MIXCHAT_DB_TIMEOUT", value)
    with pytest.raises(StoreError, match="MIXCHAT_DB_TIMEOUT=.* is not a number of seconds"):
        Store(tmp_path / "c.sqlite3")
    assert not (tmp_path / "c.sqlite3").exists()


# -- where the store lives --------------------------------------------------------------------------


@pytest.mark.parametrize("readonly", [False, True])
def test_a_home_that_is_a_file(tmp_path, readonly):
    home = tmp_path / "home"
    home.write_text("my notes")
    for path in (home / "c.sqlite3", home / "data" / "c.sqlite3"):
        with pytest.raises(StoreError) as err:
            Store(path, readonly=readonly)
        msg = str(err.value)
        assert f"{home} is a file, not a folder" in msg and f"mv {home} {home}.bad" in msg and "MIXCHAT_HOME" in msg
    assert home.read_text() == "my notes"


def test_a_new_store_and_its_folder_are_private(tmp_path):
    home = tmp_path / "new" / "home"
    s = Store(home / "c.sqlite3")
    s.create("m", "f")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in home.iterdir()}
    assert modes == {"c.sqlite3": 0o600, "c.sqlite3-wal": 0o600, "c.sqlite3-shm": 0o600}
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    s.close()
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    Store(shared / "c.sqlite3").close()
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755  # a folder the user made keeps its mode


def test_reading_before_any_store_exists_creates_nothing(tmp_path):
    path = tmp_path / "home" / "c.sqlite3"
    ro = Store(path, readonly=True)
    assert ro.list() == [] and ro.latest() is None
    with pytest.raises(StoreError, match="no conversation '0123abcd'"):
        ro.get("0123abcd")
    with pytest.raises(StoreError, match="opened read-only"):
        ro.create("m", "f")
    assert not (tmp_path / "home").exists()


def unprivileged() -> list[str]:
    """A command prefix under which file modes bind. Root (CI, containers) writes through any mode,
    so there setpriv drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH: still root, still the owner of
    the checkout and the test files, but a folder without w is read-only to it."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root, where file modes do not stop writes, and setpriv (util-linux) is missing")
    prefix = [setpriv, "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search"]
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o555)
        probe = subprocess.run([*prefix, sys.executable, "-c", f"open({tmp!r} + '/probe', 'w')"],
                               capture_output=True, text=True)
        os.chmod(tmp, 0o755)
    if probe.returncode == 0 or "PermissionError" not in probe.stderr:
        pytest.skip(f"running as root, and setpriv cannot make a folder without w read-only here: "
                    f"{probe.stderr.strip()[-200:] or 'the write went through'}")
    return prefix


PROBE = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from mixchat.conversations.store import Store, StoreError
    try:
        s = Store(Path(sys.argv[1]), readonly=sys.argv[2] == "ro")
        convs = s.list()
        out = {"titles": [c.title for c in convs],
               "messages": [m.content for c in convs for m in s.messages(s.get(c.id[:8]).id)]}
    except StoreError as exc:
        out = {"error": str(exc)}
    print(json.dumps(out))
""")


def as_user(path: Path, mode: str) -> dict:
    proc = subprocess.run([*unprivileged(), sys.executable, "-c", PROBE, str(path), mode],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture
def read_only(tmp_path):
    """chmod a-w, undone after the test (so that the temporary folder can be cleaned up)."""
    made = []

    def make(p: Path) -> Path:
        made.append((p, stat.S_IMODE(p.stat().st_mode)))
        p.chmod(stat.S_IMODE(p.stat().st_mode) & ~0o222)
        return p

    yield make
    for p, mode in reversed(made):
        p.chmod(mode)


def test_a_store_cannot_be_created_under_a_read_only_folder(tmp_path, read_only):
    (tmp_path / "ro").mkdir()
    parent = read_only(tmp_path / "ro")
    got = as_user(parent / "home" / "c.sqlite3", "rw")
    assert "cannot create the folder" in got["error"] and str(parent / "home") in got["error"]
    assert "Permission denied" in got["error"] and "MIXCHAT_HOME" in got["error"]
    assert as_user(parent / "home" / "c.sqlite3", "ro") == {"titles": [], "messages": []}
    assert list(parent.iterdir()) == []


def test_a_read_only_home_refuses_to_save_but_still_lists_and_shows(tmp_path, read_only):
    home = tmp_path / "home"
    home.mkdir()
    _, before = seeded(home / "c.sqlite3")
    read_only(home)
    got = as_user(home / "c.sqlite3", "rw")["error"]
    assert f"cannot save conversations in {home / 'c.sqlite3'}: the folder {home} is read-only" in got
    assert f"chmod u+w {home}" in got and "`mixchat list`, `show` and `export` still work" in got
    assert as_user(home / "c.sqlite3", "ro") == {"titles": ["kept talk"], "messages": ["hello"]}
    assert [p.name for p in home.iterdir()] == ["c.sqlite3"] and (home / "c.sqlite3").read_bytes() == before


def test_a_read_only_home_with_a_crashed_writers_wal_still_shows_its_last_messages(tmp_path, read_only):
    home = tmp_path / "home"
    home.mkdir()
    cid, _ = seeded(home / "c.sqlite3")
    crash = (f"import os\nfrom pathlib import Path\nfrom mixchat.conversations.store import Store\n"
             f"s = Store(Path({str(home / 'c.sqlite3')!r}))\ns.add_message({cid!r}, 'user', 'in the wal')\n"
             "os._exit(0)")
    subprocess.run([sys.executable, "-c", crash], check=True)
    assert (home / "c.sqlite3-wal").stat().st_size > 0
    read_only(home)
    assert as_user(home / "c.sqlite3", "ro") == {"titles": ["kept talk"], "messages": ["hello", "in the wal"]}


def test_a_read_only_store_file(tmp_path, read_only):
    path = tmp_path / "c.sqlite3"
    _, before = seeded(path)
    read_only(path)
    got = as_user(path, "rw")["error"]
    assert f"the file {path} is read-only" in got and f"chmod u+w {path}" in got
    assert as_user(path, "ro")["messages"] == ["hello"]
    assert path.read_bytes() == before


# -- ids --------------------------------------------------------------------------------------------


ALPHABET = "conversation ids are digits and letters"


@pytest.mark.parametrize("bad, says", [
    ("", "no conversation id given"), ("  ", "no conversation id given"), ("%", ALPHABET), ("_", ALPHABET),
    ("0%", ALPHABET), ("019_", ALPHABET), ("' OR 1=1 --", ALPHABET), ("*", ALPHABET), ("?", ALPHABET),
    ("[0-9]*", ALPHABET), ("ilou", ALPHABET), ("\x1b]0;pwned\x07", ALPHABET), ("zzzz", "no conversation 'zzzz'"),
])
def test_ids_are_checked_before_anything_is_deleted(store, bad, says):
    a, b = store.create("m", "f"), store.create("m", "f")
    with pytest.raises(StoreError, match=says) as err:
        store.delete(bad)
    assert "\x1b" not in str(err.value) and "\x07" not in str(err.value)
    with pytest.raises(StoreError, match=says):
        store.rename(bad, "x")
    assert sorted(s.id for s in store.list()) == sorted([a.id, b.id])


def test_a_prefix_must_be_long_enough_and_unique(store):
    convs = [store.create("m", "f", title=f"talk {i}") for i in range(5)]
    with pytest.raises(StoreError, match="too short to pick a conversation: give at least 4"):
        store.delete(convs[0].id[:3])
    common = os.path.commonprefix([c.id for c in convs])
    assert len(common) >= 4
    with pytest.raises(StoreError) as err:
        store.delete(common)
    msg = str(err.value)
    assert msg.startswith(f"'{common}' matches 5 conversations: ") and msg.endswith("and 2 more; give more of the id")
    newest = max(convs, key=lambda c: (c.created_at, c.id))  # candidates are listed newest first
    assert msg.startswith(f"'{common}' matches 5 conversations: {newest.id} ({newest.title}), ")
    assert len(store.list()) == 5
    gone = store.delete(convs[2].id.upper())  # as typed from a screen that shows capitals
    assert gone.id == convs[2].id and gone.title == "talk 2"
    assert sorted(s.id for s in store.list()) == sorted(c.id for i, c in enumerate(convs) if i != 2)


def test_rename_says_what_it_renamed(store):
    c = store.create("m", "f", title="old")
    renamed = store.rename(c.id[:-1], "  new\ttitle ")
    assert (renamed.id, renamed.title) == (c.id, "new title") and store.get(c.id).title == "new title"


# -- a conversation deleted while it is open --------------------------------------------------------


def test_writes_to_a_deleted_conversation_say_so_and_save_nothing(store):
    kept = store.create("m", "f")
    store.add_message(kept.id, "user", "kept")
    gone = store.create("m", "f")
    mid = store.add_message(gone.id, "assistant", "", [])
    elsewhere = Store(store.path)  # `mixchat rm` in another terminal
    elsewhere.delete(gone.id)
    elsewhere.close()
    writes = [lambda: store.add_message(gone.id, "user", "lost?"),
              lambda: store.update_settings(gone.id, None, {}),
              lambda: store.truncate(gone.id, 0)]
    for write in writes:
        with pytest.raises(ConversationDeleted, match=f"conversation {gone.id} was deleted") as err:
            write()
        assert err.value.cid == gone.id and "start a new conversation" in str(err.value)
    with pytest.raises(ConversationDeleted, match=f"message {mid}.* was deleted .*reply was not saved"):
        store.update_message(mid, "the rest of the reply", [1, 2])
    assert store.db.execute("SELECT COUNT(*) FROM messages WHERE conversation_id = ?", (gone.id,)).fetchone() == (0,)
    assert contents(store, kept.id) == ["kept"] and not store.db.in_transaction
    store.add_message(kept.id, "user", "still fine")


# -- every cause SQLite can report, one line each ---------------------------------------------------


def sqlite_error(code: int | None, text: str, cls=sqlite3.OperationalError) -> sqlite3.Error:
    exc = cls(text)
    if code is not None:  # Python 3.11+; 3.10 has only the text
        exc.sqlite_errorcode, exc.sqlite_errorname = code, f"SQLITE_{code}"
    return exc


@pytest.mark.parametrize("code", [None, "given"])
@pytest.mark.parametrize("primary, text, says", [
    (10 | (3 << 8), "disk I/O error", "disk I/O error"),
    (11, "database disk image is malformed", "is corrupt"),
    (26, "file is not a database", "is corrupt"),
    (13, "database or disk is full", "is full"),
    (5, "database is locked", "locked by another mixchat process"),
    (8, "attempt to write a readonly database", "is read-only"),
    (19 | (3 << 8), "FOREIGN KEY constraint failed", "the conversation was deleted"),
    (1, "something new", "this is a mixchat bug"),
])
def test_each_sqlite_cause_becomes_one_store_error(store, code, primary, text, says):
    exc = store._explain(sqlite_error(primary if code else None, text), "write")
    assert isinstance(exc, StoreError) and says in str(exc) and "\n" not in str(exc)


def test_no_sqlite_error_escapes_the_api(store):
    c = store.create("m", "f")
    store.db.execute("DROP INDEX messages_by_conversation")
    store.db.execute("DROP TABLE messages")  # a hand-edited store
    for call in (lambda: store.messages(c.id), lambda: store.list(), lambda: store.add_message(c.id, "user", "x")):
        with pytest.raises(StoreError, match="no such table: messages"):
            call()
    assert not store.db.in_transaction


# -- the command line -------------------------------------------------------------------------------


def test_rm_with_an_empty_id_or_a_wildcard_deletes_nothing():
    from mixchat import paths

    s = Store(paths.store_path())
    c = s.create("m", "f", title="precious")
    s.close()
    for bad in ("", "%", "_"):
        proc = mixchat("rm", bad)
        assert proc.returncode == 2 and (ALPHABET in one_error_line(proc)
                                         or "no conversation id given" in one_error_line(proc))
    assert [x.id for x in Store(paths.store_path(), readonly=True).list()] == [c.id]
    proc = mixchat("rm", c.id[:8])
    assert proc.returncode == 0 and proc.stdout.decode() == f"deleted {short_id(c.id)} (precious) and its messages\n"


def test_list_on_random_bytes_is_one_line_and_changes_nothing():
    from mixchat import paths

    paths.store_path().parent.mkdir(parents=True)
    junk = os.urandom(4096)
    paths.store_path().write_bytes(junk)
    proc = mixchat("list")
    assert proc.returncode == 2 and "not a mixchat store" in one_error_line(proc)
    assert paths.store_path().read_bytes() == junk


def test_opening_a_store_again_keeps_sqlites_locks(tmp_path):
    """Closing any descriptor of a file drops every POSIX lock the process holds on it: reading the
    header of a store this process already has open with a plain open() let another process write
    under the open Store and corrupt the file within a few rounds."""
    import subprocess
    import sys

    path = tmp_path / "c.sqlite3"
    held = [Store(path)]
    cid = held[0].create("m", "fp").id
    writer = ("import sys; from pathlib import Path; from mixchat.conversations.store import Store\n"
              "s = Store(Path(sys.argv[1]))\n"
              "for _ in range(20): s.add_message(sys.argv[2], 'user', 'hello there ' * 50)\n"
              "s.close()\n")
    try:
        for i in range(12):
            subprocess.run([sys.executable, "-c", writer, str(path), cid], check=True, timeout=60)
            held.append(Store(path))  # another handle in this process, left open
            assert len(held[-1].messages(cid)) == 20 * (i + 1)
        assert held[0].db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        for s in held:
            s.close()
