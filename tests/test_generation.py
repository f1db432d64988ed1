"""Session.generate: greedy output against Hugging Face's generate, cache re-use across turns,
sampling settings, cancellation and the context limit."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import tiny_args
from hf_oracle import hf_model

from mixchat.engine.engine import Engine
from mixchat.engine.generation import Done, PrefillProgress, Session, TokenEvent, common_prefix
from mixchat.engine.sampling import SamplingSettings, apply_repeat_penalty, sample
from mixchat.errors import ContextError
from mixchat.release.folder import open_weights
from mixchat.text.chat_format import Message, encode_chat

GREEDY = SamplingSettings(temperature=0, repeat_penalty=1.0, max_tokens=24)
MOE = {"num_experts": 4, "num_experts_per_tok": 2}


def run(session: Session, prompt, settings=GREEDY, cancel=None) -> tuple[list[TokenEvent], Done]:
    events = list(session.generate(prompt, settings, cancel))
    return [e for e in events if isinstance(e, TokenEvent)], events[-1]


@pytest.fixture(params=["dense-window", "mixtral", "ministral"])
def engine(request, make_release):
    if request.param == "dense-window":
        args = tiny_args(sliding_window=12, rope_theta=1e4)
        folder = make_release(args, "dense", seed=11, std=0.15)
    elif request.param == "ministral":  # a windowed and a full-attention layer: HF's Ministral with layer_types
        args = tiny_args(sliding_window=[8, None])
        folder = make_release(args, "dense", seed=13, std=0.15)
    else:
        args = tiny_args(moe=MOE)
        folder = make_release(args, "torrent", seed=12, std=0.15)
    return Engine.load(folder, dtype="fp32", warm=False)


def test_greedy_tokens_match_hf_generate(engine):
    """Prompt + output (about 40 tokens) is longer than the 12-token window of the dense model and the 8-token
    one of Ministral's first layer (HF generates with its own cache: a sliding-window layer per window)."""
    prompt = encode_chat(engine.tokenizer, [Message("user", "Tell me a story about a dragon and a knight.")])
    tokens, done = run(Session(engine), prompt)
    hf = hf_model(open_weights(engine.release.weights), engine.args, engine.layout)
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=GREEDY.max_tokens, do_sample=False,
                      eos_token_id=engine.tokenizer.eos_id, pad_token_id=0)[0, len(prompt):].tolist()
    if ref and ref[-1] == engine.tokenizer.eos_id:
        ref = ref[:-1]
    assert [t.id for t in tokens] == ref
    assert len(ref) > 5
    assert done.text == engine.tokenizer.decode(ref) == "".join(t.text for t in tokens)
    assert done.prefilled_tokens == len(prompt) and done.cached_tokens == 0


def test_expert_routing_is_reported_per_generated_token(make_release):
    args = tiny_args(moe=MOE, n_layers=3)
    engine = Engine.load(make_release(args, "experts", seed=3, std=0.15), dtype="fp32", warm=False)
    session = Session(engine)
    tokens, done = run(session, [1, 733, 16289, 28793, 12014, 733, 28748, 16289, 28793])
    # Each token's experts are those the model used when it read that token: recompute in one pass.
    full = engine.model(torch.tensor(done.prompt_tokens + done.generated), engine.new_cache())
    for i, t in enumerate(tokens):
        assert t.experts == full.experts[len(done.prompt_tokens) + i].tolist()
        assert len(t.experts) == 3 and all(len(pair) == 2 for pair in t.experts)


def test_second_turn_prefills_only_the_new_tokens(engine):
    tok = engine.tokenizer
    session = Session(engine)
    history = [Message("user", "What is the capital of France?")]
    first_prompt = encode_chat(tok, history)
    first, done1 = run(session, first_prompt)
    history += [Message("assistant", done1.text, ids=done1.generated), Message("user", "And of Italy?")]
    second_prompt = encode_chat(tok, history)
    second, done2 = run(session, second_prompt)

    assert done2.cached_tokens == len(first_prompt) + len(done1.generated)
    assert done2.prefilled_tokens == len(second_prompt) - done2.cached_tokens
    assert done2.prefilled_tokens <= 15  # EOS + "[INST] And of Italy? [/INST]"
    fresh, fresh_done = run(Session(engine), second_prompt)
    assert [t.id for t in second] == [t.id for t in fresh]
    assert fresh_done.cached_tokens == 0


def test_regenerating_rewinds_the_cache(engine):
    session = Session(engine)
    prompt = encode_chat(engine.tokenizer, [Message("user", "Say something.")])
    a, _ = run(session, prompt)
    b, done = run(session, prompt)  # same prompt again: rewind to it, keep all but its last token
    assert [t.id for t in a] == [t.id for t in b]
    assert done.cached_tokens == len(prompt) - 1


@pytest.mark.parametrize("engine", ["dense-window", "mixtral"], indirect=True)  # sampling: no window matters
def test_same_seed_same_text_and_seeds_differ(engine):
    prompt = encode_chat(engine.tokenizer, [Message("user", "Once upon a time")])
    s = SamplingSettings(temperature=1.0, top_p=0.9, top_k=50, max_tokens=16, seed=42)
    texts = [run(Session(engine), prompt, s)[1].generated for _ in range(2)]
    assert texts[0] == texts[1]
    others = {tuple(run(Session(engine), prompt, SamplingSettings(temperature=1.0, max_tokens=16, seed=k))[1].generated)
              for k in range(4)}
    assert len(others) > 1


def test_cancel_from_another_thread_stops_within_one_token(engine):
    cancel = threading.Event()
    session = Session(engine)
    settings = SamplingSettings(temperature=1.0, max_tokens=10_000, seed=0)
    seen = []
    for event in session.generate([1, 415, 2936], settings, cancel):
        if isinstance(event, TokenEvent):
            seen.append(event.id)
            if len(seen) == 5:
                t = threading.Thread(target=cancel.set)
                t.start()
                t.join()
        elif isinstance(event, Done):
            done = event
    assert done.stop == "interrupted" and done.generated == seen and len(seen) == 5
    assert session.tokens == [1, 415, 2936] + seen  # what was generated is kept, in the cache too


def test_max_tokens_stops_with_length(engine):
    engine.tokenizer.eos_id = -1  # this random model must not end on its own here
    s = SamplingSettings(temperature=1.0, max_tokens=7, seed=1, repeat_penalty=1.0)
    _, done = run(Session(engine), [1, 22557], s)
    assert done.stop == "length" and len(done.generated) == 7


def test_context_limit(engine):
    with pytest.raises(ContextError, match="the prompt is 25 tokens but the context holds 20"):
        list(Session(engine, max_tokens=20).generate(list(range(3, 28)), GREEDY))
    engine.tokenizer.eos_id = -1
    s = SamplingSettings(temperature=1.0, max_tokens=100, seed=0, repeat_penalty=1.0)
    session = Session(engine, max_tokens=20)
    _, done = run(session, list(range(3, 18)), s)
    assert done.stop == "context" and len(done.generated) == 5 and session.cache.pos == 20


def test_long_prompt_reports_prefill_progress(engine):
    session = Session(engine)
    session.cache.chunk_size = 8
    events = list(session.generate(list(range(3, 40)), SamplingSettings(max_tokens=1, seed=0)))
    progress = [e for e in events if isinstance(e, PrefillProgress)]
    assert [(p.done, p.total) for p in progress] == [(8, 37), (16, 37), (24, 37), (32, 37), (37, 37)]


# -- sampling -------------------------------------------------------------------------------------

def test_top_k_1_and_tiny_top_p_are_greedy():
    logits = torch.randn(100, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    assert sample(logits, SamplingSettings(temperature=2.0, top_k=1, repeat_penalty=1.0), [], g) == logits.argmax()
    assert sample(logits, SamplingSettings(temperature=2.0, top_p=1e-6, repeat_penalty=1.0), [], g) == logits.argmax()


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    picks = {sample(logits, SamplingSettings(temperature=1.0, top_p=0.8, repeat_penalty=1.0), [], g)
             for _ in range(300)}
    assert picks == {0, 1}


def test_repeat_penalty_makes_seen_tokens_less_likely():
    logits = torch.tensor([2.0, -1.0, 3.0])
    out = apply_repeat_penalty(logits, [0, 1], 2.0)
    assert out.tolist() == [1.0, -2.0, 3.0]


def test_editing_a_message_rewinds_to_where_it_differs(engine):
    tok = engine.tokenizer
    session = Session(engine)
    first = [Message("user", "Tell me about cats.")]
    _, d1 = run(session, encode_chat(tok, first))
    base = first + [Message("assistant", d1.text, ids=d1.generated)]
    dogs = encode_chat(tok, base + [Message("user", "And dogs?")])
    run(session, dogs)
    edited = encode_chat(tok, base + [Message("user", "And birds?")])  # the user edits the last message
    got, done = run(session, edited)
    fresh, _ = run(Session(engine), edited)
    assert [t.id for t in got] == [t.id for t in fresh]
    assert done.cached_tokens == common_prefix(dogs, edited) > len(encode_chat(tok, base))


def test_rewind_past_the_window_rebuilds_and_still_matches(make_release):
    args = tiny_args(sliding_window=6)
    engine = Engine.load(make_release(args, seed=5, std=0.15), dtype="fp32", warm=False)
    session = Session(engine)
    session.cache = engine.new_cache(chunk_size=4)  # a rolling buffer of 6 + 4 - 1 = 9 slots
    long_prompt = list(range(3, 40))
    run(session, long_prompt)
    edited = long_prompt[:10] + [99, 98]  # differs long before what the buffer still holds
    got, done = run(session, edited)
    fresh, _ = run(Session(engine), edited)
    assert done.cached_tokens == 0 and [t.id for t in got] == [t.id for t in fresh]
