"""mixchat's logits and expert choices against Hugging Face transformers, in fp32."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import tiny_args
from hf_oracle import hf_forward, hf_model

from mixchat.engine import Engine
from mixchat.release import open_weights

ATOL = 1e-4


def run_mixchat(engine: Engine, tokens: list[int], prompt_len: int, chunk: int):
    """Prefill `prompt_len` tokens in chunks, then decode the rest one token at a time."""
    cache = engine.new_cache(chunk_size=chunk)
    first = engine.model(torch.tensor(tokens[:prompt_len]), cache)
    outs = [first] + [engine.model(torch.tensor([t]), cache) for t in tokens[prompt_len:]]
    logits = torch.cat([o.logits for o in outs])
    experts = torch.cat([o.experts for o in outs]) if first.experts is not None else None
    weights = torch.cat([o.expert_weights for o in outs]) if first.experts is not None else None
    return logits, experts, weights


def random_tokens(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [1] + [rng.randrange(3, 32000) for _ in range(n - 1)]


def test_dense_sliding_window_matches_hf_in_chunks_and_past_the_window(make_release):
    args = tiny_args(sliding_window=8, rope_theta=10000.0)
    folder = make_release(args, "dense", seed=1, std=0.1)
    engine = Engine.load(folder, dtype="fp32", warm=False)
    tokens = random_tokens(40)
    # 30-token prompt in chunks of 5 (several windows long), then 10 decode steps past the window.
    logits, _, _ = run_mixchat(engine, tokens, prompt_len=30, chunk=5)

    hf = hf_model(open_weights(folder / "consolidated.00.pth"), args, "dense")
    ref, _, _ = hf_forward(hf, tokens, args)
    assert logits.shape == ref.shape
    assert torch.allclose(logits, ref, atol=ATOL, rtol=0), (logits - ref).abs().max()

    # The window must actually matter here, or this test would not be testing it.
    full = hf_model(open_weights(folder / "consolidated.00.pth"), tiny_args(sliding_window=None, rope_theta=1e4),
                    "dense")
    no_window, _, _ = hf_forward(full, tokens, args)
    assert (no_window[10:] - ref[10:]).abs().max() > 100 * ATOL


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
    logits, experts, weights = run_mixchat(engine, tokens, prompt_len=16, chunk=6)
    hf = hf_model(open_weights(folder / "consolidated.00.pth"), engine.args, layout)
    ref, ref_experts, ref_weights = hf_forward(hf, tokens, engine.args)
    assert torch.allclose(logits, ref, atol=ATOL, rtol=0), (logits - ref).abs().max()
    assert experts.shape == (24, 3, 2)
    assert torch.equal(experts, ref_experts)
    assert torch.allclose(weights, ref_weights, atol=1e-5)
    # Routing must vary across tokens, or matching it would prove little.
    assert len({tuple(e) for e in experts[:, 0].tolist()}) > 1


def test_torrent_and_experts_layouts_give_identical_logits(make_release):
    """The same weights saved in both MoE layouts (torrent w2 blocks transposed) load identically."""
    from mixchat.synthetic import random_state

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
        outs.append(engine.model(tokens, engine.new_cache()))
    # Not bitwise: the torrent's w2 is a transposed view, so BLAS sums in another order.
    assert torch.allclose(outs[0].logits, outs[1].logits, atol=1e-5, rtol=0)
    assert torch.equal(outs[0].experts, outs[1].experts)


def test_safetensors_folder_matches_pth(make_release):
    args = tiny_args(sliding_window=6)
    a = Engine.load(make_release(args, seed=4), dtype="fp32", warm=False)
    b = Engine.load(make_release(args, seed=4, safetensors=True), dtype="fp32", warm=False)
    assert b.release.weights.name == "consolidated.safetensors"
    tokens = torch.tensor(random_tokens(20))
    assert torch.equal(a.model(tokens, a.new_cache()).logits, b.model(tokens, b.new_cache()).logits)


def test_bf16_model_stays_close_to_fp32(make_release):
    """The default CPU dtype computes norms, rotary and softmax in fp32; bf16 matmuls only."""
    args = tiny_args(sliding_window=8)
    folder = make_release(args, seed=6, std=0.1)
    tokens = torch.tensor(random_tokens(20))
    f32 = Engine.load(folder, dtype="fp32", warm=False)
    b16 = Engine.load(folder, dtype="bf16", warm=False)
    ref = f32.model(tokens, f32.new_cache()).logits
    got = b16.model(tokens, b16.new_cache()).logits
    assert got.dtype == torch.float32
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
