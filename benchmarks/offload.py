"""Mixtral with a memory budget: the same greedy tokens as with every expert resident, and how fast.

    python benchmarks/offload.py /data/mixtral-4l-random --budget 5 [--quant none int8 int4] [--tokens 32]

For each precision, loads the folder twice in fresh processes: without a budget (every expert
resident; needs the memory) and with `--budget` GB (experts on demand, mixchat.speed.experts), decodes
the same greedy tokens from the same prompt, and prints whether they are identical, decode tok/s,
the expert cache's hit rate and the process's peak anonymous memory. Not run in CI.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "[INST] Tell me about the history of the Mediterranean trade routes. [/INST]"


def _anon_peak_gb() -> float:
    # VmHWM counts mapped file pages too; RssAnon is what the budget bounds (the page cache is the kernel's)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1e6
    return 0.0


def child(folder: str, quant: str | None, budget: float | None, tokens: int) -> dict:
    import torch

    from mixchat.engine.engine import Engine

    start = time.perf_counter()
    engine = Engine.load(folder, quant=quant, memory_budget=budget * 1e9 if budget else None, show_progress=False)
    load_s = time.perf_counter() - start
    cache = engine.new_cache()
    ids = torch.tensor(engine.tokenizer.encode(PROMPT))
    start = time.perf_counter()
    out = engine.model(ids, cache, last_only=True)
    prefill_s = time.perf_counter() - start
    generated, anon = [], 0.0
    start = time.perf_counter()
    for _ in range(tokens):
        generated.append(int(out.logits[-1].argmax()))
        out = engine.model(torch.tensor(generated[-1:]), cache, last_only=True)
        anon = max(anon, _anon_peak_gb())
    decode_s = time.perf_counter() - start
    result = {"quant": quant, "budget_gb": budget, "load_s": round(load_s, 2),
              "prefill_tokens_per_second": round(len(ids) / prefill_s, 2),
              "decode_tokens_per_second": round(tokens / decode_s, 3), "anon_rss_peak_gb": round(anon, 2),
              "tokens": generated}
    if engine.experts is not None:
        result["experts"] = {"capacity": engine.experts.capacity, **engine.experts.stats.as_dict()}
        engine.experts.close()
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder")
    ap.add_argument("--budget", type=float, default=5.0, help="GB of weights (default 5)")
    ap.add_argument("--quant", nargs="+", default=["none", "int8", "int4"])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--child", nargs=2, metavar=("QUANT", "BUDGET"), help=argparse.SUPPRESS)
    ns = ap.parse_args()
    if ns.child:
        quant, budget = ns.child
        print(json.dumps(child(ns.folder, None if quant == "none" else quant, float(budget) or None, ns.tokens)))
        return 0
    rows = []
    for quant in ns.quant:
        pair = []
        for budget in (0.0, ns.budget):  # fresh processes: one's memory never counts in the other's
            proc = subprocess.run([sys.executable, __file__, ns.folder, "--tokens", str(ns.tokens),
                                   "--child", quant, str(budget)], capture_output=True, text=True)
            if proc.returncode:
                print(f"{quant} budget {budget}: failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                return 1
            pair.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        full, budgeted = pair
        same = full["tokens"] == budgeted["tokens"]
        rows.append({"quant": quant, "same_tokens": same, "full": full, "budget": budgeted})
        e = budgeted.get("experts", {})
        print(f"{quant:5s}  same greedy tokens: {'yes' if same else 'NO'}  | all resident: decode "
              f"{full['decode_tokens_per_second']} tok/s, prefill {full['prefill_tokens_per_second']} tok/s, anon "
              f"{full['anon_rss_peak_gb']} GB | budget {ns.budget:g} GB: decode {budgeted['decode_tokens_per_second']} "
              f"tok/s, prefill {budgeted['prefill_tokens_per_second']} tok/s, anon {budgeted['anon_rss_peak_gb']} GB, "
              f"{e.get('capacity')} experts resident, hit rate {e.get('hit_rate')}, prefetches used "
              f"{e.get('prefetch_used')}/{e.get('prefetched')}", flush=True)
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
