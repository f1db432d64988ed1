"""`mixchat export --format json` and `mixchat import`: what is exported comes back as a new
conversation, equal but for its id and dates; a file that is not such an export, whatever is wrong
with it, is refused with one line naming the file, and nothing is written."""

from __future__ import annotations

import json
import sqlite3
import sys

import pytest

from mixchat import paths
from mixchat.conversations import exporting
from mixchat.conversations.exporting import ImportRefused, export_json, export_markdown, import_json, parse_import
from mixchat.conversations.store import Store, StoreError, short_id
from mixchat.frontends import cli


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "c.sqlite3")
    yield s
    s.close()


def seeded(s: Store) -> str:
    c = s.create("/models/mixtral", "fp-1234", system="Be brief.",
                 settings={"temperature": 0.3, "top_p": 0.9, "seed": 2**64 - 1, "max_tokens": 64, "top_k": 0})
    s.add_message(c.id, "user", "Where do rivers go?\n\x1b[2J and \"quotes\" 🌊")
    mid = s.add_message(c.id, "assistant", "", [])
    s.update_message(mid, "To the sea.", [10, 11, 12], [[[0, 1], [2, 3]], [[1, 0], [3, 2]], [[4, 5], [6, 7]]], "eos",
                     {"decode_tokens_per_second": 3.5, "time_to_first_token": 0.25})
    s.add_message(c.id, "user", "And then?")
    mid = s.add_message(c.id, "assistant", "", [])
    s.update_message(mid, "Clouds", [13], None, "interrupted")
    s.rename(c.id, "Rivers")
    return c.id


def without_ids_and_dates(data: dict) -> dict:
    return {k: v for k, v in data.items() if k not in ("id", "created_at", "updated_at")}


def test_export_then_import_then_export_is_the_same(store):
    cid = seeded(store)
    first = export_json(store, cid)
    conv = import_json(store, json.loads(exporting.dumps(first)), "rivers.json")
    assert conv.id != cid and len(store.list()) == 2
    again = export_json(store, short_id(conv.id))
    assert again["id"] == conv.id and without_ids_and_dates(again) == without_ids_and_dates(first)
    assert again["messages"] == first["messages"]  # each message's date is kept: when it was said
    assert export_markdown(store, conv.id).replace(conv.id, cid).split("- started")[0] == \
        export_markdown(store, cid).split("- started")[0]
    assert store.search("rivers sea") == [] and [h.position for h in store.search("clouds")] == [3, 3]


def test_the_json_export_format_is_unchanged(store):
    cid = seeded(store)
    data = export_json(store, cid)
    assert list(data) == ["id", "title", "model_path", "model_fingerprint", "system", "settings", "created_at",
                          "updated_at", "messages"]
    assert list(data["messages"][0]) == ["role", "content", "token_ids", "experts", "stop", "timings", "created_at"]
    assert data["messages"][1]["experts"][2] == [[4, 5], [6, 7]] and data["settings"]["seed"] == 2**64 - 1


def test_an_untitled_import_is_titled_by_its_first_message(store):
    conv = import_json(store, {"messages": [{"role": "user", "content": "  hello\n  there "}]}, "x.json")
    assert conv.title == "hello there" and store.get(conv.id).title == "hello there"
    [m] = store.messages(conv.id)
    assert m.stop is None and m.token_ids is None and m.created_at > 0


def test_an_import_is_one_transaction(store):
    # A message the store refuses halfway through (here: a trigger; in life a full disk) leaves no
    # conversation and no earlier message behind.
    store.db.execute("CREATE TRIGGER boom BEFORE INSERT ON messages WHEN new.content = 'boom' "
                     "BEGIN SELECT RAISE(ABORT, 'boom'); END")
    data = {"title": "t", "messages": [{"role": "user", "content": "fine"}, {"role": "assistant", "content": "boom"}]}
    with pytest.raises(StoreError):
        import_json(store, data, "x.json")
    assert store.list() == [] and store.db.execute("SELECT COUNT(*) FROM messages").fetchone() == (0,)


GOOD_MESSAGE = {"role": "user", "content": "hi"}


def doc(**changes) -> dict:
    return {"title": "t", "model_path": "/m", "messages": [GOOD_MESSAGE], **changes}


def msg(**changes) -> dict:
    return doc(messages=[{**GOOD_MESSAGE, **changes}])


@pytest.mark.parametrize("data, says", [
    ([1, 2], "holds a JSON list, not a conversation"),
    ("text", "holds a JSON string"),
    (doc(messages=None), "no list of messages"),
    ({"title": "t"}, "no list of messages"),
    (doc(messages={"0": GOOD_MESSAGE}), '"messages" is a JSON object, not a list'),
    (doc(messages=["hi"]), "message 0 is a JSON string, not an object"),
    (msg(role="system"), "message 0 has the role 'system'; only user and assistant"),
    (msg(role="tool"), "role 'tool'"),
    (msg(role=None), "role 'None'"),
    (msg(role="\x1b[2Juser"), "role '␛[2Juser'"),
    (msg(content=5), "message 0's content is a JSON number, not text"),
    (msg(content=None), "message 0's content is a JSON null, not text"),
    (msg(content=["a"]), "content is a JSON list"),
    (msg(content="a\x00b"), "holds a NUL character at character 1"),
    (msg(content="a\ud800b"), "unpaired surrogate (\\ud800) at character 1"),
    (msg(token_ids="1 2"), "token_ids is a JSON string, not a list"),
    (msg(token_ids=[1, -2]), "token_ids[1] is '-2', not a whole number"),
    (msg(token_ids=[1, 2.5]), "token_ids[1] is '2.5'"),
    (msg(token_ids=[True]), "token_ids[0] is 'True'"),
    (msg(token_ids=[2**40]), "not a whole number from 0 to 2147483647"),
    (msg(experts=[[[0, 1]], [[1, "x"]]]), "experts[1][0][1]"),
    (msg(experts=[[0, 1]]), "experts[0][0] is a JSON number, not a list"),
    (msg(experts=[["ab"]]), "experts[0][0] is a JSON string"),
    (msg(experts={"a": 1}), "experts is a JSON object, not a list"),
    (msg(stop="exploded"), "the stop 'exploded'; one of null, eos, length, context, interrupted, error"),
    (msg(timings={"x": {"nested": 1}}), "timings.x is \"{'nested': 1}\", not a number"),
    (msg(timings=[1]), "timings is a JSON list, not an object"),
    (msg(created_at="yesterday"), "created_at is 'yesterday', not a number"),
    (doc(settings={"temperature": [0.3]}), "settings.temperature is '[0.3]', not a number"),
    (doc(settings={"seed": 2**65}), "settings.seed is '36893488147419103232', not a number"),
    (doc(settings={str(i): i for i in range(65)}), "settings has 65 entries, more than 64"),
    (doc(settings="{}"), "settings is a JSON string, not an object"),
    (doc(title=7), "title is a JSON number, not text"),
    (doc(title="x" * 241), "title is 241 characters long, more than 240"),
    (doc(model_path=["a"]), "model_path is a JSON list"),
    (doc(system=False), "system is a JSON true/false, not text"),
    (doc(model_fingerprint="\x00"), "model_fingerprint holds a NUL"),
])
def test_whatever_is_wrong_is_named_and_nothing_is_written(store, data, says):
    with pytest.raises(ImportRefused) as err:
        import_json(store, data, "evil.json")
    msg = str(err.value)
    assert msg.startswith("cannot import evil.json: ") and msg.endswith("; nothing was imported")
    assert says in msg, msg
    assert "\n" not in msg and "\x1b" not in msg
    assert store.list() == []


def test_size_bounds(store, monkeypatch):
    monkeypatch.setattr(exporting, "MAX_MESSAGES", 3)
    monkeypatch.setattr(exporting, "MAX_TEXT_CHARS", 10)
    monkeypatch.setattr(exporting, "MAX_TOKENS", 4)
    for data, says in [(doc(messages=[GOOD_MESSAGE] * 4), "holds 4 messages, more than 3"),
                       (msg(content="x" * 11), "content is 11 characters long, more than 10"),
                       (doc(system="x" * 11), "system is 11 characters long"),
                       (msg(token_ids=[1] * 5), "token_ids has 5 entries, more than 4"),
                       (msg(experts=[[[1]]] * 5), "experts has 5 entries, more than 4")]:
        with pytest.raises(ImportRefused, match=says):
            parse_import(data, "big.json")
    assert import_json(store, doc(messages=[GOOD_MESSAGE] * 3), "ok.json").title == "t"


# -- the command line --------------------------------------------------------------------------------


def run(capsys, monkeypatch, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdin", open("/dev/null"))  # noqa: SIM115 - closed with the test
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_import_on_the_command_line_round_trips(tmp_path, capsys, monkeypatch):
    s = Store(paths.store_path())
    cid = seeded(s)
    s.close()
    code, exported, _ = run(capsys, monkeypatch, "export", short_id(cid), "--format", "json")
    assert code == 0
    file = tmp_path / "rivers.json"
    file.write_text(exported, encoding="utf-8")
    code, out, err = run(capsys, monkeypatch, "import", str(file))
    assert code == 0 and err == ""
    short = out.split(":")[0]
    assert out == f"{short}: Rivers (4 messages, imported from {file})\n"
    s = Store(paths.store_path(), readonly=True)
    [new] = [c for c in s.list() if c.id != cid]
    assert short_id(new.id) == short
    code, again, _ = run(capsys, monkeypatch, "export", short, "--format", "json")
    assert without_ids_and_dates(json.loads(again)) == without_ids_and_dates(json.loads(exported))


NOT_JSON = [
    (b"", "it is not JSON (Expecting value at line 1, column 1)"),
    (b"{\"title\": ", "it is not JSON"),
    (b"caf\xe9", "it is not UTF-8 (byte 0xe9 at offset 3)"),
    (b'{"messages": [{"role": "user", "content": "hi", "created_at": NaN}]}', "NaN is not a JSON number"),
    (b'{"messages": [{"role": "user", "content": "hi", "created_at": Infinity}]}', "Infinity is not a JSON number"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"title": ' + b"9" * 5000 + b"}", "it is not JSON mixchat can read (a number thousands of digits long)"),
    (b"[]", "it holds a JSON list, not a conversation"),
    (b'{"title": "t", "messages": [{"role": "system", "content": "x"}]}', "only user and assistant"),
]


@pytest.mark.parametrize("raw, says", NOT_JSON, ids=[says[:30] for _, says in NOT_JSON])
def test_a_bad_file_is_one_line_naming_it_and_nothing_is_written(tmp_path, capsys, monkeypatch, raw, says):
    file = tmp_path / "evil \x1b]0;x\x07.json"
    file.write_bytes(raw)
    code, out, err = run(capsys, monkeypatch, "import", str(file))
    assert code == 2 and out == ""
    [line] = err.splitlines()
    assert line.startswith("mixchat: error: cannot import ") and "evil ␛]0;x␇.json: " in line, line
    assert says in line and line.endswith("nothing was imported")
    assert not paths.store_path().exists()  # refused before the store was even opened


def test_missing_huge_and_folder_files(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(exporting, "MAX_IMPORT_BYTES", 100)
    big = tmp_path / "big.json"
    big.write_text(json.dumps(doc(title="x" * 200)))
    for path, says in [(tmp_path / "nowhere.json", "No such file or directory"), (tmp_path, "it is a folder"),
                       (big, "it is larger than")]:
        code, _, err = run(capsys, monkeypatch, "import", str(path))
        assert code == 2 and says in err and len(err.splitlines()) == 1, err
    assert not paths.store_path().exists()


def test_an_import_into_a_store_from_a_newer_mixchat_is_refused(tmp_path, capsys, monkeypatch):
    s = Store(paths.store_path())
    seeded(s)
    s.close()
    db = sqlite3.connect(paths.store_path())
    db.execute("PRAGMA user_version = 999")
    db.close()
    file = tmp_path / "a.json"
    file.write_text(json.dumps(doc()))
    code, _, err = run(capsys, monkeypatch, "import", str(file))
    assert code == 2 and "newer mixchat" in err
    assert len(Store(paths.store_path(), readonly=True).list()) == 1
