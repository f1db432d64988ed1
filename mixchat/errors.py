"""Errors a user can cause and fix. Each message is one line that names the file and the fix.

The CLI prints `mixchat: error: <message>` and exits with `exit_code`; anything that is not a
MixchatError is a bug and keeps its traceback.
"""

from __future__ import annotations


class MixchatError(Exception):
    exit_code = 2

    def __init__(self, message: str) -> None:
        # Collapse newlines so the user always sees exactly one line.
        super().__init__(" ".join(str(message).split()))


class ConfigError(MixchatError):
    """params.json is missing, unreadable or inconsistent."""


class ReleaseError(MixchatError):
    """A release folder's weights, tokenizer or RELEASE file cannot be used."""


class DamagedFileError(ReleaseError):
    """A weight file that is truncated or corrupt. The fix is a new download, which `mixchat verify`
    checks against RELEASE; `what` is the message without that fix (verify gives its own)."""

    FIX = "download it again and check it with `mixchat verify`"

    def __init__(self, path: object, what: str) -> None:
        self.what = f"{path}: {what}"
        super().__init__(f"{self.what}; {self.FIX}")


class ChecksumError(MixchatError):
    """A file does not match the md5 sum listed in RELEASE."""

    exit_code = 1


class ContextError(MixchatError):
    """A prompt or conversation does not fit the model's context or the cache budget."""


class NonFiniteError(MixchatError):
    """The model produced NaN or infinite logits; the message names the likely source."""
