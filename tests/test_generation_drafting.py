"""Decoding with prompt-lookup drafting gives plain decoding's reply, token for token: greedy and sampled
with a seed, dense and MoE, bf16/int8/int4; the cache it leaves continues the conversation as plain
decoding's does; Esc stops it within one verify pass."""

from __future__ import annotations

import random
import threading

import pytest
import torch
from conftest import tiny_args

from mixchat.engine.engine import Engine
from mixchat.engine.generation import Done, Session, TokenEvent
from mixchat.engine.sampling import SamplingSettings
from mixchat.speed import kernels

pytestmark = pytest.mark.skipif(not kernels.simd(), reason="drafting needs the fused step (AVX2 kernels)")

SHAPES = {"dim": 128, "head_dim": 32, "n_heads": 4, "n_kv_heads": 2, "hidden_dim": 256, "sliding_window": 48}
MOE = {"moe": {"num_experts": 4, "num_experts_per_tok": 2}}
TEXT = ("The fox counted the stars, and the owl wrote the number down. The fox counted the stars again, "
        "and the owl wrote the number down again. The fox counted")
# The tiny random models here repeat themselves when greedy, so their replies give prompt lookup matches.


def knowing(reply_ids: list[int], prompt_len: int, kept: float = 1.0, seed: int = 0):
    """A lookup that drafts the reply it was told, each guess spoiled (another id) with probability
    1 - kept: drafts and rejections where the test wants them, whatever a random model writes."""
    rng = random.Random(seed)

    class Oracle:
        def __init__(self, history: list[int]) -> None:
            self.tokens = list(history)

        def extend(self, tokens: list[int]) -> None:
            self.tokens.extend(tokens)

        def draft(self, k: int) -> list[int]:
            at = len(self.tokens) - prompt_len
            return [t if rng.random() < kept else (t + 1) % 30000 + 3 for t in reply_ids[at:at + k]]

    return Oracle


def reply(engine: Engine, prompt: list[int], draft: int, session: Session | None = None, lookup=None,
          **sampling) -> tuple[Done, list[TokenEvent], Session]:
    session = session or Session(engine)
    settings = SamplingSettings(**{"temperature": 0, "max_tokens": 40, **sampling, "draft": draft})
    events = list(session.generate(prompt, settings, lookup_class=lookup))
    return events[-1], [e for e in events if isinstance(e, TokenEvent)], session


@pytest.mark.parametrize("quant", [None, "int8", "int4"])
@pytest.mark.parametrize("layout", ["dense", "experts"])
def test_drafting_gives_plain_decodings_reply_and_cache(make_release, layout, quant):
    args = tiny_args(**SHAPES, **(MOE if layout != "dense" else {}))
    engine = Engine.load(make_release(args, layout), quant=quant, show_progress=False)
    prompt = engine.tokenizer.encode(TEXT)
    plain, plain_events, plain_session = reply(engine, prompt, 0)
    engine.pass_seconds.update(dict.fromkeys(range(1, 9), 1.0))  # wide passes measured as cheap: it drafts
    drafted, events, session = reply(engine, prompt, 7, lookup=knowing(plain.generated, len(prompt), 0.7))
    assert plain.drafted == 0 and plain.passes == len(plain.generated)
    assert 0 < drafted.accepted < drafted.drafted  # guesses kept and guesses rejected
    assert drafted.passes < len(drafted.generated)
    assert drafted.generated == plain.generated and drafted.text == plain.text and drafted.stop == plain.stop
    # the expert view gets the routing of kept tokens only, each as plain decoding routed it
    assert [(e.id, e.experts, e.expert_weights) for e in events] == \
        [(e.id, e.experts, e.expert_weights) for e in plain_events]
    # rejected rows were rewound: the session holds exactly the reply, and the next turn is plain's
    assert session.tokens == plain_session.tokens == prompt + plain.generated
    assert session.cache.pos == plain_session.cache.pos
    follow = prompt + plain.generated + engine.tokenizer.encode("And then the owl")
    again, _, _ = reply(engine, follow, 7, session)
    plain_again, _, _ = reply(engine, follow, 0, plain_session)
    assert again.cached_tokens == plain_again.cached_tokens == len(prompt) + len(plain.generated)
    assert again.generated == plain_again.generated


def test_sampled_replies_with_a_seed_are_the_same_with_drafting(make_release):
    """The sampler draws once per token from the same logits, in order, so a seed gives the same reply."""
    engine = Engine.load(make_release(tiny_args(**SHAPES)), show_progress=False)
    prompt = engine.tokenizer.encode(TEXT)
    for seed in (1, 2, 3):
        kw = {"temperature": 0.7, "top_p": 0.95, "seed": seed, "repeat_penalty": 1.1, "max_tokens": 30}
        plain = reply(engine, prompt, 0, **kw)[0]
        engine.pass_seconds.update(dict.fromkeys(range(1, 9), 1.0))  # measured as cheap: it drafts
        drafted = reply(engine, prompt, 7, lookup=knowing(plain.generated, len(prompt), 0.7, seed), **kw)[0]
        assert drafted.generated == plain.generated and 0 < drafted.accepted < drafted.drafted
        assert reply(engine, prompt, 7, **kw)[0].generated == plain.generated  # with prompt lookup too


def test_drafting_is_off_where_passes_are_not_exact(make_release):
    engine = Engine.load(make_release(tiny_args(**SHAPES)), show_progress=False)
    prompt = engine.tokenizer.encode(TEXT)
    engine.fused_decode = False  # the plain path: its sums depend on the row count
    assert not Session(engine).can_draft()
    done = reply(engine, prompt, 7)[0]
    assert done.drafted == 0 and done.passes == len(done.generated)


def test_esc_stops_after_the_current_token_even_inside_a_verify_pass(make_release):
    engine = Engine.load(make_release(tiny_args(**SHAPES)), show_progress=False)
    prompt = engine.tokenizer.encode(TEXT)
    want = reply(engine, prompt, 0, max_tokens=40)[0].generated
    cancel = threading.Event()
    session = Session(engine)
    got = []
    settings = SamplingSettings(temperature=0, max_tokens=40, draft=7)
    engine.pass_seconds.update(dict.fromkeys(range(1, 9), 1.0))  # wide passes measured as cheap: 7 guesses
    for ev in session.generate(prompt, settings, cancel, lookup_class=knowing(want, len(prompt))):
        if isinstance(ev, TokenEvent):
            got.append(ev.id)
            if len(got) == 12:  # the 4th token of the second pass (8 tokens each)
                cancel.set()
        elif isinstance(ev, Done):
            done = ev
    assert done.stop == "interrupted" and done.generated == got == want[:12]
    assert done.passes == 2 and done.drafted == 14 and done.accepted == 14
    assert session.tokens == prompt + done.generated and session.cache.pos == len(session.tokens)
    # what was dropped is gone from the cache too: the next turn continues from token 12 as plain would
    follow = prompt + want[:12]
    assert reply(engine, follow, 7, session)[0].generated == reply(engine, follow, 0)[0].generated


def test_drafts_stop_at_the_length_and_context_limits(make_release):
    engine = Engine.load(make_release(tiny_args(**SHAPES)), show_progress=False)
    prompt = engine.tokenizer.encode(TEXT)
    for n in (1, 5, 13):
        plain, drafted = reply(engine, prompt, 0, max_tokens=n)[0], reply(engine, prompt, 7, max_tokens=n)[0]
        assert drafted.generated == plain.generated and len(drafted.generated) == n and drafted.stop == "length"
    limit = len(prompt) + 9
    plain = reply(engine, prompt, 0, session=Session(engine, max_tokens=limit), max_tokens=100)[0]
    drafted, _, session = reply(engine, prompt, 7, session=Session(engine, max_tokens=limit), max_tokens=100)
    assert drafted.stop == plain.stop == "context" and drafted.generated == plain.generated
    assert session.cache.pos <= limit
    torch.testing.assert_close(torch.tensor(drafted.generated), torch.tensor(plain.generated))


def test_drafting_with_experts_loaded_on_demand(make_release):
    """A verify pass fetches every expert its tokens chose (the union) from the on-demand cache: the
    reply is the one with every expert resident, and no expert is held past the pass."""
    folder = make_release(tiny_args(**SHAPES, **MOE), "experts")
    full = Engine.load(folder, show_progress=False)
    tensors = [*full.model.named_parameters()]
    resident = sum(t.nbytes for n, t in tensors if ".experts." not in n)
    one = sum(t.nbytes for n, t in tensors if n.startswith("layers.0.feed_forward.experts.0."))
    budget = Engine.load(folder, memory_budget=resident + 3.5 * one, show_progress=False)
    assert budget.experts is not None
    prompt = full.tokenizer.encode(TEXT)
    want = reply(full, prompt, 0)[0]
    budget.pass_seconds.update(dict.fromkeys(range(1, 9), 1.0))
    got = reply(budget, prompt, 7, lookup=knowing(want.generated, len(prompt), 0.8))[0]
    assert got.accepted > 0 and got.generated == want.generated
    assert all(e is None for layer in budget.decoder.built.layers for e in layer.moe._experts)


def test_prompt_lookup_drafts_by_default(make_release, monkeypatch):
    from mixchat.engine import drafting

    engine = Engine.load(make_release(tiny_args(**SHAPES)), show_progress=False)
    asked = []
    real = drafting.PromptLookup.draft
    monkeypatch.setattr(drafting.PromptLookup, "draft", lambda self, k: asked.append(k) or real(self, k))
    prompt = engine.tokenizer.encode(TEXT)
    assert reply(engine, prompt, 7)[0].generated == reply(engine, prompt, 0)[0].generated
    assert asked and max(asked) <= 7


def test_drafting_with_a_window_per_layer(make_release):
    """Ministral's pattern (a full-attention layer beside windowed ones): each layer's buffer gets its own
    slots and masks in a verify pass, and the reply is plain decoding's."""
    args = tiny_args(**{**SHAPES, "sliding_window": [None, 6]})
    engine = Engine.load(make_release(args), show_progress=False)
    prompt = engine.tokenizer.encode(TEXT)
    plain = reply(engine, prompt, 0)[0]
    engine.pass_seconds.update(dict.fromkeys(range(1, 9), 1.0))
    drafted, _, session = reply(engine, prompt, 7, lookup=knowing(plain.generated, len(prompt), 0.7))
    assert len(session.cache.buffers) == 2 and 0 < drafted.accepted < drafted.drafted
    assert drafted.generated == plain.generated
