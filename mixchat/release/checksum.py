"""Checksums for the files mixchat writes for itself (saved KV caches, quantized weights).

Both are safetensors files whose bytes a disk error, a full disk or another program can damage;
loaded as they are, a few flipped bytes become NaN logits or, worse, plausible wrong text. Each
tensor's bytes get a CRC-32 (zlib's: 2 GB/s here, and the damage to catch is accidental, not
malicious), stored in the file's metadata as one JSON object, and checked when the file is read.

A multi-gigabyte quantized file would cost seconds to check at every start, so a file that passed
is remembered by a stamp beside it (its size, modification time and inode): rewriting the file in
any way changes the stamp, and the next start checks it again.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

META_KEY = "crc32"


def crc_bytes(data: memoryview | bytes, value: int = 0) -> int:
    step = 64 << 20  # zlib takes at most 4 GB per call; smaller steps keep progress moving
    view = memoryview(data).cast("B")
    for start in range(0, len(view), step):
        value = zlib.crc32(view[start : start + step], value)
    return value


def crc_tensor(t: torch.Tensor) -> int:
    """CRC-32 of a tensor's bytes as safetensors stores them (contiguous, native little-endian)."""
    t = t.detach().contiguous().cpu()
    if t.numel() == 0:
        return 0
    return crc_bytes(t.reshape(-1).view(torch.uint8).numpy().data)


def digest_metadata(crcs: dict[str, int]) -> str:
    return json.dumps({k: f"{v:08x}" for k, v in sorted(crcs.items())}, separators=(",", ":"))


def parse_metadata(meta: dict[str, str] | None) -> dict[str, int] | None:
    """The per-tensor CRCs stored in a file's metadata, or None if it has none (or they are damaged)."""
    raw = (meta or {}).get(META_KEY)
    if not raw:
        return None
    try:
        table = json.loads(raw)
        return {str(k): int(v, 16) for k, v in table.items()}
    except (json.JSONDecodeError, TypeError, ValueError, AttributeError):
        return None


def mismatches(tensors: Iterable[tuple[str, torch.Tensor]], expected: dict[str, int],
               advance: Callable[[int], None] | None = None) -> list[str]:
    """Names whose bytes do not match `expected` (a name with no entry counts as a mismatch)."""
    bad = []
    for name, t in tensors:
        if expected.get(name) != crc_tensor(t):
            bad.append(name)
        if advance is not None:
            advance(t.nbytes)
    return bad


def file_mismatches(path: Path, expected: dict[str, int], advance: Callable[[int], None] | None = None) -> list[str]:
    """Like `mismatches`, for a safetensors file read through a memory map (no tensor is copied)."""
    import mmap

    from mixchat.release.folder import read_safetensors_header

    header, base = read_safetensors_header(path)
    bad = [k for k in expected if k not in header]
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
        view = memoryview(mm)
        try:
            for name, meta in header.items():
                begin, end = (base + o for o in meta["data_offsets"])
                if expected.get(name) != crc_bytes(view[begin:end]):
                    bad.append(name)
                if advance is not None:
                    advance(end - begin)
        finally:
            view.release()
    return bad


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def is_stamped(path: Path) -> bool:
    """True if `path` passed its check before and has not changed since."""
    try:
        return _stamp_path(path).read_text() == _stamp(path)
    except (OSError, UnicodeDecodeError):
        return False


def stamp(path: Path) -> None:
    """Remember that `path` passed its check; best effort (a read-only folder just checks again)."""
    tmp = _stamp_path(path).with_name(_stamp_path(path).name + f".tmp{os.getpid()}")
    try:
        tmp.write_text(_stamp(path))
        os.replace(tmp, _stamp_path(path))
    except OSError:
        tmp.unlink(missing_ok=True)


def unstamp(path: Path) -> None:
    _stamp_path(path).unlink(missing_ok=True)


def remove_stale_temporaries(folder: Path, pattern: str = "*.tmp*") -> list[Path]:
    """Delete temporary files (named `….tmp<pid>`) whose writer is gone, e.g. killed mid-write.
    A file whose pid still runs is left alone: another mixchat may be writing it right now."""
    removed = []
    try:
        candidates = list(folder.glob(pattern))
    except OSError:
        return removed
    for p in candidates:
        pid = p.name.rpartition(".tmp")[2]
        if pid.isdigit() and _alive(int(pid)):
            continue
        try:
            if p.is_file() and not p.is_symlink():
                p.unlink()
                removed.append(p)
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True
