"""Streamed text deltas: never half a character, and together exactly the full decode."""

from __future__ import annotations

import random

import pytest

from mixchat.dev.synthetic import mistral_common_tokenizer
from mixchat.text.tokenizer import StreamDecoder, Tokenizer

TEXTS = [
    "Hello world, this is a test.",
    "Café crème, naïve façade, Ærøskøbing, Straße.",
    "日本語のテキストと中文文本，还有한국어.",
    "Emoji: 😀🎉👩‍👩‍👧 and 🇫🇷 flags, then text.",
    "  two leading spaces\n\nand\ttabs and trailing space ",
    "€100 ≠ ∑ ∞ — ‘quotes’ “double”",
]


@pytest.fixture(scope="module", params=["v1", "v3"])
def tok(request):
    return Tokenizer(mistral_common_tokenizer(request.param))


def stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    dec = StreamDecoder(tok)
    deltas = [dec.push(i) for i in ids]
    deltas.append(dec.flush())
    return deltas


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_join_to_the_full_decode_without_replacement_chars(tok, text):
    ids = tok.encode(text, bos=False)
    deltas = stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


def test_the_emoji_text_really_uses_byte_fallback(tok):
    ids = tok.encode(TEXTS[3], bos=False)
    assert sum(tok.sp.id_to_piece(i).startswith("<0x") for i in ids) >= 4


def test_byte_fallback_pieces_wait_for_the_whole_character(tok):
    ids = [tok.sp.piece_to_id(f"<0x{b:02X}>") for b in "😀".encode()]
    assert stream(tok, ids) == ["", "", "", "😀", ""]


def test_leading_space_of_later_pieces_is_kept(tok):
    ids = tok.encode("one two three", bos=False)
    deltas = stream(tok, ids)
    assert deltas[0] == "one" and "".join(deltas[1:]).startswith(" two")


def test_random_ids_still_join_to_the_full_decode(tok):
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(3, tok.vocab_size) for _ in range(rng.randrange(1, 30))]
        assert "".join(stream(tok, ids)) == tok.decode(ids)
