"""Weights copied out of the file mapping into anonymous memory backed by 2 MiB pages.

Decoding streams every weight once per token. Mapped straight from the release file, the weights sit
in 4 KiB page-cache pages: streaming 14 GB crosses 3.5 million page boundaries per token, each one a
TLB miss and a restart for the hardware prefetchers, which do not cross pages. In one anonymous region
that the kernel backs with transparent huge pages (madvise mode is the common default), the same
stream crosses 7,000. The copy costs one read of the file (it replaces warming the page cache, which
reads it anyway) and no extra memory once the kernel drops the then unused page-cache copy.

Linux only (elsewhere, or when the region cannot be mapped, the weights stay where they are).
"""

from __future__ import annotations

import mmap
import sys
from collections.abc import Callable

import torch

from mixchat.progress import Progress

HUGE = 2 << 20
_ALIGN = 64  # each tensor starts on a cache line


def supported() -> bool:
    return sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE")


def _layout(t: torch.Tensor) -> tuple[torch.Size, bool] | None:
    """The shape to allocate and whether to hand back its transpose; None for layouts left in place."""
    if t.is_contiguous():
        return t.shape, False
    if t.dim() == 2 and t.t().is_contiguous():  # the torrent layout's w2: keep its strides
        return t.t().shape, True
    return None


def copy_into_huge_pages(tensors: dict[str, torch.Tensor], label: str = "loading weights into memory",
                         show: bool | None = None, on_progress: Callable[[int, int], None] | None = None,
                         dtypes: dict[str, torch.dtype] | None = None) -> dict[str, torch.Tensor]:
    """The same tensors (same shapes and strides), copied into one huge-page region, in order, and
    converted on the way to the dtype `dtypes` gives a name, if any (one copy, where converting first
    would make two). Tensors with other layouts, or not on the CPU, are returned as they are (converted
    if asked)."""
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
    region = mmap.mmap(-1, total + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)
    # frombuffer keeps the mmap object alive as long as any view of it is.
    raw = torch.frombuffer(region, dtype=torch.uint8)
    start = (-raw.data_ptr()) % HUGE  # page-aligned at both ends of every 2 MiB stretch
    with Progress(label, total, enabled=show) as bar:
        for name, offset, shape, transposed in plan:
            t = tensors[name]
            dst = raw[start + offset: start + offset + size(name, t)].view(dtypes.get(name, t.dtype)).view(shape)
            if transposed:
                dst = dst.t()
            dst.copy_(t)
            out[name] = dst
            bar.advance(size(name, t))
            if on_progress is not None:
                on_progress(int(bar.done), total)
    return {n: out[n] for n in tensors}  # in the caller's order
