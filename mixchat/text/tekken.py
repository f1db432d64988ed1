"""Tekken: the byte-level BPE tokenizer of Mistral's 2024+ releases (tekken.json), on tiktoken.

The file (as mistral-common reads it; this is mixchat's own reading of that format):
- `config`: `pattern` (the pre-tokenization regex, tiktoken's pat_str), `default_num_special_tokens`
  (N), `default_vocab_size` (V, special tokens included) and `version` (the instruct format: v3 for
  Mistral-Nemo, v7 for Mistral-Small-2501, ...).
- `vocab`: the BPE vocabulary in rank order, each entry's bytes base64-encoded in `token_bytes`;
  the first 256 are the single bytes 0..255. Only the first V - N entries are used: the file may
  hold more (150000) than the model was trained with (131072 - 1000).
- `special_tokens` (optional up to v7; required after): `rank`, `token_str`, `is_control`. Absent,
  the 20 control tokens mistral-common hard-codes for old files are used (<unk> <s> </s> [INST] ...).
  Either way ids up to N are filled with "<SPECIAL_i>" placeholders.

Token ids: 0..N-1 are the special tokens, N + r is vocabulary rank r. Text never becomes a special
id ("[INST]" or "</s>" typed by a user are plain bytes), and decoding skips special ids, as
mistral-common's default (SpecialTokenPolicy.IGNORE) does. A run of ordinary ids between two special
ids is decoded on its own: its bytes as UTF-8, invalid sequences as U+FFFD.

Every way the file can be wrong (too large, not JSON, a field missing or of the wrong type, a
vocabulary that contradicts itself, a version mixchat has no chat format for) is one ReleaseError
naming the file, never a traceback.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path

from mixchat.errors import ReleaseError

# The instruct formats encode_chat knows. v11 and v13 differ from v7 only in how tool calls are
# written, which mixchat never does, so a plain chat is token for token the same as v7 (tested
# against mistral-common on a tekken file of each version).
TEKKEN_VERSIONS = ("v1", "v2", "v3", "v7", "v11", "v13")
# What mistral-common assumes for files without a special_tokens list (allowed up to v7).
LEGACY_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                         "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]",
                         "[IMG_END]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                         "[TOOL_CONTENT]")
FILLER = "<SPECIAL_{}>"
MAX_SPECIAL_TOKENS = 1 << 16
MAX_VOCAB = 1 << 22  # ids; the same bound params.json's vocab_size has (config.LIMITS)
FIX = "use the tekken.json shipped with the release"


def _version_order(version: str) -> int:
    return int(version[1:])


class TekkenTokenizer:
    """A tekken.json. Implements mixchat.text.tokenizer.TextTokenizer."""

    kind = "tekken"

    def __init__(self, path: str | Path) -> None:
        from mixchat.text.tokenizer import read_tokenizer_file

        self.path = path = Path(path)
        data = read_tokenizer_file(path, "tekken.json")
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, absurd nesting
            raise ReleaseError(f"{path}: not valid JSON ({str(exc).splitlines()[0][:80]}); {FIX}") from None
        self._read(doc)
        self.notes: list[str] = []

    # -- reading the file ------------------------------------------------------------------------

    def _bad(self, what: str) -> ReleaseError:
        return ReleaseError(f"{self.path}: {what}, so it is not a usable tekken tokenizer; {FIX}")

    def _field(self, obj: dict, key: str, kind: type, where: str):
        if key not in obj:
            raise self._bad(f"{where} has no '{key}'")
        value = obj[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self._bad(f"{where}.{key} is {type(value).__name__}, not {kind.__name__}")
        return value

    def _read(self, doc) -> None:
        import tiktoken  # deferred: keeps `mixchat --help` instant

        if not isinstance(doc, dict):
            raise self._bad(f"the JSON is a {type(doc).__name__}, not an object")
        config = self._field(doc, "config", dict, "the file")
        pattern = self._field(config, "pattern", str, "config")
        version = self._field(config, "version", str, "config")
        n_special = self._field(config, "default_num_special_tokens", int, "config")
        size = self._field(config, "default_vocab_size", int, "config")
        vocab = self._field(doc, "vocab", list, "the file")
        if version not in TEKKEN_VERSIONS:
            raise ReleaseError(
                f"{self.path}: declares instruct format version {version[:20]!r}, which this mixchat cannot write "
                f"(it knows {', '.join(TEKKEN_VERSIONS)}); use a release whose tokenizer is one of these"
            )
        if not 3 <= n_special <= MAX_SPECIAL_TOKENS:
            raise self._bad(f"config.default_num_special_tokens is {n_special} (expected 3 to {MAX_SPECIAL_TOKENS})")
        n_inner = size - n_special
        if not 256 <= n_inner <= MAX_VOCAB or size > MAX_VOCAB:
            raise self._bad(f"config.default_vocab_size {size} leaves {n_inner} ids for the vocabulary after "
                            f"{n_special} special tokens (expected 256 to {MAX_VOCAB})")
        if len(vocab) < n_inner:
            raise self._bad(f"config.default_vocab_size {size} needs {n_inner} vocabulary entries after "
                            f"{n_special} special tokens but the file holds {len(vocab)} (truncated?)")

        # The vocabulary, cut to what the model uses (mistral-common's rule: the first V - N ranks).
        table: list[bytes] = []
        ranks: dict[bytes, int] = {}
        for i, entry in enumerate(vocab[:n_inner]):
            if not isinstance(entry, dict) or entry.get("rank") != i or not isinstance(entry.get("token_bytes"), str):
                raise self._bad(f"vocab entry {i} is not {{'rank': {i}, 'token_bytes': base64, ...}}")
            try:
                piece = base64.b64decode(entry["token_bytes"], validate=True)
            except (binascii.Error, ValueError):
                raise self._bad(f"vocab entry {i} has token_bytes that are not base64") from None
            if (i < 256 and piece != bytes([i])) or (i >= 256 and len(piece) < 2):
                raise self._bad(f"vocab entry {i} is {piece[:16]!r} (the first 256 ranks must be the single bytes "
                                "in order, later ones longer)")
            if piece in ranks:
                raise self._bad(f"vocab entries {ranks[piece]} and {i} are the same bytes {piece[:16]!r}")
            ranks[piece] = i
            table.append(piece)

        # Special tokens: the file's list (ranks in order), else the legacy list; then fillers.
        listed = doc.get("special_tokens")
        if listed is None:
            if _version_order(version) > 7:
                raise self._bad(f"it declares {version} but has no special_tokens list (required after v7)")
            names = list(LEGACY_SPECIAL_TOKENS)
        else:
            if not isinstance(listed, list):
                raise self._bad(f"special_tokens is {type(listed).__name__}, not a list")
            names = []
            for i, entry in enumerate(listed):
                if (not isinstance(entry, dict) or entry.get("rank") != i or not isinstance(entry.get("token_str"), str)
                        or not entry["token_str"]):
                    raise self._bad(f"special token {i} is not {{'rank': {i}, 'token_str': text, ...}}")
                names.append(entry["token_str"])
        if len(names) > n_special:
            raise self._bad(f"it lists {len(names)} special tokens but config.default_num_special_tokens is "
                            f"{n_special}")
        names += [FILLER.format(i) for i in range(len(names), n_special)]
        special = {}
        for i, name in enumerate(names):
            if name in special:
                raise self._bad(f"special tokens {special[name]} and {i} are both {name[:40]!r}")
            special[name] = i
        needed = ["<s>", "</s>"]
        if version != "v1":
            needed += ["[INST]", "[/INST]"]
        if _version_order(version) >= 7:
            needed += ["[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]
        missing = [n for n in needed if n not in special]
        if missing:
            raise self._bad(f"it has no {missing[0]} special token, which instruct format {version} needs")

        try:
            self._bpe = tiktoken.Encoding(name=self.path.name, pat_str=pattern, mergeable_ranks=ranks,
                                          special_tokens={})
        except (ValueError, TypeError, OverflowError) as exc:  # the pattern does not compile
            raise self._bad(f"config.pattern is not a usable regex ({str(exc).splitlines()[0][:80]})") from None

        self._table = table
        self._special_names = names
        self._special = special
        self.num_special = n_special
        self.vocab_size = size
        self.version = version
        self.bos_id, self.eos_id = special["<s>"], special["</s>"]

    # -- the TextTokenizer interface -------------------------------------------------------------

    def control_id(self, piece: str) -> int | None:
        """The id of a special token such as [INST], or None if the file has no such token."""
        return self._special.get(piece)

    def is_special(self, token_id: int) -> bool:
        return 0 <= token_id < self.num_special

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Text as plain bytes: nothing in it is ever read as a special token."""
        n = self.num_special
        ids = [n + r for r in self._bpe.encode_ordinary(text)]
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one id stands for: b"" for a special token."""
        if not 0 <= token_id < self.vocab_size:
            raise IndexError(f"token id {token_id} is out of range for {self.path.name} ({self.vocab_size} ids)")
        return b"" if token_id < self.num_special else self._table[token_id - self.num_special]

    def decode_bytes(self, ids) -> bytes:
        return b"".join(self.token_bytes(i) for i in ids)

    def decode(self, ids) -> str:
        """The text of ids: special ids are skipped and each run of ordinary ids between them is
        decoded on its own (mistral-common's rule), invalid UTF-8 as U+FFFD."""
        parts, run = [], []
        for i in ids:
            piece = self.token_bytes(i)
            if i < self.num_special:
                if run:
                    parts.append(b"".join(run).decode("utf-8", "replace"))
                    run = []
            else:
                run.append(piece)
        if run:
            parts.append(b"".join(run).decode("utf-8", "replace"))
        return "".join(parts)

    def check_vocab(self, vocab_size: int, params: Path) -> None:
        if vocab_size != self.vocab_size:
            n_bpe = self.vocab_size - self.num_special
            raise ReleaseError(
                f"{self.path}: has {self.vocab_size} ids ({self.num_special} special + {n_bpe} "
                f"BPE, its default_vocab_size) but {params} says vocab_size {vocab_size}; this tokenizer belongs "
                "to another model, use the one shipped with these weights"
            )
