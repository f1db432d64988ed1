"""Several tokens through the fused step at once (drafting's verify pass) against the same tokens one at a
time: every logit, expert choice, mixing weight and cache entry must be equal, bit for bit. That is what
makes drafting's greedy output token-identical to plain decoding.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_args
from cpu_paths import each_kernel_isa  # noqa: F401 - fixture

from mixchat.engine.engine import Engine
from mixchat.speed import kernels

SHAPES = {"dim": 128, "head_dim": 32, "n_heads": 4, "n_kv_heads": 2, "hidden_dim": 256, "sliding_window": 6}
MOE = {"moe": {"num_experts": 4, "num_experts_per_tok": 2}}
TEXT = ("Once upon a time, in a land far away, there lived a fox who counted the stars every night, "
        "and every morning she told the owls how many there had been, and the owls wrote it down")


def feed(engine: Engine, cache, ids: list[int], sizes: list[int]) -> list:
    """The outputs of feeding ids in pieces of these sizes (1: a decode step; more: a verify pass)."""
    outs, at = [], 0
    for n in sizes:
        outs.append(engine.model(torch.tensor(ids[at:at + n]), cache))
        at += n
    return outs


def cat(outs: list, name: str) -> torch.Tensor | None:
    parts = [getattr(o, name) for o in outs]
    return None if parts[0] is None else torch.cat(parts)


def caches_equal(a, b) -> None:
    assert a.pos == b.pos
    for x, y in zip(a.buffers, b.buffers, strict=True):
        kept = x.slot_pos >= 0
        assert torch.equal(x.slot_pos, y.slot_pos)
        assert torch.equal(x.k[:, :, kept], y.k[:, :, kept]) and torch.equal(x.v[:, :, kept], y.v[:, :, kept])


@pytest.mark.parametrize("kernel_isa", ["native", "avx2"], indirect=True)
@pytest.mark.parametrize("quant", [None, "int8", "int4-32", "int4"])
@pytest.mark.parametrize("layout", ["dense", "experts", "torrent"])
def test_a_verify_pass_equals_one_token_steps_bit_for_bit(make_release, quant, layout, kernel_isa):
    if not kernels.simd():
        pytest.skip(f"the {kernel_isa} build has no AVX2+FMA code here, so no fused step")
    moe = layout != "dense"
    engine = Engine.load(make_release(tiny_args(**SHAPES, **(MOE if moe else {})), layout), quant=quant,
                         show_progress=False)
    ids = engine.tokenizer.encode(TEXT)
    # pieces of every size up to 8, so that the window of 6 rolls inside a piece and across pieces
    sizes = [1, 3, 8, 2, 5, 1, 7, 4, 6]
    assert sum(sizes) <= len(ids)
    ids = ids[:sum(sizes)]
    one, many = engine.new_cache(chunk_size=8), engine.new_cache(chunk_size=8)
    assert engine.decoder.verifies(one)
    steps = feed(engine, one, ids, [1] * len(ids))
    passes = feed(engine, many, ids, sizes)
    for name in ("logits", "experts", "expert_weights"):
        a, b = cat(steps, name), cat(passes, name)
        assert (a is None) == (b is None) == (name != "logits" and not moe)
        if a is not None:
            assert a.shape == b.shape and torch.equal(a, b), name
    caches_equal(one, many)


@pytest.mark.skipif(not kernels.simd(), reason="no fused step without the AVX2 kernels")
def test_rejected_rows_rewind_to_what_plain_decoding_has(make_release):
    """A verify pass whose last rows are rejected: rewound, the cache continues exactly as if only the
    accepted tokens had been fed, including where the rolling window's slots were overwritten."""
    engine = Engine.load(make_release(tiny_args(**SHAPES)), show_progress=False)
    ids = engine.tokenizer.encode(TEXT)
    wrong = [(t * 7 + 3) % 32000 for t in ids]
    ref, cache = engine.new_cache(chunk_size=8), engine.new_cache(chunk_size=8)
    feed(engine, ref, ids[:20], [1] * 20)
    feed(engine, cache, ids[:8], [1] * 8)
    at = 8
    while at < 20:
        accepted = min(3, 20 - at)
        draft = ids[at:at + accepted] + wrong[at + accepted:at + 6]
        engine.model(torch.tensor(draft), cache)
        cache.rewind(at + accepted)
        at += accepted
    assert cache.pos == ref.pos == 20 and cache.can_rewind(20)
    # Every key the next token's window sees is the same, in the same slot (slots of older positions may
    # hold rejected rows' keys now, marked empty: no window reaches them).
    for x, y in zip(cache.buffers, ref.buffers, strict=True):
        seen = (y.slot_pos >= 20 - SHAPES["sliding_window"] + 1) & (y.slot_pos >= 0)
        assert torch.equal(x.slot_pos[seen], y.slot_pos[seen])
        assert torch.equal(x.k[:, :, seen], y.k[:, :, seen]) and torch.equal(x.v[:, :, seen], y.v[:, :, seen])
    after = [cat(feed(engine, c, ids[20:26], [1] * 6), "logits") for c in (cache, ref)]
    assert torch.equal(*after)


@pytest.mark.skipif(not kernels.simd(), reason="no fused step without the AVX2 kernels")
def test_linear_rows_matches_each_row_alone():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(300, 512, generator=g).to(torch.bfloat16)
    x = torch.randn(8, 512, generator=g)
    got = kernels.linear_many(x, "bf16", [(w,)], exact_rows=True)[0]
    alone = torch.cat([kernels.linear_bf16(x[i:i + 1], w) for i in range(8)])
    assert torch.equal(got, alone)
    fast = kernels.linear_many(x, "bf16", [(w,)])[0]  # the multi-row layouts sum in another order
    assert not torch.equal(fast, alone)
