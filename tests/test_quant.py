"""Weight-only int8/int4: the arithmetic, the layer, the cache, and quality on the trained demo model."""

from __future__ import annotations

import contextlib
import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_args
from test_demo_model import _heldout_ids
from tolerance import (
    BF16,
    Q8_ROUNDINGS,
    WEIGHT_ROUNDINGS,
    assert_within,
    int4_parts,
    magnitude,
    product_bound,
    q8_shift,
)

from mixchat import paths
from mixchat.engine.engine import Engine, model_fingerprint
from mixchat.errors import MixchatError
from mixchat.paths import demo_model
from mixchat.release.folder import model_state, open_release
from mixchat.speed import kernels, quant
from mixchat.speed.qformat import CHOICES, QuantSpec, memory_estimates, model_bytes, parse_quant, quantizable
from mixchat.speed.quant import QuantLinear, dequantize, quantize_int4, quantize_int8

DEMO = demo_model()


def test_parse_quant_names_and_errors():
    assert parse_quant(None) is None and parse_quant("none") is None
    assert parse_quant("int8") == QuantSpec("int8")
    assert parse_quant("int4") == QuantSpec("int4", 128)
    assert parse_quant("int4-32").group == 32 and parse_quant("int4-g128").group == 128
    # what status, inspect and bench show is a --quant choice that gives the same spec back
    assert [parse_quant(c).label for c in CHOICES[1:]] == ["int8", "int4-128", "int4-32", "int4-64", "int4-128"]
    assert all(parse_quant(parse_quant(c).label) == parse_quant(c) for c in CHOICES[1:])
    for bad in ("int3", "int4-48", "fp8"):
        with pytest.raises(MixchatError, match="--quant"):
            parse_quant(bad)


def test_what_is_quantized():
    assert quantizable("layers.3.attention.wq.weight") and quantizable("output.weight")
    assert quantizable("layers.0.feed_forward.experts.7.w2.weight") and quantizable("layers.0.block_sparse_moe.w1")
    for kept in ("tok_embeddings.weight", "norm.weight", "layers.0.attention_norm.weight",
                 "layers.0.feed_forward.gate.weight"):
        assert not quantizable(kept), kept


def test_int8_round_trip_error_is_within_half_a_step():
    w = torch.randn(64, 256) * torch.linspace(0.01, 3, 64)[:, None]  # rows of very different ranges
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (64,)
    err = (dequantize({"q": q, "scale": scale}) - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-6).all()


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_round_trip_error_is_within_half_a_step(group):
    w = torch.randn(48, 256) + 0.5  # off-centre ranges: the zero point matters
    packed, scale, zero = quantize_int4(w, group)
    assert packed.dtype == torch.uint8 and packed.shape == (48, 128) and scale.shape == (48, 256 // group)
    back = dequantize({"q": packed, "scale": scale, "zero": zero})
    step = scale.repeat_interleave(group, dim=1)
    assert ((back - w).abs() <= step / 2 + 1e-5).all()
    # low nibble first: element 0 of row 0 is packed[0, 0] & 15
    q0 = torch.round((w[0, 0] - (zero[0, 0] - 8 * scale[0, 0])) / scale[0, 0]).clamp(0, 15)
    assert int(packed[0, 0]) & 15 == int(q0)


def test_int4_keeps_fp16_scales_and_fits_q_to_them():
    # 0.8.0: fp16 scale and zero (6 % of int4's bytes at groups of 128, not 11 %); q is chosen against the
    # rounded values, so the half-step bound above holds for what is stored, constant groups included
    w = torch.randn(10, 256) * 0.02
    w[0, :128] = 0.25  # a constant group fp16 holds: exact
    w[0, 128:] = 0.1  # one fp16 does not hold: its zero is off by half an ulp, the scale covers it
    w[1] = torch.linspace(-3e4, 3e4, 256)  # near fp16's range
    w[2, :128] = 1000.3  # rounds to 1000.5 in fp16
    w[3] = 1.0 + torch.linspace(0, 1e-3, 256)  # a narrow range far from zero
    w[4, :128] = torch.linspace(0, 15 * 1.45 * 2.0**-24, 128)  # a scale that would round down to fp16's least
    packed, scale, zero = quantize_int4(w, 128)
    assert scale.dtype == zero.dtype == torch.float16 and bool(torch.isfinite(scale).all())
    back = dequantize({"q": packed, "scale": scale, "zero": zero})
    step = scale.float().repeat_interleave(128, dim=1)
    assert ((back - w).abs() <= step / 2 * (1 + 1e-5)).all()
    assert torch.equal(back[0, :128], w[0, :128])


def test_int4_refuses_weights_beyond_fp16_with_the_tensors_name():
    w = torch.randn(4, 128)
    w[2, 5] = 1e5
    with pytest.raises(MixchatError, match=r"layers\.0\.attention\.wq\.weight .*--quant int8"):
        quant.quantize_tensor(w, QuantSpec("int4", 128), "layers.0.attention.wq.weight")
    for bad in (float("inf"), float("nan")):
        w[2, 5] = bad
        with pytest.raises(MixchatError, match="NaN or infinite.*mixchat verify"):
            quantize_int4(w, 128)
        # int8 (and int4's int8 output layer) refuses them too, by name, rather than storing NaN scales
        with pytest.raises(MixchatError, match=r"^output\.weight holds NaN or infinite values, which int8"):
            quant.quantize_tensor(w, QuantSpec("int8"), "output.weight")


def test_a_cache_of_an_older_format_is_quantized_again(monkeypatch, capsys):
    monkeypatch.setitem(quant.FORMAT_VERSIONS, "int4", 1)  # what 0.7 wrote: fp32 scales and zeros
    old = Engine.load(DEMO, quant="int4", show_progress=False)
    path = quant.cache_path(old.fingerprint, old.quant)
    monkeypatch.setitem(quant.FORMAT_VERSIONS, "int4", 2)
    capsys.readouterr()
    again = Engine.load(DEMO, quant="int4", show_progress=False)
    assert not again.quant_cached and path.is_file()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and "format '1'" in err[0] and "quantizing again" in err[0]
    # int8's format did not change: its cache from before 0.8.0 (version 1) stays valid
    assert quant.FORMAT_VERSIONS["int8"] == 1
    Engine.load(DEMO, quant="int8", show_progress=False)
    assert Engine.load(DEMO, quant="int8", show_progress=False).quant_cached
    assert Engine.load(DEMO, quant="int4", show_progress=False).quant_cached


def test_int4_group_must_divide_the_input_dimension():
    with pytest.raises(MixchatError, match="int4-32"):
        quantize_int4(torch.randn(8, 96), 64)


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 3, 9, 20])
@pytest.mark.parametrize("backend", [*kernels.ISAS, "torch"])
def test_quant_linear_equals_the_dequantized_matmul(kind, rows, backend, monkeypatch):
    # backend: a build of the compiled kernels (kernels.isa_flags), or torch's own weight-only ops (up to
    # 16 rows) and the dequantize-then-GEMM path for prefill
    with contextlib.ExitStack() as stack:
        if backend == "torch":
            monkeypatch.setattr(quant, "_kernels", lambda: None)
        else:
            try:
                stack.enter_context(kernels.forced_isa(backend))
            except kernels.KernelError as e:
                pytest.skip(f"the {backend} build cannot run here: {e}")
        torch.manual_seed(0)
        w = torch.randn(192, 256)
        group = 64 if kind == "int4" else 0
        parts = quant.quantize_tensor(w, QuantSpec(kind, group))
        layer = QuantLinear(parts, 256, 192)
        x = torch.randn(rows, 256).bfloat16()
        got = layer(x)
        kernel = quant._kernels() is not None
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 192)
    want = F.linear(x.float(), dequantize(parts))
    # The layer and the fp32 reference each sum 256 products (tolerance.product_bound), the layer then rounds
    # its output to x's bf16. Besides: the kernels round x to Q8 (int4 always, int8 below the GEMM's rows);
    # torch's small-batch ops take the scale (and zero) in bf16 and may form the dequantised weight in bf16
    # too (bf16 dot products on AVX512-BF16): 2^-8 of each term for each of the two roundings.
    w_abs = int4_parts(parts["q"], parts["scale"], parts["zero"], group) if kind == "int4" \
        else dequantize(parts).abs()
    q8 = kernel and (kind == "int4" or rows < kernels.get_gemm_min_rows())
    shift = q8_shift(x.float(), w_abs, kernels.q8_block(group)) if q8 else 0.0
    mag = magnitude(x, w_abs) + shift  # the terms' size, of x or of its Q8 rounding
    roundings = WEIGHT_ROUNDINGS[kind] + (Q8_ROUNDINGS if q8 else 0)
    bound = product_bound(mag, 256, roundings, out_unit=BF16) + product_bound(mag, 256, roundings) + shift
    if not kernel and rows <= 16:
        bound = bound + 2 * BF16 * mag
    assert_within(got, want, bound, f"{kind} {backend} rows={rows}")


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_memory_estimate_equals_what_the_engine_holds(name):
    engine = Engine.load(DEMO, quant=name, warm=False, show_progress=False)
    held = sum(t.nbytes for t in [*engine.model.parameters(), *engine.model.buffers()])
    opened = open_release(DEMO)
    shapes = {n: tuple(t.shape) for n, t in model_state(opened.state, opened.args, opened.layout).items()}
    assert model_bytes(shapes, 2, parse_quant(name)) == held
    est = memory_estimates(shapes)
    assert est["bf16"] > est["int8"] > est["int4-32"] > est["int4-64"] > est["int4-128"]


def _heldout_nats(engine: Engine) -> tuple[float, torch.Tensor]:
    ids, _ = _heldout_ids(engine.tokenizer)
    out = engine.model(torch.tensor(ids), engine.new_cache())
    return F.cross_entropy(out.logits[:-1].float(), torch.tensor(ids[1:])).item(), out.logits.argmax(-1)


@pytest.fixture(scope="module")
def bf16_reference():
    return _heldout_nats(Engine.load(DEMO, warm=False, show_progress=False))


# Measured on the shipped demo model (tests/data/austen_heldout.txt, 250 tokens): perplexity vs bf16
# -0.15 % (int8), +1.05 % (int4: groups of 128), -0.61 % (int4-32), +0.45 % (int4-64); top-1 agreement
# with bf16 0.992, 0.940, 0.964, 0.968 (0.8.0, int4 with fp16 scales and zeros; with fp32 ones +1.20 %,
# -0.67 %, +0.62 % and 0.931, 0.972, 0.964). int4 prompts round x to int8 as decode does (per 128 columns for
# groups of 128, per 32 otherwise; kernels.q8_block): before that, with exact x, int4 measured -1.21 % and
# 0.960. The bounds are the issue's: 1 % and 5 %.
@pytest.mark.parametrize("name,ppl_max,agree_min", [("int8", 0.01, 0.97), ("int4", 0.05, 0.9),
                                                      ("int4-32", 0.05, 0.9), ("int4-64", 0.05, 0.9)])
def test_quality_on_the_demo_model(name, ppl_max, agree_min, bf16_reference):
    nats_bf16, top1_bf16 = bf16_reference
    engine = Engine.load(DEMO, quant=name, show_progress=False)
    nats, top1 = _heldout_nats(engine)
    assert math.exp(nats) / math.exp(nats_bf16) - 1 < ppl_max, (nats, nats_bf16)
    assert (top1 == top1_bf16).float().mean().item() >= agree_min


def _decoded_nats(engine: Engine, n: int = 160) -> tuple[float, torch.Tensor]:
    """The same passage fed one token at a time: the decode path, where the kernels round x to int8."""
    ids = _heldout_ids(engine.tokenizer)[0][:n]
    cache = engine.new_cache()
    logits = torch.cat([engine.model(torch.tensor([t]), cache).logits for t in ids])
    return F.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:])).item(), logits.argmax(-1)


@pytest.fixture(scope="module")
def bf16_decoded():
    return _decoded_nats(Engine.load(DEMO, warm=False, show_progress=False))


# Decoding (one token at a time) rounds the activations to int8 too, as llama.cpp's Q8_0 and Q4_0 do (int8
# per 32 columns; the int8 prompt path keeps x exact). Measured over the first 160 tokens of the passage:
# -0.34 % / agreement 0.994 (int8), +1.05 % / 0.950 (int4; 0.7.9's fp32 scales: +1.19 % / 0.950). The bounds
# are the 1 % and 5 %.
@pytest.mark.parametrize("name,ppl_max,agree_min", [("int8", 0.01, 0.95), ("int4", 0.05, 0.88)])
def test_quality_when_decoding_token_by_token(name, ppl_max, agree_min, bf16_decoded):
    nats_bf16, top1_bf16 = bf16_decoded
    nats, top1 = _decoded_nats(Engine.load(DEMO, quant=name, show_progress=False))
    assert math.exp(nats) / math.exp(nats_bf16) - 1 < ppl_max, (nats, nats_bf16)
    assert (top1 == top1_bf16).float().mean().item() >= agree_min


def test_quantized_weights_are_cached_and_reused(tmp_path):
    first = Engine.load(DEMO, quant="int4", show_progress=False)
    assert not first.quant_cached
    path = quant.cache_path(first.fingerprint, first.quant)
    assert path.is_file() and str(path).startswith(str(tmp_path))  # under MIXCHAT_HOME in tests
    second = Engine.load(DEMO, quant="int4", show_progress=False)
    assert second.quant_cached
    ids = torch.tensor(second.tokenizer.encode("Mr. Darcy"))
    a = first.model(ids, first.new_cache()).logits
    b = second.model(ids, second.new_cache()).logits
    assert torch.equal(a, b)
    # int8 is a different file; the int4 one is untouched
    Engine.load(DEMO, quant="int8", show_progress=False)
    assert quant.cache_path(first.fingerprint, parse_quant("int8")).is_file() and path.is_file()


def test_the_first_quantization_makes_its_folders_private(tmp_path, monkeypatch):
    # a first `--quant --no-save` run makes $MIXCHAT_HOME as the cache's parent: the store goes there later,
    # so every folder made on the way is 0700, not the umask's 0755
    home = tmp_path / "fresh" / "home"
    monkeypatch.setenv("MIXCHAT_HOME", str(home))
    old = os.umask(0o022)
    try:
        Engine.load(DEMO, quant="int8", show_progress=False)
    finally:
        os.umask(old)
    for folder in (quant.cache_dir(), quant.cache_dir().parent, home, home.parent):
        assert folder.stat().st_mode & 0o777 == 0o700, folder


def test_a_truncated_cache_file_is_rebuilt_not_trusted(capsys):
    first = Engine.load(DEMO, quant="int8", show_progress=False)
    path = quant.cache_path(first.fingerprint, first.quant)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    again = Engine.load(DEMO, quant="int8", show_progress=False)
    assert not again.quant_cached
    assert "quantized cache" in capsys.readouterr().err
    assert path.stat().st_size == len(data)


def test_a_cache_from_another_model_is_not_used(make_release):
    demo = Engine.load(DEMO, quant="int8", show_progress=False)
    folder = make_release(tiny_args(), "dense")
    other = model_fingerprint(open_release(folder).release)
    # The demo's file under the tiny model's name: its metadata names another model.
    shutil.copy(quant.cache_path(demo.fingerprint, demo.quant), quant.cache_path(other, demo.quant))
    engine = Engine.load(folder, quant="int8", show_progress=False)
    assert engine.fingerprint == other and not engine.quant_cached


def test_tiny_models_of_each_layout_run_quantized(make_release):
    for layout in ("dense", "torrent", "experts"):
        args = tiny_args(moe={"num_experts": 4, "num_experts_per_tok": 2}) if layout != "dense" else tiny_args()
        folder = make_release(args, layout)
        ref = Engine.load(folder, dtype="fp32", show_progress=False)
        ids = torch.tensor(ref.tokenizer.encode("Hello there, general"))
        want = ref.model(ids, ref.new_cache()).logits
        for name in ("int8", "int4-32"):
            got = Engine.load(folder, dtype="fp32", quant=name, show_progress=False).model(ids, ref.new_cache()).logits
            assert torch.nn.functional.cosine_similarity(got, want, dim=-1).min() > 0.95, (layout, name)


def test_cli_one_shot_and_inspect_with_quant(capsys):
    from mixchat.frontends.cli import main

    assert main(["-m", str(DEMO), "--quant", "int8", "--no-save", "--json", "--max-tokens", "8", "--temperature",
                 "0", "-p", "Good morning"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert '"done": true' in out[-1]
    assert main(["inspect", str(DEMO)]) == 0
    assert "int8" in capsys.readouterr().out


def test_int4_of_a_release_with_weights_past_fp16_is_one_line_and_no_cache(make_release, capsys):
    from mixchat.dev.synthetic import random_state
    from mixchat.frontends.cli import main

    args = tiny_args()
    state = random_state(args)
    state["layers.1.feed_forward.w2.weight"][3, 7] = 1e5  # bf16 holds it; an fp16 scale cannot
    folder = make_release(args, state=state)
    assert main(["-m", str(folder), "--quant", "int4-32", "--no-save", "--max-tokens", "2", "-p", "Hi"]) != 0
    err = capsys.readouterr().err
    assert "layers.1.feed_forward.w2.weight" in err and "--quant int8" in err and "Traceback" not in err
    assert not list(quant.cache_dir().glob("*int4*"))  # nothing half-written is left to be trusted later
    assert main(["-m", str(folder), "--quant", "int8", "--no-save", "--max-tokens", "2", "-p", "Hi"]) == 0


def test_a_quantized_load_warms_the_embedding_table_not_the_file(monkeypatch):
    # The bf16 file is left cold (its quantized matrices are never read), but each decoded token reads one
    # embedding row from it: those pages are faulted in at load, not one disk wait per new token.
    import mixchat.engine.engine as engine_mod

    touched, warmed = [], []
    real_touch = engine_mod.touch_pages
    monkeypatch.setattr(engine_mod, "touch_pages", lambda t: (touched.append(t), real_touch(t)))
    monkeypatch.setattr(engine_mod, "warm_page_cache", lambda *a, **k: warmed.append(a[0]))
    # (with the weights left mapped from the file: copied into huge pages, they are all read at load)
    engine = Engine.load(demo_model(), quant="int8", show_progress=False, huge_pages=False)
    assert not warmed and len(touched) == 1
    assert touched[0].data_ptr() == engine.model.tok_embeddings.weight.data_ptr()
    Engine.load(demo_model(), quant="int8", show_progress=False, warm=False, huge_pages=False)
    assert len(touched) == 1  # warm=False: nothing is read ahead
    Engine.load(demo_model(), show_progress=False, huge_pages=False)
    assert len(touched) == 1 and len(warmed) == 1  # unquantized: the whole file is warmed instead
    Engine.load(demo_model(), quant="int8", show_progress=False)
    assert len(touched) == 1 and len(warmed) == 1  # copied into huge pages: the copy is the read


def test_quant_cache_goes_where_MIXCHAT_QUANT_CACHE_says(tmp_path, monkeypatch):
    assert quant.cache_dir() == paths.home_override() / "cache" / "quant"  # under --home / MIXCHAT_HOME
    elsewhere = tmp_path / "big disk" / "q"
    monkeypatch.setenv("MIXCHAT_QUANT_CACHE", str(elsewhere))
    state = {"layers.0.attention.wq.weight": torch.randn(8, 128)}
    quant.quantize_state(state, parse_quant("int8"), fingerprint="f" * 16, show=False)
    assert (elsewhere / f"{'f' * 16}-int8.safetensors").is_file()
    assert not (paths.home_override() / "cache" / "quant").exists()
