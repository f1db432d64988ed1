"""mistral-common as the oracle for mixchat's tokenizers and chat formats.

Loading a real tekken file takes mistral-common 3-4 s, so everything loaded here is cached for the
whole pytest process (shared by test_tekken.py and test_chat_format.py).
"""

from __future__ import annotations

import base64
import functools
import json
from pathlib import Path

import mistral_common
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode, get_validator
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mixchat.text.tokenizer import load_tokenizer

DATA = Path(mistral_common.__file__).parent / "data"
# Every tokenizer file mistral-common ships, by the instruct format it implies.
SHIPPED = {
    "v1": "tokenizer.model.v1",
    "v2": "mistral_instruct_tokenizer_240216.model.v2",
    "v3": "mistral_instruct_tokenizer_240323.model.v3",
    "v7": "mistral_instruct_tokenizer_241114.model.v7",
    "tekken_240718": "tekken_240718.json",
    "tekken_240911": "tekken_240911.json",
}
SHIPPED_VERSION = {"v1": "v1", "v2": "v2", "v3": "v3", "v7": "v7", "tekken_240718": "v3", "tekken_240911": "v3"}


def shipped(key: str) -> Path:
    return DATA / SHIPPED[key]


@functools.cache
def oracle(path: Path, finetuning: bool = False) -> MistralTokenizer:
    """MistralTokenizer.from_file(path). `finetuning`: the same tokenizer with the validator of
    from_file(path, mode=finetuning), which accepts a conversation that ends with the assistant (built
    from the loaded one: a tekken file takes mistral-common seconds to load)."""
    if not finetuning:
        return MistralTokenizer.from_file(str(path), mode=ValidationMode.test)
    loaded = oracle(path)
    version = loaded.instruct_tokenizer.tokenizer.version
    return MistralTokenizer(loaded.instruct_tokenizer, get_validator(version, mode=ValidationMode.finetuning),
                            loaded._instruct_request_normalizer)


@functools.cache
def ours(path: Path):
    return load_tokenizer(path)


def oracle_chat(path: Path, msgs: list[tuple[str, str]], system: str | None) -> list[int]:
    """What mistral-common writes for (role, text) messages and a system prompt."""
    request = ([SystemMessage(content=system)] if system else []) + [
        UserMessage(content=c) if r == "user" else AssistantMessage(content=c) for r, c in msgs]
    mistral = oracle(path, True) if msgs and msgs[-1][0] == "assistant" else oracle(path)  # one cache key each
    return mistral.encode_chat_completion(ChatCompletionRequest(messages=request)).tokens


@functools.lru_cache(maxsize=1)
def _tekken_doc() -> dict:
    return json.loads(shipped("tekken_240911").read_text(encoding="utf-8"))


def small_tekken(path: Path, version: str = "v7", n_vocab: int = 6000, vocab_size: int | None = None,
                 n_special: int = 100, special: list[str] | None = None) -> Path:
    """A tekken file cut from tekken_240911.json: its pattern, the first `n_vocab` ranks, `n_special`
    special ids, default_vocab_size `vocab_size` (default: all of it), the special tokens listed in
    `special` (None: no list, the legacy one applies)."""
    doc = _tekken_doc()
    out = {
        "config": {**doc["config"], "version": version, "num_vocab_tokens": n_vocab,
                   "default_vocab_size": vocab_size or n_special + n_vocab, "default_num_special_tokens": n_special},
        "vocab": doc["vocab"][:n_vocab],
    }
    if special is not None:
        out["special_tokens"] = [{"rank": i, "token_str": s, "is_control": True} for i, s in enumerate(special)]
    path.write_text(json.dumps(out), encoding="utf-8")
    return path


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
