"""User settings, saved as JSON in platformdirs' config folder and shared by every front end.

Sampling and the system prompt are also stored with each conversation (they belong to it); these
are the defaults new conversations start from. The app, line mode and one-shot answers all start
from this file, by one rule (`choose`): a flag given now wins, then a value the user saved (a key
present in settings.json, even one equal to the default), then what the release folder recommends
(params.json "mixchat": {"sampling": ...}), then the defaults below.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from mixchat import paths
from mixchat.engine.sampling import SamplingSettings
from mixchat.errors import MixchatError
from mixchat.release import checksum
from mixchat.speed.qformat import CHOICES

# What Chat.send does when the next turn would not fit the context: "drop" the oldest turns from the
# model's view (they stay in the store), or "stop" and refuse the message (what mixchat did before this setting).
WHEN_FULL = ("drop", "stop")
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "repeat_penalty", "max_tokens", "seed", "draft")


@dataclass
class Settings:
    model: str = ""
    system: str = ""
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 0
    repeat_penalty: float = 1.0  # off, as in Mistral's reference: with it, temperature 0 is not greedy
    max_tokens: int = 512
    seed: int | None = None
    draft: int = 7  # tokens guessed ahead from the conversation per pass (prompt lookup); 0 = off
    dtype: str = "auto"
    quant: str = "none"
    memory_budget_gb: float = 0.0  # 0 = all weights resident; else Mixtral's experts load on demand
    threads: int = 0  # 0 = torch's choice
    kv_memory_gb: float = 4.0
    context: int = 0  # tokens per conversation; 0 = max_seq_len, or what the KV cache can take in free memory
    expert_layer: int = 0
    when_full: str = "drop"

    def sampling(self) -> SamplingSettings:
        s = SamplingSettings(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                             repeat_penalty=self.repeat_penalty, max_tokens=self.max_tokens, seed=self.seed,
                             draft=self.draft)
        s.check(name=str)  # named as the settings sheet and settings.json name them, not as flags
        return s

    def check(self) -> None:
        self.sampling()
        if self.dtype not in ("auto", "bf16", "fp16", "fp32"):
            raise MixchatError(f"dtype {str(self.dtype)[:20]!r}: use auto, bf16, fp16 or fp32")
        if self.quant not in CHOICES:
            raise MixchatError(f"quant {str(self.quant)[:20]!r}: use " + ", ".join(CHOICES))
        if not isinstance(self.model, str) or not isinstance(self.system, str):
            raise MixchatError("model and system must be text")
        for name, whole in (("threads", True), ("expert_layer", True), ("memory_budget_gb", False), ("context", True),
                            ("kv_memory_gb", False)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)) \
                    or not math.isfinite(value) or value < 0:
                raise MixchatError(f"{name} {str(value)[:20]}: must be a {'whole ' if whole else ''}number, 0 or more")
        if self.threads > 1024:
            raise MixchatError(f"threads {self.threads}: at most 1024")
        if self.kv_memory_gb <= 0:
            raise MixchatError(f"kv_memory_gb {self.kv_memory_gb}: must be more than 0")
        if self.context == 1 or self.context > 1 << 24:
            raise MixchatError(f"context {self.context}: 0 (what fits), or from 2 to the model's max_seq_len tokens")
        if self.when_full not in WHEN_FULL:
            raise MixchatError(f"when_full {str(self.when_full)[:20]!r}: use drop (the oldest turns make room) or "
                               "stop (a full conversation refuses new messages)")


KEYS = tuple(f.name for f in fields(Settings))  # what settings.json may hold, in the sheet's order


def settings_path() -> Path:
    return paths.config_dir() / "settings.json"


def load() -> Settings:
    return load_with_keys()[0]


def load_with_keys() -> tuple[Settings, frozenset[str]]:
    """The saved settings, and which of them the file actually holds: a value the user saved wins
    over a release folder's recommendation, a default does not (see `choose`)."""
    s, keys, _ = read()
    return s, keys


def _read_raw(path: Path) -> dict[str, Any]:
    """settings.json as a dict ({} when there is none); MixchatError, naming the file, when it is not one."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except UnicodeDecodeError:
        raise MixchatError(f"{path} is not UTF-8 text") from None
    except OSError as exc:
        raise MixchatError(f"{path} cannot be read ({exc.strerror or exc})") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MixchatError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise MixchatError(f"{path} holds a JSON {type(raw).__name__}, not an object of settings")
    return raw


def read() -> tuple[Settings, frozenset[str], list[str]]:
    """The saved settings, the keys the file holds, and what is wrong with it, one line each.

    A broken settings file must not keep any front end from starting, nor cost the user the settings
    that are fine: a value that does not check out is left out (its default applies) and named; a file
    that cannot be read at all gives the defaults. The front ends say so; the file itself is only
    replaced when the user saves settings again, and then an unreadable one is kept aside (save)."""
    path = settings_path()
    try:
        raw = _read_raw(path)
    except MixchatError as exc:
        return Settings(), frozenset(), [f"{exc}; the default settings are used until you save them again"]
    kept: dict[str, Any] = {}
    problems = []
    for key in KEYS:
        if key not in raw:
            continue
        try:
            Settings(**{**kept, key: raw[key]}).check()
        except (MixchatError, TypeError, ValueError, OverflowError) as exc:
            why = str(exc) if isinstance(exc, MixchatError) else f"{key} {str(raw[key])[:20]!r} is not a valid value"
            problems.append(f"{path}: {why}; the default ({getattr(Settings(), key)!r}) is used instead")
            continue
        kept[key] = raw[key]
    return Settings(**kept), frozenset(kept), problems


def choose(key: str, flags: dict[str, Any], saved: Settings, saved_keys: frozenset[str],
           recommended: dict[str, Any] | None = None) -> tuple[Any, str]:
    """One setting by the shared rule: a flag given now, else a value saved in settings.json, else the
    folder's recommendation, else the default. Returns the value and where it came from ("flag",
    "saved", "recommended" or "default"), so a bad value can be blamed on its source."""
    if flags.get(key) is not None:
        return flags[key], "flag"
    if key in saved_keys:
        return getattr(saved, key), "saved"
    if recommended and key in recommended:
        return recommended[key], "recommended"
    return getattr(Settings(), key), "default"


def apply_recommended(s: Settings, saved_keys: frozenset[str], recommended: dict[str, Any]) -> Settings:
    """`s` with a release folder's recommended sampling in place of every value the user did not
    save (the app's settings; the caller then applies the flags given now)."""
    for key, value in recommended.items():
        if key in SAMPLING_KEYS and key not in saved_keys:
            setattr(s, key, value)
    return s


def save(s: Settings, keys: frozenset[str] | set[str] | None = None) -> str | None:
    """Write atomically, readable by the user only (it holds the system prompt); a folder that cannot
    be written is a MixchatError (the settings stay in use). `keys`: the settings the user chose (saved
    before or changed now), the only ones written, so that a value the app took from a release folder's
    recommendation does not become the user's choice for every other folder (None: all of them). Keys this
    mixchat does not know (a newer one's) are kept. A file that cannot be read as settings is not
    overwritten but renamed aside first: returns a line saying where it went, else None."""
    s.check()
    path = settings_path()
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    note = None
    try:
        paths.make_private_dir(path.parent)
        checksum.remove_stale_temporaries(path.parent, "settings.json.tmp*")
        try:
            others = {k: v for k, v in _read_raw(path).items() if k not in KEYS}
        except MixchatError as exc:
            others = {}
            aside = path.with_name(f"settings.json.unreadable-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(path, aside)
            note = f"{exc}: kept as {aside}, and the settings saved anew"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            chosen = asdict(s) if keys is None else {k: v for k, v in asdict(s).items() if k in keys}
            f.write(json.dumps({**others, **chosen}, indent=2))
        tmp.replace(path)
    except OSError as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise MixchatError(f"{path}: cannot save the settings ({exc.strerror or exc}); they apply until mixchat "
                           "closes — make the folder writable to keep them") from None
    return note
