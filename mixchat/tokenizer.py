"""SentencePiece tokenizer of a release folder, with Mistral's special ids checked on load."""

from __future__ import annotations

from pathlib import Path

from mixchat.errors import ReleaseError


class Tokenizer:
    def __init__(self, path: str | Path) -> None:
        import sentencepiece  # deferred: keeps `mixchat --help` instant

        path = Path(path)
        if not path.is_file():
            raise ReleaseError(f"{path}: missing; copy the tokenizer.model shipped with the release into the folder")
        self.path = path
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(path.read_bytes())
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

    @property
    def version(self) -> str:
        """'v3' for the 32768-piece instruct tokenizer with [INST] control pieces, else 'v1'."""
        return "v3" if self.vocab_size == 32768 and self.sp.piece_to_id("[INST]") != self.sp.unk_id() else "v1"

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
