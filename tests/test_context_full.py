"""A full context: the oldest turns are dropped from what the model sees (never from the store), in
bulk, so the conversation goes on and each turn between cuts still prefills only itself; "stop"
refuses as before. Checked on real models (tiny random releases), against mistral-common's
encoding of the kept messages, through Chat, one-shot -c and line mode."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from argparse import Namespace

import pytest
from conftest import tiny_args
from mistral_oracle import oracle_chat

from mixchat import paths
from mixchat.conversations import kvstore
from mixchat.conversations.chat import KEEP_SHARE, Chat, ContextTrimmed
from mixchat.conversations.store import Store
from mixchat.dev.synthetic import mistral_common_tokenizer
from mixchat.engine.engine import Engine
from mixchat.engine.generation import Done, PrefillProgress, TokenEvent
from mixchat.engine.sampling import SamplingSettings
from mixchat.errors import ContextError, MixchatError
from mixchat.text.chat_format import Message, encode_chat
from mixchat.text.tokenizer import load_tokenizer

CONTEXT = 128
GREEDY = SamplingSettings(temperature=0, repeat_penalty=1.0, max_tokens=8)


def release(make_release, version: str = "v1", context: int = CONTEXT, seed: int = 7):
    tokenizer = mistral_common_tokenizer(version)
    args = tiny_args(vocab_size=load_tokenizer(tokenizer).vocab_size, max_seq_len=context)
    return make_release(args, seed=seed, std=0.15, tokenizer=tokenizer)


def question(i: int) -> str:
    return f"Question {i}: what did the captain say about the weather on the {i}th morning at sea?"


def turn(chat: Chat, text: str, **kw) -> tuple[ContextTrimmed | None, Done, list]:
    events = list(chat.send(text, GREEDY, **kw))
    done = events[-1]
    assert isinstance(done, Done)
    trimmed = [e for e in events if isinstance(e, ContextTrimmed)]
    assert len(trimmed) <= 1
    if trimmed:  # told before the model reads anything
        assert events.index(trimmed[0]) == 0
    return (trimmed[0] if trimmed else None), done, events


def test_a_conversation_three_times_the_context_goes_on_and_reuses_the_cache(make_release):
    engine = Engine.load(release(make_release), dtype="fp32", warm=False)
    store = Store(paths.store_path())
    chat = Chat(engine, kvstore.SessionPool(engine, paths.kv_dir()), store)
    total, cuts, i, previous = 0, [], 0, None
    while total < 3 * CONTEXT or len(cuts) < 2 or previous is cuts[-1]:
        start_before = chat.context_start
        trimmed, done, _ = turn(chat, question(i))
        total += done.prefilled_tokens + len(done.generated)
        kept = chat.messages[chat.context_start:-1]  # the model's view, before this reply
        assert done.prompt_tokens == encode_chat(engine.tokenizer, kept)
        assert len(done.prompt_tokens) < CONTEXT
        if trimmed is not None:
            assert chat.context_start == trimmed.context_start > start_before
            assert trimmed.dropped_messages == trimmed.context_start - start_before
            assert trimmed.dropped_messages % 2 == 0 and chat.messages[chat.context_start].role == "user"
            assert trimmed.kept_tokens == len(done.prompt_tokens) <= CONTEXT // KEEP_SHARE
            assert trimmed.dropped_tokens == len(encode_chat(engine.tokenizer,
                                                             chat.messages[start_before:trimmed.context_start])) - 1
            assert done.notes[0] == (f"note: dropped the oldest {trimmed.dropped_messages} messages "
                                     f"({trimmed.dropped_tokens} tokens) to fit the {CONTEXT}-token context; "
                                     "the model no longer sees them")
            # The kept turns moved to new positions: they are read again (all but the shared BOS prefix).
            assert done.prefilled_tokens > len(done.prompt_tokens) // 2
            cuts.append(done)
        else:
            assert chat.context_start == start_before and not any("dropped" in n for n in done.notes)
            if previous is not None:
                # Between cuts the prompt starts with what the cache holds: only the new turn is read.
                exchange = len(previous.prompt_tokens) + len(previous.generated)
                assert done.prompt_tokens[:exchange] == previous.prompt_tokens + previous.generated
                assert done.cached_tokens == exchange and done.prefilled_tokens == len(done.prompt_tokens) - exchange
        previous = done
        i += 1
        assert i < 60, "the context never filled"

    assert total >= 3 * CONTEXT and len(cuts) >= 2
    # Nothing left the store; only the model's view moved, and the store knows where it starts.
    stored = store.messages(chat.id)
    assert [(m.position, m.role, m.content) for m in stored] == \
        [(n, m.role, m.content) for n, m in enumerate(chat.messages)]
    assert len(stored) == 2 * i
    assert store.get(chat.id).context_start == chat.context_start
    assert chat.dropped_messages() == chat.context_start
    assert chat.dropped_tokens() == len(encode_chat(engine.tokenizer, chat.messages[:chat.context_start])) - 1
    assert chat.context_used() == len(previous.prompt_tokens) + len(previous.generated)


def test_a_reopened_conversation_keeps_its_cut_and_its_saved_cache(make_release):
    folder = release(make_release, seed=11)
    engine = Engine.load(folder, dtype="fp32", warm=False)
    store = Store(paths.store_path())
    chat = Chat(engine, kvstore.SessionPool(engine, paths.kv_dir()), store)
    i = 0
    while chat.context_start == 0:
        trimmed, last, _ = turn(chat, question(i))
        i += 1
        assert i < 40
    assert trimmed is not None
    cid, start = chat.id, chat.context_start

    # Another process: a new store handle, a new engine and pool (only the files are shared).
    engine2 = Engine.load(folder, dtype="fp32", warm=False)
    reopened = Chat(engine2, kvstore.SessionPool(engine2, paths.kv_dir()), Store(paths.store_path()),
                    Store(paths.store_path()).get(cid[:8]))
    assert reopened.context_start == start and reopened.notes == []
    assert [m.content for m in reopened.messages] == [m.content for m in chat.messages]
    assert reopened.prompt() == last.prompt_tokens + last.generated + [engine.tokenizer.eos_id]
    trimmed2, done, _ = turn(reopened, "And what happened next?")
    exchange = len(last.prompt_tokens) + len(last.generated)
    assert trimmed2 is None and reopened.context_start == start
    assert done.cached_tokens == exchange and done.prefilled_tokens == len(done.prompt_tokens) - exchange
    # The same turn in the first process gives the same prompt and the same reply.
    _, same, _ = turn(chat, "And what happened next?", save=False)
    assert same.prompt_tokens == done.prompt_tokens and same.generated == done.generated


@pytest.mark.parametrize("version", ["v1", "v2", "v3", "v7"])
def test_the_kept_prompt_is_mistral_commons_encoding_of_the_kept_messages(make_release, version):
    """The first kept message is a user message, and the system prompt goes where each format puts
    it for those messages: v1 in the first kept user message, v2/v3 in the last, v7 at the start."""
    tokenizer = mistral_common_tokenizer(version)
    engine = Engine.load(release(make_release, version), dtype="fp32", warm=False)
    system = "You are a ship's log. Answer in one line."
    chat = Chat(engine, kvstore.SessionPool(engine, paths.kv_dir()), None, system=system)
    history = []
    for i in range(8):
        history += [("user", question(i)), ("assistant", f"The wind on day {i} came from the west, and it rained.")]
    chat.messages = [Message(role, text) for role, text in history]  # text only: what mistral-common re-encodes
    new = "So, was it a good voyage?"
    assert len(oracle_chat(tokenizer, [*history, ("user", new)], system)) > CONTEXT  # it must cut

    trimmed, done, _ = turn(chat, new, save=False)
    assert trimmed is not None and trimmed.context_start % 2 == 0 and trimmed.context_start > 0
    kept = history[trimmed.context_start:]
    assert done.prompt_tokens == oracle_chat(tokenizer, [*kept, ("user", new)], system)
    assert len(done.prompt_tokens) <= CONTEXT // KEEP_SHARE
    # Keeping one more turn would not have fitted the half: the cut dropped no more than it had to.
    longer = oracle_chat(tokenizer, [*history[trimmed.context_start - 2:], ("user", new)], system)
    assert len(longer) > CONTEXT // KEEP_SHARE


def test_stop_refuses_as_before_and_a_message_larger_than_the_context_is_refused(make_release):
    engine = Engine.load(release(make_release, seed=3), dtype="fp32", warm=False)
    store = Store(paths.store_path())
    chat = Chat(engine, kvstore.SessionPool(engine, paths.kv_dir()), store)
    i = 0
    while len(chat.prompt(question(i))) < CONTEXT:
        turn(chat, question(i), when_full="stop")
        i += 1
        assert i < 40
    before = [m.content for m in store.messages(chat.id)]
    with pytest.raises(ContextError) as err:
        list(chat.send(question(i), GREEDY, when_full="stop"))
    line = str(err.value)
    assert "\n" not in line and f"the context holds {CONTEXT}" in line and "--when-full drop" in line
    assert [m.content for m in store.messages(chat.id)] == before and chat.context_start == 0
    assert store.get(chat.id).context_start == 0

    huge = "the sea, " * 200
    for when_full in ("drop", "stop"):
        with pytest.raises(ContextError) as err:
            list(chat.send(huge, GREEDY, when_full=when_full))
        line = str(err.value)
        assert "\n" not in line and f"the context holds {CONTEXT}" in line and "shorten the message" in line
        assert "--when-full" not in line  # dropping turns would not help
        assert [m.content for m in store.messages(chat.id)] == before
        assert chat.context_start == 0 and store.get(chat.id).context_start == 0
    with pytest.raises(ValueError):
        next(chat.send("hi", GREEDY, when_full="sometimes"))

    # "drop" now makes room for the message "stop" refused.
    trimmed, done, _ = turn(chat, question(i))
    assert trimmed is not None and store.get(chat.id).context_start == chat.context_start > 0


def test_a_turn_that_fails_before_its_first_token_undoes_its_cut(make_release):
    engine = Engine.load(release(make_release, seed=5), dtype="fp32", warm=False)
    store = Store(paths.store_path())
    chat = Chat(engine, kvstore.SessionPool(engine, paths.kv_dir()), store)
    i = 0
    while True:
        text = question(i)
        prompt = chat.prompt(text)
        if len(prompt) + min(GREEDY.max_tokens, CONTEXT // 4) > CONTEXT:
            break
        turn(chat, text)
        i += 1
    n = len(chat.messages)
    events = chat.send(text, GREEDY)
    first = next(events)
    assert isinstance(first, ContextTrimmed) and store.get(chat.id).context_start == first.context_start
    with pytest.raises(RuntimeError):
        events.throw(RuntimeError("the model failed"))
    assert chat.context_start == 0 and store.get(chat.id).context_start == 0
    assert len(chat.messages) == n and len(store.messages(chat.id)) == n


def test_edit_before_the_cut_moves_it_back(make_release):
    engine = Engine.load(release(make_release, seed=9), dtype="fp32", warm=False)
    store = Store(paths.store_path())
    chat = Chat(engine, kvstore.SessionPool(engine, paths.kv_dir()), store)
    i = 0
    while chat.context_start == 0:
        turn(chat, question(i))
        i += 1
    start = chat.context_start
    assert start >= 2
    events = list(chat.edit(start - 2, "Start again: how was the sea?", GREEDY))
    assert isinstance(events[-1], Done)
    assert chat.context_start == start - 2 and store.get(chat.id).context_start == start - 2
    assert events[-1].prompt_tokens == encode_chat(engine.tokenizer, [Message("user", "Start again: how was the sea?")])


def mixchat(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mixchat", *args], input=stdin, capture_output=True, timeout=120)


def read_store(cid: str):
    """The conversation and its messages, read with a connection closed at once: SQLite's POSIX locks
    are per process, and one left open here while mixchat processes write is not what users run."""
    with contextlib.closing(Store(paths.store_path(), readonly=True)) as store:
        return store.get(cid), store.messages(cid)


def test_one_shot_continue_goes_on_past_the_context_and_says_so(make_release):
    folder = release(make_release, seed=13)
    fast = ("--dtype", "fp32", "--temperature", "0", "--repeat-penalty", "1", "--max-tokens", "8", "--json")
    total, cuts, previous, i = 0, 0, None, 0
    while total < 3 * CONTEXT or cuts < 2:
        proc = mixchat(*(("-m", str(folder)) if i == 0 else ("-c",)), *fast, "-p", question(i))
        assert proc.returncode == 0, proc.stderr
        summary = json.loads(proc.stdout.decode().splitlines()[-1])
        assert {"dropped_messages", "context_start"} <= set(summary)
        total += summary["prefilled_tokens"] + summary["generated_tokens"]
        err = proc.stderr.decode()
        if summary["dropped_messages"]:
            cuts += 1
            assert f"dropped the oldest {summary['dropped_messages']} messages" in err
            assert f"to fit the {CONTEXT}-token context" in err
            assert summary["context_start"] >= summary["dropped_messages"] > 0
        else:
            assert "dropped" not in err
            if previous is not None:
                # Each run reopens the conversation: its saved cache covers all but the new turn.
                exchange = len(previous["prompt_tokens"]) + previous["generated_tokens"]
                assert summary["context_start"] == previous["context_start"]
                assert summary["cached_tokens"] == exchange
                assert summary["prefilled_tokens"] == len(summary["prompt_tokens"]) - exchange
        assert read_store(summary["conversation"])[0].context_start == summary["context_start"]
        previous = summary
        i += 1
        assert i < 40
    assert len(read_store(previous["conversation"])[1]) == 2 * i  # none deleted


def _ns(*args: str) -> Namespace:
    from mixchat.frontends.cli import build_parser

    return build_parser().parse_args(args)


def test_one_shot_takes_the_policy_from_the_flag_then_the_settings(make_release, capsys):
    from mixchat import settings
    from mixchat.frontends import oneshot

    folder = release(make_release, seed=17)
    base = ("--dtype", "fp32", "--temperature", "0", "--max-tokens", "8", "--json")
    i = 0
    while True:  # fill the conversation, never cutting, until the next message would not fit
        ns = _ns("-m", str(folder), *base) if i == 0 else _ns("-c", *base)
        ns.when_full = "stop"  # what cli.py's --when-full gives
        try:
            assert oneshot.run(ns, question(i)) == 0
        except ContextError as exc:
            assert "--when-full drop" in str(exc)
            break
        i += 1
        assert i < 40
    capsys.readouterr()
    settings.save(settings.Settings(when_full="stop"))
    with pytest.raises(ContextError):  # no flag: the saved "stop"
        oneshot.run(_ns("-c", *base), question(i))
    ns = _ns("-c", *base)
    ns.when_full = "drop"  # the flag wins over the saved setting
    assert oneshot.run(ns, question(i)) == 0
    out, err = capsys.readouterr()
    summary = json.loads(out.splitlines()[-1])
    assert summary["dropped_messages"] > 0 and "dropped the oldest" in err
    ns.when_full = "never"
    with pytest.raises(MixchatError, match="--when-full never"):
        oneshot.run(ns, "hi")


def test_line_mode_drops_and_prints_the_note(make_release):
    from test_repl import ENTER, drive, errors, namespace

    folder = release(make_release, seed=19)
    lines = [question(i) for i in range(12)]
    rc, text = drive(namespace("-m", str(folder), "--temperature", "0", "--max-tokens", "8"),
                     ENTER.join([*lines, "/bye"]) + ENTER)
    assert rc == 0
    assert errors(text) == [] and f"to fit the {CONTEXT}-token context" in text
    store = Store(paths.store_path())
    conv = store.latest()
    assert conv.context_start > 0 and len(store.messages(conv.id)) == 2 * len(lines)


def test_events_come_in_order_and_the_gauge_api_is_documented(make_release):
    """ContextTrimmed comes before any PrefillProgress of the re-read (long enough here to report progress)."""
    from mixchat.conversations.chat import Chat as ChatClass

    for name in ("context_start", "dropped_messages()", "dropped_tokens()", "context_used()"):
        assert name in ChatClass.__doc__
    engine = Engine.load(release(make_release, context=1024, seed=21), dtype="fp32", warm=False)
    chat = Chat(engine, kvstore.SessionPool(engine, paths.kv_dir()), None)
    chat.session.cache = engine.new_cache(chunk_size=16)  # small chunks: the re-read after a cut reports progress
    long = "Tell me everything about the long voyage across the northern sea, day by day. " * 3
    for _ in range(40):
        events = list(chat.send(long, GREEDY, save=False))
        kinds = [type(e) for e in events]
        if ContextTrimmed in kinds:
            assert kinds.index(ContextTrimmed) == 0 and PrefillProgress in kinds
            assert kinds.index(PrefillProgress) < kinds.index(TokenEvent) if TokenEvent in kinds else True
            return
    pytest.fail("no cut happened")
