"""Each family of today's releases in small: a random folder written as that release ships it (its
params.json keys, weight files and real tokenizer, full vocabulary; few layers, narrow width), loaded
by mixchat from the folder, chatting in the instruct format mistral-common writes for that tokenizer,
with logits checked against Hugging Face transformers (fp32) over a chat prompt past every window."""

from __future__ import annotations

import random

import pytest
import torch
from hf_oracle import hf_forward, hf_model
from mistral_oracle import oracle_chat
from test_model_vs_hf import fp32_tolerance, run_mixchat
from tolerance import assert_within, routed_alike

from mixchat.dev.synthetic import mistral_common_tokenizer, random_state, write_release
from mixchat.engine.engine import Engine
from mixchat.release.config import ModelArgs
from mixchat.release.inspection import inspect_release
from mixchat.text.chat_format import Message, encode_chat

SMALL = {"dim": 96, "n_layers": 3, "hidden_dim": 160, "n_heads": 4, "n_kv_heads": 2, "norm_eps": 1e-5}
MOE = {"num_experts": 8, "num_experts_per_tok": 2}

# name: (params.json as the release writes it, layout, tokenizer, its file name, weight files, instruct format)
FAMILIES = {
    "Mistral-7B-v0.3": ({**SMALL, "vocab_size": 32768, "rope_theta": 1e6, "max_seq_len": 32768},
                        "dense", "v3", "tokenizer.model.v3", {"safetensors": True}, "v3"),
    "Mixtral-8x22B": ({**SMALL, "vocab_size": 32768, "rope_theta": 1e6, "max_seq_len": 65536, "moe": MOE},
                      "experts", "v3", "tokenizer.model.v3", {"shards": 3}, "v3"),
    "Mistral-Nemo": ({**SMALL, "head_dim": 32, "vocab_size": 131072, "rope_theta": 1e6, "max_seq_len": 131072,
                      "sliding_window": None}, "dense", "tekken-240718", "tekken.json", {"safetensors": True},
                     "v3-tekken"),
    "Ministral-8B": ({**SMALL, "head_dim": 32, "vocab_size": 131072, "rope_theta": 1e8, "max_seq_len": 131072,
                      "sliding_window": [7, 7, None]}, "dense", "tekken", "tekken.json", {"safetensors": True},
                     "v3-tekken"),
    "Mistral-Large/v7": ({**SMALL, "vocab_size": 32768, "rope_theta": 1e6, "max_seq_len": 131072},
                         "dense", "v7", "tokenizer.model.v7", {"shards": 2}, "v7"),
}

CHAT = [("user", "Write a haiku about [INST] tokens 🌊"), ("assistant", "Tokens drift like rain."),
        ("user", "Now one about 東京, please.")]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_release_of_each_family_chats_as_mistral_common_and_computes_as_hf(tmp_path, name):
    params, layout, tok, tok_name, files, instruct = FAMILIES[name]
    args = ModelArgs.from_dict(params)
    state = random_state(args, layout, torch.float32, seed=5, std=0.1)
    source = mistral_common_tokenizer(tok)
    folder = write_release(tmp_path / name.replace("/", "-"), args, layout, dtype=torch.float32, params=params,
                           state=state, tokenizer=source, tokenizer_name=tok_name, **files)

    report = inspect_release(folder)
    assert report["problem"] is None
    assert report["tokenizer"]["version"] == instruct.removesuffix("-tekken")
    engine = Engine.load(folder, dtype="fp32", warm=False)
    assert (engine.args.head_dim, engine.args.rope_theta, engine.args.max_seq_len) == \
        (params.get("head_dim", 24), params["rope_theta"], params["max_seq_len"])

    # The prompt: mixchat's chat format is mistral-common's, token for token, with a system prompt.
    messages = [Message(r, c) for r, c in CHAT]
    prompt = encode_chat(engine.tokenizer, messages, "Answer in verse.")
    assert prompt == oracle_chat(source, CHAT, "Answer in verse.")
    rng = random.Random(5)
    tokens = prompt + [rng.randrange(1000, args.vocab_size) for _ in range(6)]  # six decode steps after it
    assert len(prompt) > 2 * 7 + 4  # past Ministral's windows, in chunks smaller than the prompt

    logits, experts, _, router = run_mixchat(engine, tokens, prompt_len=len(prompt), chunk=8)
    hf = hf_model(state, args, layout)
    ref, ref_experts, _ = hf_forward(hf, tokens, args)
    assert_within(logits, ref, fp32_tolerance(engine, ref, len(tokens)), f"{name}: mixchat vs HF")
    if args.is_moe:
        tol = fp32_tolerance(engine, router, len(tokens))
        assert routed_alike(experts, ref_experts, router, tol) == len(tokens), "a near-tie: try another seed"
