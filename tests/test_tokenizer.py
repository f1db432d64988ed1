from __future__ import annotations

import pytest

from mixchat.errors import ReleaseError
from mixchat.synthetic import mistral_common_tokenizer
from mixchat.tokenizer import Tokenizer


def test_real_v1_tokenizer_ids(v1_tokenizer):
    tok = Tokenizer(v1_tokenizer)
    assert tok.encode("hello", bos=True, eos=True) == [1, 6312, 28709, 2]
    assert tok.decode([6312]) == "hell"
    assert tok.decode([1, 2]) == ""
    assert (tok.vocab_size, tok.version) == (32000, "v1")


def test_v3_tokenizer_is_detected():
    tok = Tokenizer(mistral_common_tokenizer("v3"))
    assert (tok.vocab_size, tok.version) == (32768, "v3")


def test_not_a_sentencepiece_model(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(ReleaseError, match="tokenizer.model: not a SentencePiece model"):
        Tokenizer(bad)
