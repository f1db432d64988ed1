from __future__ import annotations

import shutil

import pytest
from mistral_oracle import SHIPPED, SHIPPED_VERSION, oracle, oracle_chat, ours, shipped, small_tekken

from mixchat.dev.synthetic import mistral_common_tokenizer
from mixchat.errors import ReleaseError
from mixchat.text.chat_format import Message, encode_chat
from mixchat.text.tekken import TekkenTokenizer
from mixchat.text.tokenizer import (
    StreamDecoder,
    TextTokenizer,
    Tokenizer,
    find_tokenizer,
    load_tokenizer,
    suffix_version,
    tokenizer_candidates,
)


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


# -- the common interface and the version each file implies ----------------------------------------


@pytest.mark.parametrize("key", list(SHIPPED))
def test_every_shipped_file_loads_with_its_version_and_ids(key):
    path = shipped(key)
    tok, ref = ours(path), oracle(path).instruct_tokenizer.tokenizer
    assert isinstance(tok, TextTokenizer)
    assert tok.kind == ("tekken" if path.suffix == ".json" else "sentencepiece")
    assert tok.version == SHIPPED_VERSION[key] == ref.version.value
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (ref.n_words, ref.bos_id, ref.eos_id)
    assert tok.notes == []
    for piece in ["[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]"]:
        try:
            expected = ref.get_special_token(piece)
        except ValueError:  # tekken: mistral-common raises for a token the file lacks
            expected = None
        if expected == 0:  # SentencePiece: mistral-common answers <unk> for a piece the file lacks
            expected = None
        assert tok.control_id(piece) == expected, piece
    text = "Hi [INST] </s> <s> [SYSTEM_PROMPT] 😀 日本\ufffd\n  x "
    assert tok.encode(text, bos=True, eos=True) == ref.encode(text, bos=True, eos=True)
    assert tok.decode(tok.encode(text)) == ref.decode(tok.encode(text))


def test_the_v7m1_file_is_v7():
    path = shipped("v7").with_name("mistral_instruct_tokenizer_241114.model.v7m1")
    assert ours(path).version == "v7" and suffix_version(path) == "v7"


def _renamed(folder, key: str, name: str):
    folder.mkdir(exist_ok=True)
    path = folder / name
    shutil.copyfile(shipped(key), path)
    return path


@pytest.mark.parametrize("key, name, version, note", [
    # v2 and v3 write a plain chat alike, and their pieces may not tell them apart: the name says which.
    ("v2", "tokenizer.model.v3", "v3", None),
    ("v3", "tokenizer.model.v2", "v2", None),
    ("v2", "tokenizer.model", "v2", None),
    ("v3", "tokenizer.model", "v3", None),  # [IMG] is v3's
    ("v7", "tokenizer.model", "v7", None),
    ("v1", "tokenizer.model", "v1", None),
    # Where the format differs, the pieces win.
    ("v7", "tokenizer.model.v3", "v7", "named v3, but it has [SYSTEM_PROMPT] control pieces"),
    ("v1", "tokenizer.model.v3", "v1", "named v3, but it has no [INST] control piece"),
    ("v3", "tokenizer.model.v7", "v3", "named v7, but it has [INST] but no [SYSTEM_PROMPT] control pieces"),
    ("v2", "tokenizer.model.v1", "v2", "named v1, but it has [INST] but no [SYSTEM_PROMPT]"),
])
def test_the_content_decides_the_version(tmp_path, key, name, version, note):
    tok = load_tokenizer(_renamed(tmp_path, key, name))
    assert tok.version == version
    assert [n for n in tok.notes if note and note in n] if note else tok.notes == []


def test_why_the_name_cannot_be_trusted(tmp_path):
    """mistral-common goes by the suffix: a v1 file named .v3 gets <unk> (id 0) where [INST] and
    [/INST] should be, a v7 file named .v3 loses its [SYSTEM_PROMPT] format. v2 pieces named .v3 give
    the same prompt either way, which is why the name may choose between those two."""
    msgs = [("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye")]
    v1_as_v3 = oracle_chat(_renamed(tmp_path / "a", "v1", "tokenizer.model.v3"), msgs, None)
    assert v1_as_v3[1] == 0 and v1_as_v3.count(0) == 4  # <unk> for each [INST] and [/INST]
    v7_as_v3 = oracle_chat(_renamed(tmp_path / "b", "v7", "tokenizer.model.v3"), msgs, "Be brief.")
    assert v7_as_v3 != oracle_chat(shipped("v7"), msgs, "Be brief.")
    both = _renamed(tmp_path / "c", "v2", "tokenizer.model.v3")  # (oracle() caches by path)
    assert oracle_chat(both, msgs, "Be brief.") == oracle_chat(shipped("v2"), msgs, "Be brief.") == encode_chat(
        load_tokenizer(both), [Message(r, c) for r, c in msgs], "Be brief.")


def test_load_tokenizer_picks_the_kind_by_name(tmp_path):
    assert isinstance(load_tokenizer(small_tekken(tmp_path / "tekken.json")), TekkenTokenizer)
    assert isinstance(load_tokenizer(shipped("v3")), Tokenizer)
    fake = tmp_path / "other" / "tekken.json"
    fake.parent.mkdir()
    shutil.copyfile(shipped("v3"), fake)
    with pytest.raises(ReleaseError, match="tekken.json: not valid JSON"):
        load_tokenizer(fake)


# -- finding the file ----------------------------------------------------------------------------


def test_candidates_in_mistral_inference_order(tmp_path):
    names = ["tokenizer.model", "tokenizer.model.v1", "tokenizer.model.v2", "tokenizer.model.v3", "tokenizer.model.v7",
             "tokenizer.model.v7m1", "tekken.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model.bak",
             "tekken.json.orig"]
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    (tmp_path / "tokenizer.model.v11").mkdir()  # not a file
    assert [p.name for p in tokenizer_candidates(tmp_path)] == [
        "tekken.json", "tokenizer.model.v7", "tokenizer.model.v7m1", "tokenizer.model.v3", "tokenizer.model.v2",
        "tokenizer.model.v1", "tokenizer.model"]


def test_find_one_file(tmp_path):
    _renamed(tmp_path, "v1", "tokenizer.model")
    assert find_tokenizer(tmp_path) == tmp_path / "tokenizer.model"


def test_identical_copies_are_fine(tmp_path):
    """Hugging Face repos ship tokenizer.model beside tokenizer.model.v3; mistral-common ships
    .v7 beside .v7m1."""
    _renamed(tmp_path, "v3", "tokenizer.model")
    _renamed(tmp_path, "v3", "tokenizer.model.v3")
    assert find_tokenizer(tmp_path) == tmp_path / "tokenizer.model.v3"
    (tmp_path / "tokenizer.model").unlink()
    (tmp_path / "tokenizer.model.v3").unlink()
    _renamed(tmp_path, "v7", "tokenizer.model.v7")
    _renamed(tmp_path, "v7", "tokenizer.model.v7m1")
    assert find_tokenizer(tmp_path) == tmp_path / "tokenizer.model.v7"


def test_same_pieces_in_different_bytes_are_fine(tmp_path):
    _renamed(tmp_path, "v3", "tokenizer.model.v3")
    # The same model plus a protobuf field SentencePiece does not know: other bytes, same vocabulary.
    (tmp_path / "tokenizer.model").write_bytes(shipped("v3").read_bytes() + b"\xa0\x06\x01")
    assert Tokenizer(tmp_path / "tokenizer.model").vocab_size == 32768
    assert find_tokenizer(tmp_path) == tmp_path / "tokenizer.model.v3"


@pytest.mark.parametrize("files", [
    [("tekken_240911", "tekken.json"), ("v3", "tokenizer.model.v3")],
    [("v3", "tokenizer.model.v3"), ("v1", "tokenizer.model")],
    [("v7", "tokenizer.model.v7"), ("v3", "tokenizer.model.v3")],
])
def test_two_different_tokenizers_are_an_error(tmp_path, files):
    for key, name in files:
        _renamed(tmp_path, key, name)
    (tmp_path / "tokenizer.json").write_text("{}")  # Hugging Face's file is not a candidate
    with pytest.raises(ReleaseError) as info:
        find_tokenizer(tmp_path)
    msg = str(info.value)
    assert f"{files[0][1]} and {files[1][1]}" in msg and "keep the one shipped with these weights" in msg
    assert msg.startswith(str(tmp_path)) and "\n" not in msg


def test_a_broken_second_copy_is_a_disagreement(tmp_path):
    _renamed(tmp_path, "v3", "tokenizer.model.v3")
    (tmp_path / "tokenizer.model").write_bytes(b"garbage")
    with pytest.raises(ReleaseError, match="tokenizer.model.v3 and tokenizer.model; keep the one"):
        find_tokenizer(tmp_path)


def test_no_tokenizer(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ReleaseError) as info:
        find_tokenizer(tmp_path)
    msg = str(info.value)
    assert msg.startswith(f"{tmp_path}: no tokenizer file")
    assert "tekken.json, tokenizer.model.v7, tokenizer.model.v3, tokenizer.model.v2, tokenizer.model.v1, " \
           "tokenizer.model: missing" in msg


def test_sentencepiece_size_bound(tmp_path):
    path = tmp_path / "tokenizer.model"
    with open(path, "wb") as f:
        f.truncate(65 << 20)
    with pytest.raises(ReleaseError, match="too large for a tokenizer"):
        load_tokenizer(path)


# -- streaming a SentencePiece reply --------------------------------------------------------------


@pytest.fixture(scope="module", params=["v1", "v7"])
def sp(request):
    return ours(shipped(request.param))


def test_a_real_replacement_character_is_not_held_back(sp):
    ids = sp.encode("a\ufffdb", bos=False)
    dec = StreamDecoder(sp)
    deltas = [dec.push(i) for i in ids]
    at = next(k for k, d in enumerate(deltas) if "\ufffd" in d)
    assert "".join(deltas[: at + 1]) == "a\ufffd"  # out with its own id, before "b" came
    # Spelled in byte pieces: out with the third byte.
    byte = [sp.sp.piece_to_id(f"<0x{b:02X}>") for b in "\ufffd".encode()]
    dec = StreamDecoder(sp)
    assert [dec.push(i) for i in byte] == ["", "", "\ufffd"]


def test_a_run_of_replacement_characters_streams(sp):
    text = "x" + "\ufffd" * 30 + "y"
    ids = sp.encode(text, bos=False)
    dec = StreamDecoder(sp)
    deltas = [dec.push(i) for i in ids]
    assert "".join(deltas) == text and deltas[-2] != ""
    assert dec.flush() == ""


def test_unfinished_byte_pieces_still_wait(sp):
    euro = [sp.sp.piece_to_id(f"<0x{b:02X}>") for b in "€".encode()]
    dec = StreamDecoder(sp)
    assert [dec.push(i) for i in euro] == ["", "", "€"]
    dec = StreamDecoder(sp)
    assert [dec.push(i) for i in euro[:2]] == ["", ""] and dec.flush() == sp.decode(euro[:2])
