"""KV caches kept per conversation: in memory while open (an LRU under a byte budget) and on
disk beside the store, so a follow-up after a restart costs only the new tokens.

A cache file is safetensors: the filled slots' keys and values, their positions, the token ids
they cover and a fingerprint of the model and dtype. A file whose fingerprint differs, that is
truncated or otherwise unreadable is discarded with a note, never used.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path

import torch

from mixchat.engine import Engine
from mixchat.generation import Session

DEFAULT_DISK_BUDGET = 16 * 10**9  # bytes of cache files kept; MIXCHAT_KV_DISK_BUDGET_GB overrides
DEFAULT_MEMORY_BUDGET = 4 * 10**9  # bytes of live caches across open conversations


def disk_budget() -> int:
    value = os.environ.get("MIXCHAT_KV_DISK_BUDGET_GB")
    return int(float(value) * 10**9) if value else DEFAULT_DISK_BUDGET


def cache_fingerprint(engine: Engine) -> str:
    return f"{engine.fingerprint}:{str(engine.dtype).removeprefix('torch.')}"


def save(path: Path, session: Session, fingerprint: str) -> int:
    """Write atomically (temp file, then rename); returns the file's size."""
    from safetensors.torch import save_file

    tensors = session.cache.state_dict()
    tensors["tokens"] = torch.tensor(session.tokens[: session.cache.pos], dtype=torch.long)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp), metadata={"fingerprint": fingerprint})
    os.replace(tmp, path)
    return path.stat().st_size


def load(path: Path, session: Session, fingerprint: str) -> str | None:
    """Restore `session` from `path`. Returns None when restored, else a note saying why the file
    was discarded (it is then deleted; the history is prefilled again)."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("fingerprint") != fingerprint:
                reason = "it was made by another model or dtype"
            else:
                state = {k: f.get_tensor(k) for k in f.keys()}
                tokens = state.pop("tokens").tolist()
                session.cache.load_state_dict(state)
                if len(tokens) != session.cache.pos:
                    raise ValueError("token count and cache length differ")
                session.tokens = tokens
                return None
    except (SafetensorError, OSError, ValueError, KeyError, RuntimeError, json.JSONDecodeError) as exc:
        session.cache.reset()
        session.tokens = []
        reason = f"it is unreadable ({str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__})"
    path.unlink(missing_ok=True)
    return f"note: discarded the saved KV cache {path.name} because {reason}; the history will be re-read"


def enforce_disk_budget(folder: Path, budget: int, keep: Path | None = None) -> list[Path]:
    """Delete the least recently written cache files until the folder fits `budget` bytes."""
    files = sorted(folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
    total = sum(p.stat().st_size for p in files)
    removed = []
    for p in files:
        if total <= budget:
            break
        if p == keep:
            continue
        total -= p.stat().st_size
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


class SessionPool:
    """Live sessions by conversation id, least recently used first out. When their caches pass the
    memory budget, the oldest are spilled to disk (saved, then dropped from memory)."""

    def __init__(self, engine: Engine, folder: Path, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> None:
        self.engine, self.folder, self.memory_budget = engine, folder, memory_budget
        self.fingerprint = cache_fingerprint(engine)
        self.sessions: OrderedDict[str, Session] = OrderedDict()
        self.notes: list[str] = []

    def path(self, cid: str) -> Path:
        return self.folder / f"{cid}.safetensors"

    def get(self, cid: str) -> Session:
        if cid in self.sessions:
            self.sessions.move_to_end(cid)
            return self.sessions[cid]
        session = Session(self.engine)
        note = load(self.path(cid), session, self.fingerprint)
        if note:
            self.notes.append(note)
        self.sessions[cid] = session
        self._fit(keep=cid)
        return session

    def adopt(self, cid: str, session: Session) -> None:
        """A session started before its conversation had an id."""
        self.sessions[cid] = session
        self._fit(keep=cid)

    def save(self, cid: str) -> int:
        size = save(self.path(cid), self.sessions[cid], self.fingerprint)
        enforce_disk_budget(self.folder, disk_budget(), keep=self.path(cid))
        self._fit(keep=cid)
        return size

    def forget(self, cid: str) -> None:
        """The conversation was deleted: drop its cache from memory and disk."""
        self.sessions.pop(cid, None)
        self.path(cid).unlink(missing_ok=True)

    def memory(self) -> int:
        return sum(s.cache.nbytes for s in self.sessions.values())

    def _fit(self, keep: str) -> None:
        while self.memory() > self.memory_budget and len(self.sessions) > 1:
            cid = next(c for c in self.sessions if c != keep)
            if self.sessions[cid].cache.pos:
                save(self.path(cid), self.sessions[cid], self.fingerprint)
            del self.sessions[cid]
