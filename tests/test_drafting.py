"""Prompt-lookup drafting's parts that do not touch the model: the n-gram index finds what followed
the latest earlier occurrence, the acceptance rule keeps the sampler's distribution exactly, and the
gate stops drafting where drafts keep failing."""

from __future__ import annotations

import random

import pytest
import torch

from mixchat.engine.drafting import DraftGate, PromptLookup
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


def test_the_gate_drafts_what_pays_by_measured_pass_times():
    gate = DraftGate(max_draft=4, window=8, pause=3)
    for rows in range(1, 6):
        gate.record(rows - 1, rows - 1, 0.1)  # every draft kept; wider passes cost no more than one row
    assert gate.rate() > 0.9 and gate.size() == 4
    steep = DraftGate(max_draft=4)
    for rows in range(1, 6):
        steep.record(rows - 1, rows - 1, 0.1 * rows)  # compute-bound: T rows cost T steps
    assert steep.best() == 0  # even with every draft kept, a wide pass brings no more tokens per second
    mid = DraftGate(max_draft=7)
    mid.record(0, 0, 1.0)
    mid.record(3, 1, 1.2)
    mid.record(3, 2, 1.2)  # 3 kept, 2 rejections, and the prior's 1.2 of 2: p = 4.2 / 7; 1 + 0.1 per extra row
    assert mid.rate() == pytest.approx(4.2 / 7)
    best = max(range(8), key=lambda k: sum((4.2 / 7) ** i for i in range(k + 1)) / (1 + 0.1 * k))
    assert mid.best() == best and best > 0


def test_the_gate_pauses_where_drafts_fail_and_backs_off():
    gate = DraftGate(max_draft=4, window=32, pause=3)
    gate.record(0, 0, 0.1)
    first = gate.size()
    assert first > 0  # before any draft: the prior rate, and a wider pass assumed cheap
    for _ in range(10):
        gate.record(4, 0, 0.2)  # nothing kept, and a pass of 5 rows costs two of one: p = 1.2 / 10
    assert gate.rate() == pytest.approx(0.12)
    assert [gate.size() for _ in range(4)] == [0, 0, 0, 0]  # pauses 3 tokens...
    assert gate.size() == gate.best() > 0  # ...then tries again with the prior
    for _ in range(10):
        gate.record(4, 0, 0.2)
    assert [gate.size() for _ in range(8)] == [0] * 7 + [gate.best()]  # failing again: paused twice as long
    gate.record(4, 4, 0.2)
    assert (gate.drafted, gate.accepted) == (84, 4)
    assert gate._pause == 3  # a kept draft: the pause is back to its first length
