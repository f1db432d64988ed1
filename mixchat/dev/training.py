"""A batched, differentiable forward pass over mixchat's own model modules, for training.

`Transformer.forward` is inference-only (one sequence, a KV cache, no_grad). Training needs a batch
of whole sequences with gradients, so `forward_train` walks the same modules and weights —
tok_embeddings, each layer's RMSNorms, attention projections, FeedForward / MoeFeedForward experts,
the final norm and output — with the same math: interleaved rotary embeddings from
`mixchat.model.model.rotary_angles`/`apply_rotary`, grouped-query causal attention (here through
`scaled_dot_product_attention`), top-k routing with a softmax over the chosen k gate logits. A model
trained with it is saved with `state_dict()` and loads into the inference path name for name.

It also returns every MoE layer's router logits, for the load-balancing loss of Switch/Mixtral
(`load_balancing_loss`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mixchat.model.model import Attention, FeedForward, MoeFeedForward, Transformer, apply_rotary, rotary_angles


@dataclass
class TrainOutput:
    logits: torch.Tensor  # [B, T, vocab]
    router_logits: list[torch.Tensor]  # per MoE layer: [B*T, num_experts]
    experts: list[torch.Tensor]  # per MoE layer: [B*T, top_k] chosen expert ids, best first


def _rotary(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """apply_rotary for [B, T, H, hd]: fold the batch into the heads, since positions are shared."""
    b, t, h, d = x.shape
    folded = x.transpose(0, 1).reshape(t, b * h, d)
    return apply_rotary(folded, rotation).view(t, b, h, d).transpose(0, 1)


def attention_train(attn: Attention, x: torch.Tensor, rope: torch.Tensor,
                    sliding_window: int | None = None) -> torch.Tensor:
    """Causal grouped-query self-attention over [B, T, D] with the module's own wq/wk/wv/wo, each query
    seeing the last `sliding_window` keys (itself included) when the layer has a window."""
    b, t, _ = x.shape
    h, nkv, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = _rotary(attn.wq(x).view(b, t, h, hd), rope).transpose(1, 2)  # [B, H, T, hd]
    k = _rotary(attn.wk(x).view(b, t, nkv, hd), rope).transpose(1, 2)  # [B, Hkv, T, hd]
    v = attn.wv(x).view(b, t, nkv, hd).transpose(1, 2)
    rep = h // nkv
    if rep > 1:  # query head i uses kv head i // rep, as in the inference path
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    if sliding_window is not None and sliding_window < t:
        pos = torch.arange(t, device=x.device)
        mask = (pos[None, :] <= pos[:, None]) & (pos[:, None] - pos[None, :] < sliding_window)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    else:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return attn.wo(out.transpose(1, 2).reshape(b, t, h * hd))


def moe_train(moe: MoeFeedForward, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MoeFeedForward's routing over flattened tokens [N, D]; returns (out, router logits, chosen).

    The same math as MoeFeedForward.forward, dispatched for training: the N*k (token, slot) pairs
    are sorted by expert so one gather feeds every expert a contiguous slice and one index_add
    brings the results back (per-expert gathers and scatters cost as much as the experts' matmuls).
    """
    n, k = x.shape[0], moe.top_k
    logits = moe.gate(x)  # [N, E]
    top_logits, chosen = torch.topk(logits, k, dim=-1)
    weights = torch.softmax(top_logits.float(), dim=-1).to(x.dtype)  # [N, k]
    flat = chosen.reshape(-1)
    order = torch.argsort(flat, stable=True)
    tokens = order // k
    counts = torch.bincount(flat, minlength=len(moe.experts)).tolist()
    xs = x[tokens]  # [N*k, D], grouped by expert
    ys = torch.cat([expert(part) for expert, part in zip(moe.experts, xs.split(counts), strict=True) if len(part)])
    ys = ys * weights.reshape(-1)[order, None]
    out = torch.zeros_like(x).index_add_(0, tokens, ys)
    assert out.shape[0] == n
    return out, logits, chosen


def forward_train(model: Transformer, tokens: torch.Tensor, dropout: float = 0.0) -> TrainOutput:
    """Logits for every position of `tokens` ([B, T] ids, each row starting at position 0).

    `dropout` applies to the embeddings and to each residual branch while `model.training`; the demo
    corpus is small enough that a few epochs over it overfit without it."""
    args = model.args
    b, t = tokens.shape
    p = dropout if model.training else 0.0
    rope = rotary_angles(torch.arange(t, device=tokens.device), args.head_dim, args.rope_theta)
    h = F.dropout(model.tok_embeddings(tokens), p)  # [B, T, D]
    router_logits, experts = [], []
    for i, layer in enumerate(model.layers):
        h = h + F.dropout(attention_train(layer.attention, layer.attention_norm(h), rope, args.window(i)), p)
        x = layer.ffn_norm(h)
        ff = layer.feed_forward
        if isinstance(ff, MoeFeedForward):
            out, logits, chosen = moe_train(ff, x.reshape(b * t, -1))
            h = h + F.dropout(out.view(b, t, -1), p)
            router_logits.append(logits)
            experts.append(chosen)
        else:
            assert isinstance(ff, FeedForward)
            h = h + F.dropout(ff(x), p)
    return TrainOutput(model.output(model.norm(h)), router_logits, experts)


def load_balancing_loss(router_logits: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """Switch Transformer's auxiliary loss as Mixtral's training code applies it, averaged over layers:
    num_experts * sum_e (fraction of routed slots sent to e) * (mean router probability of e).
    Equals 1 when routing is perfectly balanced."""
    losses = []
    for logits in router_logits:
        n_experts = logits.shape[-1]
        probs = torch.softmax(logits.float(), dim=-1)  # [N, E]
        chosen = torch.topk(logits, top_k, dim=-1).indices
        counts = torch.zeros(n_experts, device=logits.device).index_add_(
            0, chosen.reshape(-1), torch.ones(chosen.numel(), device=logits.device))
        fraction = counts / chosen.numel()
        losses.append(n_experts * (fraction * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def expert_usage(experts: list[torch.Tensor], num_experts: int) -> torch.Tensor:
    """[layers, num_experts]: the share of routed (token, slot) pairs each expert received."""
    rows = [torch.bincount(c.reshape(-1), minlength=num_experts).float() / c.numel() for c in experts]
    return torch.stack(rows)
