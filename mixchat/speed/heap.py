"""Freed activations kept in the process's heap, so the next layer and the next prompt reuse their pages.

A prompt's activations are megabytes each (a 7B's [128, 14336] fp32 FFN product is 7.3 MB). glibc's malloc
serves blocks above its mmap threshold (128 KiB at start, raised by each free of a larger mapped block) with
a fresh mmap() and unmaps them when freed, and trims free memory off the heap's top above its trim threshold
(twice the other). Each of a prompt's hundreds of such buffers was therefore new memory: a page fault and a
zeroed 4 KiB page per 4 KiB written, inside the kernels' GEMMs (which write their outputs) and in the
elementwise ops between them. Fixing both thresholds keeps blocks up to 32 MiB (glibc's largest threshold)
in the heap and the heap's free top resident, as llama.cpp's one preallocated compute buffer is.

Measured on an AMD EPYC Zen 5 (2 threads, full-width 7B, 128-token prompts, `mixchat bench`): bf16 prefill
from ~34-39 to ~41-44 tok/s, the first prompt after loading from ~25-30 to ~34-39; the torch ops between
the GEMMs from 400-550 to 250 ms per prompt (silu alone 140 to 16 ms). Decode allocates nothing that large.
The cost is memory the process keeps after its largest prompt: the activations of one chunk of
cache.DEFAULT_CHUNK tokens, about 100-200 MB for a 7B, next to gigabytes of weights.

glibc only: elsewhere (musl, macOS) mallopt is missing or ignores these, and nothing changes.
MIXCHAT_KEEP_HEAP=0 leaves malloc's defaults (to compare).
"""

from __future__ import annotations

import ctypes
import sys

from mixchat.paths import env_flag

_M_TRIM_THRESHOLD = -1  # malloc.h
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc refuses more (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD = 1 << 30  # free heap top kept up to this; a chunk's activations stay well under it

_kept: bool | None = None


def keep_freed_memory() -> bool:
    """Fix glibc's mmap and trim thresholds (once per process) so freed activations stay in the heap; whether
    they are fixed. Setting them also turns off glibc's own adjustment of the thresholds."""
    global _kept
    if _kept is None:
        _kept = env_flag("MIXCHAT_KEEP_HEAP", True) and _mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) \
            and _mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    return _kept


def _mallopt(param: int, value: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(param, value) == 1
