"""Mistral's instruct chat format, token for token as mistral-common writes it.

The format is the tokenizer's `version` (read from the tokenizer file, see mixchat/text/tokenizer.py); it
is the same for SentencePiece and tekken files of one version, only the ids differ.

v1 (Mistral-7B-Instruct, Mixtral-Instruct; 32000 pieces): BOS, then each user turn is the *text*
"[INST] {content} [/INST]" tokenized as one string, each assistant turn is its text followed by
EOS. The system prompt is prepended to the FIRST user message as "{system}\\n\\n{content}".

v2/v3 (32768-piece tokenizers with control pieces; tekken v3 = Mistral-Nemo): BOS, each user turn
is [INST] + tokens(content) + [/INST] with [INST]/[/INST] as single control ids; assistant text has
trailing spaces (only " ", not newlines) stripped, then EOS. The system prompt is prepended to the
LAST user message, so it moves every turn (the KV cache then re-uses only the prefix before it).

v7 (tokenizer.model.v7, tekken v7 = Mistral-Small-2501; also tekken v11/v13, which differ from v7
only in tool calls): BOS, then [SYSTEM_PROMPT] + tokens(system) + [/SYSTEM_PROMPT] once, right
after BOS, then the turns as in v3. The system prompt no longer moves, so a follow-up re-uses
the whole cached history.

mistral-common's other quirks, matched here: consecutive user messages are one turn, joined by
"\\n\\n" (so are consecutive assistant messages given as text); an empty system prompt is none.

An assistant message may carry the token ids the model generated; they are used verbatim so a
follow-up turn's prompt starts with exactly the ids already in the KV cache (re-tokenizing the
text can split it differently).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mixchat.text.tokenizer import TextTokenizer

SYSTEM_AT_START = ("v7", "v11", "v13")  # [SYSTEM_PROMPT] ... [/SYSTEM_PROMPT] after BOS
FORMATS = ("v1", "v2", "v3", *SYSTEM_AT_START)


@dataclass
class Message:
    role: str  # "user" or "assistant"
    content: str
    ids: list[int] | None = field(default=None, compare=False)  # assistant: the generated ids, without EOS


def _merged(messages: list[Message]) -> list[Message]:
    """mistral-common's normalizer: a run of user messages is one turn, their texts joined by a blank
    line; so is a run of assistant messages, unless one carries generated ids (those stay verbatim)."""
    out: list[Message] = []
    for m in messages:
        if m.role not in ("user", "assistant"):
            raise ValueError(f"unknown role {m.role!r}")
        prev = out[-1] if out else None
        if prev is not None and prev.role == m.role and (m.role == "user" or (prev.ids is None and m.ids is None)):
            out[-1] = Message(m.role, f"{prev.content}\n\n{m.content}")
        else:
            out.append(m)
    return out


def _control(tokenizer: TextTokenizer, piece: str) -> int:
    i = tokenizer.control_id(piece)
    if i is None:  # the tokenizers check this on load; a hand-made one may not
        raise ValueError(f"{tokenizer.path}: has no {piece} control token, which format {tokenizer.version} needs")
    return i


def encode_chat(tokenizer: TextTokenizer, messages: list[Message], system: str | None = None) -> list[int]:
    """The prompt for the model to write the next assistant turn (or the whole history when the
    last message is the assistant's)."""
    version = tokenizer.version
    if version not in FORMATS:
        raise ValueError(f"no chat format for tokenizer version {version!r}")
    messages = _merged(messages)
    users = [i for i, m in enumerate(messages) if m.role == "user"]
    system = system or None
    ids = [tokenizer.bos_id]
    if version in SYSTEM_AT_START:
        if system is not None:
            ids += [_control(tokenizer, "[SYSTEM_PROMPT]"), *tokenizer.encode(system, bos=False),
                    _control(tokenizer, "[/SYSTEM_PROMPT]")]
        system_at = None
    else:
        system_at = (users[0] if version == "v1" else users[-1]) if users and system else None
    if version != "v1":
        begin, end = _control(tokenizer, "[INST]"), _control(tokenizer, "[/INST]")
    for i, m in enumerate(messages):
        if m.role == "user":
            content = f"{system}\n\n{m.content}" if i == system_at else m.content
            if version == "v1":
                ids += tokenizer.encode(f"[INST] {content} [/INST]", bos=False)
            else:
                ids += [begin, *tokenizer.encode(content, bos=False), end]
        else:
            if m.ids is not None:
                ids += m.ids
            else:
                ids += tokenizer.encode(m.content if version == "v1" else m.content.rstrip(" "), bos=False)
            ids.append(tokenizer.eos_id)
    return ids
