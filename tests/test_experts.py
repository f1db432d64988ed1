"""Experts on demand within a memory budget: same tokens as with everything resident, bounded cache."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_args
from torch import nn

from mixchat.engine.engine import Engine, _copy_expert
from mixchat.errors import MixchatError
from mixchat.paths import demo_model
from mixchat.speed.experts import ExpertCache

DEMO = demo_model()


def _budget(engine: Engine, experts: float) -> tuple[float, int]:
    """A budget holding the non-expert weights and `experts` experts, and one expert's bytes."""
    tensors = [*engine.model.named_parameters(), *engine.model.named_buffers()]
    resident = sum(t.nbytes for n, t in tensors if ".experts." not in n)
    one = sum(t.nbytes for n, t in tensors if n.startswith("layers.0.feed_forward.experts.0."))
    return resident + experts * one, one


def _greedy(engine: Engine, text: str, n: int = 24) -> tuple[list[int], torch.Tensor]:
    cache = engine.new_cache()
    out = engine.model(torch.tensor(engine.tokenizer.encode(text)), cache)
    first = out.logits
    tokens = []
    for _ in range(n):
        tokens.append(int(out.logits[-1].argmax()))
        out = engine.model(torch.tensor(tokens[-1:]), cache)
    return tokens, first


@pytest.mark.parametrize("quant", [None, "int8", "int4"])
def test_a_budget_gives_the_same_greedy_tokens(quant):
    full = Engine.load(DEMO, quant=quant, show_progress=False)
    assert full.experts is None
    probe = Engine.load(DEMO, quant=quant, show_progress=False, memory_budget=1e12)
    assert probe.experts is None  # everything fits: nothing is offloaded
    budget, one = _budget(full, 10.5)  # the resident weights and about a third of the 32 experts
    budgeted = Engine.load(DEMO, quant=quant, show_progress=False, memory_budget=budget)
    cache = budgeted.experts
    assert cache is not None and cache.capacity == 10 and cache.expert_bytes == one
    want_tokens, want_logits = _greedy(full, "It is a truth universally acknowledged")
    got_tokens, got_logits = _greedy(budgeted, "It is a truth universally acknowledged")
    assert got_tokens == want_tokens
    assert torch.equal(got_logits, want_logits)
    st = cache.stats
    assert st.misses > 0 and st.hits > 0 and st.prefetched > 0
    assert len(cache.resident()) <= cache.capacity
    # every routed (token, layer, expert) was asked for once
    assert st.hits + st.misses >= 24 * budgeted.args.n_layers * 2 / 2
    cache.close()


def test_prediction_from_the_next_router_is_often_right():
    full = Engine.load(DEMO, show_progress=False)
    engine = Engine.load(DEMO, show_progress=False, memory_budget=_budget(full, 16.5)[0])
    _greedy(engine, "My dear, have you heard that Netherfield Park is let at last?", 40)
    st = engine.experts.stats
    # With half the experts resident, most predictions are used before they are evicted (measured 0.68).
    assert st.prefetch_used / st.prefetched > 0.4, st


def test_a_budget_below_the_resident_weights_is_a_clear_error():
    with pytest.raises(MixchatError, match="--memory-budget .* too small.*non-expert weights need"):
        Engine.load(DEMO, show_progress=False, memory_budget=1e6)


def test_dense_models_ignore_the_budget(make_release):
    folder = make_release(tiny_args(), "dense")
    assert Engine.load(folder, show_progress=False, memory_budget=1).experts is None


@pytest.mark.parametrize("layout", ["torrent", "experts"])
def test_both_moe_layouts_offload_exactly(make_release, layout):
    folder = make_release(tiny_args(moe={"num_experts": 8, "num_experts_per_tok": 2}, n_layers=3), layout)
    full = Engine.load(folder, dtype="fp32", show_progress=False)
    ids = torch.tensor(full.tokenizer.encode("The quick brown fox jumps over the lazy dog"))
    want = full.model(ids, full.new_cache())
    budget = Engine.load(folder, dtype="fp32", show_progress=False, memory_budget=1e12).experts
    assert budget is None
    small = Engine.load(folder, dtype="fp32", show_progress=False,
                        memory_budget=sum(p.nbytes for n, p in full.model.named_parameters() if ".experts." not in n)
                        + 3 * 3 * 64 * 96 * 4)
    assert small.experts.capacity == 3
    got = small.model(ids, small.new_cache())
    assert torch.equal(got.logits, want.logits) and torch.equal(got.experts, want.experts)


def test_lru_cache_bounds_and_order():
    loads = []

    def load(layer: int, e: int) -> nn.Module:
        loads.append((layer, e))
        return nn.Identity()

    cache = ExpertCache(load, expert_bytes=100, capacity=3, prefetch=False)
    for key in [(0, 1), (0, 2), (0, 1), (0, 3), (0, 4)]:
        cache.get(*key)
    assert cache.resident() == [(0, 1), (0, 3), (0, 4)]  # (0, 2) was least recently used
    assert (cache.stats.hits, cache.stats.misses, cache.stats.loaded_bytes) == (1, 4, 400)
    cache.get(0, 2)
    assert loads.count((0, 2)) == 2 and len(cache.resident()) == 3


def test_prefetched_experts_count_as_hits_and_are_loaded_once():
    cache = ExpertCache(lambda layer, e: nn.Identity(), expert_bytes=1, capacity=4)
    cache.prefetch(1, [5, 6])
    cache.get(1, 5)
    cache.get(1, 5)
    cache.close()
    st = cache.stats
    assert st.prefetched == 2 and st.prefetch_used == 1 and st.misses == 0 and st.hits == 2
    assert st.loaded_bytes == 2


def test_one_shot_stats_report_the_hit_rate(capsys):
    from mixchat.frontends.cli import main

    assert main(["-m", str(DEMO), "--memory-budget", "0.008", "--no-save", "--stats", "--max-tokens", "6",
                 "--temperature", "0", "-p", "Good morning"]) == 0
    assert "hit rate" in capsys.readouterr().err


def test_a_loaded_bf16_expert_is_a_copy_with_the_mapped_strides():
    g = torch.Generator().manual_seed(0)
    mapped = {"w1.weight": torch.randn(96, 64, generator=g).to(torch.bfloat16),
              "w2.weight": torch.randn(96, 64, generator=g).to(torch.bfloat16).t(),  # the torrent's transposed w2
              "w3.weight": torch.randn(96, 64, generator=g).to(torch.bfloat16)}
    for dt in (torch.bfloat16, torch.float32):
        got = _copy_expert(mapped, torch.device("cpu"), dt)
        for k, t in mapped.items():
            assert got[k].dtype == dt and got[k].stride() == t.stride() and torch.equal(got[k], t.to(dt))
            assert got[k].data_ptr() != t.data_ptr()  # the cache owns it: evicting it frees the memory
        if dt == torch.bfloat16:
            mapped["w1.weight"].zero_()
            assert got["w1.weight"].abs().sum() > 0
