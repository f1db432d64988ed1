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
