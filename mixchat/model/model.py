"""Mistral and Mixtral in plain PyTorch, for one sequence at a time.

Parameter names equal the release's own (mistral-inference's experts layout for MoE), so loading is
a name-for-name assignment. The model owns no state besides its weights: the KV cache is passed in.
Each layer attends within its own sliding window (args.window(i), None: the whole sequence), which it
gets from the cache as its step's mask over its buffer's slots (Ministral mixes windowed and full layers).
Norms, rotary embeddings and softmax run in fp32 whatever the weight dtype, as the reference does
and because CPU bf16 reductions are both slow and lossy.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mixchat.model.cache import KVCache, Step
from mixchat.release.config import ModelArgs


class Linear(nn.Linear):
    """nn.Linear without bias, for input of any float dtype: the residual stream may be wider than the
    weights (see residual_dtype)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)


def residual_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype of the residual stream for a model whose embedding is `weight`. On CPU a bf16 model
    keeps it in fp32 (as llama.cpp does): every product there runs in fp32 anyway (the kernels take and
    give fp32, torch's bf16 CPU ops are slow), so bf16 activations only added two conversions per
    layer and per weight, about a tenth of a 7B decode step. On GPUs it is the weights' dtype."""
    return torch.float32 if weight.device.type == "cpu" and weight.dtype == torch.bfloat16 else weight.dtype


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.weight.shape, eps=self.eps).type_as(x) * self.weight


@functools.cache
def _inv_freq(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)


def rotary_angles(positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """e^(i * position * theta^(-2j/head_dim)) as complex64 [T, head_dim/2]: the rotation of pair j."""
    angles = positions.float()[:, None] * _inv_freq(head_dim, theta, positions.device)[None, :]
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) as the complex number x[2i] + i*x[2i+1].

    This is the layout Mistral's weights were trained with; Hugging Face's half-split rotate_half
    only gives the same result after permuting the rows of wq and wk. One complex multiply rather
    than the cos/sin arithmetic: a decode step runs this 64 times, and each torch op costs microseconds.
    """
    t, h, d = x.shape  # [T, heads, head_dim]
    pairs = torch.view_as_complex(x.float().reshape(t, h, d // 2, 2))
    return torch.view_as_real(pairs * rotation[:, None, :]).view(t, h, d).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = Linear(args.dim, args.n_heads * args.head_dim)
        self.wk = Linear(args.dim, args.n_kv_heads * args.head_dim)
        self.wv = Linear(args.dim, args.n_kv_heads * args.head_dim)
        self.wo = Linear(args.n_heads * args.head_dim, args.dim)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, step: Step,
                kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        t = x.shape[0]
        nkv, hd = self.n_kv_heads, self.head_dim
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = apply_rotary(q.view(t, self.n_heads, hd), rope)  # [T, H, hd]
        k = apply_rotary(k.view(t, nkv, hd), rope)  # [T, Hkv, hd]
        v = v.view(t, nkv, hd)
        cache_k, cache_v = kv  # this layer's [Hkv, capacity, hd]
        cache_k[:, step.slots] = k.transpose(0, 1).to(cache_k.dtype)
        cache_v[:, step.slots] = v.transpose(0, 1).to(cache_v.dtype)
        keys, values = cache_k[:, : step.length], cache_v[:, : step.length]  # [Hkv, S, hd]
        # A bf16 cache with fp32 queries (residual_dtype: a CPU bf16 model) attends in fp32.
        if keys.dtype != q.dtype:
            q, keys, values = q.float(), keys.float(), values.float()
        # Grouped-query attention without repeating keys (query head h uses kv head h // (H / Hkv)); the
        # mask (causal, and this layer's window) is [T, S], shared by all heads. Batched (4-D): torch's fused
        # CPU kernel takes only that; with 3-D it fell back to the unfused math, whose attention is 2-3.5x slower.
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys[None], values[None], attn_mask=step.mask,
                                             enable_gqa=True)[0]  # [H, T, hd]
        return self.wo(out.transpose(0, 1).reshape(t, -1).to(x.dtype))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = Linear(dim, hidden_dim)
        self.w2 = Linear(hidden_dim, dim)
        self.w3 = Linear(dim, hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoeFeedForward(nn.Module):
    """Sparse mixture of experts: each token goes to the top-k experts by gate logit, mixed with a
    softmax over those k logits (equal to softmax-over-all then renormalising the chosen k)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.top_k = args.moe.num_experts_per_tok
        self.gate = Linear(args.dim, args.moe.num_experts)
        self.experts = nn.ModuleList(FeedForward(args.dim, args.hidden_dim) for _ in range(args.moe.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        top_logits, chosen = torch.topk(self.gate(x), self.top_k, dim=-1)  # [T, k] best first
        weights = torch.softmax(top_logits.float(), dim=-1)  # [T, k]
        out = torch.zeros_like(x)
        for e in chosen.unique().tolist():
            tokens, rank = torch.where(chosen == e)
            y = self.experts[e](x[tokens]) * weights[tokens, rank, None].to(x.dtype)
            out.index_add_(0, tokens, y)
        return out, chosen, weights


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention = Attention(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = MoeFeedForward(args) if args.is_moe else FeedForward(args.dim, args.hidden_dim)

    def forward(self, x, rope, step, kv):
        h = x + self.attention(self.attention_norm(x), rope, step, kv)
        return self.add_feed_forward(h)

    def add_feed_forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """h + the feed-forward of h, and the chosen experts and their weights (None, None when dense)."""
        ff = self.feed_forward(self.ffn_norm(h))
        if isinstance(ff, tuple):
            return h + ff[0], ff[1], ff[2]
        return h + ff, None, None


@dataclass
class Output:
    logits: torch.Tensor  # [T, vocab] fp32 (only the last row when last_only)
    experts: torch.Tensor | None  # [T, n_layers, top_k] expert ids, best first (MoE only)
    expert_weights: torch.Tensor | None  # [T, n_layers, top_k] fp32 mixing weights (MoE only)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = Linear(args.dim, args.vocab_size)
        # decoder(h, rope, steps, cache) -> (h, experts, expert weights) or None: a step of a few tokens done
        # elsewhere (mixchat.speed.decoder runs it in C, each row as a one-token step computes it), with
        # decoder.head(h) -> their logits or None; None from it, or no decoder, runs the layers here.
        self.decoder: Callable | None = None
        # A pipeline rank (mixchat.distributed) holds the layers `owned` only, the others staying on the meta
        # device. ranks: the other ranks of a torchrun launch, told of each chunk by ranks.start(h, cache) once its
        # slots are taken; ranks.finish(h, cache, experts, weights) -> the same after their layers.
        self.owned = range(args.n_layers)
        self.ranks = None

    # no_grad, not inference_mode: the cache may grow inside forward, and inference tensors could
    # not be updated in place afterwards (rewind, restore).
    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, cache: KVCache, last_only: bool = False) -> Output:
        """Run `tokens` ([T] ids) after what `cache` holds, in chunks of cache.chunk_size tokens,
        so a long prompt needs chunk x window memory, never T x T."""
        logits, experts, weights = [], [], []
        total = tokens.shape[0]
        for start in range(0, total, cache.chunk_size):
            chunk = tokens[start : start + cache.chunk_size]
            is_last = start + chunk.shape[0] >= total
            out = self._step(chunk, cache, "all" if not last_only else "last" if is_last else "none")
            if out.logits is not None:
                logits.append(out.logits)
            if out.experts is not None:
                experts.append(out.experts)
                weights.append(out.expert_weights)
        return Output(
            logits=torch.cat(logits),
            experts=torch.cat(experts) if experts else None,
            expert_weights=torch.cat(weights) if weights else None,
        )

    def _step(self, tokens: torch.Tensor, cache: KVCache, rows: str) -> Output:
        h = self.tok_embeddings(tokens).to(residual_dtype(self.tok_embeddings.weight))  # [T, D]
        h, experts, weights, fused = self.run_layers(h, cache)
        if self.ranks is not None:
            h, experts, weights = self.ranks.finish(h, cache, experts, weights)
        # Only the rows that are asked for go through the vocab projection (a [T, 32000] matmul).
        logits = None
        if rows != "none":
            x = h if rows == "all" else h[-1:]
            logits = self.decoder.head(x) if fused else None
            if logits is None:
                logits = self.output(self.norm(x)).float()
        return Output(
            logits=logits,
            experts=torch.stack(experts, dim=1) if experts else None,
            expert_weights=torch.stack(weights, dim=1) if weights else None,
        )

    def run_layers(self, h: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, list, list, bool]:
        """The owned layers on residual h ([T, D], the tokens after what `cache` holds): h after them, each
        MoE layer's chosen experts and weights, and whether the decoder ran them."""
        steps = cache.prepare(h.shape[0])  # per layer: where its buffer takes the chunk, its window's mask
        if self.ranks is not None:
            self.ranks.start(h, cache)
        first = steps[self.owned[0]]
        rope = rotary_angles(first.positions, self.args.head_dim, self.args.rope_theta)
        fused = self.decoder(h, rope, steps, cache) if self.decoder is not None else None
        if fused is not None:
            h, experts, weights = fused
        else:
            experts, weights = [], []
            for i in self.owned:
                h, chosen, w = self.layers[i](h, rope, steps[i], cache.layer(i))
                if chosen is not None:
                    experts.append(chosen)
                    weights.append(w)
        cache.advance(h.shape[0])
        return h, experts, weights, fused is not None
