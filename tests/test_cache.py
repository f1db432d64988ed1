"""The KV cache against itself: chunked prefill, decode, rewind and save/restore must all give the
logits of one full pass."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_args
from test_model_vs_hf import random_tokens

from mixchat.cache import KVCache
from mixchat.errors import ContextError
from mixchat.model import Transformer
from mixchat.synthetic import random_state


def model_for(args) -> Transformer:
    model = Transformer(args)
    model.load_state_dict(random_state(args, "experts" if args.is_moe else "dense", torch.float32, seed=7, std=0.1))
    return model.eval()


WINDOWED = tiny_args(sliding_window=8, vocab_size=500)
FULL = tiny_args(vocab_size=500, moe={"num_experts": 4, "num_experts_per_tok": 2})
TOKENS = torch.tensor([t % 500 for t in random_tokens(50)])


@pytest.mark.parametrize("args", [WINDOWED, FULL], ids=["window", "moe-full"])
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


@pytest.mark.parametrize("args", [WINDOWED, FULL], ids=["window", "moe-full"])
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


@pytest.mark.parametrize("args", [WINDOWED, FULL], ids=["window", "moe-full"])
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
