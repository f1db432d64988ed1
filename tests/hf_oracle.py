"""Hugging Face transformers' Mistral/Mixtral/Ministral, built from a release state dict: the independent
implementation mixchat's logits are checked against.

Per-layer windows (Ministral's params.json pattern) become HF's MinistralForCausalLM with `layer_types`
(sliding_attention / full_attention), which has one window size for all its sliding layers. Patterns
with several window sizes, which no HF class expresses, go through `hf_forward`'s walk over the same HF
decoder layers, each given the mask HF's own create_sliding_window_causal_mask builds for its window."""

from __future__ import annotations

import copy

import torch

from mixchat.release.config import ModelArgs
from mixchat.release.folder import model_state


def permute_for_rotate_half(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Reorder each head's rows from interleaved pairs (0,1),(2,3)... to HF's half split
    (0..hd/2 | hd/2..hd), the permutation HF's own conversion script applies to wq and wk."""
    dim = w.shape[1]
    return w.view(n_heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(n_heads * head_dim, dim)


def hf_model(sd: dict[str, torch.Tensor], args: ModelArgs, layout: str):
    from transformers import (
        MinistralConfig,
        MinistralForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        MixtralConfig,
        MixtralForCausalLM,
    )

    sd = {k: v.float() for k, v in model_state(sd, args, layout).items()}
    common = dict(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.hidden_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads,
        head_dim=args.head_dim, rms_norm_eps=args.norm_eps, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta},
        sliding_window=args.sliding_window, tie_word_embeddings=False,
    )
    windows = [args.window(i) for i in range(args.n_layers)]
    if args.is_moe:
        assert len(set(windows)) == 1, "HF's Mixtral has one window for every layer"
        config = MixtralConfig(num_local_experts=args.moe.num_experts,
                               num_experts_per_tok=args.moe.num_experts_per_tok, **common)
        model = MixtralForCausalLM(config)
    elif len(set(windows)) > 1:  # per-layer windows: Ministral's layer_types
        sized = [w for w in windows if w is not None]
        common["sliding_window"] = max(sized) if sized else None  # hf_forward masks other sizes per layer
        config = MinistralConfig(**common, layer_types=["full_attention" if w is None else "sliding_attention"
                                                        for w in windows])
        model = MinistralForCausalLM(config)
    else:
        config = MistralConfig(**common)
        model = MistralForCausalLM(config)
    config._attn_implementation = "eager"

    hf = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"],
          "lm_head.weight": sd["output.weight"]}
    for i in range(args.n_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        hf[q + "self_attn.q_proj.weight"] = permute_for_rotate_half(sd[p + "attention.wq.weight"], args.n_heads,
                                                                    args.head_dim)
        hf[q + "self_attn.k_proj.weight"] = permute_for_rotate_half(sd[p + "attention.wk.weight"], args.n_kv_heads,
                                                                    args.head_dim)
        hf[q + "self_attn.v_proj.weight"] = sd[p + "attention.wv.weight"]
        hf[q + "self_attn.o_proj.weight"] = sd[p + "attention.wo.weight"]
        hf[q + "input_layernorm.weight"] = sd[p + "attention_norm.weight"]
        hf[q + "post_attention_layernorm.weight"] = sd[p + "ffn_norm.weight"]
        f = p + "feed_forward."
        if args.is_moe:
            e = range(args.moe.num_experts)
            hf[q + "mlp.gate.weight"] = sd[f + "gate.weight"]
            hf[q + "mlp.experts.gate_up_proj"] = torch.stack(
                [torch.cat([sd[f + f"experts.{j}.w1.weight"], sd[f + f"experts.{j}.w3.weight"]]) for j in e])
            hf[q + "mlp.experts.down_proj"] = torch.stack([sd[f + f"experts.{j}.w2.weight"] for j in e])
        else:
            hf[q + "mlp.gate_proj.weight"] = sd[f + "w1.weight"]
            hf[q + "mlp.up_proj.weight"] = sd[f + "w3.weight"]
            hf[q + "mlp.down_proj.weight"] = sd[f + "w2.weight"]
    model.load_state_dict(hf, strict=True)
    return model.float().eval()


def hf_expresses(args: ModelArgs) -> bool:
    """Whether hf_model's model has args' windows in its own config (else hf_forward walks its layers)."""
    return len({args.window(i) for i in range(args.n_layers)} - {None}) <= 1


@torch.no_grad()
def hf_layer_walk(model, ids: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """What HF's model forward does (embed, rotary, the decoder layers, norm, lm_head), with each layer
    given the mask of its own window, built by HF's mask functions: logits [1, T, V]."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    inner = model.model
    embeds = inner.embed_tokens(ids)
    position_ids = torch.arange(ids.shape[1])[None]

    def mask(window: int | None):
        config = copy.copy(inner.config)
        config.sliding_window = window
        make = create_causal_mask if window is None else create_sliding_window_causal_mask
        return make(config=config, inputs_embeds=embeds, attention_mask=None, cache=None, position_ids=position_ids)

    masks = {w: mask(w) for w in {args.window(i) for i in range(args.n_layers)}}
    h = embeds
    rotary = inner.rotary_emb(h, position_ids)
    for i, layer in enumerate(inner.layers):
        h = layer(h, attention_mask=masks[args.window(i)], position_ids=position_ids, position_embeddings=rotary)
    return model.lm_head(inner.norm(h))


@torch.no_grad()
def hf_forward(model, tokens: list[int], args: ModelArgs):
    """Logits [T, V] of one full pass, and for MoE the chosen experts [T, L, k] and weights."""
    routing = []
    hooks = []
    if args.is_moe:
        for layer in model.model.layers:
            hooks.append(layer.mlp.gate.register_forward_hook(lambda m, i, out: routing.append(out)))
    try:
        ids = torch.tensor([tokens])
        logits = (model(ids).logits if hf_expresses(args) else hf_layer_walk(model, ids, args))[0]
    finally:
        for h in hooks:
            h.remove()
    if not args.is_moe:
        return logits, None, None
    return logits, torch.stack([r[2] for r in routing], dim=1), torch.stack([r[1] for r in routing], dim=1)
