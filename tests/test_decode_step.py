"""The fused one-token layer step (csrc/decode.c via kernels.DecodeLayer) against model.py's plain path.

The plain path is itself checked against Hugging Face's Mistral/Mixtral (test_hf_oracle.py), so equal
logits here carry that over: sliding window past the window, GQA, the rolling cache, Mixtral routing.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_args

from mixchat import kernels
from mixchat import model as model_mod
from mixchat.engine import Engine

needs_kernels = pytest.mark.skipif(not kernels.available() or not kernels._get().mc_simd(),
                                   reason=f"compiled AVX2 kernels not available: {kernels.reason()}")

# Shapes every kernel takes: K a multiple of 64 for int4, of 32 for int8.
SHAPES = {"dim": 128, "head_dim": 32, "n_heads": 4, "n_kv_heads": 2, "hidden_dim": 256, "sliding_window": 6}


def decode_steps(engine: Engine, ids: list[int], fused: bool) -> tuple[list, object]:
    """The outputs for ids fed one at a time (every step a decode step), and the cache afterwards."""
    saved = model_mod.fused_decode
    model_mod.fused_decode = fused
    try:
        cache = engine.new_cache(chunk_size=4)
        return [engine.model(torch.tensor([t]), cache) for t in ids], cache
    finally:
        model_mod.fused_decode = saved


def decode_logits(engine: Engine, ids: list[int], fused: bool) -> tuple[torch.Tensor, object]:
    outs, cache = decode_steps(engine, ids, fused)
    return torch.cat([o.logits for o in outs]), cache


@needs_kernels
@pytest.mark.parametrize("quant", [None, "int8", "int4-32"])
@pytest.mark.parametrize("layout", ["dense", "experts", "torrent"])
def test_fused_decode_equals_the_plain_path(make_release, quant, layout):
    moe = layout != "dense"
    extra = {"moe": {"num_experts": 4, "num_experts_per_tok": 2}} if moe else {}
    folder = make_release(tiny_args(**SHAPES, **extra), layout)
    engine = Engine.load(folder, quant=quant, show_progress=False)
    ids = engine.tokenizer.encode("Once upon a time, in a land far away, there lived a fox who counted stars")
    assert len(ids) > 2 * SHAPES["sliding_window"] + 4  # the rolling buffer wraps more than once

    fused_out, fused_cache = decode_steps(engine, ids, True)
    built = engine.model._decode_built.layers
    assert built is not None and len(built) == 2  # the fused step really ran
    assert all(layer.has_ffn is not moe and (layer.moe is not None) is moe for layer in built)
    plain_out, plain_cache = decode_steps(engine, ids, False)
    fused, plain = (torch.cat([o.logits for o in outs]) for outs in (fused_out, plain_out))
    if moe:  # the same experts, best first, with the same mixing weights
        for name in ("experts", "expert_weights"):
            f, p = (torch.cat([getattr(o, name) for o in outs]) for outs in (fused_out, plain_out))
            assert f.dtype == p.dtype and f.shape == p.shape
            assert torch.equal(f, p) if name == "experts" else torch.allclose(f, p, atol=1e-4)

    scale = plain.abs().max().item()
    assert torch.allclose(fused, plain, atol=2e-3 * scale), (fused - plain).abs().max().item()
    assert torch.equal(fused.argmax(-1), plain.argmax(-1))
    # Keys and values were written into the same slots (bf16 rounding of nearly equal fp32 values).
    assert torch.equal(fused_cache.slot_pos, plain_cache.slot_pos)
    assert torch.allclose(fused_cache.k.float(), plain_cache.k.float(), atol=2e-2, rtol=2e-2)
    assert torch.allclose(fused_cache.v.float(), plain_cache.v.float(), atol=2e-2, rtol=2e-2)


@needs_kernels
def test_fused_decode_follows_a_prefilled_prompt_and_an_fp32_cache(make_release):
    folder = make_release(tiny_args(**SHAPES))
    engine = Engine.load(folder, show_progress=False)
    ids = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog")
    outs = []
    for fused in (True, False):
        model_mod.fused_decode = fused
        try:
            cache = engine.new_cache()
            cache.k, cache.v = cache.k.float(), cache.v.float()  # the C side takes fp32 caches too
            engine.model(torch.tensor(ids[:7]), cache)  # a prompt (plain path), then decode steps
            outs.append(torch.cat([engine.model(torch.tensor([t]), cache).logits for t in ids[7:]]))
        finally:
            model_mod.fused_decode = True
    assert torch.allclose(outs[0], outs[1], atol=1e-3 * outs[1].abs().max().item())


@needs_kernels
def test_a_replaced_weight_is_picked_up(make_release):
    folder = make_release(tiny_args(**SHAPES))
    engine = Engine.load(folder, show_progress=False)
    ids = engine.tokenizer.encode("Hello there")
    before, _ = decode_logits(engine, ids, True)
    first = engine.model._decode_built.layers
    wq = engine.model.layers[1].attention.wq
    wq.weight = torch.nn.Parameter(torch.randn_like(wq.weight.float()).mul(0.2).to(wq.weight.dtype),
                                   requires_grad=False)
    after, _ = decode_logits(engine, ids, True)
    assert engine.model._decode_built.layers is not first  # rebuilt, not reading the old pointers
    plain, _ = decode_logits(engine, ids, False)
    assert not torch.allclose(before, after)
    assert torch.allclose(after, plain, atol=2e-3 * plain.abs().max().item())

    # The same Parameter with new storage (what Module.to does): the old pointer must not be read.
    rebuilt = engine.model._decode_built.layers
    wo = engine.model.layers[0].attention.wo
    wo.weight.data = torch.randn_like(wo.weight.float()).mul(0.2).to(wo.weight.dtype)
    swapped, _ = decode_logits(engine, ids, True)
    assert engine.model._decode_built.layers is not rebuilt
    plain, _ = decode_logits(engine, ids, False)
    assert not torch.allclose(after, swapped)
    assert torch.allclose(swapped, plain, atol=2e-3 * plain.abs().max().item())

    # Nothing replaced: the built layers are reused, not rebuilt every token.
    again = engine.model._decode_built.layers
    decode_logits(engine, ids, True)
    assert engine.model._decode_built.layers is again


@needs_kernels
def test_shapes_the_kernels_do_not_take_keep_the_plain_path(make_release):
    # hidden 96 is not a multiple of 64: int4 cannot take w2, so no layer is fused and decode still works.
    folder = make_release(tiny_args(dim=128, head_dim=32, hidden_dim=96))
    engine = Engine.load(folder, quant="int4-32", show_progress=False)
    ids = engine.tokenizer.encode("Hello there")
    fused, _ = decode_logits(engine, ids, True)
    assert engine.model._decode_built.layers is None
    plain, _ = decode_logits(engine, ids, False)
    assert torch.equal(fused, plain)


@needs_kernels
def test_decode_layer_rejects_what_it_cannot_take():
    d, hd = 128, 32
    w = lambda n, k: (torch.zeros(n, k, dtype=torch.bfloat16),)  # noqa: E731
    norm = torch.ones(d, dtype=torch.bfloat16)
    attn = [w(128, d), w(64, d), w(64, d), w(d, 128)]
    kernels.DecodeLayer("bf16", 0, 4, 2, hd, 1e-5, norm, norm, attn, None)  # fine
    with pytest.raises(ValueError, match="where the layer needs"):
        kernels.DecodeLayer("bf16", 0, 4, 2, hd, 1e-5, norm, norm, [w(128, d), w(128, d), w(64, d), w(d, 128)], None)
    with pytest.raises(ValueError, match="norm"):
        kernels.DecodeLayer("bf16", 0, 4, 2, hd, 1e-5, norm, norm.float(), attn, None)
    with pytest.raises(ValueError, match="int8 decode needs K % 32"):
        q8 = lambda n, k: (torch.zeros(n, k, dtype=torch.int8), torch.ones(n))  # noqa: E731
        kernels.DecodeLayer("int8", 0, 4, 2, 24, 1e-5, torch.ones(48), torch.ones(48),
                            [q8(96, 48), q8(48, 48), q8(48, 48), q8(48, 96)], None)
    with pytest.raises(ValueError, match="kind"):
        kernels.DecodeLayer("fp8", 0, 4, 2, hd, 1e-5, norm, norm, attn, None)


@needs_kernels
def test_offloaded_experts_go_through_the_same_compiled_step(make_release):
    args = tiny_args(**SHAPES, moe={"num_experts": 4, "num_experts_per_tok": 2})
    folder = make_release(args, "experts")
    tensors = [*Engine.load(folder, show_progress=False).model.named_parameters()]
    resident = sum(t.nbytes for n, t in tensors if ".experts." not in n)
    one = sum(t.nbytes for n, t in tensors if n.startswith("layers.0.feed_forward.experts.0."))
    engine = Engine.load(folder, memory_budget=resident + 3.5 * one, show_progress=False)
    assert engine.experts is not None
    ids = engine.tokenizer.encode("Hello there, how are you")
    fused, _ = decode_logits(engine, ids, True)
    built = engine.model._decode_built.layers
    # experts fetched from the cache between routing and the experts, by the same compiled step
    assert built is not None and all(layer.moe is not None for layer in built)
    assert all(e is None for layer in built for e in layer.moe._experts)  # no expert held past a step
    plain, _ = decode_logits(engine, ids, False)
    assert torch.allclose(fused, plain, atol=2e-3 * plain.abs().max().item())
    # ... so a budget changes nothing: the same logits, bit for bit, as with every expert resident
    resident, _ = decode_logits(Engine.load(folder, show_progress=False), ids, True)
    assert torch.equal(fused, resident)
    assert engine.experts.stats.hits + engine.experts.stats.misses > 0
