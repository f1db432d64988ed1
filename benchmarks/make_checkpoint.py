"""Write a random release folder in Mistral's exact format, full width or tiny.

    python benchmarks/make_checkpoint.py --preset mistral-7b /data/mistral-7b-random
    python benchmarks/make_checkpoint.py --preset mixtral-8x7b --layers 2 /data/mixtral-2l-random
    python benchmarks/make_checkpoint.py --preset tiny-mixtral /tmp/tiny-mixtral
    python benchmarks/make_checkpoint.py --preset mistral-nemo --layers 8 /data/nemo-8l-random

The weights are N(0, 0.02) noise: right shapes, names, dtypes and files for speed and memory work,
meaningless text. The tokenizer is mistral-common's real one for the preset (v1 tokenizer.model, or
tekken.json for the 131072-id presets; pip install mistral-common) or the one given with --tokenizer.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from mixchat.dev.synthetic import mistral_common_tokenizer, write_release
from mixchat.release.config import ModelArgs

PRESETS = {
    "mistral-7b": {"dim": 4096, "n_layers": 32, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32,
                   "n_kv_heads": 8, "norm_eps": 1e-05, "sliding_window": 4096, "vocab_size": 32000},
    "mixtral-8x7b": {"dim": 4096, "n_layers": 32, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32,
                     "n_kv_heads": 8, "norm_eps": 1e-05, "vocab_size": 32000,
                     "moe": {"num_experts_per_tok": 2, "num_experts": 8}},
    # Mistral-Nemo-Instruct-2407: head_dim 128 is not dim / n_heads; tekken's 131072 ids; 128k context.
    "mistral-nemo": {"dim": 5120, "n_layers": 40, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32,
                     "n_kv_heads": 8, "norm_eps": 1e-05, "vocab_size": 131072, "rope_theta": 1000000.0,
                     "max_seq_len": 131072, "sliding_window": None},
    # Ministral-8B-shaped, with sliding_window as a per-layer pattern the way its params.json gives one (here a
    # full-attention layer every fourth: the pattern is an example, the shapes are the point).
    "ministral-8b": {"dim": 4096, "n_layers": 36, "head_dim": 128, "hidden_dim": 12288, "n_heads": 32,
                     "n_kv_heads": 8, "norm_eps": 1e-05, "vocab_size": 131072, "rope_theta": 100000000.0,
                     "max_seq_len": 131072, "sliding_window": [None, 32768, 32768, 32768]},
    "tiny-mistral": {"dim": 256, "n_layers": 4, "head_dim": 32, "hidden_dim": 768, "n_heads": 8, "n_kv_heads": 2,
                     "norm_eps": 1e-05, "sliding_window": 64, "vocab_size": 32000},
    "tiny-mixtral": {"dim": 256, "n_layers": 4, "head_dim": 32, "hidden_dim": 512, "n_heads": 8, "n_kv_heads": 2,
                     "norm_eps": 1e-05, "vocab_size": 32000, "moe": {"num_experts_per_tok": 2, "num_experts": 8}},
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny-mixtral")
    ap.add_argument("--layers", type=int, help="cut the model to this many layers")
    ap.add_argument("--layout", choices=["dense", "torrent", "experts"],
                    help="weight layout (default: dense, or torrent for MoE presets)")
    ap.add_argument("--safetensors", action="store_true", help="write consolidated.safetensors instead of .pth")
    ap.add_argument("--tokenizer", type=Path, help="tokenizer file to copy (default: mistral-common's v1, or "
                    "tekken for 131072 ids)")
    ap.add_argument("--shards", type=int, default=0, help="split the weights into this many safetensors shards")
    ap.add_argument("--seed", type=int, default=0)
    ns = ap.parse_args()

    params = dict(PRESETS[ns.preset])
    if ns.layers:
        params["n_layers"] = ns.layers
        if isinstance(params.get("sliding_window"), list):  # a cut model keeps the pattern's first layers
            pattern = params["sliding_window"]
            params["sliding_window"] = [pattern[i % len(pattern)] for i in range(ns.layers)]
    args = ModelArgs.from_dict(params)
    tokenizer = ns.tokenizer or mistral_common_tokenizer("tekken" if args.vocab_size == 131072 else "v1")
    if tokenizer is None:
        print("no tokenizer: pip install mistral-common, or pass --tokenizer PATH", file=sys.stderr)
        return 2
    layout = ns.layout or ("torrent" if args.is_moe else "dense")
    start = time.perf_counter()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    # params.json as the real release writes it: the Mixtral torrent omits rope_theta and sliding_window.
    write_release(ns.folder, args, layout, seed=ns.seed, tokenizer=tokenizer, params=params,
                  safetensors=ns.safetensors, shards=ns.shards)
    size = sum(p.stat().st_size for p in ns.folder.iterdir())
    print(f"wrote {ns.folder} ({layout}, {size / 1e9:.2f} GB) in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
