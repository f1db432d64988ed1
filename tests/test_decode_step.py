"""The fused one-token layer step (csrc/decode.c via kernels.DecodeLayer) against model.py's plain path.

The plain path is itself checked against Hugging Face's Mistral/Mixtral (test_hf_oracle.py), so equal
logits here carry that over: sliding window past the window, GQA, the rolling cache, Mixtral routing.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_args
from cpu_paths import each_kernel_isa  # noqa: F401 - fixture
from hf_oracle import hf_forward, hf_model
from routing import RouterLog
from test_model_vs_hf import random_tokens
from tolerance import BF16, BF16_FLIP, Q8_FLIP, Chain, assert_same_argmax, assert_within, routed_alike, tolerance

from mixchat.engine.engine import Engine
from mixchat.model.cache import KVCache
from mixchat.release.folder import open_weights
from mixchat.speed import kernels

needs_kernels = pytest.mark.skipif(not kernels.simd(),
                                   reason=f"compiled AVX2 kernels not available: {kernels.reason()}")

# Shapes every kernel takes: K a multiple of 64 for int4, of 32 for int8.
SHAPES = {"dim": 128, "head_dim": 32, "n_heads": 4, "n_kv_heads": 2, "hidden_dim": 256, "sliding_window": 6}
MOE = {"moe": {"num_experts": 4, "num_experts_per_tok": 2}}


def flip_terms(args, tokens: int, quant: str | None) -> tuple[float, ...]:
    """What two paths that make the same roundings in another fp32 order may differ by (tolerance.py):
    their sums' order, and a flipped rounding in each coarse format both round to: the bf16 KV cache, and
    with int8/int4 weights the Q8 activations of every decoded product."""
    return Chain.of(args, tokens).reordered(), BF16_FLIP, *((Q8_FLIP,) if quant else ())


def assert_same_logits(got, want, args, tokens: int, quant: str | None, router: torch.Tensor | None = None) -> int:
    """Outputs [T] of two such paths agree: expert choices where the router decides them, then logits (and
    argmax where decided) up to the first token routed differently; returns that token count."""
    terms = flip_terms(args, tokens, quant)
    logits = [torch.cat([o.logits for o in outs]) for outs in (got, want)]
    n = logits[0].shape[0]
    if router is not None:
        experts = [torch.cat([o.experts for o in outs]) for outs in (got, want)]
        n = routed_alike(*experts, router, tolerance(router.abs().max().item(), *terms))
        # the mixing weights, a softmax over the chosen logits, move by at most half as much (its slope)
        weights = [torch.cat([o.expert_weights for o in outs])[:n] for outs in (got, want)]
        assert_within(*weights, tolerance(router.abs().max().item(), *terms) / 2, "expert weights")
    tol = tolerance(logits[1].abs().max().item(), *terms)
    assert_within(logits[0][:n], logits[1][:n], tol, "logits")
    assert_same_argmax(logits[0][:n], logits[1][:n], tol)
    return n


def decode_steps(engine: Engine, ids: list[int], fused: bool) -> tuple[list, object]:
    """The outputs for ids fed one at a time (every step a decode step), and the cache afterwards."""
    saved = engine.fused_decode
    engine.fused_decode = fused
    try:
        cache = engine.new_cache(chunk_size=4)
        return [engine.model(torch.tensor([t]), cache) for t in ids], cache
    finally:
        engine.fused_decode = saved


def decode_logits(engine: Engine, ids: list[int], fused: bool) -> tuple[torch.Tensor, object]:
    outs, cache = decode_steps(engine, ids, fused)
    return torch.cat([o.logits for o in outs]), cache


def plain_steps(engine: Engine, ids: list[int]) -> tuple[list, object, torch.Tensor | None]:
    """decode_steps on the plain path, with the router logits where the model has routers."""
    if not engine.args.is_moe:
        return *decode_steps(engine, ids, False), None
    with RouterLog(engine.model) as log:
        outs, cache = decode_steps(engine, ids, False)
    return outs, cache, log.logits()


@pytest.mark.parametrize("kernel_isa", ["native", "avx2"], indirect=True)  # the builds with a fused step
@pytest.mark.parametrize("quant", [None, "int8", "int4-32"])
@pytest.mark.parametrize("layout", ["dense", "experts", "torrent"])
def test_fused_decode_equals_the_plain_path(make_release, quant, layout, kernel_isa):
    if not kernels.simd():
        pytest.skip(f"the {kernel_isa} build has no AVX2+FMA code here, so no fused step")
    moe = layout != "dense"
    args = tiny_args(**SHAPES, **(MOE if moe else {}))
    engine = Engine.load(make_release(args, layout), quant=quant, show_progress=False)
    ids = engine.tokenizer.encode("Once upon a time, in a land far away, there lived a fox who counted stars")
    assert len(ids) > 2 * SHAPES["sliding_window"] + 4  # the rolling buffer wraps more than once

    fused_out, fused_cache = decode_steps(engine, ids, True)
    built = engine.decoder.built.layers
    assert built is not None and len(built) == 2  # the fused step really ran
    assert all(layer.has_ffn is not moe and (layer.moe is not None) is moe for layer in built)
    plain_out, plain_cache, router = plain_steps(engine, ids)
    for name in ("experts", "expert_weights"):
        f, p = (getattr(outs[0], name) for outs in (fused_out, plain_out))
        assert (f is None and p is None) if not moe else (f.dtype == p.dtype and f.shape == p.shape)
    n = assert_same_logits(fused_out, plain_out, args, len(ids), quant, router)
    if n < len(ids):
        return  # routed differently at a near-tie: the caches hold different (valid) histories
    # Keys and values were written into the same slots: bf16 roundings of values that differ by what the
    # logits may (relative to the layer's largest), and by one bf16 ulp where the rounding flipped.
    assert torch.equal(fused_cache.slot_pos, plain_cache.slot_pos)
    terms = flip_terms(args, len(ids), quant)
    for f, p in ((fused_cache.k, plain_cache.k), (fused_cache.v, plain_cache.v)):
        f, p = f.float(), p.float()
        for layer in range(args.n_layers):
            bound = BF16_FLIP * p[layer].abs() + tolerance(p[layer].abs().max().item(), *terms)
            assert_within(f[layer], p[layer], bound, f"cache layer {layer}")


@needs_kernels
def test_fused_decode_follows_a_prefilled_prompt_and_an_fp32_cache(make_release):
    args = tiny_args(**SHAPES)
    engine = Engine.load(make_release(args), show_progress=False)
    ids = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog")
    outs = []
    for fused in (True, False):
        engine.fused_decode = fused
        cache = KVCache(engine.args, torch.float32)  # the C side takes fp32 caches too
        engine.model(torch.tensor(ids[:7]), cache)  # a prompt (plain path), then decode steps
        outs.append(torch.cat([engine.model(torch.tensor([t]), cache).logits for t in ids[7:]]))
    # Nothing is rounded to a coarser format here (fp32 cache, bf16 weights used exactly): the paths
    # differ by their fp32 sums' order alone.
    tol = tolerance(outs[1].abs().max().item(), Chain.of(args, len(ids)).reordered())
    assert_within(outs[0], outs[1], tol, "fused vs plain, fp32 cache")


@needs_kernels
def test_fused_decode_keeps_each_layers_window(make_release):
    """Per-layer windows (Ministral) through the C step: each layer gets its own buffer's slot, length and
    mask. With an fp32 cache and the bf16 weights (exact in fp32) nothing is rounded coarser than fp32 (but
    x, in a kernels build with vdpbf16ps), so the fused steps are checked against HF's Ministral itself; with
    the bf16 cache, against the plain path."""
    args = tiny_args(**{**SHAPES, "sliding_window": [6, None]})
    folder = make_release(args, seed=3, std=0.1)
    engine = Engine.load(folder, show_progress=False)
    ids = random_tokens(30, seed=5)  # the window-6 layer's 6 + 4 - 1 slots roll over three times
    cache = KVCache(engine.args, torch.float32, chunk_size=4)
    logits = torch.cat([engine.model(torch.tensor([t]), cache).logits for t in ids])
    assert engine.decoder.built.layers is not None  # the fused step ran
    assert [(b.window, b.capacity) for b in cache.buffers] == [(6, 9), (None, 32)]
    hf = hf_model(open_weights(folder / "consolidated.00.pth"), args, "dense")
    ref, _, _ = hf_forward(hf, ids, args)
    chain = Chain.of(args, len(ids))
    rounded_x = chain.rounded(BF16) if kernels.bf16dot() else 0.0  # every product's x rounded to bf16
    assert_within(logits, ref, tolerance(ref.abs().max().item(), chain.reordered(), rounded_x),
                  "fused, fp32 cache, vs HF")

    fused_out, fused_cache = decode_steps(engine, ids, True)
    plain_out, plain_cache, _ = plain_steps(engine, ids)
    assert_same_logits(fused_out, plain_out, args, len(ids), None)
    for f, p in zip(fused_cache.buffers, plain_cache.buffers, strict=True):
        assert torch.equal(f.slot_pos, p.slot_pos)


@needs_kernels
def test_a_replaced_weight_is_picked_up(make_release):
    folder = make_release(tiny_args(**SHAPES))
    engine = Engine.load(folder, show_progress=False)
    ids = engine.tokenizer.encode("Hello there")
    before, _ = decode_logits(engine, ids, True)
    first = engine.decoder.built.layers
    wq = engine.model.layers[1].attention.wq
    wq.weight = torch.nn.Parameter(torch.randn_like(wq.weight.float()).mul(0.2).to(wq.weight.dtype),
                                   requires_grad=False)
    after, _ = decode_logits(engine, ids, True)
    assert engine.decoder.built.layers is not first  # rebuilt, not reading the old pointers
    plain, _ = decode_logits(engine, ids, False)
    assert not torch.allclose(before, after)
    terms = flip_terms(engine.args, len(ids), None)
    assert_within(after, plain, tolerance(plain.abs().max().item(), *terms), "after a new Parameter")

    # The same Parameter with new storage (what Module.to does): the old pointer must not be read.
    rebuilt = engine.decoder.built.layers
    wo = engine.model.layers[0].attention.wo
    wo.weight.data = torch.randn_like(wo.weight.float()).mul(0.2).to(wo.weight.dtype)
    swapped, _ = decode_logits(engine, ids, True)
    assert engine.decoder.built.layers is not rebuilt
    plain, _ = decode_logits(engine, ids, False)
    assert not torch.allclose(after, swapped)
    assert_within(swapped, plain, tolerance(plain.abs().max().item(), *terms), "after a .data swap")

    # Nothing replaced: the built layers are reused, not rebuilt every token.
    again = engine.decoder.built.layers
    decode_logits(engine, ids, True)
    assert engine.decoder.built.layers is again


@needs_kernels
def test_the_engine_switches_the_fused_step_and_invalidates_it(make_release):
    engine = Engine.load(make_release(tiny_args(**SHAPES)), fused_decode=False, show_progress=False)
    assert not engine.fused_decode and engine.model.decoder is None  # the model alone is plain PyTorch
    ids = engine.tokenizer.encode("Hello there")
    plain, _ = decode_logits(engine, ids, False)
    engine.fused_decode = True
    assert engine.fused_decode and engine.model.decoder is engine.decoder
    fused, _ = decode_logits(engine, ids, True)
    assert engine.decoder.built.layers is not None
    assert_within(fused, plain, tolerance(plain.abs().max().item(), *flip_terms(engine.args, len(ids), None)),
                  "fused vs plain")
    # Replacing a layer (as quant.install does) tells the decoder, which builds again at the next step.
    wq = engine.model.layers[0].attention.wq
    engine.model.layers[0].attention.wq = type(wq).sharing(wq)
    engine.weights_replaced()
    assert engine.decoder.built is None
    again, _ = decode_logits(engine, ids, True)
    assert engine.decoder.built.layers is not None and torch.equal(again, fused)


@needs_kernels
def test_shapes_the_kernels_do_not_take_keep_the_plain_path(make_release):
    # hidden 96 is not a multiple of 64: int4 cannot take w2, so no layer is fused and decode still works.
    folder = make_release(tiny_args(dim=128, head_dim=32, hidden_dim=96))
    engine = Engine.load(folder, quant="int4-32", show_progress=False)
    ids = engine.tokenizer.encode("Hello there")
    fused, _ = decode_logits(engine, ids, True)
    assert engine.decoder.built.layers is None
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
    args = tiny_args(**SHAPES, **MOE)
    folder = make_release(args, "experts")
    tensors = [*Engine.load(folder, show_progress=False).model.named_parameters()]
    resident = sum(t.nbytes for n, t in tensors if ".experts." not in n)
    one = sum(t.nbytes for n, t in tensors if n.startswith("layers.0.feed_forward.experts.0."))
    engine = Engine.load(folder, memory_budget=resident + 3.5 * one, show_progress=False)
    assert engine.experts is not None
    ids = engine.tokenizer.encode("Hello there, how are you")
    fused_out, _ = decode_steps(engine, ids, True)
    built = engine.decoder.built.layers
    # experts fetched from the cache between routing and the experts, by the same compiled step
    assert built is not None and all(layer.moe is not None for layer in built)
    assert all(e is None for layer in built for e in layer.moe._experts)  # no expert held past a step
    plain_out, _, router = plain_steps(engine, ids)
    assert_same_logits(fused_out, plain_out, args, len(ids), None, router)
    # ... so a budget changes nothing: the same logits, bit for bit, as with every expert resident (the
    # same compiled code on the same values)
    resident, _ = decode_logits(Engine.load(folder, show_progress=False), ids, True)
    assert torch.equal(torch.cat([o.logits for o in fused_out]), resident)
    assert engine.experts.stats.hits + engine.experts.stats.misses > 0


def run_on_build(isa: str, engine: Engine, prompt: list[int], steps: list[int]) -> tuple[list, torch.Tensor]:
    """A prompt, then decode steps, on one build of the kernels: the outputs and the router logits of the
    plain-path calls. The fused step runs where the build has the AVX2+FMA code, and only there."""
    with kernels.forced_isa(isa), RouterLog(engine.model) as log:
        cache = engine.new_cache()
        outs = [engine.model(torch.tensor(prompt), cache)] + [engine.model(torch.tensor([t]), cache) for t in steps]
        built = engine.decoder.built
        assert built.library is kernels.library()  # the fused layers follow the build swapped in
        assert (built.layers is not None) is kernels.simd()
        if isa != "native":  # native has the AVX2+FMA code where the CPU has it
            assert kernels.simd() is (isa == "avx2")
        return outs, log.logits()


@pytest.mark.skipif(kernels._compiler() is None, reason="no C compiler")
@pytest.mark.parametrize("quant", [None, "int8"])
def test_every_kernel_build_gives_the_same_model(make_release, quant):
    # The same model, prompt and decode steps on each build of the kernels (kernels.isa_flags): the AVX2+FMA
    # code (native and avx2 builds) takes the fused step, the portable build's scalar code the plain path.
    # All make the same roundings, each in its own fp32 order.
    args = tiny_args(**SHAPES, **MOE)
    engine = Engine.load(make_release(args, "experts"), quant=quant, show_progress=False)
    ids = engine.tokenizer.encode("Once upon a time, in a land far away, there lived a fox")
    prompt, steps = ids[:kernels.GEMM_MIN_ROWS + 1], ids[kernels.GEMM_MIN_ROWS + 1:]  # the GEMM, then decode
    runs = {}
    for isa in kernels.ISAS:
        try:
            with kernels.forced_isa(isa):
                pass
        except kernels.KernelError:
            continue  # a build this CPU cannot run
        runs[isa] = run_on_build(isa, engine, prompt, steps)
    plain, router = runs["portable"]  # the plain path routes every token in Python: the router's logits
    for outs, _ in runs.values():
        assert_same_logits(outs, plain, args, len(ids), quant, router)
