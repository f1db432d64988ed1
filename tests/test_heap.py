"""mixchat.speed.heap: a prompt's freed activations stay in the heap, so the next prompt reuses their pages
instead of faulting fresh ones in (glibc)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# One prompt's feed-forward activations, allocated and freed the way 8 layers of a 7B do at 128 tokens ([128,
# 14336] fp32 products of 7.3 MB between [128, 4096] residuals), four prompts over; the minor page faults of
# each prompt are counted.
SCRIPT = """
import json, resource, torch
from mixchat.speed import heap
kept = heap.keep_freed_memory()
faults = []
for prompt in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    h = torch.ones(128, 4096)
    for layer in range(8):
        a = h * 2
        y1, y3 = torch.ones(128, 14336), torch.ones(128, 14336)
        s = torch.nn.functional.silu(y1)
        m = s * y3
        del y1, y3, s
        out = m[:, :4096] + a
        del m, a
        h = h + out
        del out
    del h
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": kept, "faults": faults}))
"""
BLOCK = 128 * 14336 * 4 // 4096  # the 4 KiB pages of one [128, 14336] fp32 activation


def _run(keep: bool) -> dict:
    env = {**os.environ, "MIXCHAT_KEEP_HEAP": "1" if keep else "0"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _glibc() -> bool:
    return sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION") is not None


@pytest.mark.skipif(not _glibc(), reason="the thresholds are glibc's malloc's")
def test_freed_activations_are_reused_without_page_faults():
    kept = _run(keep=True)
    assert kept["kept"] is True
    # After the first prompt faulted the heap in, the others reuse it: at most two activations' pages
    # faulted in over three prompts (the heap may still grow to its peak once).
    assert sum(kept["faults"][1:]) <= 2 * BLOCK, kept
    # With malloc's defaults (MIXCHAT_KEEP_HEAP=0) such blocks are mapped and unmapped, or trimmed off the
    # heap: later prompts fault several activations in again (glibc 2.3x: thousands of pages per prompt).
    default = _run(keep=False)
    assert default["kept"] is False
    assert sum(default["faults"][1:]) > max(4 * BLOCK, 4 * sum(kept["faults"][1:])), (default, kept)


def test_switch_off_leaves_malloc_alone(monkeypatch):
    from mixchat.speed import heap

    monkeypatch.setattr(heap, "_kept", None)
    monkeypatch.setenv("MIXCHAT_KEEP_HEAP", "0")
    calls = []
    monkeypatch.setattr(heap, "_mallopt", lambda *a: calls.append(a) or True)
    assert heap.keep_freed_memory() is False and calls == []
