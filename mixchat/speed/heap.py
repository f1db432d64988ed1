"""Freed activations kept in the process's heap, so the next layer and the next prompt reuse their pages.

A prompt's activations are megabytes each (a 7B's [128, 14336] fp32 FFN product is 7.3 MB). glibc's malloc
serves blocks above its mmap threshold (128 KiB at start, raised by each free of a larger mapped block) with
a fresh mmap() and unmaps them when freed, trims free memory off the heap's top above its trim threshold
(twice the other), and unmaps a thread arena's 64 MiB heaps once they are empty. Each of a prompt's hundreds
of such buffers was therefore new memory: a page fault and a zeroed 4 KiB page per 4 KiB written, inside
the kernels' GEMMs (which write their outputs) and in the elementwise ops between them. Fixing the
thresholds keeps blocks up to 32 MiB (glibc's largest threshold) in the heap and its free top resident, as
llama.cpp's one preallocated compute buffer is; one arena puts the app's generation thread on that same
heap (a thread arena's heaps come and go whatever the thresholds).

Measured on an AMD EPYC Zen 5 (2 threads, full-width 7B, 128-token prompts): 35,000-160,000 page faults per
prompt before, 0-1,800 after the first; the torch ops between the GEMMs from 400-550 to 250 ms per prompt
(silu alone 140 to 16 ms). Decode allocates nothing that large. The cost is memory the process keeps after
its largest prompt (the activations of one chunk of cache.DEFAULT_CHUNK tokens, about 100-200 MB for a 7B)
and blocks under 32 MiB that a dropped model leaves in the heap, which release_freed() gives back.

glibc only: elsewhere (musl, macOS) mallopt is missing or ignores these, and nothing changes. A user's own
malloc settings (MALLOC_*_ environment variables, GLIBC_TUNABLES) win: then these are left alone, as with
MIXCHAT_KEEP_HEAP=0.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

from mixchat.paths import env_flag

# malloc.h's mallopt parameters, and what each is set to
_SETTINGS = (
    (-3, 32 << 20),  # M_MMAP_THRESHOLD: glibc refuses more (HEAP_MAX_SIZE / 2 on 64-bit)
    (-1, 256 << 20),  # M_TRIM_THRESHOLD: free heap top kept up to this; a chunk's activations fit well under it
    (-2, 64 << 20),  # M_TOP_PAD: the heap grows (and keeps) this much beyond each need: no shrink-grow cycles
    (-8, 1),  # M_ARENA_MAX: threads started from now on share the main heap (see the module's docstring)
)
_USER_SETTINGS = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                  "MALLOC_MMAP_MAX_")

_kept: bool | None = None


def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep freed activations (once per process; best before any thread starts, since
    a thread keeps the arena it began with); whether it is set. Setting the thresholds also turns off
    glibc's own adjustment of them."""
    global _kept
    if _kept is None:
        _kept = env_flag("MIXCHAT_KEEP_HEAP", True) and not _user_tuned() and (libc := _glibc()) is not None \
            and all(_mallopt(libc, param, value) for param, value in _SETTINGS)
    return _kept


def release_freed() -> None:
    """Give the free pages anywhere in the heap back to the system (malloc_trim): after a model is dropped,
    its quantized weights' blocks under 32 MiB would otherwise stay resident until reused."""
    if _kept and (libc := _glibc()) is not None:
        libc.malloc_trim(0)


def _user_tuned() -> bool:
    return any(name in os.environ for name in _USER_SETTINGS) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "")


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library with mallopt and malloc_trim bound, where it is glibc (musl's mallopt is a no-op)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (glibc's own symbol)
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        return libc
    except (OSError, AttributeError):
        return None


def _mallopt(libc: ctypes.CDLL, param: int, value: int) -> bool:
    return libc.mallopt(param, value) == 1
