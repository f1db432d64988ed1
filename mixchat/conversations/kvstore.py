"""KV caches kept per conversation: in memory while open (an LRU under a byte budget) and on
disk beside the store, so a follow-up after a restart costs only the new tokens.

A cache file is safetensors: the filled slots' keys and values, their positions, the token ids
they cover and a fingerprint of the model and dtype. A file whose fingerprint differs, that is
truncated or otherwise unreadable is discarded with a note, never used.
"""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from pathlib import Path

import torch

from mixchat import paths
from mixchat.engine.engine import Engine
from mixchat.engine.generation import Session
from mixchat.errors import MixchatError
from mixchat.release import checksum

DEFAULT_DISK_BUDGET = 16 * 10**9  # bytes of cache files kept; MIXCHAT_KV_DISK_BUDGET_GB overrides
DEFAULT_MEMORY_BUDGET = 4 * 10**9  # bytes of live caches across open conversations


def disk_budget() -> int:
    value = os.environ.get("MIXCHAT_KV_DISK_BUDGET_GB")
    if not value:
        return DEFAULT_DISK_BUDGET
    try:
        gb = float(value)
    except ValueError:
        gb = float("nan")
    if not math.isfinite(gb) or gb < 0:
        raise MixchatError(f"MIXCHAT_KV_DISK_BUDGET_GB={value[:20]!r}: must be a number of GB, 0 or more; "
                           "unset it for the default 16")
    return int(gb * 10**9)


def cache_fingerprint(engine: Engine) -> str:
    """The model, the dtype, the quantization (the keys and values depend on the weights they were computed
    with: a history cached under int4 and continued without it would answer differently from one read
    again) and, across ranks, the split (each rank's file holds its own layers). Unquantized, the string is
    what mixchat wrote before it had the quantization in it, so those caches stay valid."""
    quant = f":{engine.quant.name}" if engine.quant else ""
    split = f":{engine.split}" if engine.split else ""
    return f"{engine.fingerprint}:{str(engine.dtype).removeprefix('torch.')}{quant}{split}"


def _tmp(path: Path) -> Path:
    # The pid in the name lets a later start tell a write that was killed (remove it) from one
    # that another mixchat process is doing right now (leave it).
    return path.with_name(path.name + f".tmp{os.getpid()}")


def write_file(path: Path, tensors: dict[str, torch.Tensor], fingerprint: str) -> int:
    """Write `tensors` atomically (temp file, then rename), with a CRC per tensor; returns the file's size."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    crcs = {k: checksum.crc_tensor(v) for k, v in tensors.items()}
    paths.make_private_dir(path.parent)
    tmp = _tmp(path)
    try:
        save_file(tensors, str(tmp), metadata={"fingerprint": fingerprint, checksum.META_KEY:
                                              checksum.digest_metadata(crcs)})
        os.chmod(tmp, 0o600)  # what was said in a conversation is as private as the conversation
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path.stat().st_size


OTHER_MODEL = "it was made by another model, dtype, quantization or split"
_READ_ERRORS = (OSError, ValueError, KeyError, RuntimeError, TypeError, IndexError, json.JSONDecodeError)


def read_file(path: Path, fingerprint: str) -> dict[str, torch.Tensor] | str:
    """The tensors of a cache file written with this fingerprint, whole and matching their CRCs and finite,
    or why not (a phrase: "it was made by another model or dtype")."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return "it is missing"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            crcs = checksum.parse_metadata(meta)
            if meta.get("fingerprint") != fingerprint:
                return OTHER_MODEL
            if crcs is None:
                return "it carries no checksum (an older mixchat wrote it)"
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, *_READ_ERRORS) as exc:
        return f"it is damaged ({str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__})"
    if set(state) != set(crcs) or checksum.mismatches(state.items(), crcs):
        return "it is damaged (its bytes do not match their checksum)"
    if not all(torch.isfinite(t).all() for k, t in state.items() if t.is_floating_point()):
        return "it is damaged (it holds non-finite keys or values)"
    return state


def save(path: Path, session: Session, fingerprint: str) -> int:
    """Write the session's cache and tokens (and, in a pipeline, have every other rank save its part first:
    rank 0's file is the one a later start looks for)."""
    if hasattr(session.cache, "save_parts"):
        session.cache.save_parts(path.name.removesuffix(".safetensors"), fingerprint)
    tensors = dict(session.cache.state_dict())
    tensors["tokens"] = torch.tensor(session.tokens[: session.cache.pos], dtype=torch.long)
    return write_file(path, tensors, fingerprint)


def load(path: Path, session: Session, fingerprint: str) -> str | None:
    """Restore `session` from `path`. Returns None when restored (or when there is no file), else a
    note saying why the file was not used (the history is prefilled again). A damaged file is deleted;
    another model's is kept: opening a conversation with another model and leaving it unanswered must
    not cost the cache its own model made (the next save replaces it)."""
    if not path.is_file():
        return None
    vocab = session.engine.args.vocab_size
    state = read_file(path, fingerprint)
    reason = state if isinstance(state, str) else None
    if reason is None:
        try:
            tokens = state.pop("tokens")
            if tokens.dtype != torch.long or tokens.dim() != 1 or \
                    (tokens.numel() and not 0 <= int(tokens.min()) <= int(tokens.max()) < vocab):
                raise ValueError("its token ids do not fit this model")
            session.cache.load_state_dict(state)
            if tokens.numel() != session.cache.pos:
                raise ValueError("token count and cache length differ")
            if hasattr(session.cache, "load_parts"):
                session.cache.load_parts(path.name.removesuffix(".safetensors"), fingerprint)
            session.tokens = tokens.tolist()
            return None
        except _READ_ERRORS as exc:
            session.cache.reset()
            session.tokens = []
            reason = f"it is damaged ({str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__})"
    if reason == OTHER_MODEL:
        return (f"note: not using the saved KV cache {path.name}: {reason}; the history will be re-read (the "
                "file is replaced once this model has written a reply)")
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass
    return f"note: discarded the saved KV cache {path.name} because {reason}; the history will be re-read"


def enforce_disk_budget(folder: Path, budget: int, keep: Path | None = None) -> list[Path]:
    """Delete the least recently written cache files until the folder fits `budget` bytes."""
    files = sorted((p for p in folder.glob("*.safetensors") if p.is_file() and not p.is_symlink()),
                   key=lambda p: p.stat().st_mtime)
    total = sum(p.stat().st_size for p in files)
    removed = []
    for p in files:
        if total <= budget:
            break
        if keep is not None and p.name.split(".", 1)[0] == keep.name.split(".", 1)[0]:
            continue  # the conversation's own file, and the parts other ranks saved beside it
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
        checksum.remove_stale_temporaries(folder)  # left by a process killed mid-write

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

    def save(self, cid: str) -> str | None:
        """Write conversation `cid`'s cache; returns None, or a note when it could not be written.
        The conversation itself is in the store already: a cache that cannot be saved only costs
        re-reading the history next time, so it is never an error that stops a reply."""
        try:
            save(self.path(cid), self.sessions[cid], self.fingerprint)
            enforce_disk_budget(self.folder, disk_budget(), keep=self.path(cid))
        except OSError as exc:
            return (f"note: could not save the KV cache to {self.path(cid)} ({exc.strerror or exc}); the "
                    "conversation is saved, and continuing it re-reads the history"
                    + ("; remove what is in the way" if isinstance(exc, (IsADirectoryError, FileExistsError,
                                                                          NotADirectoryError)) else ""))
        finally:
            self._fit(keep=cid)
        return None

    def forget(self, cid: str) -> None:
        """The conversation was deleted: drop its cache from memory and disk."""
        self.sessions.pop(cid, None)
        if self.engine.pipeline is not None:  # the parts the other ranks saved, open or not
            self.engine.pipeline.tell({"op": "forget", "name": cid})
        try:
            self.path(cid).unlink(missing_ok=True)
        except OSError:
            pass

    def memory(self) -> int:
        return sum(s.cache.nbytes for s in self.sessions.values())

    def _fit(self, keep: str) -> None:
        while self.memory() > self.memory_budget and len(self.sessions) > 1:
            cid = next(c for c in self.sessions if c != keep)
            if self.sessions[cid].cache.pos:
                try:
                    save(self.path(cid), self.sessions[cid], self.fingerprint)
                except OSError as exc:  # spilling is an optimisation: the conversation is in the store
                    self.notes.append(f"note: could not spill the KV cache of {cid} to disk ({exc.strerror}); "
                                      "continuing it re-reads the history")
            del self.sessions[cid]
