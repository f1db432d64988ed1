"""Chat: turns saved as they stream; regenerate and edit replace the tail in the store and rewind
the cache instead of re-reading the history."""

from __future__ import annotations

from conftest import tiny_args

from mixchat import paths
from mixchat.conversations import kvstore
from mixchat.conversations.chat import Chat
from mixchat.conversations.store import Store
from mixchat.engine.engine import Engine
from mixchat.engine.generation import Done
from mixchat.engine.sampling import SamplingSettings

GREEDY = SamplingSettings(temperature=0, repeat_penalty=1.0, max_tokens=6)


def last(events) -> Done:
    return list(events)[-1]


def test_regenerate_and_edit_replace_the_tail(make_release):
    engine = Engine.load(make_release(tiny_args(sliding_window=32), seed=41, std=0.15), dtype="fp32", warm=False)
    store = Store(paths.store_path())
    chat = Chat(engine, kvstore.SessionPool(engine, paths.kv_dir()), store)
    first = last(chat.send("Tell me about the sea.", GREEDY))
    second = last(chat.send("And the sky?", GREEDY))

    again = last(chat.regenerate(GREEDY))
    assert again.generated == second.generated  # greedy: the same reply
    assert again.cached_tokens == len(again.prompt_tokens) - 1  # rewound, not re-read
    msgs = store.messages(chat.id)
    assert [m.role for m in msgs] == ["user", "assistant"] * 2 and msgs[3].token_ids == second.generated

    edited = last(chat.edit(2, "And the stars?", GREEDY))
    msgs = store.messages(chat.id)
    assert [m.content for m in msgs if m.role == "user"] == ["Tell me about the sea.", "And the stars?"]
    assert msgs[3].token_ids == edited.generated and len(msgs) == 4
    history = len(first.prompt_tokens) + len(first.generated)
    assert edited.cached_tokens >= history  # everything up to the edited message came from the cache
    assert [m.content for m in chat.messages] == [m.content for m in msgs]


def test_the_model_that_wrote_the_latest_reply_is_the_conversations(make_release, monkeypatch):
    """Continued with another model, the conversation is that model's once it has a reply from it (its saved
    cache is that model's); a turn stopped before the other model wrote a token changes nothing; a relative
    folder is kept absolute, and the same folder spelt another way is not a change."""
    import threading

    a = make_release(tiny_args(sliding_window=32), seed=41, std=0.15)
    b = make_release(tiny_args(sliding_window=32), seed=42, std=0.15)
    (a.parent / "elsewhere").mkdir()
    monkeypatch.chdir(a.parent / "elsewhere")
    first = Engine.load(f"../{a.name}", dtype="fp32", warm=False)  # relative, as `mixchat -m ../m` gives it
    store = Store(paths.store_path())
    chat = Chat(first, kvstore.SessionPool(first, paths.kv_dir()), store)
    last(chat.send("Tell me about the sea.", GREEDY))
    cid = chat.id
    assert store.get(cid).model_path == str(a)  # absolute and tidied: found from any working directory

    second = Engine.load(str(b), dtype="fp32", warm=False)
    pool = kvstore.SessionPool(second, paths.kv_dir())
    stopped = threading.Event()
    stopped.set()  # stopped before its first token: b wrote nothing
    done = last(Chat(second, pool, store, store.get(cid)).send("And the sky?", GREEDY, cancel=stopped))
    assert not done.generated
    assert store.get(cid).model_path == str(a) and store.get(cid).model_fingerprint == first.fingerprint
    done = last(Chat(second, pool, store, store.get(cid)).send("And the sky?", GREEDY))
    assert done.generated
    conv = store.get(cid)
    assert conv.model_path == str(b) and conv.model_fingerprint == second.fingerprint

    link = b.parent / "through-a-link"
    link.symlink_to(b)
    again = Engine.load(str(link), dtype="fp32", warm=False)  # the same folder, spelt another way
    last(Chat(again, kvstore.SessionPool(again, paths.kv_dir()), store, store.get(cid)).send("More?", GREEDY))
    assert store.get(cid).model_path == str(b)
