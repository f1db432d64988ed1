"""The instruct format against mistral-common, token for token."""

from __future__ import annotations

import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mixchat.chat_format import Message, encode_chat
from mixchat.synthetic import mistral_common_tokenizer
from mixchat.tokenizer import Tokenizer

TURNS = [
    ("Hi there", "Hello! How can I help? "),
    ("Écris un haïku sur la mer.", "Vagues d'argent —\nla mer respire\nsous la lune."),
    ("What is 2+2?\nAnswer briefly.", "4"),
    ("日本の首都は？ 😀", "東京です。"),
    ("  leading and trailing spaces  ", "```python\nprint('hi')\n```"),
]


def conversation(n_turns: int) -> list[tuple[str, str]]:
    """n user turns; the first n-1 have answers, the last awaits one."""
    msgs = []
    for i in range(n_turns):
        user, assistant = TURNS[i]
        msgs.append(("user", user))
        if i < n_turns - 1:
            msgs.append(("assistant", assistant))
    return msgs


@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
@pytest.mark.parametrize("n_turns", [1, 2, 5])
@pytest.mark.parametrize("system", [None, "You are a terse assistant.\nAnswer in one line."])
def test_matches_mistral_common(version, n_turns, system):
    oracle = getattr(MistralTokenizer, version)()
    msgs = conversation(n_turns)
    request = ([SystemMessage(content=system)] if system else []) + [
        UserMessage(content=c) if r == "user" else AssistantMessage(content=c) for r, c in msgs]
    expected = oracle.encode_chat_completion(ChatCompletionRequest(messages=request)).tokens

    tok = Tokenizer(mistral_common_tokenizer(version))
    assert tok.version == version
    assert encode_chat(tok, [Message(r, c) for r, c in msgs], system) == expected


def test_assistant_ids_are_used_verbatim(v1_tokenizer):
    tok = Tokenizer(v1_tokenizer)
    odd = [28705, 6312, 28709]  # a split the tokenizer itself would not choose
    ids = encode_chat(tok, [Message("user", "a"), Message("assistant", "hello", ids=odd), Message("user", "b")])
    at = ids.index(6312)
    assert ids[at - 1 : at + 3] == [28705, 6312, 28709, tok.eos_id]
