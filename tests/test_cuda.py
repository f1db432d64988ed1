"""--device cuda: the same code on a GPU. Skipped where there is none (CI has none)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_args

from mixchat.engine.engine import Engine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


@pytest.mark.parametrize("quant", [None, "int8", "int4-32"])  # int4-32: the tiny model's dim is 64
@pytest.mark.parametrize("layout", ["dense", "experts"])
def test_gpu_logits_match_the_cpu(make_release, layout, quant):
    args = tiny_args(moe={"num_experts": 4, "num_experts_per_tok": 2}) if layout == "experts" else tiny_args()
    folder = make_release(args, layout)
    cpu = Engine.load(folder, dtype="fp32", quant=quant, show_progress=False)
    gpu = Engine.load(folder, dtype="fp32", device="cuda", quant=quant, show_progress=False)
    ids = torch.tensor(cpu.tokenizer.encode("Hello there, general Kenobi"))
    cache = gpu.new_cache()
    assert cache.layer(0)[0].device.type == "cuda"  # the KV cache lives on the device
    got = gpu.model(ids.cuda(), cache).logits.cpu()
    want = cpu.model(ids, cpu.new_cache()).logits
    assert torch.allclose(got, want, atol=1e-3, rtol=1e-3)


def test_gpu_bf16_greedy_decoding_runs(make_release):
    folder = make_release(tiny_args(), "dense")
    engine = Engine.load(folder, device="cuda", show_progress=False)
    assert engine.dtype in (torch.bfloat16, torch.float16)
    cache = engine.new_cache()
    out = engine.model(torch.tensor(engine.tokenizer.encode("Hi")).cuda(), cache)
    for _ in range(8):
        out = engine.model(out.logits[-1:].argmax(-1), cache)
    assert torch.isfinite(out.logits).all()
