"""Conversation ids: ULIDs in Crockford base32 that sort by time, a short form (the last 8
characters) that `list` shows and every command accepts, and the hexadecimal ids of stores written
by mixchat 0.3 still found by every form."""

from __future__ import annotations

import json
import re
import sqlite3

import pytest
from conftest import tiny_args
from test_cli import mixchat, one_error_line

from mixchat import paths
from mixchat.conversations import store as store_mod
from mixchat.conversations.migrations import migrate
from mixchat.conversations.store import CROCKFORD, SHORT_ID, Store, StoreError, check_id, new_id, short_id

ULID = re.compile(r"^[0-7][0-9a-hjkmnp-tv-z]{25}$")


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "c.sqlite3")
    yield s
    s.close()


def test_new_ids_are_ulids_whose_start_is_the_time_in_milliseconds(monkeypatch):
    ms = 1_796_000_000_123  # Dec 2026
    monkeypatch.setattr(store_mod.time, "time_ns", lambda: ms * 1_000_000 + 999_999)
    cid = new_id()
    assert ULID.match(cid), cid
    assert sum(CROCKFORD.index(c) << 5 * i for i, c in enumerate(reversed(cid[:10]))) == ms
    assert not set(cid) & set("ilou")  # Crockford leaves out the letters read as digits


def test_new_ids_sort_by_creation_time(monkeypatch):
    now = [1_700_000_000_000]  # milliseconds

    def tick() -> int:
        now[0] += 1 if len(made) % 3 else 997  # some a millisecond apart, some further; never a tie
        return now[0] * 1_000_000

    made: list[str] = []
    monkeypatch.setattr(store_mod.time, "time_ns", tick)
    for _ in range(300):
        made.append(new_id())
    assert sorted(made) == made
    # Across the digits' ranks: a time whose base32 form gains a digit still sorts after
    monkeypatch.setattr(store_mod.time, "time_ns", lambda: (32**9 - 1) * 1_000_000)
    before = new_id()
    monkeypatch.setattr(store_mod.time, "time_ns", lambda: 32**9 * 1_000_000)
    assert new_id() > before


def test_short_forms_are_distinct_and_pick_their_conversation(store):
    convs = [store.create("m", "f", title=f"talk {i}") for i in range(300)]
    shorts = [short_id(c.id) for c in convs]
    assert all(len(s) == SHORT_ID for s in shorts) and len(set(shorts)) == len(convs)
    # Made in the same few milliseconds, the ids share their start: the short form is the random end.
    assert len({c.id[:8] for c in convs}) < 10
    for c in convs[::37]:
        assert store.get(short_id(c.id)).id == c.id
        assert store.get(short_id(c.id).upper()).id == c.id
        assert store.get(c.id[-5:]).id == c.id  # any unique suffix of 4 or more
        assert store.get(c.id).title == c.title


def test_old_hexadecimal_ids_still_resolve_by_every_form(tmp_path):
    """A store from mixchat 0.3: 11 hex digits of milliseconds and 6 random ones."""
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path, isolation_level=None)
    migrate(db, upto=3)
    old = ["19a4c3e01f2a1b2c3", "19a4c3e01f3d4e5f6", "19a4c3e0ff0badf00"]
    for i, cid in enumerate(old):
        db.execute("INSERT INTO conversations (id, title, model_path, model_fingerprint, created_at, updated_at) "
                   "VALUES (?, ?, '/m', 'fp', ?, ?)", (cid, f"old {i}", 100.0 + i, 100.0 + i))
    db.close()

    s = Store(path)
    new = s.create("/m", "fp", title="new")
    assert ULID.match(new.id)
    for i, cid in enumerate(old):
        assert check_id(cid) == cid
        assert s.get(cid).title == f"old {i}"
        assert s.get(short_id(cid)).title == f"old {i}"
    assert s.get("19a4c3e0ff").id == old[2]  # a unique prefix, as before
    with pytest.raises(StoreError) as err:
        s.get("19a4c3e01f")
    msg = str(err.value)
    # Newest first by creation time (hex ids and ULIDs do not sort against each other)
    assert msg == (f"'19a4c3e01f' matches 2 conversations: {old[1]} (old 1), {old[0]} (old 0); "
                   "give more of the id")
    assert [x.id for x in s.list()] == [new.id, *reversed(old)]


def test_text_that_starts_one_id_and_ends_another_picks_neither(tmp_path):
    path = tmp_path / "c.sqlite3"
    db = sqlite3.connect(path, isolation_level=None)
    migrate(db)
    for cid, title in (("abcd0000000000000", "starts"), ("0000000000000abcd", "ends")):
        db.execute("INSERT INTO conversations (id, title, model_path, model_fingerprint, created_at, updated_at) "
                   "VALUES (?, ?, '/m', 'fp', 1, 1)", (cid, title))
    db.close()
    s = Store(path)
    with pytest.raises(StoreError, match="'abcd' matches 2 conversations: .*give more of the id"):
        s.delete("abcd")
    assert len(s.list()) == 2
    assert s.get("abcd0").title == "starts" and s.get("0abcd").title == "ends"


@pytest.mark.parametrize("bad", ["", " ", "%", "_", "*", "?", "[a-z]*", "ab%d", "il1o", "u000", "' OR 1=1 --"])
def test_the_new_alphabet_still_refuses_wildcards_and_nothing(store, bad):
    c = store.create("m", "f")
    with pytest.raises(StoreError, match="no conversation id given|conversation ids are digits and letters"):
        store.delete(bad)
    assert [x.id for x in store.list()] == [c.id]


def test_every_command_takes_the_short_form(make_release):
    model = make_release(tiny_args(sliding_window=24), seed=31, std=0.15)
    s = Store(paths.store_path())
    conv = s.create(str(model), "another model's", title="a short talk")
    s.add_message(conv.id, "user", "hello")
    s.close()
    short = short_id(conv.id)

    listing = mixchat("list").stdout.decode()
    assert short in listing and conv.id not in listing
    assert "a short talk" in mixchat("show", short).stdout.decode()
    assert json.loads(mixchat("export", short, "--format", "json").stdout)["id"] == conv.id
    proc = mixchat("--cid", short, "-m", str(model), "--json", "--max-tokens", "2", "-p", "and then?")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.decode().splitlines()[-1])["conversation"] == conv.id
    proc = mixchat("rename", short, "renamed")
    assert proc.returncode == 0 and proc.stdout.decode() == f"{short}: renamed\n"
    proc = mixchat("rm", short)
    assert proc.returncode == 0 and proc.stdout.decode() == f"deleted {short} (renamed) and its messages\n"
    proc = mixchat("show", short)
    assert proc.returncode == 2 and "no conversation" in one_error_line(proc)
