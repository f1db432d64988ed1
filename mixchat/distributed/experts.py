"""The expert split: every rank runs every layer, and each holds a share of every layer's experts.

A token's two chosen experts may sit on different ranks. Each rank sums the outputs of the chosen experts
it holds (in ascending id, from zero), the ranks' sums are added (all_reduce), and only then does the sum
join the residual, as in one process. With top-2 routing at most two of the added parts are not zero, and
x + 0 is x, so the result is one process's bit for bit whatever order the reduction takes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mixchat.model.model import MoeFeedForward


class SplitMoe(MoeFeedForward):
    """MoeFeedForward holding experts `local` only (the others stay on the meta device); reduce(out) adds the
    other ranks' parts into out. The fused step reads `local` and `reduce` too (mixchat.speed.decoder)."""

    def __init__(self, moe: MoeFeedForward, local: range, reduce: Callable[[torch.Tensor], None]) -> None:
        nn.Module.__init__(self)
        self.top_k, self.gate, self.experts = moe.top_k, moe.gate, moe.experts
        self.local, self.reduce = local, reduce
        # Experts on demand (--memory-budget, mixchat.speed.experts): the offloaded layer this one wraps still
        # predicts the next layer's experts and fetches this rank's for the fused step. Not a submodule: its
        # weights are this one's.
        object.__setattr__(self, "inner", moe)
        if hasattr(moe, "decode_fetch"):
            self.decode_fetch = moe.decode_fetch

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if hasattr(self.inner, "predict"):
            self.inner.predict(x)
        top_logits, chosen = torch.topk(self.gate(x), self.top_k, dim=-1)
        weights = torch.softmax(top_logits.float(), dim=-1)
        out = torch.zeros_like(x)
        for e in chosen.unique().tolist():
            if e in self.local:
                tokens, rank = torch.where(chosen == e)
                out.index_add_(0, tokens, self.experts[e](x[tokens]) * weights[tokens, rank, None].to(x.dtype))
        self.reduce(out)
        return out, chosen, weights


def split_experts(model: nn.Module, local: range, reduce: Callable[[torch.Tensor], None]) -> None:
    """Make every MoE layer of `model` a SplitMoe over experts `local`."""
    for block in model.layers:
        if isinstance(block.feed_forward, MoeFeedForward):
            block.feed_forward = SplitMoe(block.feed_forward, local, reduce)
