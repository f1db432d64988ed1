"""Hugging Face transformers' Mistral/Mixtral, built from a release state dict: the independent
implementation mixchat's logits are checked against."""

from __future__ import annotations

import torch

from mixchat.config import ModelArgs
from mixchat.release import model_state


def permute_for_rotate_half(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Reorder each head's rows from interleaved pairs (0,1),(2,3)... to HF's half split
    (0..hd/2 | hd/2..hd), the permutation HF's own conversion script applies to wq and wk."""
    dim = w.shape[1]
    return w.view(n_heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(n_heads * head_dim, dim)


def hf_model(sd: dict[str, torch.Tensor], args: ModelArgs, layout: str):
    from transformers import MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM

    sd = {k: v.float() for k, v in model_state(sd, args, layout).items()}
    common = dict(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.hidden_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads,
        head_dim=args.head_dim, rms_norm_eps=args.norm_eps, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta},
        sliding_window=args.sliding_window, tie_word_embeddings=False,
    )
    if args.is_moe:
        config = MixtralConfig(num_local_experts=args.moe.num_experts,
                               num_experts_per_tok=args.moe.num_experts_per_tok, **common)
        model = MixtralForCausalLM(config)
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


@torch.no_grad()
def hf_forward(model, tokens: list[int], args: ModelArgs):
    """Logits [T, V] of one full pass, and for MoE the chosen experts [T, L, k] and weights."""
    routing = []
    hooks = []
    if args.is_moe:
        for layer in model.model.layers:
            hooks.append(layer.mlp.gate.register_forward_hook(lambda m, i, out: routing.append(out)))
    try:
        logits = model(torch.tensor([tokens])).logits[0]
    finally:
        for h in hooks:
            h.remove()
    if not args.is_moe:
        return logits, None, None
    return logits, torch.stack([r[2] for r in routing], dim=1), torch.stack([r[1] for r in routing], dim=1)
