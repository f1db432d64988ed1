"""Weights copied out of the file mapping into anonymous memory backed by 2 MiB pages.

Decoding streams every weight once per token. Mapped straight from the release file, the weights sit
in 4 KiB page-cache pages: streaming 14 GB crosses 3.5 million page boundaries per token, each one a
TLB miss and a restart for the hardware prefetchers, which do not cross pages. In one anonymous region
that the kernel backs with transparent huge pages (madvise mode is the common default), the same
stream crosses 7,000. The copy costs one read of the file (it replaces warming the page cache, which
reads it anyway). Each source tensor's pages are unmapped from the process once the copy has moved
past them (release_sources), so resident memory grows by the copy alone rather than by the copy and the
file's pages: both would not fit a 24 GB machine for a 14.5 GB folder, and the kernel would have to
reclaim mapped pages while the copy faults in huge ones. The page cache keeps the file for the next load.

Linux only (elsewhere, or when the region cannot be mapped, the weights stay where they are).
"""

from __future__ import annotations

import ctypes
import math
import mmap
import sys
from collections.abc import Callable

import torch

from mixchat.progress import Progress, ProgressListener

HUGE = 2 << 20
_ALIGN = 64  # each tensor starts on a cache line


def supported() -> bool:
    """Linux with madvise(MADV_HUGEPAGE), and transparent huge pages not switched off (with "[never]" the
    copy would land in 4 KiB pages again: a slower load for nothing)."""
    if not (sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE")):
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return True  # no such file (a container hiding it): madvise decides


_PAGE = mmap.PAGESIZE


def _file_mappings() -> list[tuple[int, int]]:
    """The address ranges of this process that map a file (/proc/self/maps lines with a path)."""
    spans = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].startswith("/") and fields[4] != "0":
                    lo, hi = fields[0].split("-")
                    spans.append((int(lo, 16), int(hi, 16)))
    except OSError:
        return []
    return spans


def _releaser(tensors: dict[str, torch.Tensor], names: list[str]) -> Callable[[str | None], None]:
    """release(name) after each copy, release(None) at the end: unmap the whole pages of the copied source
    tensors from the process (MADV_DONTNEED), where they map a file (dropped file pages fault back in from
    it if read again) and no other tensor's bytes share them. Anything else is left alone: anonymous
    memory would be zeroed. A source is released once the copies have moved more than 2 MiB away from it:
    the page cache keeps a file in folios of up to 2 MiB, and a read fault maps the whole folio, so
    releasing right behind the reads would be undone by the next one."""
    files = _file_mappings()
    libc = ctypes.CDLL(None, use_errno=True) if files else None
    spans = {n: (tensors[n].data_ptr(), tensors[n].data_ptr() + tensors[n].numel() * tensors[n].element_size())
             for n in names}
    order = sorted(spans.values())
    shared = {s for a, b in zip(order, order[1:], strict=False) if a[1] > b[0] for s in (a, b)}
    pending: list[tuple[int, int]] = []

    def drop(lo: int, hi: int) -> None:
        lo, hi = -(-lo // _PAGE) * _PAGE, hi // _PAGE * _PAGE  # whole pages only: neighbours keep theirs
        if hi > lo and any(a <= lo and hi <= b for a, b in files):
            libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), mmap.MADV_DONTNEED)

    def release(name: str | None) -> None:
        if libc is None:
            return
        near = (spans[name][0] - HUGE, spans[name][1] + HUGE) if name is not None else None
        for span in list(pending):
            if near is None or span[1] <= near[0] or span[0] >= near[1]:
                drop(*span)
                pending.remove(span)
        if name is not None and spans[name] not in shared:
            pending.append(spans[name])

    return release


def _layout(t: torch.Tensor) -> tuple[torch.Size, bool] | None:
    """The shape to allocate and whether to hand back its transpose; None for layouts left in place."""
    if t.is_contiguous():
        return t.shape, False
    if t.dim() == 2 and t.t().is_contiguous():  # the torrent layout's w2: keep its strides
        return t.t().shape, True
    return None


def _region(nbytes: int) -> torch.Tensor:
    """`nbytes` uint8 from a 2 MiB boundary of a fresh anonymous mapping advised MADV_HUGEPAGE. The tensor
    keeps the mapping alive (frombuffer holds the mmap object as long as any view of it lives)."""
    region = mmap.mmap(-1, nbytes + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)
    raw = torch.frombuffer(region, dtype=torch.uint8)
    start = (-raw.data_ptr()) % HUGE  # page-aligned at both ends of every 2 MiB stretch
    return raw[start: start + nbytes]


def empty(shape: tuple[int, ...], dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """An uninitialised tensor in huge pages where supported(), else torch.empty. For buffers whose read
    rate is set beside the weights' (the read probe, the row-read measurement): in 4 KiB pages the same
    loads read 10-15 % slower than over the weights' 2 MiB pages (a Zen 3 EPYC), which would measure page
    walks rather than the kernels, and let the weights beat the "ceiling"."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0 or not supported():
        return torch.empty(shape, dtype=dtype)
    return _region(nbytes).view(dtype).view(shape)


def copy_into_huge_pages(tensors: dict[str, torch.Tensor], label: str = "loading weights into memory",
                         show: bool | None = None, listener: ProgressListener | None = None,
                         dtypes: dict[str, torch.dtype] | None = None,
                         release_sources: bool = False) -> dict[str, torch.Tensor]:
    """The same tensors (same shapes and strides), copied into one huge-page region, in order, and
    converted on the way to the dtype `dtypes` gives a name, if any (one copy, where converting first
    would make two). Tensors with other layouts, or not on the CPU, are returned as they are (converted
    if asked). release_sources: the caller is done with the sources, so their file-mapped pages leave the
    process as the copy moves past them (see the module docstring)."""
    dtypes = dtypes or {}

    def size(name: str, t: torch.Tensor) -> int:
        return t.numel() * dtypes.get(name, t.dtype).itemsize

    plan: list[tuple[str, int, torch.Size, bool]] = []
    total = 0
    for name, t in tensors.items():
        if t.device.type != "cpu" or (lay := _layout(t)) is None:
            continue
        plan.append((name, total, *lay))
        total += -(-size(name, t) // _ALIGN) * _ALIGN
    planned = {p[0] for p in plan} if supported() else set()
    out = {n: t.to(dtypes.get(n, t.dtype)) for n, t in tensors.items() if n not in planned}
    if not planned:
        return out
    raw = _region(total)
    release = _releaser(tensors, [p[0] for p in plan]) if release_sources else None
    with Progress(label, sum(size(n, tensors[n]) for n, *_ in plan), enabled=show, listener=listener) as bar:
        for name, offset, shape, transposed in plan:
            t = tensors[name]
            dst = raw[offset: offset + size(name, t)].view(dtypes.get(name, t.dtype)).view(shape)
            if transposed:
                dst = dst.t()
            dst.copy_(t)
            out[name] = dst
            if release is not None:
                release(name)
            bar.advance(size(name, t))
        if release is not None:
            release(None)
    return {n: out[n] for n in tensors}  # in the caller's order
