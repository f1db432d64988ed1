"""mixchat's logits and expert choices against Hugging Face transformers, in fp32.

Both sides compute in fp32 and round nothing coarser, so they differ by their sums' order alone
(tolerance.Chain.reordered): Hugging Face's eager attention and half-split rotary against mixchat's
SDPA and complex rotation, each on whatever code its BLAS picks for this CPU.
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import tiny_args
from cpu_paths import each_native_bf16  # noqa: F401 - fixture
from hf_oracle import hf_expresses, hf_forward, hf_model
from routing import RouterLog
from tolerance import BF16, Chain, assert_same_argmax, assert_within, routed_alike, tolerance

from mixchat.dev.synthetic import random_state
from mixchat.engine.engine import Engine, resolve_dtype
from mixchat.model.cache import KVCache
from mixchat.model.model import Transformer
from mixchat.release.config import ModelArgs
from mixchat.release.folder import open_weights
from mixchat.speed import linear


def run_mixchat(engine: Engine, tokens: list[int], prompt_len: int, chunk: int):
    """Prefill `prompt_len` tokens in chunks, then decode the rest one token at a time; logits, experts,
    mixing weights and (MoE) the router logits."""
    cache = engine.new_cache(chunk_size=chunk)
    with RouterLog(engine.model) as log:
        first = engine.model(torch.tensor(tokens[:prompt_len]), cache)
        outs = [first] + [engine.model(torch.tensor([t]), cache) for t in tokens[prompt_len:]]
    logits = torch.cat([o.logits for o in outs])
    if first.experts is None:
        return logits, None, None, None
    return logits, torch.cat([o.experts for o in outs]), torch.cat([o.expert_weights for o in outs]), log.logits()


def fp32_tolerance(engine: Engine, values: torch.Tensor, tokens: int) -> float:
    return tolerance(values.abs().max().item(), Chain.of(engine.args, tokens).reordered())


def random_tokens(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [1] + [rng.randrange(3, 32000) for _ in range(n - 1)]


def test_dense_sliding_window_matches_hf_in_chunks_and_past_the_window(make_release):
    args = tiny_args(sliding_window=8, rope_theta=10000.0)
    folder = make_release(args, "dense", seed=1, std=0.1)
    engine = Engine.load(folder, dtype="fp32", warm=False)
    tokens = random_tokens(40)
    # 30-token prompt in chunks of 5 (several windows long), then 10 decode steps past the window.
    logits, _, _, _ = run_mixchat(engine, tokens, prompt_len=30, chunk=5)

    hf = hf_model(open_weights(folder / "consolidated.00.pth"), args, "dense")
    ref, _, _ = hf_forward(hf, tokens, args)
    assert logits.shape == ref.shape
    tol = fp32_tolerance(engine, ref, len(tokens))
    assert_within(logits, ref, tol, "mixchat vs HF")

    # The window must actually matter here, or this test would not be testing it: without it the logits
    # are further from HF's than the tolerance lets mixchat's be.
    full = hf_model(open_weights(folder / "consolidated.00.pth"), tiny_args(sliding_window=None, rope_theta=1e4),
                    "dense")
    no_window, _, _ = hf_forward(full, tokens, args)
    assert (no_window[10:] - ref[10:]).abs().max() > tol


@pytest.mark.parametrize("pattern", [[5, 5, None], [3, None, 7]], ids=["ministral", "two-windows"])
def test_per_layer_windows_match_hf_in_chunks_and_past_every_window(make_release, pattern):
    """Ministral's params.json pattern: HF's MinistralForCausalLM with layer_types where its windowed layers
    share one size; with two sizes, HF's decoder layers each under HF's mask for its own window."""
    args = tiny_args(sliding_window=pattern, n_layers=3)
    folder = make_release(args, "dense", seed=8, std=0.1)
    engine = Engine.load(folder, dtype="fp32", warm=False)
    assert engine.args.layer_windows == tuple(pattern) and engine.args.rope_theta == 1e4
    tokens = random_tokens(40, seed=8)
    # A 30-token prompt in chunks of 4, then 10 decode steps: the window-3 layer's buffer (3 + 4 - 1 slots)
    # rolls over six times, the window-5 and 7 ones four and three times.
    logits, _, _, _ = run_mixchat(engine, tokens, prompt_len=30, chunk=4)

    sd = open_weights(folder / "consolidated.00.pth")
    hf = hf_model(sd, args, "dense")
    assert type(hf).__name__ == "MinistralForCausalLM" and hf_expresses(args) == (pattern == [5, 5, None])
    ref, _, _ = hf_forward(hf, tokens, args)
    tol = fp32_tolerance(engine, ref, len(tokens))
    assert_within(logits, ref, tol, "mixchat vs HF")

    # Each layer's own window matters: with the layers of any one window given another (a window for the
    # full-attention ones, full attention for the windowed), HF's logits move further than the tolerance.
    sized = [w for w in pattern if w is not None]
    for w in dict.fromkeys(pattern):
        other = [(min(sized) if x is None else None) if x == w else x for x in pattern]
        changed = tiny_args(sliding_window=other, n_layers=3, rope_theta=1e4)
        moved, _, _ = hf_forward(hf_model(sd, changed, "dense"), tokens, changed)
        assert (moved - ref).abs().max() > tol, f"windows {other} give the logits of {pattern}"


def test_nemo_shapes_match_hf():
    """Mistral-Nemo in small: head_dim given and not dim / n_heads (Nemo: dim 5120, 32 heads of 128; here
    dim 96, 4 heads of 32), rope_theta 1e6, tekken's 131072 ids, against HF's MistralForCausalLM."""
    args = ModelArgs.from_dict({"dim": 96, "n_layers": 2, "head_dim": 32, "hidden_dim": 160, "n_heads": 4,
                                "n_kv_heads": 2, "norm_eps": 1e-5, "vocab_size": 131072, "rope_theta": 1e6,
                                "sliding_window": None})
    assert args.n_heads * args.head_dim != args.dim and args.window(0) is None
    sd = random_state(args, "dense", torch.float32, seed=9, std=0.1)
    model = Transformer(args)
    model.load_state_dict(sd)
    rng = random.Random(9)
    tokens = [1] + [rng.randrange(3, 131072) for _ in range(31)]
    cache = KVCache(args, chunk_size=5)
    outs = [model(torch.tensor(tokens[:24]), cache)] + [model(torch.tensor([t]), cache) for t in tokens[24:]]
    logits = torch.cat([o.logits for o in outs])

    hf = hf_model(sd, args, "dense")
    assert type(hf).__name__ == "MistralForCausalLM" and hf.model.layers[0].self_attn.head_dim == 32
    ref, _, _ = hf_forward(hf, tokens, args)
    tol = tolerance(ref.abs().max().item(), Chain.of(args, len(tokens)).reordered())
    assert_within(logits, ref, tol, "mixchat vs HF")
    # rope_theta is honoured: at Mistral-7B's 1e4 HF's logits are elsewhere
    other = ModelArgs.from_dict({**args.to_params(), "rope_theta": 1e4})
    moved, _, _ = hf_forward(hf_model(sd, other, "dense"), tokens, other)
    assert (moved - ref).abs().max() > tol


@pytest.mark.parametrize("layout", ["torrent", "experts"])
def test_mixtral_with_six_experts_matches_hf(make_release, layout):
    """A non-8 expert count (6, top-2) in both MoE layouts, against HF's Mixtral."""
    args = tiny_args(moe={"num_experts": 6, "num_experts_per_tok": 2}, n_layers=2)
    folder = make_release(args, layout, seed=10, std=0.1)
    engine = Engine.load(folder, dtype="fp32", warm=False)
    tokens = random_tokens(24, seed=4)
    logits, experts, weights, router = run_mixchat(engine, tokens, prompt_len=16, chunk=6)
    hf = hf_model(open_weights(folder / "consolidated.00.pth"), engine.args, layout)
    ref, ref_experts, ref_weights = hf_forward(hf, tokens, engine.args)
    assert experts.shape == (24, 2, 2) and router.shape == (24, 2, 6)
    router_tol = fp32_tolerance(engine, router, len(tokens))
    n = routed_alike(experts, ref_experts, router, router_tol)
    assert n == len(tokens), "a near-tie in this model's routing: the test needs another seed"
    assert_within(weights, ref_weights, router_tol / 2, "mixing weights")
    assert_within(logits, ref, fp32_tolerance(engine, ref, len(tokens)), "mixchat vs HF")
    assert set(experts.flatten().tolist()) == set(range(6))  # every expert, the last two included


@pytest.mark.parametrize("layout", ["torrent", "experts"])
@pytest.mark.parametrize("theta", [None, 5e5])
def test_mixtral_matches_hf_with_routing(make_release, layout, theta):
    args = tiny_args(moe={"num_experts": 4, "num_experts_per_tok": 2}, n_layers=3)
    params = args.to_params()
    del params["sliding_window"]  # the Mixtral torrent's params.json has neither key
    del params["rope_theta"]
    if theta is not None:
        params["rope_theta"] = theta
    folder = make_release(args, layout, seed=2, std=0.1, params=params)
    engine = Engine.load(folder, dtype="fp32", warm=False)
    expected_theta = 1e6 if theta is None else theta
    assert engine.args.rope_theta == expected_theta
    assert ("rope_theta" in engine.args.defaulted) == (theta is None)

    tokens = random_tokens(24, seed=3)
    logits, experts, weights, router = run_mixchat(engine, tokens, prompt_len=16, chunk=6)
    hf = hf_model(open_weights(folder / "consolidated.00.pth"), engine.args, layout)
    ref, ref_experts, ref_weights = hf_forward(hf, tokens, engine.args)
    assert experts.shape == (24, 3, 2)
    router_tol = fp32_tolerance(engine, router, len(tokens))
    n = routed_alike(experts, ref_experts, router, router_tol)
    assert n == len(tokens), "a near-tie in this model's routing: the test needs another seed"
    # the mixing weights, a softmax over the chosen logits, move by at most half as much (its slope)
    assert_within(weights, ref_weights, router_tol / 2, "mixing weights")
    assert_within(logits, ref, fp32_tolerance(engine, ref, len(tokens)), "mixchat vs HF")
    # Routing must vary across tokens, or matching it would prove little.
    assert len({tuple(e) for e in experts[:, 0].tolist()}) > 1


def test_torrent_and_experts_layouts_give_identical_logits(make_release):
    """The same weights saved in both MoE layouts (torrent w2 blocks transposed) load identically."""
    from mixchat.dev.synthetic import random_state

    args = tiny_args(moe={"num_experts": 4, "num_experts_per_tok": 2})
    experts_sd = random_state(args, "experts", torch.bfloat16, seed=5, std=0.1)
    torrent_sd = {k: v for k, v in experts_sd.items() if ".feed_forward." not in k}
    for i in range(args.n_layers):
        f = f"layers.{i}.feed_forward."
        torrent_sd[f"layers.{i}.block_sparse_moe.gate.weight"] = experts_sd[f + "gate.weight"]
        for w in ("w1", "w2", "w3"):
            blocks = [experts_sd[f + f"experts.{j}.{w}.weight"] for j in range(4)]
            torrent_sd[f"layers.{i}.block_sparse_moe.{w}"] = torch.cat([b.t() if w == "w2" else b for b in blocks])
    tokens = torch.tensor(random_tokens(12))
    outs = []
    for layout, sd in (("experts", experts_sd), ("torrent", torrent_sd)):
        engine = Engine.load(make_release(args, layout, state=sd), dtype="fp32", warm=False)
        with RouterLog(engine.model) as log:
            outs.append(engine.model(tokens, engine.new_cache()))
    # Not bitwise: the torrent's w2 is a transposed view, so BLAS sums in another order.
    router = log.logits()
    n = routed_alike(outs[1].experts, outs[0].experts, router, fp32_tolerance(engine, router, len(tokens)))
    assert n == len(tokens), "a near-tie in this model's routing: the test needs another seed"
    assert_within(outs[1].logits, outs[0].logits, fp32_tolerance(engine, outs[0].logits, len(tokens)), "layouts")


def test_safetensors_folder_matches_pth(make_release):
    args = tiny_args(sliding_window=6)
    a = Engine.load(make_release(args, seed=4), dtype="fp32", warm=False)
    b = Engine.load(make_release(args, seed=4, safetensors=True), dtype="fp32", warm=False)
    assert b.release.weights.name == "consolidated.safetensors"
    tokens = torch.tensor(random_tokens(20))
    assert torch.equal(a.model(tokens, a.new_cache()).logits, b.model(tokens, b.new_cache()).logits)


def test_bf16_model_stays_close_to_fp32(make_release, native_bf16):
    """The default CPU dtype computes norms, rotary and softmax in fp32; bf16 matmuls only."""
    args = tiny_args(sliding_window=8)
    folder = make_release(args, seed=6, std=0.1)
    tokens = torch.tensor(random_tokens(20))
    assert len(tokens) > linear._KERNEL_MAX_ROWS  # with native bf16, torch's bf16 GEMM takes this prompt
    f32 = Engine.load(folder, dtype="fp32", warm=False)
    b16 = Engine.load(folder, dtype="bf16", warm=False)  # the same bf16 weights: f32 holds them exactly
    ref = f32.model(tokens, f32.new_cache()).logits
    got = b16.model(tokens, b16.new_cache()).logits
    assert got.dtype == torch.float32
    # The bf16 model rounds every key and value into its cache (per layer, the inputs of the attention
    # scores and output); with native bf16 torch's GEMM also rounds every product's input and output.
    chain = Chain.of(args, len(tokens))
    terms = 2 * args.n_layers * BF16, chain.reordered(), chain.rounded(BF16) if native_bf16 else 0.0
    tol = tolerance(ref.abs().max().item(), *terms)
    assert_within(got, ref, tol, "bf16 vs fp32")
    assert_same_argmax(got, ref, tol)


@pytest.mark.parametrize("capability,dtype", [("DEFAULT", torch.float32), ("AVX2", torch.bfloat16),
                                              ("AVX512", torch.bfloat16)])
def test_the_cpu_decides_the_default_dtype(monkeypatch, capability, dtype):
    # Without AVX2 bf16 converts slowly (engine.resolve_dtype): fp32 by default there, bf16 elsewhere.
    # torch's own switch, ATEN_CPU_CAPABILITY=default|avx2|avx512, lowers what it reports.
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert resolve_dtype("auto", torch.device("cpu")) == dtype
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16  # asked for: the CPU does not matter
