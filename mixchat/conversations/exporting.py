"""Conversations out of the store and into it: `mixchat list`, `search`, `show`, `export
--format markdown|json` and `import FILE.json`.

Markdown is for people, so control characters in it are made visible; JSON is for programs and
keeps the exact text (safetext.json_text escapes every control character, C1 included). An imported file is someone
else's data: everything in it is checked before anything is written, and it is written whole, in
one transaction, as a new conversation.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixchat.conversations.store import (
    TITLE_CHARS,
    Conversation,
    SearchHit,
    Store,
    StoredMessage,
    Summary,
    short_id,
)
from mixchat.errors import MixchatError
from mixchat.safetext import json_text, one_line, visible

# Bounds on an imported file. The largest real conversation is a few MB (a 128k-token context of
# text, token ids and routing); these leave room for that and refuse what only fills memory.
MAX_IMPORT_BYTES = 256 * 2**20
MAX_MESSAGES = 100_000
MAX_TEXT_CHARS = 16 * 2**20  # one message, the system prompt
MAX_TOKENS = 1 << 20  # token ids (and routing entries) of one message
MAX_LAYERS = 1024
MAX_EXPERTS = 1 << 16  # an expert index, and experts per token and layer
MAX_SETTINGS = 64  # keys in `settings`, and in a message's `timings`
STOPS = (None, "eos", "length", "context", "interrupted", "error")
ROLES = ("user", "assistant")


def when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


# -- for people ---------------------------------------------------------------------------------


def format_list(rows: list[Summary]) -> str:
    if not rows:
        return "no conversations yet"
    lines = [f"{'id':<8} {'updated':<16} {'turns':>5}  {'model':<24} title"]
    for r in rows:
        model = one_line(r.model_path.rstrip("/").rsplit("/", 1)[-1])[:24]
        lines.append(f"{short_id(r.id):<8} {when(r.updated_at):<16} {r.turns:>5}  {model:<24} {one_line(r.title)}")
    return "\n".join(lines)


def format_hit(hit: SearchHit) -> str:
    """One line: short id, date, title, and where the words were found."""
    title = one_line(hit.title) or "(untitled)"
    where = "title" if hit.role == "title" else f"{hit.role} #{hit.position}: {one_line(hit.snippet)}"
    return f"{short_id(hit.conversation_id):<8} {when(hit.updated_at)}  {title}  | {where}"


def _stop_note(m: StoredMessage) -> str:
    if m.role != "assistant" or m.stop == "eos":
        return ""
    return {None: " [unfinished: the process stopped while writing]", "interrupted": " [stopped]",
            "length": " [cut at the token limit]", "context": " [cut: the context is full]"}.get(
        m.stop, f" [{one_line(str(m.stop))}]")


def to_markdown(conv: Conversation, messages: list[StoredMessage]) -> str:
    """The transcript people read (and `cat` later): control characters shown, never acting."""
    out = [f"# {one_line(conv.title) or '(untitled)'}", "",
           f"- id: `{conv.id}`", f"- model: `{one_line(conv.model_path)}`", f"- started: {when(conv.created_at)}"]
    if conv.system:
        out.append(f"- system prompt: {one_line(conv.system)}")
    for m in messages:
        out += ["", f"## {m.role}{_stop_note(m)}", "", visible(m.content)]
    return "\n".join(out) + "\n"


def export_markdown(store: Store, cid: str) -> str:
    """Conversation `cid` (an id, unique prefix or short form) as Markdown."""
    conv = store.get(cid)
    return to_markdown(conv, store.messages(conv.id))


# -- for programs --------------------------------------------------------------------------------


def to_dict(conv: Conversation, messages: list[StoredMessage]) -> dict[str, Any]:
    return {
        "id": conv.id, "title": conv.title, "model_path": conv.model_path,
        "model_fingerprint": conv.model_fingerprint, "system": conv.system, "settings": conv.settings,
        "created_at": conv.created_at, "updated_at": conv.updated_at,
        "messages": [{"role": m.role, "content": m.content, "token_ids": m.token_ids, "experts": m.experts,
                      "stop": m.stop, "timings": m.timings, "created_at": m.created_at} for m in messages],
    }


def export_json(store: Store, cid: str) -> dict[str, Any]:
    """Conversation `cid` as the object `export --format json` prints and `import` reads."""
    conv = store.get(cid)
    return to_dict(conv, store.messages(conv.id))


def dumps(data: dict[str, Any]) -> str:
    return json_text(data, indent=2)


class ImportRefused(MixchatError):
    """A file `import` will not take; nothing was written."""


def read_json_file(path: Path) -> dict[str, Any]:
    """The object in a conversation file, or ImportRefused naming the file and what is wrong."""
    def refuse(what: str) -> ImportRefused:
        return ImportRefused(f"cannot import {path}: {what}; nothing was imported")

    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_IMPORT_BYTES + 1)
    except IsADirectoryError:
        raise refuse("it is a folder, not a file") from None
    except OSError as exc:
        raise refuse(exc.strerror or str(exc)) from None
    if len(raw) > MAX_IMPORT_BYTES:
        raise refuse(f"it is larger than {MAX_IMPORT_BYTES // 2**20} MB, more than any conversation")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise refuse(f"it is not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}), so not an export "
                     "of mixchat's") from None

    def no_constant(name: str) -> None:
        raise ValueError(f"{name} is not a JSON number")

    try:
        data = json.loads(text.removeprefix("\ufeff"), parse_constant=no_constant)
    except json.JSONDecodeError as exc:
        raise refuse(f"it is not JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except RecursionError:
        raise refuse("it is not JSON mixchat can read (lists or objects nested too deeply)") from None
    except ValueError as exc:  # NaN or Infinity; an integer of more than 4300 digits (Python's own limit)
        what = str(exc) if "is not a JSON number" in str(exc) else "a number thousands of digits long"
        raise refuse(f"it is not JSON mixchat can read ({what})") from None
    if not isinstance(data, dict):
        raise refuse(f"it holds a JSON {_kind(data)}, not a conversation (an object, as `mixchat export "
                     "--format json` writes)")
    return data


@dataclass
class Imported:
    """What a conversation file holds, checked: the arguments of Store.add_conversation."""

    title: str
    model_path: str
    fingerprint: str
    system: str | None
    settings: dict[str, Any]
    messages: list[StoredMessage]


def parse_import(data: Any, source: str) -> Imported:
    """What `data` (an object as export_json makes it) holds, all of it checked; ImportRefused,
    naming `source` and the first thing wrong, for anything that is not what mixchat writes."""
    def refuse(what: str) -> ImportRefused:
        return ImportRefused(f"cannot import {source}: {what}; nothing was imported")

    if not isinstance(data, dict):
        raise refuse(f"it holds a JSON {_kind(data)}, not a conversation")
    check = _Checker(refuse)
    title = check.text(data.get("title", ""), "title", 4 * TITLE_CHARS, optional=True) or ""
    model_path = check.text(data.get("model_path", ""), "model_path", 4096, optional=True) or ""
    fingerprint = check.text(data.get("model_fingerprint", ""), "model_fingerprint", 256, optional=True) or ""
    system = check.text(data.get("system"), "system", MAX_TEXT_CHARS, optional=True)
    settings = check.flat_dict(data.get("settings", {}), "settings")
    raw_messages = data.get("messages")
    if not isinstance(raw_messages, list):
        raise refuse("it has no list of messages (\"messages\": [...])" if raw_messages is None
                     else f"\"messages\" is a JSON {_kind(raw_messages)}, not a list")
    if len(raw_messages) > MAX_MESSAGES:
        raise refuse(f"it holds {len(raw_messages)} messages, more than {MAX_MESSAGES}")
    messages = [check.message(m, i) for i, m in enumerate(raw_messages)]
    return Imported(title, model_path, fingerprint, system, settings, messages)


def add_imported(store: Store, imported: Imported) -> Conversation:
    return store.add_conversation(imported.title, imported.model_path, imported.fingerprint, imported.system,
                                  imported.settings, imported.messages)


def import_json(store: Store, data: dict[str, Any], source: str) -> Conversation:
    """A new conversation (new id, created now) holding what `data` (as export_json makes it)
    holds: title, model path and fingerprint, system prompt, settings and messages. Everything is
    checked first (parse_import); a file that fails leaves the store as it was. Written in one
    transaction."""
    return add_imported(store, parse_import(data, source))


def _kind(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "true/false", type(None): "null"}.get(
        type(value), "number")


class _Checker:
    """Each check returns the value it accepts or raises refuse(what is wrong, and where)."""

    def __init__(self, refuse: Any) -> None:
        self.refuse = refuse

    def text(self, value: Any, where: str, limit: int, optional: bool = False) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str):
            raise self.refuse(f"{where} is a JSON {_kind(value)}, not text")
        if len(value) > limit:
            raise self.refuse(f"{where} is {len(value)} characters long, more than {limit}")
        try:
            value.encode("utf-8")  # JSON can spell lone surrogates (\ud800), which are not text
        except UnicodeEncodeError as exc:
            raise self.refuse(f"{where} holds an unpaired surrogate (\\u{ord(value[exc.start]):04x}) at character "
                              f"{exc.start}, which is not text") from None
        if "\0" in value:
            raise self.refuse(f"{where} holds a NUL character at character {value.index(chr(0))}: binary data, "
                              "not text")
        return value

    def number(self, value: Any, where: str) -> float:
        # Whole numbers up to 2^64 (a seed may be any of them), fractions that are finite.
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not (abs(value) <= 2**64 if isinstance(value, int) else math.isfinite(value)):
            raise self.refuse(f"{where} is {str(value)[:20]!r}, not a number mixchat keeps")
        return value

    def flat_dict(self, value: Any, where: str) -> dict[str, Any]:
        """An object of at most MAX_SETTINGS names, each with a number, text, true/false or null."""
        if not isinstance(value, dict):
            raise self.refuse(f"{where} is a JSON {_kind(value)}, not an object")
        if len(value) > MAX_SETTINGS:
            raise self.refuse(f"{where} has {len(value)} entries, more than {MAX_SETTINGS}")
        out = {}
        for key, item in value.items():
            name = f"{where}.{one_line(key[:40])}"
            self.text(key, f"a name in {where}", 100)
            if item is None or isinstance(item, bool):
                out[key] = item
            elif isinstance(item, str):
                out[key] = self.text(item, name, MAX_TEXT_CHARS)
            else:
                out[key] = self.number(item, name)
        return out

    def int_list(self, value: Any, where: str, below: int, limit: int) -> list[int]:
        if not isinstance(value, list):
            raise self.refuse(f"{where} is a JSON {_kind(value)}, not a list")
        if len(value) > limit:
            raise self.refuse(f"{where} has {len(value)} entries, more than {limit}")
        for i, item in enumerate(value):
            if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item < below:
                raise self.refuse(f"{where}[{i}] is {str(item)[:20]!r}, not a whole number from 0 to {below - 1}")
        return value

    def message(self, m: Any, i: int) -> StoredMessage:
        where = f"message {i}"
        if not isinstance(m, dict):
            raise self.refuse(f"{where} is a JSON {_kind(m)}, not an object")
        role = m.get("role")
        if role not in ROLES:
            raise self.refuse(f"{where} has the role {one_line(str(role))[:20]!r}; only user and assistant can be "
                              "imported")
        content = self.text(m.get("content"), f"{where}'s content", MAX_TEXT_CHARS)
        token_ids = m.get("token_ids")
        if token_ids is not None:
            token_ids = self.int_list(token_ids, f"{where}'s token_ids", 1 << 31, MAX_TOKENS)
        experts = m.get("experts")
        if experts is not None:
            experts = self.experts(experts, f"{where}'s experts")
        stop = m.get("stop")
        if stop not in STOPS:
            raise self.refuse(f"{where} has the stop {one_line(str(stop))[:20]!r}; one of "
                              + ", ".join(str(s).replace("None", "null") for s in STOPS))
        timings = m.get("timings")
        if timings is not None:
            timings = self.flat_dict(timings, f"{where}'s timings")
        created = m.get("created_at", 0.0)
        created = self.number(created, f"{where}'s created_at") if created is not None else 0.0
        return StoredMessage(0, "", i, role, content, token_ids, experts, stop, timings, created)

    def experts(self, value: Any, where: str) -> list:
        """Per token, per layer, the experts it went to: [[[e, e], ...], ...]."""
        if not isinstance(value, list):
            raise self.refuse(f"{where} is a JSON {_kind(value)}, not a list")
        if len(value) > MAX_TOKENS:
            raise self.refuse(f"{where} has {len(value)} entries, more than {MAX_TOKENS}")
        for t, layers in enumerate(value):
            if not isinstance(layers, list) or len(layers) > MAX_LAYERS:
                raise self.refuse(f"{where}[{t}] is not a list of at most {MAX_LAYERS} layers")
            for n, chosen in enumerate(layers):
                self.int_list(chosen, f"{where}[{t}][{n}]", MAX_EXPERTS, MAX_EXPERTS)
        return value
