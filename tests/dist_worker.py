"""Run by torchrun in tests/test_distributed.py: a fixed sequence of forward passes through a model split
across the ranks, rank 0 saving every logit, expert and weight it got (the other ranks serve it).

    torchrun --standalone --nproc-per-node 2 tests/dist_worker.py FOLDER OUT.pt DTYPE QUANT RANK_LAYERS SPLIT
"""

from __future__ import annotations

import sys

import torch

from mixchat.distributed import group as dist_group
from mixchat.distributed.pipeline import Pipeline
from mixchat.distributed.serving import serve


def passes(engine, cache) -> dict[str, list[torch.Tensor]]:
    """A prompt longer than a chunk, one-token steps past the sliding window, a 5-token pass, a rewind, and
    one-token steps again: what a conversation does to a cache."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, engine.args.vocab_size, (40,), generator=g)
    got: dict[str, list[torch.Tensor]] = {"logits": [], "experts": [], "weights": []}

    def run(ids: torch.Tensor) -> None:
        out = engine.model(ids, cache)
        got["logits"].append(out.logits)
        if out.experts is not None:
            got["experts"].append(out.experts)
            got["weights"].append(out.expert_weights)

    run(tokens[:19])
    for t in tokens[19:31]:
        run(t[None])
    run(tokens[31:36])
    cache.rewind(33)
    for t in tokens[33:40]:
        run(t[None])
    return got


def main() -> int:
    folder, out, dtype, quant, rank_layers, split = sys.argv[1:7]
    group = dist_group.start(60)
    if group.rank != 0:
        return serve(group)
    from mixchat.engine.engine import Engine

    engine = Engine.load(folder, dtype=dtype, threads=1, quant=None if quant == "none" else quant,
                         show_progress=False, rank_layers=[int(n) for n in rank_layers.split(",")], split=split)
    cache = engine.new_cache(chunk_size=8)
    torch.save({**passes(engine, cache), "split": engine.split, "world_size": engine.world_size}, out)
    Pipeline.of(group).stop()
    group.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
