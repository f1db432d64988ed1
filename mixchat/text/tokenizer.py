"""The tokenizer of a release folder: which file, which kind, which instruct format.

Two kinds, one interface (TextTokenizer below):
- SentencePiece (`tokenizer.model`, `tokenizer.model.v1` ... `.v7`, `.v7m1`): class Tokenizer here.
- tekken (`tekken.json`, a tiktoken-style byte-level BPE): class TekkenTokenizer in mixchat/text/tekken.py.

`find_tokenizer(folder)` picks the file in mistral-inference's order of preference (TOKENIZER_NAMES);
`load_tokenizer(path)` opens it as the right kind. New code calls these; `Tokenizer(path)` stays the
SentencePiece class for the call sites that name a tokenizer.model directly.

The instruct format (`version`) comes from the file's CONTENT, never from a folder name:
- tekken.json says it: config.version.
- SentencePiece: the control pieces, which is how mistral-common's own files differ
  (tokenizer.model.v1: only <unk> <s> </s>; _240216.model.v2: [INST] [/INST] and the tool pieces;
  _240323.model.v3: those and [IMG] [PREFIX] [MIDDLE] [SUFFIX]; _241114.model.v7: those and
  [IMG_BREAK] [IMG_END] [SYSTEM_PROMPT] [/SYSTEM_PROMPT] [TOOL_CONTENT]). No [INST] control piece:
  v1 ([INST] is written as text). [SYSTEM_PROMPT] and [/SYSTEM_PROMPT]: v7. Otherwise v2 or v3.
  mistral-common itself goes by the file name's suffix (.v3), but a name can lie where pieces
  cannot: a v7 format needs the [SYSTEM_PROMPT] pieces to exist, and a v1 file asked for [INST] as a
  control id would fail. So where suffix and pieces disagree about the format, the pieces win (and
  `notes` says so). v2 and v3 write a plain chat identically (they differ in tool calls only) and
  their files cannot always be told apart by pieces (Mistral-7B-Instruct-v0.3's tokenizer.model.v3
  has the v2 file's pieces), so between those two alone the suffix names the version; without one,
  [IMG] means v3.
"""

from __future__ import annotations

import codecs
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from mixchat.errors import ReleaseError

if TYPE_CHECKING:
    from mixchat.text.tekken import TekkenTokenizer

MAX_TOKENIZER_BYTES = 64 << 20  # SentencePiece files are ~0.5 MB, tekken.json 15-20 MB

# mistral-inference's order of preference. A SentencePiece name may carry mistral-common's
# multimodal suffix (tokenizer.model.v7m1): same pieces, the image settings are not mixchat's concern.
TOKENIZER_NAMES = ("tekken.json", "tokenizer.model.v7", "tokenizer.model.v3", "tokenizer.model.v2",
                   "tokenizer.model.v1", "tokenizer.model")
_SP_SUFFIX = re.compile(r"\.model\.(v\d{1,3})(m\d{1,3})?$")


@runtime_checkable
class TextTokenizer(Protocol):
    """What every tokenizer mixchat loads provides (SentencePiece `Tokenizer`, `TekkenTokenizer`).

    path        the file it was read from
    kind        "sentencepiece" | "tekken"
    vocab_size  ids the model must have (its embedding rows): params.json's vocab_size must equal it
    bos_id, eos_id
    version     the instruct format the file implies: "v1" | "v2" | "v3" | "v7" (tekken also "v11",
                "v13", which write a plain chat as v7 does); read from the file's content
    notes       things worth telling the user (a file name that contradicts the content)
    encode(text, bos=True, eos=False) -> ids; control pieces written in the text stay text
    decode(ids) -> text; control ids decode to nothing
    control_id(piece) -> the id of a control piece such as "[INST]", or None if the file has none
    check_vocab(vocab_size, params_path) raises ReleaseError when params.json disagrees
    """

    path: Path
    kind: str
    vocab_size: int
    bos_id: int
    eos_id: int
    version: str
    notes: list[str]

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def control_id(self, piece: str) -> int | None: ...

    def check_vocab(self, vocab_size: int, params: Path) -> None: ...


def read_tokenizer_file(path: Path, name: str) -> bytes:
    """The file's bytes, within MAX_TOKENIZER_BYTES; every failure as one line naming the file."""
    fix = f"copy the {name} shipped with the release into the folder"
    try:
        if not path.is_file():
            raise ReleaseError(f"{path}: missing; {fix}")
        size = path.stat().st_size
        if size > MAX_TOKENIZER_BYTES:
            raise ReleaseError(f"{path}: {size} bytes, too large for a tokenizer (they are at most a few tens "
                               f"of MB); use the {name} shipped with the release")
        with open(path, "rb") as f:
            data = f.read(MAX_TOKENIZER_BYTES + 1)
    except PermissionError:
        raise ReleaseError(f"{path}: permission denied; make it readable (chmod a+r) or run mixchat as the "
                           "file's owner") from None
    except OSError as exc:
        raise ReleaseError(f"{path}: cannot read ({exc.strerror}); {fix}") from None
    if len(data) > MAX_TOKENIZER_BYTES:  # grew while we looked
        raise ReleaseError(f"{path}: too large for a tokenizer; use the {name} shipped with the release")
    return data


def suffix_version(path: Path) -> str | None:
    """The version a SentencePiece file's name claims (tokenizer.model.v3 -> "v3"), None without one."""
    m = _SP_SUFFIX.search(Path(path).name)
    return m[1] if m else None


class Tokenizer:
    """A SentencePiece tokenizer.model, with Mistral's special ids checked on load."""

    kind = "sentencepiece"

    def __init__(self, path: str | Path) -> None:
        import sentencepiece  # deferred: keeps `mixchat --help` instant

        path = Path(path)
        self.path = path
        data = read_tokenizer_file(path, "tokenizer.model")
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(data)
        except (RuntimeError, OSError) as exc:
            raise ReleaseError(
                f"{path}: not a SentencePiece model ({str(exc).splitlines()[0][:80]}); "
                "use the tokenizer.model shipped with the release"
            ) from None
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ReleaseError(f"{path}: has no BOS/EOS pieces, so it is not a Mistral tokenizer")
        self.notes: list[str] = []
        self.version = self._version()

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    def control_id(self, piece: str) -> int | None:
        """The id of a control piece such as [INST], or None if the model has no such piece."""
        i = self.sp.piece_to_id(piece)
        return i if i != self.sp.unk_id() and self.sp.is_control(i) else None

    def _version(self) -> str:
        """The instruct format, from the control pieces (see the module docstring)."""
        named = suffix_version(self.path)
        if self.control_id("[INST]") is None or self.control_id("[/INST]") is None:
            found, fits, why = "v1", ("v1",), "it has no [INST] control piece"
        elif self.control_id("[SYSTEM_PROMPT]") is not None and self.control_id("[/SYSTEM_PROMPT]") is not None:
            found, fits, why = "v7", ("v7",), "it has [SYSTEM_PROMPT] control pieces"
        else:
            found = "v3" if self.control_id("[IMG]") is not None else "v2"
            fits, why = ("v2", "v3"), "it has [INST] but no [SYSTEM_PROMPT] control pieces"
        if named in fits:
            return named  # the name agrees, or chooses between v2 and v3, which the pieces cannot always tell
        if named is not None:
            self.notes.append(f"{self.path.name}: named {named}, but {why}; mixchat writes the {'/'.join(fits)} "
                              "chat format its pieces imply")
        return found

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))

    def decode_bytes(self, ids: list[int]) -> bytes:
        """UTF-8 of decode(ids) (SentencePiece already turns invalid byte pieces into U+FFFD)."""
        return self.sp.decode(list(ids), out_type=bytes)

    def byte_value(self, token_id: int) -> int | None:
        """The byte a byte-fallback piece (<0xE2>) stands for, None for any other piece."""
        if not self.sp.is_byte(token_id):
            return None
        return int(self.sp.id_to_piece(token_id)[3:5], 16)

    def check_vocab(self, vocab_size: int, params: Path) -> None:
        if vocab_size != self.vocab_size:
            raise ReleaseError(
                f"{self.path}: has {self.vocab_size} pieces but {params} says vocab_size {vocab_size}; "
                "this tokenizer belongs to another model, use the one shipped with these weights"
            )


SentencePieceTokenizer = Tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer | TekkenTokenizer:
    """The tokenizer in `path`: tekken for a .json file, SentencePiece otherwise (mistral-common's
    rule: the kind follows the name, the format the content)."""
    path = Path(path)
    if path.name.endswith(".json"):
        from mixchat.text.tekken import TekkenTokenizer

        return TekkenTokenizer(path)
    return Tokenizer(path)


def _rank(name: str) -> tuple:
    """Sort key: mistral-inference's order (tekken.json, .v7, .v3, .v2, .v1, tokenizer.model),
    other versions by number, and a multimodal variant (.v7m1) right after its plain name."""
    if name == "tekken.json":
        return (0,)
    m = re.fullmatch(r"tokenizer\.model\.v(\d{1,3})(?:m(\d{1,3}))?", name)
    if m:
        return (1, -int(m[1]), int(m[2] or 0))
    return (2,)


def tokenizer_candidates(folder: str | Path) -> list[Path]:
    """The tokenizer files in `folder`, most preferred first; nothing is read or checked."""
    folder = Path(folder)
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    found = [n for n in names if n == "tekken.json" or re.fullmatch(r"tokenizer\.model(\.v\d{1,3}(m\d{1,3})?)?", n)]
    return [folder / n for n in sorted(found, key=_rank) if (folder / n).is_file()]


def _same_tokenizer(a: Path, b: Path) -> bool:
    """Byte-identical, or two SentencePiece files with the same pieces, scores and kinds of piece
    (Hugging Face repos ship tokenizer.model beside tokenizer.model.v3)."""
    if a.stat().st_size == b.stat().st_size and read_tokenizer_file(a, a.name) == read_tokenizer_file(b, b.name):
        return True
    if a.name.endswith(".json") or b.name.endswith(".json"):
        return False
    try:
        x, y = Tokenizer(a), Tokenizer(b)
    except ReleaseError:
        return False
    if x.vocab_size != y.vocab_size:
        return False
    probe = "Hello, world! [INST] 1 234 ünïcödé 日本語 😀\n\t  x"
    return x.sp.encode(probe) == y.sp.encode(probe) and all(
        x.sp.id_to_piece(i) == y.sp.id_to_piece(i) and x.sp.get_score(i) == y.sp.get_score(i)
        and x.sp.is_control(i) == y.sp.is_control(i) and x.sp.is_byte(i) == y.sp.is_byte(i)
        and x.sp.is_unknown(i) == y.sp.is_unknown(i) and x.sp.is_unused(i) == y.sp.is_unused(i)
        for i in range(x.vocab_size))


def find_tokenizer(folder: str | Path) -> Path:
    """The tokenizer file of a release folder, in mistral-inference's order of preference. Two files
    that say different things are an error (which one the weights were trained with cannot be
    known); identical copies are fine."""
    folder = Path(folder)
    found = tokenizer_candidates(folder)
    if not found:
        raise ReleaseError(f"{folder}: no tokenizer file (looked for {', '.join(TOKENIZER_NAMES)}: missing); copy "
                           "the tokenizer shipped with the release into the folder")
    first = found[0]
    for other in found[1:]:
        if not _same_tokenizer(first, other):
            raise ReleaseError(f"{folder}: holds two different tokenizers, {first.name} and {other.name}; keep the "
                               "one shipped with these weights and move the other out of the folder")
    return first


def _incomplete_utf8(data: bytes) -> bool:
    """Whether `data` ends in the first bytes of a UTF-8 character that more bytes could complete."""
    dec = codecs.getincrementaldecoder("utf-8")("replace")
    dec.decode(data[-4:])
    return bool(dec.getstate()[0])


class StreamDecoder:
    """Turns ids into text deltas whose concatenation is exactly tokenizer.decode(all ids), never
    ending in half a character. Works for both kinds.

    tekken is byte-level: each id is bytes, fed to an incremental UTF-8 decoder that holds back an
    unfinished character until its last byte arrives (a real U+FFFD, bytes EF BF BD, is complete and
    goes out at once). A special id ends the run, as decode() decodes each run on its own.

    SentencePiece cannot be decoded piece by piece: the leading "▁" of the first piece is dropped
    only at the start of a text, and byte-fallback pieces (<0xE2><0x82><0xAC>) form a character
    only together. So each step decodes a short window of recent ids twice, with and without the
    new ones, and emits the difference; while the window ends in a character whose byte pieces are
    not all there (decoded as U+FFFD) it waits for more ids. A U+FFFD that is really in the text
    (its own piece, or all three of its bytes) goes out with its id.
    """

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start: context ids whose text was already emitted
        self.read = 0  # ids up to here have been emitted
        self._bytes = getattr(tokenizer, "kind", "sentencepiece") == "tekken"
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        if self._bytes:
            tok = self.tokenizer
            if tok.is_special(token_id):
                tail = self._utf8.decode(b"", final=True)
                self._utf8.reset()
                return tail
            return self._utf8.decode(tok.token_bytes(token_id))
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        after = self.tokenizer.decode(self.ids[self.prefix :])
        if len(after) <= len(before) or (after.endswith("\ufffd") and self._unfinished()):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :]

    def _unfinished(self) -> bool:
        """SentencePiece: whether the window's trailing U+FFFD stands for a character still being
        spelled in byte pieces, rather than one really in the text."""
        tok, raw = self.tokenizer, bytearray()
        for i in reversed(self.ids[self.prefix :]):
            b = tok.byte_value(i) if hasattr(tok, "byte_value") else None
            if b is None:
                break
            raw.insert(0, b)
            if len(raw) == 4:
                break
        if not raw:
            # The last piece is no byte: U+FFFD is its text (the "�" piece), or the pieces before it
            # were an invalid sequence that no later byte can repair.
            return not tok.decode(self.ids[-1:]).endswith("\ufffd")
        return _incomplete_utf8(bytes(raw)) or not raw.endswith(b"\xef\xbf\xbd")

    def flush(self) -> str:
        """Whatever is held back (a byte sequence the model never completed)."""
        if self._bytes:
            tail = self._utf8.decode(b"", final=True)
            self._utf8.reset()
            return tail
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        after = self.tokenizer.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :]
