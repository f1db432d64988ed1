"""Prompt-lookup drafting's parts that do not touch the model: the n-gram index finds what followed
the latest earlier occurrence, the acceptance rule keeps the sampler's distribution exactly, and the
gate stops drafting where drafts keep failing."""

from __future__ import annotations

import random

import pytest
import torch

from mixchat.engine.drafting import DraftGate, PromptLookup, accept
from mixchat.engine.sampling import SamplingSettings, distribution, sample


def scan_draft(tokens: list[int], k: int, max_n: int = 3, min_n: int = 1) -> list[int]:
    """The same draft by brute force: the latest earlier occurrence of the longest suffix."""
    for n in range(max_n, min_n - 1, -1):
        if len(tokens) <= n:
            continue
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start:start + n] == suffix:
                return tokens[start + n:start + n + k]
    return []


def test_the_draft_is_what_followed_the_latest_earlier_occurrence():
    look = PromptLookup([5, 6, 7, 8, 1, 2, 5, 6, 7, 9, 3, 5, 6])
    # "5 6" occurs twice before the end: the latest one was followed by 7 9 3 5 6.
    assert look.draft(3) == [7, 9, 3]
    look.extend([7])  # "5 6 7": the latest earlier occurrence is followed by 9
    assert look.draft(2) == [9, 3]
    assert PromptLookup([1, 2, 3]).draft(4) == []  # nothing repeats
    assert look.draft(0) == []


def test_the_index_gives_the_brute_force_draft_token_by_token():
    rng = random.Random(0)
    tokens = [rng.randrange(6) for _ in range(400)]
    look = PromptLookup()
    for i, t in enumerate(tokens):
        look.extend([t])
        assert look.draft(5) == scan_draft(tokens[:i + 1], 5), i
    look.truncate(150)  # rejected draft tokens, an edit: as if the rest never came
    assert look.tokens == tokens[:150] and look.draft(5) == scan_draft(tokens[:150], 5)


@pytest.mark.parametrize("draft", [0, 2, 4])
def test_acceptance_keeps_the_samplers_distribution(draft):
    probs = torch.tensor([0.5, 0.05, 0.25, 0.2, 0.0]) * 0.8  # unnormalised, as top-p leaves them
    gen = torch.Generator().manual_seed(1)
    n = 40000
    counts = torch.zeros(5)
    kept = 0
    for _ in range(n):
        ok, token = accept(draft, probs, gen)
        counts[token] += 1
        kept += ok
    p = probs / probs.sum()
    assert torch.allclose(counts / n, p, atol=0.01), counts / n
    assert abs(kept / n - float(p[draft])) < 0.01  # accepted exactly as often as p(draft)
    assert counts[4] == 0  # a token the sampler cannot give is never given


def test_sample_draws_from_the_same_distribution():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(3))
    s = SamplingSettings(temperature=0.8, top_p=0.9, top_k=20, repeat_penalty=1.3, seed=1)
    history = [1, 2, 3, 3, 7]
    probs = distribution(logits, s, history)
    assert probs is not None and 0.85 < float(probs.sum()) <= 1 + 1e-5 and int((probs > 0).sum()) <= 20
    a, b = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert [sample(logits, s, history, a) for _ in range(50)] == \
        [int(torch.multinomial(probs, 1, generator=b)) for _ in range(50)]
    greedy = SamplingSettings(temperature=0, repeat_penalty=1.3)
    assert distribution(logits, greedy, history) is None
    penalised = logits.clone()
    for t in set(history):
        penalised[t] = penalised[t] / 1.3 if penalised[t] > 0 else penalised[t] * 1.3
    assert sample(logits, greedy, history, None) == int(penalised.argmax())


def test_the_gate_pauses_where_drafts_fail_and_backs_off():
    gate = DraftGate(max_draft=4, min_rate=0.5, window=8, pause=3)
    assert gate.size() == 4
    gate.record(4, 0)
    gate.record(4, 1)  # 1 of 8 accepted: below half
    assert [gate.size() for _ in range(4)] == [0, 0, 0, 4]  # a pause of 3 tokens, then it tries again
    gate.record(4, 0)
    gate.record(4, 0)
    assert [gate.size() for _ in range(7)] == [0] * 6 + [4]  # failing again: twice as long
    gate.record(4, 4)
    gate.record(4, 3)
    assert gate.size() == 4 and (gate.drafted, gate.accepted) == (24, 8)
