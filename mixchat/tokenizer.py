"""SentencePiece tokenizer of a release folder, with Mistral's special ids checked on load."""

from __future__ import annotations

from pathlib import Path

from mixchat.errors import ReleaseError

MAX_TOKENIZER_BYTES = 64 << 20


class Tokenizer:
    def __init__(self, path: str | Path) -> None:
        import sentencepiece  # deferred: keeps `mixchat --help` instant

        path = Path(path)
        if not path.is_file():
            raise ReleaseError(f"{path}: missing; copy the tokenizer.model shipped with the release into the folder")
        self.path = path
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            if path.stat().st_size > MAX_TOKENIZER_BYTES:
                raise ReleaseError(f"{path}: {path.stat().st_size} bytes, too large for a tokenizer (they are a few "
                                   "MB); use the tokenizer.model shipped with the release")
            data = path.read_bytes()
        except PermissionError:
            raise ReleaseError(f"{path}: permission denied; make it readable (chmod a+r) or run mixchat as the "
                               "file's owner") from None
        except OSError as exc:
            raise ReleaseError(f"{path}: cannot read ({exc.strerror}); copy the tokenizer.model shipped with the "
                               "release into the folder") from None
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

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    def control_id(self, piece: str) -> int | None:
        """The id of a control piece such as [INST], or None if the model has no such piece."""
        i = self.sp.piece_to_id(piece)
        return i if i != self.sp.unk_id() and self.sp.is_control(i) else None

    @property
    def version(self) -> str:
        """Which instruct format the file implies, told by its pieces as mistral-common's files differ:
        'v1' writes [INST] as plain text (Mistral-7B, Mixtral); 'v2' and 'v3' (32768 pieces) have
        [INST]/[/INST] control pieces, and v3 adds [IMG]."""
        if self.control_id("[INST]") is None:
            return "v1"
        return "v3" if self.control_id("[IMG]") is not None else "v2"

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))

    def check_vocab(self, vocab_size: int, params: Path) -> None:
        if vocab_size != self.vocab_size:
            raise ReleaseError(
                f"{self.path}: has {self.vocab_size} pieces but {params} says vocab_size {vocab_size}; "
                "this tokenizer belongs to another model, use the one shipped with these weights"
            )


class StreamDecoder:
    """Turns ids into text deltas whose concatenation is exactly tokenizer.decode(all ids).

    Decoding piece by piece is wrong for SentencePiece twice over: the leading "▁" of the first
    piece is dropped only at the start of a text, and byte-fallback pieces (<0xE2><0x82><0xAC>)
    form a character only together. So each step decodes a short window of recent ids twice, with
    and without the new ones, and emits the difference; while the window ends in a partial UTF-8
    character (decoded as U+FFFD) it waits for more ids.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start: context ids whose text was already emitted
        self.read = 0  # ids up to here have been emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        after = self.tokenizer.decode(self.ids[self.prefix :])
        if after.endswith("\ufffd") or len(after) <= len(before):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :]

    def flush(self) -> str:
        """Whatever is held back (a byte sequence the model never completed)."""
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        after = self.tokenizer.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :]
