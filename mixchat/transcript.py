"""Conversations as people read them: `mixchat list`, `show`, `export --format markdown|json`."""

from __future__ import annotations

import json
import time

from mixchat.safetext import one_line, visible
from mixchat.store import Conversation, StoredMessage, Summary


def when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def format_list(rows: list[Summary]) -> str:
    if not rows:
        return "no conversations yet"
    lines = [f"{'id':<17} {'updated':<16} {'turns':>5}  {'model':<24} title"]
    for r in rows:
        model = one_line(r.model_path.rstrip("/").rsplit("/", 1)[-1])[:24]
        lines.append(f"{r.id:<17} {when(r.updated_at):<16} {r.turns:>5}  {model:<24} {one_line(r.title)}")
    return "\n".join(lines)


def _stop_note(m: StoredMessage) -> str:
    if m.role != "assistant" or m.stop == "eos":
        return ""
    return {None: " [unfinished: the process stopped while writing]", "interrupted": " [stopped]",
            "length": " [cut at the token limit]"}.get(m.stop, f" [{one_line(str(m.stop))}]")


def to_markdown(conv: Conversation, messages: list[StoredMessage]) -> str:
    """The transcript people read (and `cat` later): control characters shown, never acting."""
    out = [f"# {one_line(conv.title) or '(untitled)'}", "",
           f"- id: `{conv.id}`", f"- model: `{one_line(conv.model_path)}`", f"- started: {when(conv.created_at)}"]
    if conv.system:
        out.append(f"- system prompt: {one_line(conv.system)}")
    for m in messages:
        out += ["", f"## {m.role}{_stop_note(m)}", "", visible(m.content)]
    return "\n".join(out) + "\n"


def to_json(conv: Conversation, messages: list[StoredMessage]) -> str:
    return json.dumps({
        "id": conv.id, "title": conv.title, "model_path": conv.model_path,
        "model_fingerprint": conv.model_fingerprint, "system": conv.system, "settings": conv.settings,
        "created_at": conv.created_at, "updated_at": conv.updated_at,
        "messages": [{"role": m.role, "content": m.content, "token_ids": m.token_ids, "experts": m.experts,
                      "stop": m.stop, "timings": m.timings, "created_at": m.created_at} for m in messages],
    }, ensure_ascii=False, indent=2)
