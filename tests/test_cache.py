"""The KV cache against itself: chunked prefill, decode, rewind and save/restore must all give the
logits of one full pass, with one window for all layers, none, or one per layer (a buffer per window)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_args
from test_model_vs_hf import random_tokens

from mixchat.dev.synthetic import random_state
from mixchat.errors import ContextError
from mixchat.model.cache import KVCache, kv_bytes, kv_tokens_within
from mixchat.model.model import Transformer
from mixchat.release.config import ModelArgs


def model_for(args) -> Transformer:
    model = Transformer(args)
    model.load_state_dict(random_state(args, "experts" if args.is_moe else "dense", torch.float32, seed=7, std=0.1))
    return model.eval()


WINDOWED = tiny_args(sliding_window=8, vocab_size=500)
FULL = tiny_args(vocab_size=500, moe={"num_experts": 4, "num_experts_per_tok": 2})
# Ministral-style: windows 5 and 8 and a full-attention layer, a buffer each
MIXED = tiny_args(sliding_window=[5, None, 8], n_layers=3, vocab_size=500)
TOKENS = torch.tensor([t % 500 for t in random_tokens(50)])
EACH = pytest.mark.parametrize("args", [WINDOWED, FULL, MIXED], ids=["window", "moe-full", "per-layer"])


@EACH
@pytest.mark.parametrize("chunk", [1, 3, 8, 13])
def test_chunked_prefill_equals_one_pass(args, chunk):
    model = model_for(args)
    ref = model(TOKENS, KVCache(args, chunk_size=64)).logits
    got = model(TOKENS, KVCache(args, chunk_size=chunk)).logits
    assert torch.allclose(got, ref, atol=1e-5, rtol=0)


def test_rolling_buffer_stays_bounded():
    model = model_for(WINDOWED)
    cache = KVCache(WINDOWED, chunk_size=4)
    model(TOKENS, cache)
    for t in TOKENS[:20]:
        model(t[None], cache)
    assert cache.pos == 70 and cache.capacity == 8 + 4 - 1


def test_full_attention_cache_grows_then_refuses_past_the_limit():
    model = model_for(FULL)
    cache = KVCache(FULL, chunk_size=4, max_tokens=30)
    assert cache.capacity == 8
    model(TOKENS[:20], cache)
    assert cache.capacity >= 20
    with pytest.raises(ContextError, match="context full"):
        model(TOKENS[:20], cache)


@EACH
def test_rewind_then_continue_equals_fresh(args):
    model = model_for(args)
    cache = KVCache(args, chunk_size=8)
    model(TOKENS[:30], cache)
    first = model(TOKENS[30:33], cache).logits
    model(TOKENS[33:36], cache)  # some other continuation, then take it back
    cache.rewind(30)
    again = model(TOKENS[30:33], cache).logits
    assert torch.allclose(first, again, atol=1e-6, rtol=0)


def test_rewind_refuses_when_the_window_has_been_overwritten():
    cache = KVCache(WINDOWED, chunk_size=4)  # 11 slots
    model_for(WINDOWED)(TOKENS[:40], cache)
    assert cache.can_rewind(37) and not cache.can_rewind(30)
    with pytest.raises(ValueError, match="cannot rewind"):
        cache.rewind(30)
    assert cache.pos == 40


@EACH
def test_state_dict_round_trip_continues_exactly(args, tmp_path):
    model = model_for(args)
    cache = KVCache(args, chunk_size=8)
    model(TOKENS[:35], cache)
    torch.save(cache.state_dict(), tmp_path / "kv.pt")
    expected = model(TOKENS[35:40], cache).logits

    restored = KVCache(args, chunk_size=8)
    restored.load_state_dict(torch.load(tmp_path / "kv.pt", weights_only=True))
    assert restored.pos == 35
    assert torch.allclose(model(TOKENS[35:40], restored).logits, expected, atol=1e-6, rtol=0)


def test_state_from_another_model_is_refused():
    cache = KVCache(WINDOWED, chunk_size=4)
    model_for(WINDOWED)(TOKENS[:10], cache)
    other = KVCache(tiny_args(sliding_window=8, vocab_size=500, n_layers=3), chunk_size=4)
    with pytest.raises(ValueError, match="shape"):
        other.load_state_dict(cache.state_dict())


def test_last_only_returns_the_last_row_of_the_full_pass():
    model = model_for(WINDOWED)
    full = model(TOKENS, KVCache(WINDOWED, chunk_size=16)).logits
    last = model(TOKENS, KVCache(WINDOWED, chunk_size=16), last_only=True).logits
    assert last.shape == (1, 500) and torch.allclose(last[0], full[-1], atol=1e-6)


def test_each_window_gets_its_own_buffer_bounded_by_it():
    model = model_for(MIXED)
    cache = KVCache(MIXED, chunk_size=4, max_tokens=70)
    assert [(b.layers, b.window) for b in cache.buffers] == [((0,), 5), ((1,), None), ((2,), 8)]
    model(TOKENS, cache)
    for t in TOKENS[:20]:
        model(t[None], cache)
    assert cache.pos == 70
    assert [b.capacity for b in cache.buffers] == [5 + 4 - 1, 70, 8 + 4 - 1]  # rolled past 5 and 8 many times
    assert cache.nbytes == kv_bytes(MIXED, torch.float32, 70, chunk_size=4)  # at its largest now
    with pytest.raises(AttributeError, match="buffer per sliding window"):
        cache.k  # noqa: B018 - one tensor for all layers only where they share a window


def test_rewind_needs_every_layers_window():
    model = model_for(MIXED)
    cache = KVCache(MIXED, chunk_size=4)  # buffers of 8 (window 5), everything, 11 (window 8)
    model(TOKENS[:40], cache)
    assert cache.oldest_kept() == 32  # the window-5 layer holds 32..39
    assert cache.can_rewind(36) and not cache.can_rewind(35)  # 35 needs 31 in the window-5 layer
    with pytest.raises(ValueError, match="keys before 32 are gone"):
        cache.rewind(35)
    cache.rewind(38)
    again = model(TOKENS[38:42], cache).logits
    fresh = KVCache(MIXED, chunk_size=4)
    model(TOKENS[:38], fresh)
    assert torch.allclose(again, model(TOKENS[38:42], fresh).logits, atol=1e-5, rtol=0)  # other chunks: other sums


def test_a_second_rewind_knows_what_the_first_left():
    """The keys a rolling buffer holds after a rewind are what it held before, not the last capacity
    positions before the new length: rewinding again must not reach below them."""
    model = model_for(WINDOWED)
    cache = KVCache(WINDOWED, chunk_size=4)  # 11 slots: after 40 tokens, positions 29..39
    model(TOKENS[:40], cache)
    cache.rewind(37)  # holds 29..36
    assert cache.oldest_kept() == 29
    assert not cache.can_rewind(33)  # 33 needs 26..33
    assert cache.can_rewind(36)
    cache.rewind(36)
    fresh = KVCache(WINDOWED, chunk_size=4)
    model(TOKENS[:36], fresh)
    assert torch.allclose(model(TOKENS[36:45], cache).logits, model(TOKENS[36:45], fresh).logits, atol=1e-6, rtol=0)


def test_saved_layout_per_buffer_and_the_old_one_for_a_single_window():
    cache = KVCache(WINDOWED, chunk_size=4)
    model_for(WINDOWED)(TOKENS[:20], cache)
    state = cache.state_dict()  # what mixchat always saved for a model with one window: kept on disk
    assert set(state) == {"k", "v", "positions", "pos"}
    assert state["k"].shape == (2, 2, 11, 16) and sorted(state["positions"].tolist()) == list(range(9, 20))

    mixed = KVCache(MIXED, chunk_size=4)
    model_for(MIXED)(TOKENS[:20], mixed)
    saved = mixed.state_dict()
    assert set(saved) == {"pos", "k", "v", "positions", "k.1", "v.1", "positions.1", "k.2", "v.2", "positions.2"}
    assert [saved[f"positions{s}"].shape[0] for s in ("", ".1", ".2")] == [8, 20, 11]
    assert saved["k.1"].shape == (1, 2, 20, 16)
    # A file of the one layout is refused by the other (kvstore then re-reads the history)
    for other, into in ((state, KVCache(MIXED, chunk_size=4)), (saved, KVCache(WINDOWED, chunk_size=4))):
        with pytest.raises(ValueError, match="sliding-window buffer"):
            into.load_state_dict(other)
        assert into.pos == 0


@pytest.mark.parametrize("damage", ["gap", "repeat", "nan", "missing window keys", "past the limit"])
def test_a_damaged_state_is_refused_and_leaves_the_cache_empty(damage):
    cache = KVCache(MIXED, chunk_size=4)
    model_for(MIXED)(TOKENS[:20], cache)
    state = cache.state_dict()
    positions = state["positions.1"]  # the full-attention layer's: 0..19
    if damage == "gap":
        keep = positions != 3
        state["positions.1"], state["k.1"], state["v.1"] = positions[keep], state["k.1"][:, :, keep], \
            state["v.1"][:, :, keep]
    elif damage == "repeat":
        state["positions.1"] = torch.where(positions == 3, 4, positions)
    elif damage == "nan":
        state["v.2"][0, 0, 0, 0] = float("nan")
    elif damage == "missing window keys":  # the window-8 layer keeps only its last 3
        recent = state["positions.2"] >= 17
        state["positions.2"], state["k.2"], state["v.2"] = state["positions.2"][recent], \
            state["k.2"][:, :, recent], state["v.2"][:, :, recent]
    else:
        state["pos"] = torch.tensor([100])
    restored = KVCache(MIXED, chunk_size=4, max_tokens=64)
    with pytest.raises(ValueError):
        restored.load_state_dict(state)
    assert restored.pos == 0 and all((b.slot_pos == -1).all() for b in restored.buffers)


@pytest.mark.parametrize("args", [WINDOWED, FULL, MIXED], ids=["window", "moe-full", "per-layer"])
def test_a_token_limit_below_max_seq_len(args):
    model = model_for(args)
    cache = KVCache(args, chunk_size=8, max_tokens=6)
    assert all(b.limit <= 6 for b in cache.buffers)  # no buffer grows past the limit, windowed or not
    assert cache.nbytes <= kv_bytes(args, torch.float32, 6, chunk_size=8)
    model(TOKENS[:6], cache)
    with pytest.raises(ContextError, match="context full: 7 tokens exceed the limit of 6"):
        model(TOKENS[6:7], cache)
    assert cache.pos == 6
    fresh = model(TOKENS[:6], KVCache(args, chunk_size=8)).logits
    cache.rewind(3)
    assert torch.allclose(model(TOKENS[3:6], cache).logits, fresh[3:], atol=1e-5, rtol=0)


def test_kv_bytes_counts_each_layer_up_to_its_window():
    per_token_layer = 2 * MIXED.n_kv_heads * MIXED.head_dim * 2  # keys and values, bf16
    assert kv_bytes(MIXED, torch.bfloat16, 1) == 3 * per_token_layer
    # windows 5 and 8 hold at most W + chunk - 1 slots; the full layer all 1000 tokens
    assert kv_bytes(MIXED, torch.bfloat16, 1000, chunk_size=16) == (20 + 1000 + 23) * per_token_layer
    assert kv_bytes(WINDOWED, torch.float32, 1000) == 2 * (8 + 255) * 2 * 2 * 16 * 4
    # Mistral-Nemo 12B: 40 layers of 8 kv heads of 128, no window: 160 KiB a token, 21.5 GB at 128k in bf16
    nemo = ModelArgs.from_dict({"dim": 5120, "n_layers": 40, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32,
                                "n_kv_heads": 8, "vocab_size": 131072, "max_seq_len": 131072})
    assert kv_bytes(nemo, torch.bfloat16, 1) == 163840
    assert kv_bytes(nemo, torch.bfloat16, 131072) == 163840 * 131072
    # and the other way: the longest context a budget holds
    for args in (nemo, MIXED, WINDOWED):
        for budget in (0, 10**5, 10**7, 10**10):
            n = kv_tokens_within(args, torch.bfloat16, budget)
            assert 0 <= n <= args.max_seq_len and kv_bytes(args, torch.bfloat16, n) <= budget
            assert n == args.max_seq_len or kv_bytes(args, torch.bfloat16, n + 1) > budget
    assert kv_tokens_within(nemo, torch.bfloat16, 8 * 10**9) == 8 * 10**9 // 163840
    assert kv_tokens_within(WINDOWED, torch.bfloat16, 10**9) == WINDOWED.max_seq_len  # windows bound it
