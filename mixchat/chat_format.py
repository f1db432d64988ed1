"""Mistral's instruct chat format, token for token as mistral-common writes it.

v1 (Mistral-7B-Instruct, Mixtral-Instruct; 32000 pieces): BOS, then each user turn is the *text*
"[INST] {content} [/INST]" tokenized as one string, each assistant turn is its text followed by
EOS. The system prompt is prepended to the FIRST user message as "{system}\\n\\n{content}".

v2/v3 (32768 pieces with control pieces): BOS, each user turn is [INST] + tokens(content) + [/INST]
with [INST]/[/INST] as single control ids; assistant text has trailing spaces stripped, then EOS.
The system prompt is prepended to the LAST user message, so it moves every turn (the KV cache
then re-uses only the prefix before it).

An assistant message may carry the token ids the model generated; they are used verbatim so a
follow-up turn's prompt starts with exactly the ids already in the KV cache (re-tokenizing the
text can split it differently).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mixchat.tokenizer import Tokenizer


@dataclass
class Message:
    role: str  # "user" or "assistant"
    content: str
    ids: list[int] | None = field(default=None, compare=False)  # assistant: the generated ids, without EOS


def encode_chat(tokenizer: Tokenizer, messages: list[Message], system: str | None = None) -> list[int]:
    """The prompt for the model to write the next assistant turn (or the whole history when the
    last message is the assistant's)."""
    version = tokenizer.version
    users = [i for i, m in enumerate(messages) if m.role == "user"]
    system_at = (users[0] if version == "v1" else users[-1]) if users and system else None
    ids = [tokenizer.bos_id]
    for i, m in enumerate(messages):
        if m.role == "user":
            content = f"{system}\n\n{m.content}" if i == system_at else m.content
            if version == "v1":
                ids += tokenizer.encode(f"[INST] {content} [/INST]", bos=False)
            else:
                ids += [tokenizer.control_id("[INST]"), *tokenizer.encode(content, bos=False),
                        tokenizer.control_id("[/INST]")]
        elif m.role == "assistant":
            if m.ids is not None:
                ids += m.ids
            else:
                ids += tokenizer.encode(m.content if version == "v1" else m.content.rstrip(" "), bos=False)
            ids.append(tokenizer.eos_id)
        else:
            raise ValueError(f"unknown role {m.role!r}")
    return ids
