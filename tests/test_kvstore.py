from __future__ import annotations

import pytest
import torch
from conftest import tiny_args

from mixchat.conversations import kvstore
from mixchat.engine.engine import Engine
from mixchat.engine.generation import Done, Session
from mixchat.engine.sampling import SamplingSettings
from mixchat.text.chat_format import Message, encode_chat

GREEDY = SamplingSettings(temperature=0, repeat_penalty=1.0, max_tokens=12)


@pytest.fixture(params=["window", "moe"])
def engine(request, make_release):
    if request.param == "window":
        folder = make_release(tiny_args(sliding_window=16), seed=21, std=0.15)
    else:
        folder = make_release(tiny_args(moe={"num_experts": 4, "num_experts_per_tok": 2}), "torrent", seed=22,
                              std=0.15)
    return Engine.load(folder, dtype="fp32", warm=False)


def turn(session: Session, prompt: list[int]) -> Done:
    return list(session.generate(prompt, GREEDY))[-1]


def test_saved_cache_continues_exactly_like_the_live_one(engine, tmp_path):
    fp = kvstore.cache_fingerprint(engine)
    live = Session(engine)
    first = encode_chat(engine.tokenizer, [Message("user", "Name three rivers.")])
    d1 = turn(live, first)
    size = kvstore.save(tmp_path / "c.safetensors", live, fp)
    per_token = 2 * engine.args.n_layers * engine.args.n_kv_heads * engine.args.head_dim * 4
    assert size < (live.cache.pos + 8) * per_token + 4096  # filled slots only, not the whole buffer

    restored = Session(engine)
    assert kvstore.load(tmp_path / "c.safetensors", restored, fp) is None
    assert restored.tokens == live.tokens and restored.cache.pos == live.cache.pos
    second = encode_chat(engine.tokenizer, [Message("user", "Name three rivers."),
                                            Message("assistant", d1.text, ids=d1.generated),
                                            Message("user", "And three lakes?")])
    a, b = turn(live, second), turn(restored, second)
    assert a.generated == b.generated and b.cached_tokens == len(first) + len(d1.generated)


def test_cache_from_another_model_is_not_used_but_kept_with_a_note(engine, tmp_path):
    """Not used; kept for its own model (opening a conversation with another model and leaving it unanswered
    must not cost it its cache): the next save by this model replaces it."""
    s = Session(engine)
    turn(s, [1, 415, 1369])
    kvstore.save(tmp_path / "c.safetensors", s, "another-model:bfloat16")
    fresh = Session(engine)
    note = kvstore.load(tmp_path / "c.safetensors", fresh, kvstore.cache_fingerprint(engine))
    assert "made by another model" in note and "not using" in note
    assert fresh.cache.pos == 0 and fresh.tokens == [] and (tmp_path / "c.safetensors").exists()
    assert kvstore.load(tmp_path / "c.safetensors", Session(engine), "another-model:bfloat16") is None  # still whole


def test_cache_from_another_quantization_is_discarded(make_release, tmp_path):
    # the keys and values depend on the weights: a history cached under int8 and continued unquantized (or
    # the other way) would answer differently from the same history read again
    folder = make_release(tiny_args(), seed=23, std=0.15)
    plain = Engine.load(folder, dtype="fp32", warm=False)
    int8 = Engine.load(folder, dtype="fp32", quant="int8", warm=False, show_progress=False)
    assert kvstore.cache_fingerprint(plain) == f"{plain.fingerprint}:float32"  # what 0.7 wrote: still valid
    s = Session(int8)
    turn(s, [1, 415, 1369])
    kvstore.save(tmp_path / "c.safetensors", s, kvstore.cache_fingerprint(int8))
    fresh = Session(plain)
    assert "quantization" in kvstore.load(tmp_path / "c.safetensors", fresh, kvstore.cache_fingerprint(plain))
    assert fresh.cache.pos == 0


def test_truncated_cache_file_is_discarded_with_a_note(engine, tmp_path):
    fp = kvstore.cache_fingerprint(engine)
    s = Session(engine)
    turn(s, [1, 415, 1369])
    path = tmp_path / "c.safetensors"
    kvstore.save(path, s, fp)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    fresh = Session(engine)
    assert "damaged" in kvstore.load(path, fresh, fp)
    assert fresh.cache.pos == 0 and not path.exists()
    assert turn(fresh, [1, 415, 1369]).cached_tokens == 0


def test_disk_budget_removes_the_oldest_files(tmp_path):
    import os

    for i, name in enumerate(["a", "b", "c"]):
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(b"x" * 1000)
        os.utime(p, (1000 + i, 1000 + i))
    removed = kvstore.enforce_disk_budget(tmp_path, 2000)
    assert [p.name for p in removed] == ["a.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.safetensors", "c.safetensors"]


def test_pool_spills_the_least_recently_used_to_disk_and_brings_it_back(engine, tmp_path):
    pool = kvstore.SessionPool(engine, tmp_path, memory_budget=1)  # room for one live cache only
    a = pool.get("a")
    da = turn(a, [1, 415, 1369, 264])
    pool.get("b")
    assert list(pool.sessions) == ["b"] and (tmp_path / "a.safetensors").exists()
    back = pool.get("a")
    assert back is not a and back.tokens == a.tokens
    assert torch.equal(back.cache.k[:, :, : back.cache.pos], a.cache.k[:, :, : a.cache.pos])
    assert da.generated
    pool.forget("a")
    assert "a" not in pool.sessions and not (tmp_path / "a.safetensors").exists()
