"""mixchat.kernels (compiled GEMV kernels) against float64 torch references, plus the fallbacks."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from mixchat import kernels

needs_kernels = pytest.mark.skipif(not kernels.available(), reason=f"compiled kernels unavailable: {kernels.reason()}")

ROWS = (1, 2, 3, 5)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_matches(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """got ~= x @ w.T within fp32 accumulation error: a few eps * sqrt(K) times sum_k |x_k w_k|."""
    x64, w64 = x.double().reshape(-1, x.shape[-1]), w.double()
    want = x64 @ w64.T
    bound = 1e-6 * x.shape[-1] ** 0.5 * (x64.abs() @ w64.abs().T) + 1e-30
    assert got.dtype == torch.float32
    got = got.reshape(want.shape).double()
    err = (got - want).abs()
    assert (err <= bound).all(), f"max error {err.max().item():.3g}, bound there {bound.flatten()[err.argmax()]:.3g}"


def int4_case(n: int, k: int, group: int, seed: int = 0):
    g = gen(seed)
    q = torch.randint(0, 16, (n, k), generator=g)
    scale = torch.rand(n, k // group, generator=g) * 0.05 + 0.001
    zero = torch.randn(n, k // group, generator=g) * 0.05
    packed = kernels.pack_int4(q)
    return packed, scale, zero, kernels.dequantize_int4(packed, scale, zero, group)


# ---------------------------------------------------------------------------------------------------
# bf16 and int8: any K (a K % 32 tail goes through scalar code)


@needs_kernels
@pytest.mark.parametrize("n,k", [(1, 1), (7, 33), (64, 100), (130, 4096 + 17), (1000, 512), (24, 14336)])
@pytest.mark.parametrize("t", ROWS)
def test_bf16_matches_torch(n, k, t):
    g = gen(n + k + t)
    x = torch.randn(t, k, generator=g)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    assert_matches(kernels.linear_bf16(x, w), x, w.float())


@needs_kernels
@pytest.mark.parametrize("n,k", [(1, 1), (7, 33), (64, 100), (130, 4096 + 17), (1000, 512), (24, 14336)])
@pytest.mark.parametrize("t", ROWS)
def test_int8_matches_torch(n, k, t):
    g = gen(n + k + t)
    x = torch.randn(t, k, generator=g)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, generator=g) * 0.01 + 1e-4
    assert_matches(kernels.linear_int8(x, q, scale, exact=True), x, q.float() * scale[:, None])


@needs_kernels
@pytest.mark.parametrize("n,k", [(7, 32), (64, 96), (130, 4096), (24, 14336)])
@pytest.mark.parametrize("t", ROWS + (8, 9))
def test_int8_q8_is_exact_for_the_rounded_x(n, k, t):
    # Below the GEMM's rows the default rounds x to int8 per 32 columns; given that, the rest is exact.
    g = gen(n + k + t)
    x = torch.randn(t, k, generator=g)
    x[:, ::97] *= 30
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    q[0, :5] = -127  # the most negative weight: |q| must still fit vpmaddubsw's unsigned operand
    scale = torch.rand(n, generator=g) * 0.01 + 1e-4
    assert_matches(kernels.linear_int8(x, q, scale), kernels.quantize_x_q8(x), q.float() * scale[:, None])


@needs_kernels
@pytest.mark.parametrize("t", [4, 8, 9, 17])
def test_more_rows_than_one_pass_serves(t):
    # bf16/int8 read the weight once per 8 rows of x, int4 once per 4: the slicing must line up.
    g = gen(t)
    x = torch.randn(t, 320, generator=g)
    w = torch.randn(72, 320, generator=g).to(torch.bfloat16)
    assert_matches(kernels.linear_bf16(x, w), x, w.float())
    q = torch.randint(-127, 128, (72, 320), generator=g, dtype=torch.int8)
    s = torch.rand(72, generator=g) + 0.5
    assert_matches(kernels.linear_int8(x, q, s, exact=True), x, q.float() * s[:, None])
    packed, scale, zero, w4 = int4_case(72, 320, 64, seed=t)
    assert_matches(kernels.linear_int4(x, packed, scale, zero, 64, exact=True), x, w4)


@needs_kernels
def test_leading_dimensions_and_input_dtypes():
    g = gen(1)
    x = torch.randn(2, 3, 256, generator=g)
    w = torch.randn(40, 256, generator=g).to(torch.bfloat16)
    y = kernels.linear_bf16(x, w)
    assert y.shape == (2, 3, 40)
    assert_matches(y, x, w.float())
    xb = x.to(torch.bfloat16)  # converted to fp32 on the way in
    assert_matches(kernels.linear_bf16(xb, w), xb.float(), w.float())
    xt = torch.randn(256, 3, generator=g).T  # non-contiguous x is copied, not rejected
    assert_matches(kernels.linear_bf16(xt, w), xt, w.float())
    assert kernels.linear_bf16(torch.empty(0, 256), w).shape == (0, 40)


# ---------------------------------------------------------------------------------------------------
# GEMM (prompts): from get_gemm_min_rows() rows of x on; partial tiles in T (6) and N (16), K blocks of 256


@pytest.fixture
def gemm_rows():
    saved = kernels.get_gemm_min_rows()
    yield saved
    kernels.set_gemm_min_rows(saved)


@needs_kernels
@pytest.mark.parametrize("n,k", [(16, 256), (40, 264), (1000, 4160), (3, 64)])
@pytest.mark.parametrize("extra", [0, 1, 7, 40])
def test_gemm_matches_torch(n, k, extra, gemm_rows):
    t = gemm_rows + extra
    g = gen(n + k + t)
    x = torch.randn(t, k, generator=g)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    assert_matches(kernels.linear_bf16(x, w), x, w.float())
    wt = torch.randn(k, n, generator=g).to(torch.bfloat16)  # stored transposed, as the torrent w2
    assert_matches(kernels.linear_bf16(x, wt.t()), x, wt.t().float())
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, generator=g) * 0.01 + 1e-4
    assert_matches(kernels.linear_int8(x, q, scale), x, q.float() * scale[:, None])
    if k % 64 == 0:
        for group in (32, 64):
            packed, sc, zp, w4 = int4_case(n, k, group, seed=t)
            assert_matches(kernels.linear_int4(x, packed, sc, zp, group, exact=True), x, w4)  # the GEMM
            # by default int4 rounds x to Q8 for any row count: its 8-row integer kernel beats the GEMM
            xq = kernels.quantize_x_q8(x, kernels.q8_block(group))
            assert_matches(kernels.linear_int4(x, packed, sc, zp, group), xq, w4)


@needs_kernels
@pytest.mark.parametrize("t", [1, 2, 5, 6, 7, 8])
@pytest.mark.parametrize("k,n", [(1000, 72), (1003, 77), (130, 600)])
@pytest.mark.parametrize("over_k", [True, False])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_transposed_bf16_for_few_rows(t, k, n, over_k, threads):
    # Both thread splits, K not a multiple of the 4 rows per pass, N not of the 8 columns per vector,
    # and more threads than cores (a thread's share of K can be empty or ragged).
    g = gen(t + k + n)
    x = torch.randn(t, k, generator=g)
    wt = torch.randn(k, n, generator=g).to(torch.bfloat16)
    try:
        kernels.set_transposed_split(over_k)
        kernels.set_num_threads(threads)
        assert_matches(kernels.linear_bf16(x, wt.t()), x, wt.t().float())
    finally:
        kernels.set_transposed_split(True)
        kernels.set_num_threads(None)


@needs_kernels
def test_gemm_and_gemv_agree(gemm_rows):
    g = gen(9)
    x = torch.randn(20, 512, generator=g)
    w = torch.randn(48, 512, generator=g).to(torch.bfloat16)
    kernels.set_gemm_min_rows(1000)
    gemv = kernels.linear_bf16(x, w)
    kernels.set_gemm_min_rows(1)
    gemm = kernels.linear_bf16(x, w)
    assert kernels.get_gemm_min_rows() == 1
    assert torch.allclose(gemv, gemm, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError):
        kernels.set_gemm_min_rows(0)


# ---------------------------------------------------------------------------------------------------
# int4: K % 64 == 0, group in 32/64/128


@needs_kernels
@pytest.mark.parametrize("n,k,group", [(8, 64, 32), (8, 64, 64), (33, 192, 32), (33, 192, 64), (70, 1024, 32),
                                       (70, 1024, 64), (70, 1024, 128), (300, 4096, 64), (16, 14336, 128)])
@pytest.mark.parametrize("t", ROWS)
def test_int4_exact_matches_torch(n, k, group, t):
    packed, scale, zero, w = int4_case(n, k, group, seed=n + k + t)
    x = torch.randn(t, k, generator=gen(t))
    assert_matches(kernels.linear_int4(x, packed, scale, zero, group, exact=True), x, w)


@needs_kernels
@pytest.mark.parametrize("n,k,group", [(8, 64, 32), (33, 192, 64), (70, 1024, 32), (70, 1024, 128),
                                       (300, 4096, 64), (16, 14336, 128)])
@pytest.mark.parametrize("t", ROWS)
def test_int4_q8_is_exact_for_the_rounded_x(n, k, group, t):
    # The default path rounds x to int8 per 32 columns (per group of 128); given that, the rest is exact fp32.
    packed, scale, zero, w = int4_case(n, k, group, seed=n + k + t)
    x = torch.randn(t, k, generator=gen(t))
    x[:, ::97] *= 30  # outliers: the per-block scales must follow them
    xq = kernels.quantize_x_q8(x, kernels.q8_block(group))
    assert_matches(kernels.linear_int4(x, packed, scale, zero, group), xq, w)


@needs_kernels
def test_int4_q8_error_is_small_next_to_int4s_own():
    # What rounding x to int8 costs, measured: about 0.5% relative (1.3% with 50x outliers in 1% of
    # channels), against 8-10% for rounding the weights to 4 bits in the first place.
    g = gen(5)
    w = torch.randn(512, 4096, generator=g) * 0.02
    x = torch.randn(4, 4096, generator=g) * torch.where(torch.rand(4096, generator=g) < 0.01, 50.0, 1.0)
    from mixchat.quant import quantize_int4

    packed, scale, zero = quantize_int4(w, 64)
    exact = kernels.linear_int4(x, packed, scale, zero, 64, exact=True).double()
    q8 = kernels.linear_int4(x, packed, scale, zero, 64).double()
    true = x.double() @ w.double().T
    q8_err = ((q8 - exact).norm() / exact.norm()).item()
    weight_err = ((exact - true).norm() / true.norm()).item()
    assert q8_err < 0.02
    assert q8_err < weight_err / 4


def test_pack_int4_layout_and_checks():
    q = torch.tensor([[1, 2, 15, 0], [7, 8, 9, 10]])
    packed = kernels.pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.tolist() == [[0x21, 0x0F], [0x87, 0xA9]]
    assert torch.equal(kernels.unpack_int4(packed), q.to(torch.uint8))
    with pytest.raises(ValueError):
        kernels.pack_int4(torch.tensor([[16, 0]]))
    with pytest.raises(ValueError):
        kernels.pack_int4(torch.zeros(2, 3, dtype=torch.uint8))
    with pytest.raises(TypeError):
        kernels.pack_int4(torch.zeros(2, 2))


def test_argument_checks():
    w = torch.zeros(8, 64, dtype=torch.bfloat16)
    with pytest.raises(TypeError):
        kernels.linear_bf16(torch.zeros(1, 64), w.float())
    with pytest.raises(ValueError):
        kernels.linear_bf16(torch.zeros(1, 64), torch.zeros(8, 128, dtype=torch.bfloat16)[:, ::2])  # strided
    with pytest.raises(ValueError):
        kernels.linear_bf16(torch.zeros(1, 63), w)
    with pytest.raises(TypeError):
        kernels.linear_bf16(torch.zeros(1, 64, dtype=torch.int32), w)
    q = torch.zeros(8, 64, dtype=torch.int8)
    with pytest.raises(ValueError):
        kernels.linear_int8(torch.zeros(1, 64), q, torch.zeros(7))
    with pytest.raises(TypeError):
        kernels.linear_int8(torch.zeros(1, 64), q, torch.zeros(8, dtype=torch.float64))
    packed = torch.zeros(8, 48, dtype=torch.uint8)  # K = 96: not a multiple of 64
    with pytest.raises(ValueError):
        kernels.linear_int4(torch.zeros(1, 96), packed, torch.zeros(8, 3), torch.zeros(8, 3), 32)
    packed = torch.zeros(8, 32, dtype=torch.uint8)
    with pytest.raises(ValueError):
        kernels.linear_int4(torch.zeros(1, 64), packed, torch.zeros(8, 4), torch.zeros(8, 4), 16)
    with pytest.raises(ValueError):
        kernels.linear_int4(torch.zeros(1, 64), packed, torch.zeros(8, 1), torch.zeros(8, 2), 32)


# ---------------------------------------------------------------------------------------------------
# Several weights in one call (q/k/v and w1/w3 of a decode step)


@needs_kernels
@pytest.mark.parametrize("t", (1, 2, 4, 5, 9, 20))  # past the one-pass kernels and into the GEMM
def test_linear_many_equals_the_single_calls(t):
    g = gen(7)
    x = torch.randn(t, 1024, generator=g)
    shapes = (512, 128, 128)
    ws = [(torch.randn(n, 1024, generator=g).to(torch.bfloat16),) for n in shapes]
    for got, (w,) in zip(kernels.linear_many(x, "bf16", ws), ws, strict=True):
        assert torch.equal(got, kernels.linear_bf16(x, w))
    qs = [(torch.randint(-127, 128, (n, 1024), generator=g, dtype=torch.int8), torch.rand(n, generator=g) + 0.1)
          for n in shapes]
    for got, (q, scale) in zip(kernels.linear_many(x, "int8", qs), qs, strict=True):
        assert torch.equal(got, kernels.linear_int8(x, q, scale))
    p4 = [int4_case(n, 1024, 64, seed=n)[:3] for n in shapes]
    for got, parts in zip(kernels.linear_many(x, "int4", p4, 64), p4, strict=True):
        assert torch.equal(got, kernels.linear_int4(x, *parts, 64))
    assert kernels.linear_many(x[:, None, :], "bf16", ws[:1])[0].shape == (t, 1, 512)


def test_linear_many_checks_its_arguments():
    x = torch.zeros(1, 64)
    w = torch.zeros(8, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="kind"):
        kernels.linear_many(x, "fp8", [(w,)])
    with pytest.raises(ValueError, match="between 1 and"):
        kernels.linear_many(x, "bf16", [])
    with pytest.raises(ValueError, match="share K"):
        kernels.linear_many(x, "bf16", [(w,), (torch.zeros(8, 32, dtype=torch.bfloat16),)])
    with pytest.raises(TypeError):
        kernels.linear_many(x, "int8", [(w, torch.zeros(8))])
    with pytest.raises(ValueError, match="rows"):
        kernels.linear_many(x, "int8", [(torch.zeros(8, 64, dtype=torch.int8), torch.zeros(7))])
    with pytest.raises(ValueError, match="group"):
        kernels.linear_many(x, "int4", [(torch.zeros(8, 32, dtype=torch.uint8), torch.zeros(8, 4), torch.zeros(8, 4))],
                            16)


@needs_kernels
def test_project_fuses_only_what_the_kernels_take(monkeypatch):
    from mixchat import model as model_mod

    calls = []
    real = kernels.linear_many
    monkeypatch.setattr(kernels, "linear_many", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    torch.manual_seed(0)
    a, b = model_mod.Linear(256, 64).to(torch.bfloat16), model_mod.Linear(256, 32).to(torch.bfloat16)
    x = torch.randn(1, 256)
    with torch.no_grad():
        ya, yb = model_mod.project(x, a, b)
        assert calls == ["bf16"]
        assert torch.equal(ya, a(x)) and torch.equal(yb, b(x))
        model_mod.project(torch.randn(9, 256), a, b)  # more rows than one pass: one layer at a time
        model_mod.project(x, a, model_mod.Linear(256, 8))  # an fp32 weight: not the kernels' format
    assert calls == ["bf16"]
    model_mod.project(x, a, b)  # with gradients: torch's autograd ops
    assert calls == ["bf16"]


# ---------------------------------------------------------------------------------------------------
# Threads


@needs_kernels
def test_thread_count_does_not_change_results():
    g = gen(3)
    x = torch.randn(3, 2048, generator=g)
    w = torch.randn(1024, 2048, generator=g).to(torch.bfloat16)
    packed, scale, zero, _ = int4_case(1024, 2048, 64)
    try:
        outs = []
        for n in (1, 2, 3):
            kernels.set_num_threads(n)
            assert kernels.get_num_threads() == n
            outs.append((kernels.linear_bf16(x, w), kernels.linear_int4(x, packed, scale, zero, 64)))
    finally:
        kernels.set_num_threads(None)
    for a, b in outs[1:]:  # each output row is summed by one thread in a fixed order: bit-identical
        assert torch.equal(a, outs[0][0]) and torch.equal(b, outs[0][1])
    assert kernels.get_num_threads() == torch.get_num_threads()
    with pytest.raises(ValueError):
        kernels.set_num_threads(0)


@needs_kernels
def test_concurrent_callers():
    # ctypes drops the GIL: two Python threads run kernels at once, each with its own scratch for x.
    g = gen(4)
    w = torch.randn(256, 1024, generator=g).to(torch.bfloat16)
    packed, scale, zero, w4 = int4_case(256, 1024, 32)
    xs = [torch.randn(2, 1024, generator=g) for _ in range(2)]
    errors: list[BaseException] = []

    def work(x: torch.Tensor) -> None:
        try:
            for _ in range(50):
                assert_matches(kernels.linear_bf16(x, w), x, w.float())
                assert_matches(kernels.linear_int4(x, packed, scale, zero, 32), kernels.quantize_x_q8(x), w4)
        except BaseException as e:  # noqa: B036 - reported to the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(x,)) for x in xs]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[0]


@needs_kernels
@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps")
def test_the_kernels_add_no_openmp_runtime():
    # A second libgomp would mean a second thread pool competing for the same cores. (Other wheels,
    # e.g. sentencepiece, may bring their own copy; the point is that the kernels use torch's.)
    code = """if True:
        from pathlib import Path
        import torch
        def gomps():
            return {l.split()[-1] for l in Path("/proc/self/maps").read_text().splitlines() if "libgomp" in l}
        torch.randn(256, 256) @ torch.randn(256, 256)
        before = gomps()
        from mixchat import kernels
        kernels.linear_bf16(torch.randn(1, 1024), torch.randn(512, 1024).to(torch.bfloat16))
        assert kernels.available()
        print(sorted(gomps() - before))
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


# ---------------------------------------------------------------------------------------------------
# Fallbacks


@pytest.fixture
def fresh_state(monkeypatch):
    """Let a test re-run kernels' one-time initialisation; monkeypatch restores the real state after."""
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_reason", None)
    return monkeypatch


def test_disabled_by_environment(fresh_state):
    fresh_state.setenv("MIXCHAT_KERNELS", "0")
    assert not kernels.available()
    assert "MIXCHAT_KERNELS" in kernels.reason()
    # The linear_* functions still work, through pure torch.
    g = gen(6)
    x = torch.randn(3, 128, generator=g)
    w = torch.randn(16, 128, generator=g).to(torch.bfloat16)
    assert_matches(kernels.linear_bf16(x, w), x, w.float())
    q = torch.randint(-127, 128, (16, 128), generator=g, dtype=torch.int8)
    s = torch.rand(16, generator=g)
    assert_matches(kernels.linear_int8(x, q, s, exact=True), x, q.float() * s[:, None])
    assert_matches(kernels.linear_int8(x, q, s), kernels.quantize_x_q8(x), q.float() * s[:, None])
    packed, scale, zero, w4 = int4_case(16, 128, 32)
    assert_matches(kernels.linear_int4(x, packed, scale, zero, 32, exact=True), x, w4)
    assert_matches(kernels.linear_int4(x, packed, scale, zero, 32), kernels.quantize_x_q8(x), w4)


def test_no_compiler_is_a_quiet_fallback(fresh_state, tmp_path):
    fresh_state.setenv("CC", str(tmp_path / "no-such-cc"))
    fresh_state.setenv("MIXCHAT_KERNEL_CACHE", str(tmp_path / "cache"))
    fresh_state.delenv("MIXCHAT_KERNELS", raising=False)
    assert not kernels.available()
    reason = kernels.reason()
    assert "compiler" in reason and "\n" not in reason


@pytest.mark.skipif(kernels._compiler() is None, reason="no C compiler")
def test_failed_build_says_why(tmp_path):
    with pytest.raises(kernels.KernelError, match="build failed"):
        kernels.build(flags=(*kernels.FLAGS, "-DMC_FORCE_ERROR", "-include", "/nonexistent/header.h"), root=tmp_path)
    assert not list(tmp_path.rglob("*.so")), "a failed build must not leave a library behind"


@pytest.mark.skipif(kernels._compiler() is None, reason="no C compiler")
def test_cached_build_is_reused(tmp_path):
    first = kernels.build(root=tmp_path)
    mtime = first.stat().st_mtime_ns
    assert kernels.build(root=tmp_path) == first and first.stat().st_mtime_ns == mtime
    assert [p.name for p in first.parent.iterdir()] == ["libgemv.so"]  # no temporaries left


@pytest.mark.skipif(kernels._compiler() is None or os.uname().machine not in ("x86_64", "AMD64"),
                    reason="needs a C compiler on x86-64")
def test_portable_build_passes_the_self_check(tmp_path):
    # Without -march=native the AVX2 code is compiled out; the scalar path must give the same answers
    # (load() runs the self-check and raises if it does not).
    flags = tuple(f for f in kernels.FLAGS if f != "-march=native") + ("-march=x86-64",)
    lib = kernels.load(kernels.build(flags=flags, root=tmp_path))
    assert lib.mc_simd() == 0


@needs_kernels
def test_bf16_decode_through_the_kernel_matches_torch(make_release, monkeypatch):
    from conftest import tiny_args

    from mixchat import model as model_mod
    from mixchat.engine import Engine

    folder = make_release(tiny_args(moe={"num_experts": 4, "num_experts_per_tok": 2}), "experts")
    engine = Engine.load(folder, show_progress=False)  # bf16 weights
    ids = engine.tokenizer.encode("Once upon a time")

    def decode(e: Engine = engine) -> torch.Tensor:
        cache = e.new_cache()
        rows = [e.model(torch.tensor([t]), cache).logits for t in ids]  # one token at a time: the GEMV path
        return torch.cat(rows)

    def prefill() -> torch.Tensor:  # the whole prompt at once: the GEMM path
        return engine.model(torch.tensor(ids * 4), engine.new_cache()).logits

    monkeypatch.setattr(model_mod, "_kernels_module", None)
    with_kernel, prompt_kernel = decode(), prefill()
    assert model_mod._kernels_module is kernels  # the kernel was used
    monkeypatch.setattr(model_mod, "_kernels_module", False)
    with_torch, prompt_torch = decode(), prefill()
    # torch's one-token path rounds x to bf16, the kernel keeps it in fp32
    assert torch.allclose(with_kernel, with_torch, atol=0.03 * with_torch.abs().max().item())
    # the same bf16 weights upcast exactly: only the KV cache's bf16 rounding differs
    with_fp32 = decode(Engine.load(folder, dtype="fp32", show_progress=False))
    assert torch.allclose(with_kernel, with_fp32, atol=0.01 * with_fp32.abs().max().item())
    assert torch.equal(with_kernel.argmax(-1), with_fp32.argmax(-1))
    # both prefill paths compute in fp32 from the same bf16 weights
    assert len(ids) * 4 > kernels.get_gemm_min_rows()
    assert torch.allclose(prompt_kernel, prompt_torch, atol=1e-4 * prompt_torch.abs().max().item())


def test_torrent_w2_views_decode_like_fp32(make_release):
    # The torrent layout's w2 is a transposed view, which the kernels read as it lies.
    from conftest import tiny_args

    from mixchat.engine import Engine

    folder = make_release(tiny_args(moe={"num_experts": 4, "num_experts_per_tok": 2}), "torrent")
    bf16 = Engine.load(folder, show_progress=False)
    fp32 = Engine.load(folder, dtype="fp32", show_progress=False)
    w2 = bf16.model.layers[0].feed_forward.experts[0].w2.weight
    assert not w2.is_contiguous() and w2.t().is_contiguous()
    ids = bf16.tokenizer.encode("Once upon a time")
    caches = bf16.new_cache(), fp32.new_cache()
    for t in ids:
        got = bf16.model(torch.tensor([t]), caches[0]).logits
        want = fp32.model(torch.tensor([t]), caches[1]).logits
        assert torch.allclose(got, want, atol=0.05 * want.abs().max().item())
