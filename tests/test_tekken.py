"""tekken.json against mistral-common's Tekkenizer: ids, text, vocabulary size, special tokens,
streaming, and what a broken file gives."""

from __future__ import annotations

import json
import random

import pytest
from mistral_common.tokens.tokenizers.tekken import Tekkenizer
from mistral_oracle import b64, oracle, ours, shipped, small_tekken

from mixchat.errors import ReleaseError
from mixchat.text.tekken import LEGACY_SPECIAL_TOKENS, TekkenTokenizer
from mixchat.text.tokenizer import MAX_TOKENIZER_BYTES, StreamDecoder, load_tokenizer

TEKKEN_FILES = ["tekken_240718", "tekken_240911"]

CORPUS = [
    "Hello world, this is a test.",
    "The quick brown fox jumps over the lazy dog. It's 3:45 p.m.; costs $12.50 (≈ €11,60).",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n\n\nclass A(B):\n\tpass\n",
    "for (int i = 0; i < n; ++i) { a[i] = b[i] << 2 | c; }\r\n",
    "   leading spaces", "trailing spaces   ", "\n\n\n", " ", "\t\t\t x \t", " \n \n ", "a  b   c    d" + " " * 40,
    "Emoji: 😀🎉👩‍👩‍👧 and 🇫🇷 flags, 🏳️‍🌈, 👍🏽 then text.",
    "日本語のテキストと中文文本，还有한국어. 𠜎𠜱𠝹𠱓 (astral CJK)",
    "Café crème, naïve façade, Ærøskøbing, Straße; e\u0301 (combining) and ﬁ ligature.",
    "العربية עברית Ελληνικά Русский हिन्दी ไทย",
    "U+FFFD in the text: \ufffd, twice \ufffd\ufffd, alone:", "\ufffd",
    "control chars: \x00 \x01 \x07 \x1b[31mred\x1b[0m \x7f \x9b \u200b\u200d\ufeff",
    "[INST] not a control [/INST] </s> <s> <unk> [SYSTEM_PROMPT] x [/SYSTEM_PROMPT] <SPECIAL_20> [TOOL_CALLS]",
    "<|im_start|>user\nhi<|im_end|> <b>bold</b> [b]bb[/b] {{ template }} ${var} %s \\n",
    "Pneumonoultramicroscopicsilicovolcanoconiosis " * 3,
    "x" * 20000,
    "antidisestablishmentarianism" * 400,
    "🙂" * 300,
    "1234567890" * 50 + " 3.14159265358979 1e-10 0x1F",
    "",
]


@pytest.fixture(scope="module", params=TEKKEN_FILES)
def pair(request):
    path = shipped(request.param)
    return ours(path), oracle(path).instruct_tokenizer.tokenizer


def test_ids_and_settings_match_mistral_common(pair):
    tok, ref = pair
    assert (tok.kind, tok.version, tok.vocab_size, tok.num_special) == ("tekken", "v3", ref.n_words,
                                                                        ref.num_special_tokens)
    assert (tok.bos_id, tok.eos_id) == (ref.bos_id, ref.eos_id) == (1, 2)
    for name in LEGACY_SPECIAL_TOKENS:
        assert tok.control_id(name) == ref.get_special_token(name)
    assert tok.control_id("<SPECIAL_999>") == 999 and tok.control_id("[THINK]") is None
    assert tok.control_id("hello") is None


@pytest.mark.parametrize("bos, eos", [(True, False), (False, False), (True, True)])
def test_encode_decode_match_mistral_common(pair, bos, eos):
    tok, ref = pair
    for text in CORPUS:
        ids = tok.encode(text, bos=bos, eos=eos)
        assert ids == ref.encode(text, bos=bos, eos=eos), text[:40]
        body = ids[bos: len(ids) - eos]
        assert all(i >= tok.num_special for i in body), "text became a special id"
        assert tok.decode(ids) == ref.decode(ids) == text


def test_lone_surrogates_become_replacement_characters_as_in_mistral_common(pair):
    """mixchat's own inputs are valid UTF-8, but a str can hold surrogates: tiktoken's rule applies."""
    tok, ref = pair
    text = "a\ud800b \udfff c\ud83d"
    assert tok.encode(text) == ref.encode(text, bos=True, eos=False)
    assert tok.decode(tok.encode(text)) == "a\ufffdb \ufffd c\ufffd"


def test_decode_of_any_ids_matches_mistral_common(pair):
    """Random ids, specials among them and raw byte ranks that make invalid UTF-8."""
    tok, ref = pair
    rng = random.Random(0)
    n = tok.num_special
    for _ in range(200):
        ids = [rng.choice([rng.randrange(0, 40), rng.randrange(n, n + 256), rng.randrange(n, tok.vocab_size)])
               for _ in range(rng.randrange(1, 25))]
        assert tok.decode(ids) == ref.decode(ids)


def test_ids_past_the_vocabulary_are_refused(pair):
    tok, _ = pair
    with pytest.raises(IndexError):
        tok.decode([tok.vocab_size])


# -- the vocabulary size -------------------------------------------------------------------------


def test_vocabulary_is_cut_to_default_vocab_size_as_mistral_common_does(tmp_path):
    """The file holds 6000 ranks; default_vocab_size 4100 with 100 special ids uses the first 4000."""
    path = small_tekken(tmp_path / "tekken.json", "v3", n_vocab=6000, vocab_size=4100, n_special=100)
    tok, ref = load_tokenizer(path), oracle(path).instruct_tokenizer.tokenizer
    assert tok.vocab_size == ref.n_words == 4100
    for text in CORPUS:
        ids = tok.encode(text)
        assert ids == ref.encode(text, bos=True, eos=False)
        assert max(ids) < 4100
    # All 6000 would split the same text into fewer pieces: the cut is real.
    full = load_tokenizer(small_tekken(tmp_path / "full.json", "v3", n_vocab=6000, n_special=100))
    assert full.vocab_size == 6100 and len(full.encode(CORPUS[1])) < len(tok.encode(CORPUS[1]))

    tok.check_vocab(4100, tmp_path / "params.json")
    with pytest.raises(ReleaseError, match=r"tekken.json: has 4100 ids \(100 special \+ 4000 BPE, its "
                                           r"default_vocab_size\) but .*params.json says vocab_size 6100; this "
                                           "tokenizer belongs to another model"):
        tok.check_vocab(6100, tmp_path / "params.json")


def test_real_tekken_vocab_size_is_what_mistral_nemo_declares():
    tok = ours(shipped("tekken_240911"))
    tok.check_vocab(131072, shipped("tekken_240911"))  # Mistral-Nemo's params.json vocab_size
    with pytest.raises(ReleaseError):
        tok.check_vocab(150000 + 1000, shipped("tekken_240911"))


def test_special_tokens_come_from_the_file(tmp_path):
    """A v7 file with its own list: ids are its ranks, the rest are <SPECIAL_i> fillers."""
    names = ["<unk>", "<s>", "</s>", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[INST]", "[/INST]", "[IMG]"]
    path = small_tekken(tmp_path / "tekken.json", "v7", n_special=50, special=names)
    tok, ref = load_tokenizer(path), Tekkenizer.from_file(path)
    assert tok.version == "v7"
    for name in names + ["<SPECIAL_8>", "<SPECIAL_49>"]:
        assert tok.control_id(name) == ref.get_special_token(name)
    assert tok.control_id("[TOOL_CALLS]") is None and tok.control_id("<SPECIAL_50>") is None
    for text in CORPUS[:12]:
        assert tok.encode(text) == ref.encode(text, bos=True, eos=False)


# -- streaming -----------------------------------------------------------------------------------


def stream(tok, ids: list[int]) -> list[str]:
    dec = StreamDecoder(tok)
    deltas = [dec.push(i) for i in ids]
    deltas.append(dec.flush())
    return deltas


@pytest.mark.parametrize("text", [t for t in CORPUS if len(t) < 2000])
def test_stream_deltas_join_to_the_full_decode(text):
    tok = ours(shipped("tekken_240911"))
    ids = tok.encode(text, bos=False)
    deltas = stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids) == text
    if "\ufffd" not in text:
        assert not any("\ufffd" in d for d in deltas)


def test_a_character_split_across_tokens_waits_for_its_last_byte():
    tok = ours(shipped("tekken_240911"))
    text = "🫠 𠜎 🦩 ok"
    ids = tok.encode(text, bos=False)
    # The test means something only if some token holds part of a character.
    partial = [i for i in ids if not _decodes(tok.token_bytes(i))]
    assert len(partial) >= 2
    deltas = stream(tok, ids)
    assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)
    assert any(d == "" for d in deltas[:-1])  # held back at least once
    # The four bytes of 🫠 one id at a time: nothing until the last, then the character.
    n = tok.num_special
    assert stream(tok, [n + b for b in "🫠".encode()]) == ["", "", "", "🫠", ""]


def _decodes(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_a_real_replacement_character_goes_out_at_once():
    tok = ours(shipped("tekken_240911"))
    ids = tok.encode("a\ufffd", bos=False)
    deltas = [StreamDecoder(tok).push(i) for i in ids]  # a fresh decoder per id: each alone must emit
    dec = StreamDecoder(tok)
    assert "".join(dec.push(i) for i in ids) == "a\ufffd"  # before any flush
    assert "\ufffd" in "".join(deltas)
    n = tok.num_special
    dec = StreamDecoder(tok)
    assert [dec.push(n + b) for b in b"\xef\xbf\xbd\xef\xbf\xbd"] == ["", "", "\ufffd", "", "", "\ufffd"]


def test_invalid_bytes_and_special_ids_stream_as_decode_has_them():
    tok = ours(shipped("tekken_240911"))
    rng = random.Random(1)
    n = tok.num_special
    for _ in range(300):
        ids = [rng.choice([rng.randrange(0, 30), rng.randrange(n, n + 256), rng.randrange(n + 256, n + 5000)])
               for _ in range(rng.randrange(1, 20))]
        assert "".join(stream(tok, ids)) == tok.decode(ids)
    # A character cut by a special id is two broken halves, as mistral-common decodes it.
    cut = [n + 0xE2, n + 0x82, 3, n + 0xAC]
    assert "".join(stream(tok, cut)) == tok.decode(cut) == oracle(shipped("tekken_240911")).decode(cut)
    assert "".join(stream(tok, [n + 0xE2])) == "\ufffd"  # the model stopped mid-character: flushed


# -- broken files --------------------------------------------------------------------------------


def _doc(n_vocab: int = 300, version: str = "v3", special: list[str] | None = None) -> dict:
    vocab = [{"rank": i, "token_bytes": b64(bytes([i])), "token_str": None} for i in range(256)]
    vocab += [{"rank": 256 + k, "token_bytes": b64(bytes([97 + k % 26, 97 + k // 26])), "token_str": None}
              for k in range(n_vocab - 256)]
    doc = {"config": {"pattern": r"\s+|\S+", "num_vocab_tokens": n_vocab, "default_vocab_size": n_vocab + 30,
                      "default_num_special_tokens": 30, "version": version}, "vocab": vocab}
    if special is not None:
        doc["special_tokens"] = [{"rank": i, "token_str": s, "is_control": True} for i, s in enumerate(special)]
    return doc


def _with(**changes):
    def make(doc):
        for where, value in changes.items():
            obj = doc
            *keys, last = where.split("__")
            for k in keys:
                obj = obj[int(k)] if isinstance(obj, list) else obj[k]
            if value is _DELETE:
                del obj[last]
            elif isinstance(obj, list):
                obj[int(last)] = value
            else:
                obj[last] = value
        return json.dumps(doc)
    return make


_DELETE = object()
V7_SPECIAL = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]

BROKEN = {
    "empty file": (lambda d: "", "not valid JSON"),
    "truncated": (lambda d: json.dumps(d)[:500], "not valid JSON"),
    "not UTF-8": (lambda d: b"\xff\xfe{}", "not valid JSON"),
    "nested a million deep": (lambda d: "[" * 1_000_000, "not valid JSON"),
    "a list": (lambda d: "[1, 2]", "the JSON is a list, not an object"),
    "no config": (_with(config=_DELETE), "the file has no 'config'"),
    "no vocab": (_with(vocab=_DELETE), "the file has no 'vocab'"),
    "vocab not a list": (_with(vocab={"a": 1}), "vocab is dict, not list"),
    "version unknown": (_with(config__version="v15"), "instruct format version 'v15', which this mixchat cannot"),
    "version a number": (_with(config__version=3), "config.version is int, not str"),
    "vocab size a string": (_with(config__default_vocab_size="131072"), "default_vocab_size is str, not int"),
    "vocab size a bool": (_with(config__default_num_special_tokens=True), "is bool, not int"),
    "vocab size larger than the file": (_with(config__default_vocab_size=100_000), "(truncated?)"),
    "vocab size absurd": (_with(config__default_vocab_size=10**30), "expected 256 to"),
    "special count negative": (_with(config__default_num_special_tokens=-5), "expected 3 to"),
    "no room for bytes": (_with(config__default_vocab_size=200), "leaves 170 ids"),
    "rank out of order": (_with(vocab__260__rank=7), "vocab entry 260 is not"),
    "entry not an object": (_with(vocab__3="AAA="), "vocab entry 3 is not"),
    "bad base64": (_with(vocab__270__token_bytes="@@@"), "vocab entry 270 has token_bytes that are not base64"),
    "byte ranks out of order": (_with(vocab__65__token_bytes=b64(b"B")), "the first 256 ranks must be the single"),
    "duplicate bytes": (_with(vocab__280__token_bytes=b64(b"ba")), "are the same bytes"),
    "pattern not a regex": (_with(config__pattern="(unclosed"), "config.pattern is not a usable regex"),
    "special_tokens not a list": (_with(special_tokens="<s>"), "special_tokens is str, not a list"),
    "special rank wrong": (_with(special_tokens=[{"rank": 5, "token_str": "<s>", "is_control": True}]),
                           "special token 0 is not"),
    "too many specials": (_with(special_tokens=[{"rank": i, "token_str": f"<t{i}>", "is_control": True}
                                                for i in range(31)]), "lists 31 special tokens"),
    "duplicate special": (_with(special_tokens=[{"rank": i, "token_str": s, "is_control": True}
                                                for i, s in enumerate(["<s>", "</s>", "<s>"])]),
                          "special tokens 0 and 2 are both '<s>'"),
    "no [INST]": (_with(special_tokens=[{"rank": i, "token_str": s, "is_control": True}
                                        for i, s in enumerate(["<unk>", "<s>", "</s>"])]),
                  "no [INST] special token, which instruct format v3 needs"),
    "v7 without [SYSTEM_PROMPT]": (
        _with(config__version="v7", special_tokens=[{"rank": i, "token_str": s, "is_control": True}
                                                    for i, s in enumerate(V7_SPECIAL[:5])]),
        "no [SYSTEM_PROMPT] special token, which instruct format v7 needs"),
    "v13 without a special list": (_with(config__version="v13"), "has no special_tokens list (required after v7)"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_file_is_one_line_naming_it(tmp_path, case):
    make, words = BROKEN[case]
    path = tmp_path / "tekken.json"
    data = make(_doc())
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    with pytest.raises(ReleaseError) as info:
        TekkenTokenizer(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: ") and words in msg and "\n" not in msg, msg
    assert len(msg) < 400


def test_the_hand_made_file_itself_loads(tmp_path):
    path = tmp_path / "tekken.json"
    path.write_text(json.dumps(_doc(special=V7_SPECIAL)))
    tok = TekkenTokenizer(path)
    ab = 30 + 256 + 26  # "ab" is rank 256 + 26
    assert tok.vocab_size == 330 and tok.encode("ab ab", bos=False) == [ab, 30 + 32, ab]
    assert tok.decode(tok.encode("[INST] ab")) == "[INST] ab"


def test_a_half_copied_real_file(tmp_path):
    path = tmp_path / "tekken.json"
    data = shipped("tekken_240718").read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ReleaseError, match="tekken.json: not valid JSON"):
        load_tokenizer(path)


def test_an_oversized_file_is_not_read(tmp_path):
    path = tmp_path / "tekken.json"
    with open(path, "wb") as f:
        f.truncate(MAX_TOKENIZER_BYTES + 1)  # sparse: costs no disk
    with pytest.raises(ReleaseError, match="too large for a tokenizer"):
        load_tokenizer(path)


def test_a_missing_file(tmp_path):
    with pytest.raises(ReleaseError, match="tekken.json: missing"):
        load_tokenizer(tmp_path / "tekken.json")
