"""Load time, memory and inspect time for a release folder (the figures in the closing notes).

    python benchmarks/load.py /data/mistral-7b-random [--drop-caches] [--dtype bf16] [--quant int8]

Reports: the time from starting `mixchat -p` to its first token on stdout (a fresh process, run
first so --drop-caches makes it a cold start), `mixchat inspect` wall time (fresh process),
Engine.load wall time (including the sequential read that fills the page cache) and how much of it
that read took, time of the first forward token, peak RSS and how much of it is anonymous memory
(zero-copy loading keeps that near zero for the weights). With --drop-caches the page cache is dropped
again before Engine.load, and once more before a plain sequential read of the weights file (16 MiB
read() calls, like dd): the disk's own rate, which a cold load cannot beat.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def drop_caches() -> None:
    subprocess.run(["sync"])
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--drop-caches", action="store_true", help="drop the page cache first (needs root)")
    ap.add_argument("--no-warm", action="store_true", help="skip the sequential read; page in on demand")
    ap.add_argument("--quant", help="int8 / int4: load through the quantized cache (quantizing first if needed)")
    ns = ap.parse_args()

    if ns.drop_caches:
        drop_caches()

    # What a user waits for: from typing the command to the first token of the answer on stdout,
    # process start, imports and load included (measured first, so a dropped page cache is cold).
    argv = [sys.executable, "-m", "mixchat", "-m", str(ns.folder), "--no-save", "--json", "--max-tokens", "2",
            "--temperature", "0", "-p", "Hello", "--dtype", ns.dtype] + (["--quant", ns.quant] if ns.quant else [])
    start = time.perf_counter()
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as proc:
        proc.stdout.readline()
        first_token_s = time.perf_counter() - start
        proc.communicate()

    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mixchat", "inspect", str(ns.folder)], check=True, capture_output=True)
    inspect_s = time.perf_counter() - start

    import torch

    import mixchat.engine.engine as engine_mod
    from mixchat.engine.engine import Engine

    if ns.drop_caches:
        drop_caches()
    read = {"s": 0.0}
    warm_page_cache = engine_mod.warm_page_cache

    def timed_warm(*args, **kwargs) -> None:
        t = time.perf_counter()
        warm_page_cache(*args, **kwargs)
        read["s"] += time.perf_counter() - t

    engine_mod.warm_page_cache = timed_warm
    start = time.perf_counter()
    engine = Engine.load(ns.folder, dtype=ns.dtype, warm=not ns.no_warm, quant=ns.quant)
    load_s = time.perf_counter() - start
    anon_after_load = status_kb("RssAnon")
    cache = engine.new_cache()
    start = time.perf_counter()
    engine.model(torch.tensor([1]), cache, last_only=True)
    first_s = time.perf_counter() - start
    result = {
        "folder": str(ns.folder),
        "weights_gb": engine.release.weights.stat().st_size / 1e9,
        "dtype": str(engine.dtype),
        "quant": ns.quant,
        "command_to_first_token_s": round(first_token_s, 2),
        "inspect_s": round(inspect_s, 2),
        "load_s": round(load_s, 2),
        "load_file_read_s": round(read["s"], 2),  # the warm-up read inside load_s (0: not warmed)
        "first_forward_s": round(first_s, 2),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
        "anon_rss_after_load_gb": round(anon_after_load / 1e6, 2),
        "anon_rss_after_first_token_gb": round(status_kb("RssAnon") / 1e6, 2),
    }
    if ns.drop_caches:  # after the engine is gone: the kernel keeps pages that a process still maps
        weights = engine.release.weights
        del engine, cache
        gc.collect()
        drop_caches()
        start = time.perf_counter()
        with open(weights, "rb", buffering=0) as f:
            buf = bytearray(16 << 20)
            while f.readinto(buf):
                pass
        result["plain_read_s"] = round(time.perf_counter() - start, 2)  # the disk's rate for the same file
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
