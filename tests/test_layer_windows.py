"""Per-layer sliding windows (Ministral's params.json pattern) through what keeps a conversation: the
saved KV cache, rewinding a Session past a window, the training forward pass. The logits themselves are
checked against HF's Ministral in test_model_vs_hf.py and test_decode_step.py."""

from __future__ import annotations

import torch
from conftest import tiny_args
from test_model_vs_hf import random_tokens

from mixchat.conversations import kvstore
from mixchat.dev.training import forward_train
from mixchat.engine.engine import Engine
from mixchat.engine.generation import Done, Session
from mixchat.engine.sampling import SamplingSettings
from mixchat.model.cache import kv_bytes
from mixchat.text.chat_format import Message, encode_chat

GREEDY = SamplingSettings(temperature=0, repeat_penalty=1.0, max_tokens=12)
ARGS = tiny_args(sliding_window=[6, None, 10, None], n_layers=4)


def engine_for(make_release) -> Engine:
    return Engine.load(make_release(ARGS, seed=23, std=0.15), dtype="fp32", warm=False)


def turn(session: Session, prompt: list[int]) -> Done:
    return list(session.generate(prompt, GREEDY))[-1]


def test_saved_cache_of_a_per_layer_window_model_continues_exactly(make_release, tmp_path):
    engine = engine_for(make_release)
    fp = kvstore.cache_fingerprint(engine)
    live = Session(engine)
    first = encode_chat(engine.tokenizer, [Message("user", "Name three rivers and say which is longest.")])
    d1 = turn(live, first)
    assert live.cache.pos > 10  # past both windows
    size = kvstore.save(tmp_path / "c.safetensors", live, fp)
    # the windowed layers' buffers saved their last W + 255 slots or fewer, the full layers everything
    assert size < kv_bytes(ARGS, torch.float32, live.cache.pos) + 4096

    restored = Session(engine)
    assert kvstore.load(tmp_path / "c.safetensors", restored, fp) is None
    assert restored.tokens == live.tokens and restored.cache.pos == live.cache.pos
    second = encode_chat(engine.tokenizer, [Message("user", "Name three rivers and say which is longest."),
                                            Message("assistant", d1.text, ids=d1.generated),
                                            Message("user", "And three lakes?")])
    a, b = turn(live, second), turn(restored, second)
    assert a.generated == b.generated and b.cached_tokens == len(first) + len(d1.generated)


def test_a_cache_saved_with_other_windows_is_discarded_with_a_note(make_release, tmp_path):
    uniform = Engine.load(make_release(tiny_args(sliding_window=6, n_layers=4), seed=23, std=0.15), dtype="fp32",
                          warm=False)
    s = Session(uniform)
    turn(s, [1, 415, 1369])
    engine = engine_for(make_release)
    fp = kvstore.cache_fingerprint(engine)
    kvstore.save(tmp_path / "c.safetensors", s, fp)  # as if the fingerprint had not told them apart
    fresh = Session(engine)
    note = kvstore.load(tmp_path / "c.safetensors", fresh, fp)
    assert "damaged" in note and "sliding-window buffer" in note and "re-read" in note
    assert fresh.cache.pos == 0 and fresh.tokens == []


def test_editing_past_the_smallest_window_re_reads_and_matches_a_fresh_session(make_release):
    engine = engine_for(make_release)
    session = Session(engine)
    session.cache = engine.new_cache(chunk_size=4)  # the window-6 layer keeps 9 slots
    prompt = random_tokens(30, seed=2)
    turn(session, prompt)
    # The full-attention layers hold every key, but the window-6 layer lost what position 12 needs.
    assert not session.cache.can_rewind(12) and session.cache.can_rewind(session.cache.pos - 3)
    edited = prompt[:12] + [99, 98]
    done = turn(session, edited)
    fresh = turn(Session(engine), edited)
    assert done.cached_tokens == 0 and done.generated == fresh.generated
    # a follow-up needs no rewind: everything is re-used
    follow = edited + done.generated + [2, 733]
    assert turn(session, follow).cached_tokens == len(edited) + len(done.generated)


def test_training_forward_uses_each_layers_window(make_release):
    engine = engine_for(make_release)
    ids = torch.tensor(random_tokens(24, seed=6))
    want = engine.model(ids, engine.new_cache(chunk_size=5)).logits
    with torch.no_grad():
        got = forward_train(engine.model, ids[None]).logits[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_a_session_with_a_token_limit_stops_at_it(make_release):
    engine = engine_for(make_release)
    session = Session(engine, max_tokens=20)
    assert session.context_limit == 20 and session.cache.nbytes <= kv_bytes(ARGS, torch.float32, 20)
    done = turn(session, random_tokens(15, seed=3))
    assert done.stop == "context" and session.cache.pos == 20 and len(done.generated) == 5
