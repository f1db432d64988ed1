"""The instruct format against mistral-common, token for token, for every tokenizer file it ships
(SentencePiece v1, v2, v3, v7; tekken 240718 and 240911, both v3 = Mistral-Nemo) and for tekken
files of the later versions cut from tekken_240911.json (v7 = Mistral-Small-2501, v11, v13)."""

from __future__ import annotations

import pytest
from mistral_common.tokens.tokenizers.base import SpecialTokens
from mistral_oracle import SHIPPED, oracle_chat, ours, shipped, small_tekken

from mixchat.text.chat_format import Message, encode_chat
from mixchat.text.tokenizer import Tokenizer

TURNS = [
    ("Hi there", "Hello! How can I help? "),
    ("Écris un haïku sur la mer.", "Vagues d'argent —\nla mer respire\nsous la lune."),
    ("What is 2+2?\nAnswer briefly.", "4"),
    ("日本の首都は？ 😀", "東京です。"),
    ("  leading and trailing spaces  ", "```python\nprint('hi')\n```"),
    ("[INST] what does </s> mean? [/INST]", "<s>It ends a sequence.</s> [SYSTEM_PROMPT] is a marker.  "),
    ("   ", "\n"),
    ("\t\n", "   "),
    ("<b>bold</b> [b]x[/b] {{x}} <|im_start|>user<|im_end|> [/SYSTEM_PROMPT]", "Sure: <i>ok</i> \n "),
    ("\ufffd \x1b[31mred\x1b[0m \x00 \u200b 🇫🇷👩‍👩‍👧", "😀😀😀  "),
    ("x" * 3000, "y " * 500),
    ("العربية עברית Ελληνικά", "Русский हिन्दी ไทย"),
]
SYSTEMS = [None, "You are a terse assistant.\nAnswer in one line.", "  [INST] odd system </s> 😀  "]
ALL_SPECIAL = [s.value for s in SpecialTokens]


def conversation(n_turns: int, start: int = 0) -> list[tuple[str, str]]:
    """n user turns; the first n-1 have answers, the last awaits one."""
    msgs = []
    for i in range(n_turns):
        user, assistant = TURNS[(start + i) % len(TURNS)]
        msgs.append(("user", user))
        if i < n_turns - 1:
            msgs.append(("assistant", assistant))
    return msgs


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Every file to test, by name -> path."""
    tmp = tmp_path_factory.mktemp("tekken")
    out = {key: shipped(key) for key in SHIPPED}
    # Small tekken files (6000 ranks) load in a blink; their special tokens in a new order.
    shuffled = ALL_SPECIAL[:3] + ALL_SPECIAL[3:][::-1]
    out["tekken_v3_small"] = small_tekken(tmp / "tekken_v3.json", "v3")
    out["tekken_v7_legacy"] = small_tekken(tmp / "tekken_v7a.json", "v7")
    out["tekken_v7"] = small_tekken(tmp / "tekken_v7b.json", "v7", special=shuffled)
    out["tekken_v11"] = small_tekken(tmp / "tekken_v11.json", "v11", special=ALL_SPECIAL)
    out["tekken_v13"] = small_tekken(tmp / "tekken_v13.json", "v13", special=shuffled)
    return out


FILES = [*SHIPPED, "tekken_v3_small", "tekken_v7_legacy", "tekken_v7", "tekken_v11", "tekken_v13"]
SMALL = [f for f in FILES if not f.startswith("tekken_24")]  # quick to load in mistral-common


def as_ids(tok, msgs):
    """The history as mixchat holds it: each assistant turn also carries the ids the model generated
    (here: what the tokenizer makes of the text mistral-common encodes)."""
    out = []
    for role, text in msgs:
        ids = None
        if role == "assistant":
            ids = tok.encode(text if tok.version == "v1" else text.rstrip(" "), bos=False)
        out.append(Message(role, text, ids=ids))
    return out


@pytest.mark.parametrize("name", FILES)
def test_matches_mistral_common(files, name):
    path = files[name]
    tok = ours(path)
    for n_turns in (1, 2, 5, 12):
        for start in (0, 5, 9):
            msgs = conversation(n_turns, start)
            for system in SYSTEMS:
                expected = oracle_chat(path, msgs, system)
                assert encode_chat(tok, [Message(r, c) for r, c in msgs], system) == expected, (n_turns, start, system)
                assert encode_chat(tok, as_ids(tok, msgs), system) == expected, (n_turns, start, system)


@pytest.mark.parametrize("name", SMALL)
def test_edited_and_regenerated_histories_match(files, name):
    """Ctrl+E / Ctrl+R: the history is cut at a user message and re-sent with a new one; a history
    ending with the assistant (what is in the cache after a reply) is encoded like mistral-common's
    finetuning mode."""
    path = files[name]
    tok = ours(path)
    full = conversation(8)
    for system in SYSTEMS:
        for cut in range(0, len(full), 2):
            edited = full[:cut] + [("user", "Actually, tell me about cats instead.  ")]
            assert encode_chat(tok, as_ids(tok, edited), system) == oracle_chat(path, edited, system)
            answered = full[: cut + 2]  # ... user, assistant
            assert encode_chat(tok, as_ids(tok, answered), system) == oracle_chat(path, answered, system)


@pytest.mark.parametrize("name", SMALL)
def test_quirks_match(files, name):
    path = files[name]
    tok = ours(path)
    cases = [
        [("user", "first"), ("user", "second")],  # one turn, joined by a blank line
        [("user", "a"), ("assistant", "b"), ("assistant", "c  "), ("user", "d")],
        [("user", ""), ("assistant", "empty question")],
        [("user", "q"), ("assistant", " \n ")],
    ]
    for msgs in cases:
        for system in SYSTEMS:
            assert encode_chat(tok, [Message(r, c) for r, c in msgs], system) == oracle_chat(path, msgs, system)
    # An empty system prompt is none (mistral-common refuses it; mixchat's settings may hold "").
    msgs = [Message("user", "hi")]
    assert encode_chat(tok, msgs, "") == encode_chat(tok, msgs, None)


@pytest.mark.parametrize("name", FILES)
def test_control_ids_only_where_the_format_puts_them(files, name):
    tok = ours(files[name])
    msgs = [Message(r, c) for r, c in conversation(6, start=5)]
    ids = encode_chat(tok, msgs, "[SYSTEM_PROMPT] [INST]")
    begin, sys_begin = tok.control_id("[INST]"), tok.control_id("[SYSTEM_PROMPT]")
    if tok.version == "v1":
        assert begin is None
    else:
        assert ids.count(begin) == 6
    assert ids.count(sys_begin) == (1 if tok.version in ("v7", "v11", "v13") else 0)
    assert ids.count(tok.bos_id) == 1 and ids.count(tok.eos_id) == 5


@pytest.mark.parametrize("name", ["v1", "v3", "v7", "tekken_240911", "tekken_v7"])
def test_the_cached_history_is_a_prefix_of_the_next_prompt(files, name):
    """With the generated ids used verbatim, a follow-up only appends, except that v2/v3 move the
    system prompt to the last user message (v7 put it at the start for that reason)."""
    tok = ours(files[name])
    history = [Message("user", "Tell me a story.")]
    for system in SYSTEMS:
        first = encode_chat(tok, history, system)
        reply = Message("assistant", "Once upon a time ", ids=tok.encode("Once upon a time", bos=False)[::-1])
        second = encode_chat(tok, history + [reply, Message("user", "And then?")], system)
        moves = system is not None and tok.version in ("v2", "v3")
        assert (second[: len(first)] == first) != moves
        assert second[len(first) : len(first) + len(reply.ids)] == reply.ids or moves


def test_assistant_ids_are_used_verbatim(v1_tokenizer):
    tok = Tokenizer(v1_tokenizer)
    odd = [28705, 6312, 28709]  # a split the tokenizer itself would not choose
    ids = encode_chat(tok, [Message("user", "a"), Message("assistant", "hello", ids=odd), Message("user", "b")])
    at = ids.index(6312)
    assert ids[at - 1 : at + 3] == [28705, 6312, 28709, tok.eos_id]


def test_unknown_role():
    tok = ours(shipped("v3"))
    with pytest.raises(ValueError, match="unknown role"):
        encode_chat(tok, [Message("system", "x")])
