"""Time to continue a long conversation with and without its saved KV cache.

    python benchmarks/continue_conversation.py /data/mistral-7b-random [--tokens 2000]

Turn 1 puts a ~N-token message into a new conversation; the store and cache are then copied, and
turn 2 ("Summarise that.") runs once with the saved cache and once with the cache file deleted.
Each run is a fresh `mixchat` process, as a user would run it; figures are wall time of the whole
process, time to first token and the cached/prefilled token counts it reports.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def turn(home: Path, args: list[str], text: str) -> dict:
    env = {**os.environ, "MIXCHAT_HOME": str(home)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "mixchat", *args, "--json", "--temperature", "0", "--max-tokens", "1"],
                          input=text.encode(), capture_output=True, env=env, check=True)
    done = json.loads(proc.stdout.decode().splitlines()[-1])
    done["wall_seconds"] = round(time.perf_counter() - start, 2)
    return done


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("--tokens", type=int, default=2000)
    ns = ap.parse_args()
    words = "river mountain lantern quiet harbour silver orchard thunder meadow candle".split()
    rng = random.Random(0)
    text = " ".join(rng.choice(words) for _ in range(int(ns.tokens / 1.25)))

    with tempfile.TemporaryDirectory() as tmp:
        home, copy = Path(tmp) / "home", Path(tmp) / "copy"
        first = turn(home, ["-m", str(ns.model)], text)
        cid = first["conversation"]
        kv = home / "kv" / f"{cid}.safetensors"
        shutil.copytree(home, copy)
        (copy / "kv" / f"{cid}.safetensors").unlink()
        cached = turn(home, ["-c"], "Summarise that.")
        uncached = turn(copy, ["-c"], "Summarise that.")
        result = {
            "first_turn": {k: first[k] for k in ("prefilled_tokens", "wall_seconds")},
            "history_tokens": cached["cached_tokens"] + cached["prefilled_tokens"],
            "cache_file_bytes": kv.stat().st_size,
            "with_cache": {k: cached[k] for k in ("cached_tokens", "prefilled_tokens", "time_to_first_token",
                                                  "wall_seconds")},
            "without_cache": {k: uncached[k] for k in ("cached_tokens", "prefilled_tokens", "time_to_first_token",
                                                       "wall_seconds")},
        }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
