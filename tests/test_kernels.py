"""mixchat.speed.kernels (compiled GEMV kernels) against float64 torch references, plus the fallbacks.

Every bound is tolerance.py's rigorous one for a single product: the kernels, on any CPU and in any
build (kernel_isa runs the native, avx2 and portable builds here), sum K products in fp32 in their own
order, so they are within gamma_K * sum|terms| of the exact result.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from cpu_paths import each_kernel_isa, each_native_bf16  # noqa: F401 - fixtures
from routing import RouterLog
from tolerance import (
    BF16,
    BF16_FLIP,
    FP64,
    Q8_ROUNDINGS,
    WEIGHT_ROUNDINGS,
    Chain,
    assert_same_argmax,
    assert_within,
    gamma,
    int4_parts,
    magnitude,
    product_bound,
    q8_shift,
    routed_alike,
    tolerance,
)

from mixchat.paths import env_flag
from mixchat.speed import kernels
from mixchat.speed.kernels import loader

needs_kernels = pytest.mark.skipif(not kernels.available(), reason=f"compiled kernels unavailable: {kernels.reason()}")

ROWS = (1, 2, 3, 5)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_matches(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, roundings: int = 0,
                   w_abs: torch.Tensor | None = None) -> None:
    """got = x @ w.T within tolerance.product_bound: one fp32 sum of K products per output in any order,
    `roundings` more per term; w_abs stands for |w| where the kernels sum w's parts separately (int4)."""
    k = x.shape[-1]
    want = x.double().reshape(-1, k) @ w.double().T
    mag = magnitude(x, w if w_abs is None else w_abs)
    # the fp64 reference is itself within gamma_K(2^-53) of the exact sum
    bound = product_bound(mag, k, roundings) + gamma(k, FP64) * mag
    assert got.dtype == torch.float32
    assert_within(got.reshape(want.shape), want, bound, f"K={k}")


def assert_int4_matches(got: torch.Tensor, x: torch.Tensor, case: tuple, group: int, q8: bool = False) -> None:
    packed, scale, zero, w = case
    xr = kernels.quantize_x_q8(x.reshape(-1, x.shape[-1]), kernels.q8_block(group)) if q8 else x
    roundings = WEIGHT_ROUNDINGS["int4"] + (Q8_ROUNDINGS if q8 else 0)
    assert_matches(got, xr, w, roundings, int4_parts(packed, scale, zero, group))


def int4_case(n: int, k: int, group: int, seed: int = 0):
    g = gen(seed)
    q = torch.randint(0, 16, (n, k), generator=g)
    scale = (torch.rand(n, k // group, generator=g) * 0.05 + 0.001).to(kernels.INT4_PARAMS)
    zero = (torch.randn(n, k // group, generator=g) * 0.05).to(kernels.INT4_PARAMS)
    packed = kernels.pack_int4(q)
    return packed, scale, zero, kernels.dequantize_int4(packed, scale, zero, group)


@pytest.mark.skipif(not env_flag("MIXCHAT_KERNELS", True) or loader._compiler() is None,
                    reason="kernels switched off, or no C compiler here")
def test_kernels_load_where_a_compiler_is():
    """Every test that needs the kernels skips without them, and a kernel that fails the self-check switches
    itself off (users fall back to torch): so with a compiler at hand this is the test that fails when a
    change breaks one, instead of the suite skipping hundreds of tests and passing."""
    assert kernels.available(), kernels.reason()


# ---------------------------------------------------------------------------------------------------
# bf16 and int8: any K (a K % 32 tail goes through scalar code)


@needs_kernels
@pytest.mark.parametrize("n,k", [(1, 1), (7, 33), (64, 100), (130, 4096 + 17), (1000, 512), (24, 14336)])
@pytest.mark.parametrize("t", ROWS)
def test_bf16_matches_torch(n, k, t):
    g = gen(n + k + t)
    x = torch.randn(t, k, generator=g)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    assert_matches(kernels.linear_bf16(x, w), kernels.bf16_x(x), w.float())


@needs_kernels
@pytest.mark.parametrize("n,k", [(1, 1), (7, 33), (64, 100), (130, 4096 + 17), (1000, 512), (24, 14336)])
@pytest.mark.parametrize("t", ROWS)
def test_int8_matches_torch(n, k, t):
    g = gen(n + k + t)
    x = torch.randn(t, k, generator=g)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, generator=g) * 0.01 + 1e-4
    assert_matches(kernels.linear_int8(x, q, scale, exact=True), x, q.float() * scale[:, None],
                   WEIGHT_ROUNDINGS["int8"])


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
    assert_matches(kernels.linear_int8(x, q, scale), kernels.quantize_x_q8(x), q.float() * scale[:, None],
                   WEIGHT_ROUNDINGS["int8"] + Q8_ROUNDINGS)


@needs_kernels
@pytest.mark.parametrize("t", [4, 8, 9, 17])
def test_more_rows_than_one_pass_serves(t):
    # bf16/int8 read the weight once per 8 rows of x, int4 once per 4: the slicing must line up.
    g = gen(t)
    x = torch.randn(t, 320, generator=g)
    w = torch.randn(72, 320, generator=g).to(torch.bfloat16)
    assert_matches(kernels.linear_bf16(x, w), kernels.bf16_x(x), w.float())
    q = torch.randint(-127, 128, (72, 320), generator=g, dtype=torch.int8)
    s = torch.rand(72, generator=g) + 0.5
    assert_matches(kernels.linear_int8(x, q, s, exact=True), x, q.float() * s[:, None], WEIGHT_ROUNDINGS["int8"])
    case = int4_case(72, 320, 64, seed=t)
    assert_int4_matches(kernels.linear_int4(x, *case[:3], 64, exact=True), x, case, 64)


@needs_kernels
def test_leading_dimensions_and_input_dtypes():
    g = gen(1)
    x = torch.randn(2, 3, 256, generator=g)
    w = torch.randn(40, 256, generator=g).to(torch.bfloat16)
    y = kernels.linear_bf16(x, w)
    assert y.shape == (2, 3, 40)
    assert_matches(y, kernels.bf16_x(x), w.float())
    xb = x.to(torch.bfloat16)  # converted to fp32 on the way in
    assert_matches(kernels.linear_bf16(xb, w), kernels.bf16_x(xb.float()), w.float())
    xt = torch.randn(256, 3, generator=g).T  # non-contiguous x is copied, not rejected
    assert_matches(kernels.linear_bf16(xt, w), kernels.bf16_x(xt), w.float())
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
    assert_matches(kernels.linear_bf16(x, w), kernels.bf16_x(x), w.float())
    wt = torch.randn(k, n, generator=g).to(torch.bfloat16)  # stored transposed, as the torrent w2
    assert_matches(kernels.linear_bf16(x, wt.t()), x, wt.t().float())
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, generator=g) * 0.01 + 1e-4
    # int8 prompts, unless exact: x rounded to bf16 where the vdpbf16ps GEMM takes them (as for bf16 weights)
    assert_matches(kernels.linear_int8(x, q, scale), kernels.bf16_x(x), q.float() * scale[:, None],
                   WEIGHT_ROUNDINGS["int8"])
    assert_matches(kernels.linear_int8(x, q, scale, exact=True), x, q.float() * scale[:, None],
                   WEIGHT_ROUNDINGS["int8"])
    if k % 64 == 0:
        for group in (32, 64):
            case = int4_case(n, k, group, seed=t)
            assert_int4_matches(kernels.linear_int4(x, *case[:3], group, exact=True), x, case, group)  # the GEMM
            # by default int4 rounds x to Q8 for any row count: its 8-row integer kernel beats the GEMM
            assert_int4_matches(kernels.linear_int4(x, *case[:3], group), x, case, group, q8=True)


GEMM_ROW_BLOCK = 132  # MC_TROWS in gemm.c: rows of x per pass over the weights


def gemm_operands(g: torch.Generator, t: int, n: int, k: int) -> tuple[torch.Tensor, ...]:
    """x [t, k]; bf16 w [n, k] and wt [k, n] (the transposed layout); int8 q [n, k] with its scale [n]."""
    x = torch.randn(t, k, generator=g)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    wt = torch.randn(k, n, generator=g).to(torch.bfloat16)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    return x, w, wt, q, torch.rand(n, generator=g) * 0.01 + 1e-4


@needs_kernels
@pytest.mark.parametrize("t", [GEMM_ROW_BLOCK + 1, 2 * GEMM_ROW_BLOCK + 7])
@pytest.mark.parametrize("n,k", [(40, 264), (600, 520)])
def test_gemm_row_blocks_change_no_result(t, n, k, gemm_rows):
    """Past MC_TROWS rows the GEMM takes x in blocks of rows, each over all of K per pass of outputs: every
    output's sum still runs over K in one order, so a long prompt gives, bit for bit, what its rows give
    in smaller calls (each still through the GEMM), and matches torch."""
    x, w, wt, q, scale = gemm_operands(gen(t + n + k), t, n, k)
    # (the product, its check against torch)
    cases = [(lambda r: kernels.linear_bf16(r, w), lambda y: assert_matches(y, kernels.bf16_x(x), w.float())),
             (lambda r: kernels.linear_bf16(r, wt.t()), lambda y: assert_matches(y, x, wt.t().float())),
             (lambda r: kernels.linear_int8(r, q, scale, exact=True),
              lambda y: assert_matches(y, x, q.float() * scale[:, None], WEIGHT_ROUNDINGS["int8"]))]
    if k % 64 == 0:
        case = int4_case(n, k, 64, seed=t)
        cases.append((lambda r: kernels.linear_int4(r, *case[:3], 64, exact=True),
                      lambda y: assert_int4_matches(y, x, case, 64)))
    cut = gemm_rows + 5  # both parts at least the GEMM's rows, the first ending inside a block of 6
    for product, check in cases:
        whole = product(x)
        assert torch.equal(whole, torch.cat([product(x[:cut]), product(x[cut:])]))
        check(whole)


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_gemm_output_blocks_change_no_result(threads, gemm_rows):
    """The GEMM packs several blocks of 16 outputs at once and runs each panel of x through all of them
    (MC_NBLK; the thread shares decide where a group ends): an output's sum does not depend on its
    neighbours, so the weight's rows cut into slices at and off those boundaries give, bit for bit, the
    columns of the whole product."""
    n, k, t = 600, 520, gemm_rows + 7  # 37.5 blocks of 16: groups that end early and a partial last block
    g = gen(n + k + threads)
    x, w, wt, q, scale = gemm_operands(g, t, n, k)
    packed, s4, z4, _ = int4_case(n, 512, 64, seed=threads)  # int4 needs K % 64 == 0
    x4 = torch.randn(t, 512, generator=g)
    products = [lambda a, b: kernels.linear_bf16(x, w[a:b]),
                lambda a, b: kernels.linear_bf16(x, wt[:, a:b].contiguous().t()),
                lambda a, b: kernels.linear_int8(x, q[a:b], scale[a:b], exact=True),
                lambda a, b: kernels.linear_int4(x4, packed[a:b], s4[a:b], z4[a:b], 64, exact=True)]
    cuts = [0, 48, 100, 64 * 4 + 16, 599, n]  # on a block, off one, past a whole group, one output alone
    try:
        kernels.set_num_threads(threads)
        for product in products:
            whole = product(0, n)
            parts = torch.cat([product(a, b) for a, b in zip(cuts, cuts[1:], strict=False)], dim=1)
            assert torch.equal(whole, parts)
    finally:
        kernels.set_num_threads(None)


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
    # two fp32 sums of the same products, each within its bound of the exact one
    assert_within(gemv, gemm, 2 * product_bound(magnitude(x, w), 512), "GEMV vs GEMM")
    with pytest.raises(ValueError):
        kernels.set_gemm_min_rows(0)


# ---------------------------------------------------------------------------------------------------
# int4: K % 64 == 0, group in 32/64/128


@needs_kernels
@pytest.mark.parametrize("n,k,group", [(8, 64, 32), (8, 64, 64), (33, 192, 32), (33, 192, 64), (70, 1024, 32),
                                       (70, 1024, 64), (70, 1024, 128), (300, 4096, 64), (16, 14336, 128)])
@pytest.mark.parametrize("t", ROWS)
def test_int4_exact_matches_torch(n, k, group, t):
    case = int4_case(n, k, group, seed=n + k + t)
    x = torch.randn(t, k, generator=gen(t))
    assert_int4_matches(kernels.linear_int4(x, *case[:3], group, exact=True), x, case, group)


@needs_kernels
@pytest.mark.parametrize("n,k,group", [(8, 64, 32), (33, 192, 64), (70, 1024, 32), (70, 1024, 128),
                                       (300, 4096, 64), (16, 14336, 128)])
@pytest.mark.parametrize("t", ROWS)
def test_int4_q8_is_exact_for_the_rounded_x(n, k, group, t):
    # The default path rounds x to int8 per 32 columns (per group of 128); given that, the rest is exact fp32.
    case = int4_case(n, k, group, seed=n + k + t)
    x = torch.randn(t, k, generator=gen(t))
    x[:, ::97] *= 30  # outliers: the per-block scales must follow them
    assert_int4_matches(kernels.linear_int4(x, *case[:3], group), x, case, group, q8=True)


@needs_kernels
@pytest.mark.parametrize("k,group", [(192, 64), (320, 32), (1024, 128), (4096, 128)])
@pytest.mark.parametrize("t", [9, 20, 130])
def test_int4_prompts_give_each_eight_row_slices_own_bits(k, group, t):
    """More than 8 rows of x walk each block of weight rows through every 8-row slice (int4q8_sliced) rather
    than each slice through every weight: the same kernels on the same slices, so the same bits, also past
    the 128 rows prepared at once, and for several weights sharing x (in one call below the GEMM's row count;
    the row-exact products, drafting's, in one call at any count)."""
    case, other = int4_case(200, k, group, seed=t + k), int4_case(72, k, group, seed=t + k + 1)
    x = torch.randn(t, k, generator=gen(t))
    x[:, ::97] *= 30

    def by_slices(c: tuple) -> torch.Tensor:
        return torch.cat([kernels.linear_int4(x[i:i + 8], *c[:3], group) for i in range(0, t, 8)])

    assert torch.equal(kernels.linear_int4(x, *case[:3], group), by_slices(case))
    both = kernels.linear_many(x, "int4", [case[:3], other[:3]], group=group)
    assert torch.equal(both[0], by_slices(case)) and torch.equal(both[1], by_slices(other))
    rows = kernels.linear_many(x, "int4", [case[:3], other[:3]], group=group, exact_rows=True)
    for got, c in zip(rows, (case, other), strict=True):
        assert torch.equal(got, torch.cat([kernels.linear_int4(x[i:i + 1], *c[:3], group) for i in range(t)]))


@needs_kernels
def test_int4_q8_error_is_small_next_to_int4s_own():
    # What rounding x to int8 costs, measured: about 0.5% relative (1.3% with 50x outliers in 1% of
    # channels), against 8-10% for rounding the weights to 4 bits in the first place.
    g = gen(5)
    w = torch.randn(512, 4096, generator=g) * 0.02
    x = torch.randn(4, 4096, generator=g) * torch.where(torch.rand(4096, generator=g) < 0.01, 50.0, 1.0)
    from mixchat.speed.quant import quantize_int4

    packed, scale, zero = quantize_int4(w, 64)
    exact = kernels.linear_int4(x, packed, scale, zero, 64, exact=True).double()
    q8 = kernels.linear_int4(x, packed, scale, zero, 64).double()
    # Within the contract: each x moved by at most its block's absmax / 254, and each path's fp32 sums.
    parts = int4_parts(packed, scale, zero, 64)
    mag = magnitude(x, parts)
    sums = 2 * product_bound(mag, 4096, WEIGHT_ROUNDINGS["int4"] + Q8_ROUNDINGS)
    assert_within(q8, exact, q8_shift(x, parts) + sums, "Q8 vs exact")
    # ... and small next to the weights' own rounding: the claim above (a tenth), with room for other data
    true = x.double() @ w.double().T
    q8_err = ((q8 - exact).norm() / exact.norm()).item()
    weight_err = ((exact - true).norm() / true.norm()).item()
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
    def h(*shape):
        return torch.zeros(*shape, dtype=kernels.INT4_PARAMS)

    packed = torch.zeros(8, 48, dtype=torch.uint8)  # K = 96: not a multiple of 64
    with pytest.raises(ValueError):
        kernels.linear_int4(torch.zeros(1, 96), packed, h(8, 3), h(8, 3), 32)
    packed = torch.zeros(8, 32, dtype=torch.uint8)
    with pytest.raises(ValueError):
        kernels.linear_int4(torch.zeros(1, 64), packed, h(8, 4), h(8, 4), 16)
    with pytest.raises(ValueError):
        kernels.linear_int4(torch.zeros(1, 64), packed, h(8, 1), h(8, 2), 32)
    # fp32 scales and zeros (the format before 0.8.0) would be read as fp16 pairs: refused
    with pytest.raises(TypeError):
        kernels.linear_int4(torch.zeros(1, 64), packed, torch.zeros(8, 2), h(8, 2), 32)
    with pytest.raises(TypeError):
        kernels.linear_many(torch.zeros(1, 64), "int4", [(packed, h(8, 2), torch.zeros(8, 2))], 32)


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
@pytest.mark.parametrize("kind", ["bf16", "int8", "int4"])
def test_threads_taking_each_others_chunks_give_every_row_once_and_the_same(kind):
    # mc_run_jobs hands out each weight's rows in chunks (a multiple of 16 rows, ~256 K weights: 64 rows
    # at K = 4096) and a thread that is through its share takes chunks from the end of the others'. Rows
    # that are not a multiple of a chunk, weights of different heights in one region, and more threads
    # than chunks (some threads own nothing): every row is computed (each is checked against the weights)
    # and by one thread in a fixed order, so the outputs are bit-identical whatever the thread count.
    g = gen(21)
    k = 4096
    x = torch.randn(2, k, generator=g)
    heights = (1000, 72, 336)  # 15.6, 1.1 and 5.25 chunks of 64 rows
    weights, reference = [], []
    for i, n in enumerate(heights):
        if kind == "bf16":
            w = (torch.randn(n, k, generator=g) * 0.05).to(torch.bfloat16)
            weights.append((w,))
            reference.append(w.float())
        elif kind == "int8":
            q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
            scale = torch.rand(n, generator=g) * 0.01
            weights.append((q, scale))
            reference.append(q.float() * scale[:, None])
        else:
            packed, scale, zero, w = int4_case(n, k, 64, seed=i)
            weights.append((packed, scale, zero))
            reference.append(w)
    try:
        outs = []
        for threads in (1, 2, 3, 8):
            kernels.set_num_threads(threads)
            outs.append(kernels.linear_many(x, kind, weights, 64 if kind == "int4" else 0))
    finally:
        kernels.set_num_threads(None)
    for got in outs[1:]:
        for a, b in zip(got, outs[0], strict=True):
            assert torch.equal(a, b)
    if kind == "bf16":  # exact fp32 x: the sums themselves are checked (int8/int4 round x to int8)
        for y, w in zip(outs[0], reference, strict=True):
            assert_matches(y, x, w)
    else:
        for y, w in zip(outs[0], reference, strict=True):
            torch.testing.assert_close(y, x @ w.T, rtol=0.05, atol=0.05 * (x @ w.T).abs().max().item())


@needs_kernels
def test_concurrent_callers():
    # ctypes drops the GIL: two Python threads run kernels at once, each with its own scratch for x.
    g = gen(4)
    w = torch.randn(256, 1024, generator=g).to(torch.bfloat16)
    case = packed, scale, zero, _ = int4_case(256, 1024, 32)
    xs = [torch.randn(2, 1024, generator=g) for _ in range(2)]
    errors: list[BaseException] = []

    def work(x: torch.Tensor) -> None:
        try:
            for _ in range(50):
                assert_matches(kernels.linear_bf16(x, w), kernels.bf16_x(x), w.float())
                assert_int4_matches(kernels.linear_int4(x, packed, scale, zero, 32), x, case, 32, q8=True)
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
        from mixchat.speed import kernels
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
    monkeypatch.setattr(kernels.loader, "_lib", None)
    monkeypatch.setattr(kernels.loader, "_reason", None)
    monkeypatch.setattr(kernels.loader, "_opened", {})
    return monkeypatch


def test_disabled_by_environment(fresh_state):
    fresh_state.setenv("MIXCHAT_KERNELS", "0")
    assert not kernels.available()
    assert "MIXCHAT_KERNELS" in kernels.reason()
    # The linear_* functions still work, through pure torch.
    g = gen(6)
    x = torch.randn(3, 128, generator=g)
    w = torch.randn(16, 128, generator=g).to(torch.bfloat16)
    assert_matches(kernels.linear_bf16(x, w), kernels.bf16_x(x), w.float())
    q = torch.randint(-127, 128, (16, 128), generator=g, dtype=torch.int8)
    s = torch.rand(16, generator=g)
    assert_matches(kernels.linear_int8(x, q, s, exact=True), x, q.float() * s[:, None], WEIGHT_ROUNDINGS["int8"])
    assert_matches(kernels.linear_int8(x, q, s), kernels.quantize_x_q8(x), q.float() * s[:, None],
                   WEIGHT_ROUNDINGS["int8"] + Q8_ROUNDINGS)
    case = int4_case(16, 128, 32)
    assert_int4_matches(kernels.linear_int4(x, *case[:3], 32, exact=True), x, case, 32)
    assert_int4_matches(kernels.linear_int4(x, *case[:3], 32), x, case, 32, q8=True)


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
    # the portable build compiles in a second, the native one in 20-30
    first = kernels.build(flags=kernels.isa_flags("portable"), root=tmp_path)
    mtime = first.stat().st_mtime_ns
    assert kernels.build(flags=kernels.isa_flags("portable"), root=tmp_path) == first
    assert first.stat().st_mtime_ns == mtime
    assert [p.name for p in first.parent.iterdir()] == ["libmixchat.so"]  # no temporaries left


def _fake_compiler(tmp_path: Path) -> str:
    """A `cc` that writes an empty library and logs the source file it was given, in no time."""
    cc = tmp_path / "fake-cc"
    cc.write_text('#!/bin/sh\n[ "$1" = --version ] && { echo fake 1.0; exit 0; }\n'
                  'while [ $# -gt 0 ]; do case "$1" in -o) out=$2; shift;; *.c) echo "$1" >> "$0.log";; esac; '
                  'shift; done\n: > "$out"\n')
    cc.chmod(0o755)
    return str(cc)


def test_the_build_takes_the_unity_file_and_hashes_every_part(tmp_path, monkeypatch):
    # csrc/kernels.c (which #includes the part files) is what the compiler is given; editing any .c or .h
    # part gives another cache folder.
    from mixchat.speed.kernels import loader

    csrc = tmp_path / "csrc"
    csrc.mkdir()
    (csrc / "kernels.c").write_text('#include "part.c"\n')
    (csrc / "part.c").write_text("int x;\n")
    (csrc / "part.h").write_text("#define A 1\n")
    monkeypatch.setattr(loader, "CSRC", csrc)
    cc = _fake_compiler(tmp_path)
    assert kernels.source() == csrc / "kernels.c"
    first = kernels.build(cc=cc, flags=("-O0",), root=tmp_path / "cache")
    (csrc / "part.c").write_text("int y;\n")
    second = kernels.build(cc=cc, flags=("-O0",), root=tmp_path / "cache")
    (csrc / "part.h").write_text("#define A 2\n")
    third = kernels.build(cc=cc, flags=("-O0",), root=tmp_path / "cache")
    assert len({first.parent, second.parent, third.parent}) == 3
    assert Path(cc + ".log").read_text().split() == 3 * [str(csrc / "kernels.c")]


def test_struct_sizes_are_checked_against_the_library(fresh_state):
    import ctypes

    from mixchat.speed.kernels import decode

    class Library:  # what ctypes.CDLL offers: attributes for the exported functions
        def __init__(self, sizes: dict[int, int] | None) -> None:
            if sizes is not None:
                self.mc_struct_size = lambda which: sizes[which]

    right = {0: ctypes.sizeof(decode._LayerStruct), 1: ctypes.sizeof(decode._MoeStruct)}
    decode.check_struct_sizes(Library(right))
    decode.check_struct_sizes(Library(None))  # a library from before mc_struct_size: not checked
    with pytest.raises(kernels.KernelError, match="struct mc_moe is 8 bytes in the library"):
        decode.check_struct_sizes(Library({**right, 1: 8}))

    # The loader runs the check: a mismatch leaves the kernels unavailable, saying why.
    real = decode.check_struct_sizes
    fresh_state.setattr(decode, "check_struct_sizes", lambda lib: real(Library({0: 1, 1: 1})))
    assert not kernels.available()
    assert kernels.reason() == f"struct mc_layer is 1 bytes in the library, {right[0]} in Python"


def test_install_swaps_in_kernel_layers_that_share_the_weights():
    from conftest import tiny_args

    from mixchat.model.model import Transformer
    from mixchat.speed import linear

    torch.manual_seed(0)
    model = Transformer(tiny_args()).to(torch.bfloat16)
    assert model.decoder is None and not any(isinstance(m, linear.KernelLinear) for m in model.modules())
    before = {n: p for n, p in model.named_parameters()}
    swapped = linear.install(model)
    assert swapped == sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert isinstance(model.layers[0].attention.wq, linear.KernelLinear)
    assert all(p is before[n] for n, p in model.named_parameters())  # shared, not copied
    assert linear.install(model) == 0  # nothing left to swap


# ---------------------------------------------------------------------------------------------------
# Builds (MIXCHAT_KERNEL_ISA): every side of the CPU-dependent C code, on this machine


def test_build_flags_pin_the_code_path():
    assert "-march=native" in kernels.isa_flags("native")
    avx2 = kernels.isa_flags("avx2")  # what an AVX2-only CPU runs, on an AVX-512 one too
    assert "-march=x86-64-v3" in avx2 and not any("native" in f or "avx512" in f for f in avx2)
    assert "-DMC_PORTABLE" in kernels.isa_flags("portable")
    with pytest.raises(ValueError, match="native, avx2, portable"):
        kernels.isa_flags("avx512")


@pytest.mark.skipif(kernels._compiler() is None, reason="no C compiler")
def test_the_environment_picks_the_build(fresh_state):
    fresh_state.setenv("MIXCHAT_KERNEL_ISA", "portable")
    fresh_state.delenv("MIXCHAT_KERNELS", raising=False)
    assert kernels.available() and not kernels.simd()
    assert kernels.reason().startswith("ok (portable build; scalar code")


def test_an_unknown_build_is_refused(fresh_state):
    fresh_state.setenv("MIXCHAT_KERNEL_ISA", "avx512")
    fresh_state.delenv("MIXCHAT_KERNELS", raising=False)
    assert not kernels.available()
    assert "MIXCHAT_KERNEL_ISA=avx512" in kernels.reason()


def test_the_avx2_build_is_refused_where_it_cannot_run(fresh_state):
    # Its first AVX2 instruction would kill the process, so it is never loaded on such a CPU.
    fresh_state.setattr(kernels.loader, "_cpu_flags", lambda: "fpu sse sse2")
    with pytest.raises(kernels.KernelError, match="the avx2 build needs"), kernels.forced_isa("avx2"):
        pass


@pytest.mark.skipif(kernels._compiler() is None, reason="no C compiler")
@pytest.mark.parametrize("rows", [1, 3, 9, 2 * kernels.GEMM_MIN_ROWS + 1])  # one pass, 8-row slices, the GEMM
def test_each_build_meets_the_contract(kernel_isa, rows):
    # Every entry point of each build, within the same bounds as the detailed tests above (which run the
    # process's own build, native unless MIXCHAT_KERNEL_ISA says otherwise).
    assert kernels.reason().startswith(f"ok ({kernel_isa} build")
    if kernel_isa != "native":
        assert kernels.simd() is (kernel_isa == "avx2")
    g = gen(rows)
    for n, k in ((40, 100), (72, 1024)):  # a K % 32 tail (bf16, exact int8 only); then every format
        x = torch.randn(rows, k, generator=g)
        x[:, ::97] *= 30
        w = torch.randn(n, k, generator=g).to(torch.bfloat16)
        assert_matches(kernels.linear_bf16(x, w), kernels.bf16_x(x), w.float())
        wt = torch.randn(k, n, generator=g).to(torch.bfloat16)
        assert_matches(kernels.linear_bf16(x, wt.t()), x, wt.t().float())
        q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        s = torch.rand(n, generator=g) * 0.01 + 1e-4
        assert_matches(kernels.linear_int8(x, q, s, exact=True), x, q.float() * s[:, None], WEIGHT_ROUNDINGS["int8"])
        if k % 64:
            continue
        q8 = rows < kernels.get_gemm_min_rows()  # int8 rounds x to Q8 below the GEMM's rows
        assert_matches(kernels.linear_int8(x, q, s), kernels.quantize_x_q8(x) if q8 else kernels.bf16_x(x),
                       q.float() * s[:, None],
                       WEIGHT_ROUNDINGS["int8"] + (Q8_ROUNDINGS if q8 else 0))
        for group in kernels.INT4_GROUPS:
            case = int4_case(n, k, group, seed=group)
            assert_int4_matches(kernels.linear_int4(x, *case[:3], group, exact=True), x, case, group)
            assert_int4_matches(kernels.linear_int4(x, *case[:3], group), x, case, group, q8=True)
        many = [(w,), (wt.t().contiguous(),)]
        for got, (wi,) in zip(kernels.linear_many(x, "bf16", many), many, strict=True):
            assert torch.equal(got, kernels.linear_bf16(x, wi))


# ---------------------------------------------------------------------------------------------------
# Through the model


def _run(engine, tokens: list[int], one_at_a_time: bool):
    """Logits, expert choices and the router log of `tokens` from an empty cache."""
    cache = engine.new_cache()
    with RouterLog(engine.model) as log:
        if one_at_a_time:
            outs = [engine.model(torch.tensor([t]), cache) for t in tokens]
        else:
            outs = [engine.model(torch.tensor(tokens), cache)]
    return torch.cat([o.logits for o in outs]), torch.cat([o.experts for o in outs]), log


def expert_rows(experts: torch.Tensor, n_experts: int) -> torch.Tensor:
    """How many tokens each expert took, [layers, n_experts], from chosen experts [T, layers, k]."""
    return torch.stack([torch.bincount(experts[:, layer].flatten(), minlength=n_experts)
                        for layer in range(experts.shape[1])])


needs_bf16dot = pytest.mark.skipif(not kernels.bf16dot(), reason="the kernels' build has no vdpbf16ps GEMM "
                                   "(a CPU without AVX512-BF16)")


@needs_bf16dot
@pytest.mark.parametrize("n,k", [(7, 32), (33, 96), (130, 544), (260, 1056), (40, 48)])
@pytest.mark.parametrize("t", [12, 13, 40])
@pytest.mark.parametrize("threads", [1, 2])
def test_the_vdpbf16ps_gemm_multiplies_x_rounded_to_bf16(n, k, t, threads):
    """Prompts on an AVX512-BF16 build: bf16 and int8 weights by x rounded to bf16 (to nearest even), summed
    in fp32 as pairs of exact products, so within one K-term fp32 sum of the rounded x's exact product (int8:
    one more rounding, the row's scale). Partial tiles in T (3 rows), N (128 outputs) and K (512 columns)
    and the threads' shares; K % 32 != 0 (48) goes through the fp32 tile instead, bit for bit."""
    g = torch.Generator().manual_seed(n * k + t)
    x = torch.randn(t, k, generator=g)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    q = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, generator=g) + 0.1
    assert t >= kernels.get_gemm_min_rows()
    kernels.set_num_threads(threads)
    try:
        got = kernels.linear_bf16(x, w), kernels.linear_int8(x, q, scale)
        kernels.set_gemm_bf16dot(False)
        fp32_tile = kernels.linear_bf16(x, w), kernels.linear_int8(x, q, scale)
    finally:
        kernels.set_gemm_bf16dot(True)
        kernels.set_num_threads(None)
    if k % 32:
        for a, b in zip(got, fp32_tile, strict=True):
            assert torch.equal(a, b)
        return
    xr = x.to(torch.bfloat16).double()
    w8 = q.double() * scale.double()[:, None]
    for y, wd, extra, what in ((got[0], w.double(), 0, "bf16"), (got[1], w8, 1, "int8")):
        mag = magnitude(xr, wd)
        assert_within(y, xr @ wd.T, product_bound(mag, k, roundings=extra) + gamma(k, FP64) * mag, f"{what} T={t}")
    # and it is not the fp32 tile: that one multiplies x as it is
    assert not torch.equal(got[0], fp32_tile[0])


@needs_kernels
def test_prompt_gemm_is_measured_once_per_machine_and_kept(monkeypatch, tmp_path):
    """With native bf16 the faster of the kernels' GEMM and torch's takes prompts: measured at the first
    prompt, kept beside the kernels' build so later processes choose alike, measured again when the file
    is damaged; MIXCHAT_PROMPT_GEMM forces either; without native bf16 the kernels, unmeasured."""
    from mixchat.speed import linear
    from mixchat.speed.kernels import measured

    calls = []

    def measure() -> dict:
        calls.append(1)
        return {"choice": "torch", "kernels_gflops": 100.0, "torch_gflops": 200.0, "kernels_gemm": "fp32",
                "measured": "now"}

    kept = tmp_path / "prompt-gemm.json"
    monkeypatch.setattr(linear, "measure_prompt_gemm", measure)
    monkeypatch.setattr(measured, "choice_file", lambda lib, name: kept if name == kept.name else None)
    monkeypatch.setattr(measured, "_found", {})
    monkeypatch.delenv("MIXCHAT_PROMPT_GEMM", raising=False)
    monkeypatch.setenv("MIXCHAT_NATIVE_BF16", "0")
    assert linear.prompt_gemm() == "kernels" and not calls and not kept.exists()
    monkeypatch.setenv("MIXCHAT_NATIVE_BF16", "1")
    assert linear.prompt_gemm() == "torch" and linear.prompt_gemm() == "torch" and len(calls) == 1
    assert "torch GEMM" in linear.prompt_gemm_note() and "bf16 200;" in linear.prompt_gemm_note()
    measured.forget()  # a new process reads the file
    assert linear.prompt_gemm() == "torch" and len(calls) == 1
    kept.write_text("{not json")
    measured.forget()
    assert linear.prompt_gemm() == "torch" and len(calls) == 2
    for forced in ("kernels", "torch"):
        monkeypatch.setenv("MIXCHAT_PROMPT_GEMM", forced)
        assert linear.prompt_gemm() == forced and len(calls) == 2
        assert linear.prompt_gemm_note() is None  # forced: no measurement decides it
    # a cache folder that cannot take the file loses nothing but the next process's shortcut
    measured._write(tmp_path / "gone" / "prompt-gemm.json", {"2": {"choice": "torch"}})
    assert not (tmp_path / "gone").exists()


@needs_kernels
def test_measuring_the_prompt_gemms_times_both():
    from mixchat.speed import linear

    found = linear.measure_prompt_gemm(rows=24, n=64, k=256, repeats=1)
    assert found["choice"] in ("kernels", "torch")
    assert found["kernels_gflops"] > 0 and found["torch_gflops"] > 0
    assert found["kernels_gemm"] == ("vdpbf16ps" if kernels.bf16dot() else "fp32")


@needs_kernels
def test_native_bf16_decides_who_multiplies_a_prompt(monkeypatch, native_bf16):
    from mixchat.speed import linear

    rows = []
    real = kernels.linear_bf16
    monkeypatch.setattr(kernels, "linear_bf16", lambda x, w: rows.append(x.shape[0]) or real(x, w))
    layer = linear.KernelLinear(64, 32, bias=False).to(torch.bfloat16)
    most = linear._KERNEL_MAX_ROWS
    with torch.no_grad():
        for t in (1, most, most + 1):
            layer(torch.randn(t, 64))
    # the kernels take decode and short prompts either way; longer prompts go to torch's bf16 GEMM where
    # the CPU multiplies bf16 natively and torch's GEMM measured faster (the fixture pins that side)
    assert rows == [1, most] + ([] if native_bf16 else [most + 1])
    monkeypatch.setenv("MIXCHAT_PROMPT_GEMM", "kernels")  # where the kernels' GEMM measured faster
    rows.clear()
    with torch.no_grad():
        layer(torch.randn(most + 1, 64))
    assert rows == [most + 1]
    # without the kernels, several rows are upcast to fp32 unless bf16 is native
    assert linear.upcast(linear._UPCAST_MIN_TOKENS, layer.weight) is not native_bf16


@needs_kernels
def test_bf16_decode_through_the_kernel_matches_torch(make_release, monkeypatch, native_bf16):
    from conftest import tiny_args

    from mixchat.engine.engine import Engine
    from mixchat.speed import linear

    args = tiny_args(moe={"num_experts": 4, "num_experts_per_tok": 2})
    folder = make_release(args, "experts")
    engine = Engine.load(folder, show_progress=False)  # bf16 weights
    ids = engine.tokenizer.encode("Once upon a time")
    prompt = ids * 4
    assert len(prompt) > linear._KERNEL_MAX_ROWS  # with native bf16, torch's GEMM takes this prompt
    chain = Chain.of(args, len(prompt))

    used = []
    real = kernels.linear_bf16
    monkeypatch.setattr(kernels, "linear_bf16", lambda x, w: used.append(x.shape[0]) or real(x, w))
    k_decode, k_experts, _ = _run(engine, ids, True)  # one token at a time: the GEMV path
    k_prompt, k_prompt_experts, _ = _run(engine, prompt, False)  # the whole prompt: the GEMM path
    assert used  # the kernel was used
    monkeypatch.setattr(linear, "_use_kernels", False)
    t_decode, t_experts, t_log = _run(engine, ids, True)
    t_prompt, t_prompt_experts, t_prompt_log = _run(engine, prompt, False)

    # One token at a time torch rounds each bf16 product's input and output to bf16 (it upcasts to fp32
    # only from _UPCAST_MIN_TOKENS rows on), on any CPU; the kernel keeps fp32. Both round the KV cache to
    # bf16, where a hair's difference can flip a rounding.
    terms = chain.rounded(BF16), chain.reordered(), BF16_FLIP
    router = t_log.logits()
    n = routed_alike(k_experts, t_experts, router, tolerance(router.abs().max().item(), *terms))
    assert_within(k_decode[:n], t_decode[:n], tolerance(t_decode.abs().max().item(), *terms), "decode: kernel vs torch")

    # The same bf16 weights upcast exactly: only the KV cache's bf16 rounding of every key and value (the
    # attention scores' and output's inputs, per layer) differs.
    f_decode, f_experts, f_log = _run(Engine.load(folder, dtype="fp32", show_progress=False), ids, True)
    terms = 2 * args.n_layers * BF16, chain.reordered()
    router = f_log.logits()
    n = routed_alike(k_experts, f_experts, router, tolerance(router.abs().max().item(), *terms))
    tol = tolerance(f_decode.abs().max().item(), *terms)
    assert_within(k_decode[:n], f_decode[:n], tol, "decode: kernel vs fp32")
    assert_same_argmax(k_decode[:n], f_decode[:n], tol)

    # Prompts. Without native bf16 both paths multiply in fp32 (the kernels' GEMM; torch upcasts), but
    # torch rounds an expert's products' inputs and outputs to bf16 where it is given fewer than
    # _UPCAST_MIN_TOKENS rows. With it both take torch's bf16 GEMM (inputs and outputs rounded) for more
    # than _KERNEL_MAX_ROWS rows, and the kernels keep fp32 in an expert given at most that many.
    rows = torch.stack([expert_rows(e, args.moe.num_experts) for e in (k_prompt_experts, t_prompt_experts)])
    odd = rows <= linear._KERNEL_MAX_ROWS if native_bf16 else rows < linear._UPCAST_MIN_TOKENS
    rounded_layers = int(((rows > 0) & odd).any(dim=-1).any(dim=0).sum())  # w1/w3 and w2 in each
    terms = chain.rounded(BF16, 2 * rounded_layers), chain.reordered(), BF16_FLIP
    router = t_prompt_log.logits()
    n = routed_alike(k_prompt_experts, t_prompt_experts, router, tolerance(router.abs().max().item(), *terms))
    assert_within(k_prompt[:n], t_prompt[:n], tolerance(t_prompt.abs().max().item(), *terms), "prompt")


def test_torrent_w2_views_decode_like_fp32(make_release):
    # The torrent layout's w2 is a transposed view, which the kernels read as it lies.
    from conftest import tiny_args

    from mixchat.engine.engine import Engine

    args = tiny_args(moe={"num_experts": 4, "num_experts_per_tok": 2})
    folder = make_release(args, "torrent")
    bf16 = Engine.load(folder, show_progress=False)
    fp32 = Engine.load(folder, dtype="fp32", show_progress=False)
    w2 = bf16.model.layers[0].feed_forward.experts[0].w2.weight
    assert not w2.is_contiguous() and w2.t().is_contiguous()
    ids = bf16.tokenizer.encode("Once upon a time")
    got, got_experts, _ = _run(bf16, ids, True)
    want, want_experts, log = _run(fp32, ids, True)
    # The same weights, upcast exactly in fp32: the bf16 model rounds every key and value into its cache
    # (per layer, the inputs of the attention scores and output), and without the kernels torch rounds
    # each product's input and output to bf16 for one token.
    chain = Chain.of(args, len(ids))
    terms = 2 * args.n_layers * BF16, chain.reordered(), 0.0 if kernels.available() else chain.rounded(BF16)
    router = log.logits()
    n = routed_alike(got_experts, want_experts, router, tolerance(router.abs().max().item(), *terms))
    assert_within(got[:n], want[:n], tolerance(want.abs().max().item(), *terms), "bf16 vs fp32 decode")


@needs_kernels
def test_row_reads_are_measured_once_per_machine_kept_and_forced(monkeypatch, tmp_path):
    """Each format's software prefetch and rows per pass are set per row length from a measurement at the first
    call (kept beside the library, read by later processes, measured again when damaged or older), or the
    prefetch forced by MIXCHAT_ROW_PREFETCH (with the build's rows)."""
    from mixchat.speed.kernels import measured, prefetch

    lib = kernels.library()
    if not lib.mc_simd():
        pytest.skip("the portable build has one way to read")
    calls = []

    def figures(choice: str, **rates: float) -> dict:
        rates = {name.replace("_", "+"): rate for name, rate in rates.items()}
        return {"choice": choice, "gb_per_second": rates,
                "speedup": {name: round(rate / rates["build+on"], 3) for name, rate in rates.items()}}

    def measure(lib_: object) -> dict:
        calls.append(lib_)
        return {"distance_bytes": lib.mc_prefetch_default(), "measured": "now", "pages": prefetch._pages(),
                "columns": dict(prefetch.ROWS),
                "bf16": {"short": figures("one+off", build_on=10.0, build_off=11.0, one_on=10.4, one_off=12.0),
                         "long": figures("build+off", build_on=10.0, build_off=11.0)},
                "int8": {"short": figures("one+on", build_on=10.0, build_off=8.0, one_on=12.5, one_off=9.0),
                         "long": figures("build+on", build_on=10.0, build_off=8.0, one_on=10.1, one_off=9.0)},
                "int4": {"short": figures("build+on", build_on=10.0, build_off=8.0),
                         "long": figures("build+off", build_on=10.0, build_off=12.0)}}

    def settings() -> list[tuple[int, int]]:
        kernels.linear_bf16(torch.randn(1, 64), torch.randn(8, 64).to(torch.bfloat16))
        return [(lib.mc_get_prefetch(i, r), lib.mc_get_one_row(i, r))
                for i in range(len(prefetch.FORMATS)) for r in range(len(prefetch.ROWS))]

    kept = tmp_path / prefetch.FILE
    on = lib.mc_prefetch_default()
    assert on > 0
    # (bf16 short, bf16 long, int8 short, int8 long, int4 short, int4 long): each row kind its own choice
    measured_settings = [(0, 1), (0, 0), (on, 1), (on, 0), (on, 0), (0, 0)]
    monkeypatch.setattr(prefetch, "measure", measure)
    monkeypatch.setattr(measured, "choice_file", lambda lib_, name: kept if name == kept.name else None)
    monkeypatch.setattr(measured, "_found", {})
    monkeypatch.delenv("MIXCHAT_ROW_PREFETCH", raising=False)

    def keep(record: dict) -> None:
        kept.write_text(json.dumps({str(kernels.get_num_threads()): record}))
        measured.forget()
        kernels.reapply_settings()

    try:
        kernels.reapply_settings()
        assert settings() == measured_settings and len(calls) == 1 and kept.exists()
        assert settings() == measured_settings and len(calls) == 1  # set once, not per call
        note = prefetch.note(lib, kernels.get_num_threads())
        assert note.startswith("bf16 short rows one row, prefetch off (12.0 GB/s against 10.0 with build rows, "
                               "prefetch on), long rows build rows, prefetch off (11.0 GB/s against 10.0"), note
        assert "; int8 short rows one row, prefetch on (12.5 GB/s against 10.0" in note, note
        assert ", long rows build rows, prefetch on (10.0 GB/s); int4 short rows" in note, note
        assert note.endswith("; measured now"), note
        measured.forget()  # a new process reads the file
        kernels.reapply_settings()
        assert settings() == measured_settings and len(calls) == 1
        kept.write_text('{"2": {"bf16": "garbage"}, "1": []}')
        measured.forget()
        kernels.reapply_settings()
        assert settings() == measured_settings and len(calls) == 2
        # a setting this code does not know (an edited or older file) is measured again, never applied
        record = measure(lib)
        record["int8"]["long"] = figures("one+sometimes", build_on=10.0, one_sometimes=12.0)
        keep(record)
        assert settings() == measured_settings and len(calls) == 4
        # one taken on a busy machine contradicts itself (its turns' ratio says one row, its median rates not)
        record = measure(lib)
        record["bf16"]["short"]["speedup"]["one+off"] = 1.3
        record["bf16"]["short"]["gb_per_second"]["one+off"] = 10.2
        keep(record)
        assert settings() == measured_settings and len(calls) == 6  # measured again, not taken
        # one taken before the weights were in the model's pages (no "pages": before 0.7.6), or in others;
        # one setting per format (before 0.7.8); rows of other lengths
        older = {fmt: figures("one+off", build_on=10.0, one_off=12.0) for fmt in prefetch.FORMATS}
        for change in ({"pages": None}, {"pages": "base" if prefetch._pages() == "huge" else "huge"},
                       {"columns": None, **older}, {"columns": {"short": 4096, "long": 16384}}):
            record = measure(lib)
            record.update(change)
            keep({k: v for k, v in record.items() if v is not None})
            assert settings() == measured_settings
        assert len(calls) == 14  # each time measured again (the record written and the new one)
        for forced, want in (("on", [(on, 0)] * 6), ("off", [(0, 0)] * 6)):
            monkeypatch.setenv("MIXCHAT_ROW_PREFETCH", forced)
            kernels.reapply_settings()
            assert settings() == want and len(calls) == 14
            assert prefetch.note(lib, kernels.get_num_threads()) is None
        monkeypatch.setenv("MIXCHAT_ROW_PREFETCH", "sometimes")  # ignored, like an unset one
        kernels.reapply_settings()
        assert settings() == measured_settings
    finally:
        monkeypatch.undo()
        kernels.reapply_settings()
    kinds = len(prefetch.ROWS)
    assert lib.mc_set_prefetch(len(prefetch.FORMATS), 0, 0) < 0 and lib.mc_get_prefetch(-1, 0) < 0
    assert lib.mc_set_prefetch(0, kinds, 0) < 0 and lib.mc_get_prefetch(0, -1) < 0
    assert lib.mc_set_one_row(len(prefetch.FORMATS), 0, 1) < 0 and lib.mc_get_one_row(-1, 0) < 0
    assert lib.mc_set_one_row(0, kinds, 1) < 0 and lib.mc_get_one_row(0, kinds) < 0


def test_a_measurement_records_how_busy_the_machine_was(monkeypatch):
    """Kept choices say when they were measured and at what load, so a busy moment shows in `bench`."""
    from mixchat.speed.kernels import measured

    monkeypatch.setattr(measured.os, "getloadavg", lambda: (2.5, 1.0, 0.5))
    found = measured.stamp()
    assert found["load_average"] == 2.5 and found["cpus"] == (measured.os.cpu_count() or 1)
    assert measured.when(found) == f"measured {found['measured']} at load 2.50 on {found['cpus']} CPUs"
    assert measured.when({"measured": "then"}) == "measured then"  # kept before the load was recorded

    def no_load() -> tuple[float, float, float]:
        raise OSError("no load average here")

    monkeypatch.setattr(measured.os, "getloadavg", no_load)
    assert "load_average" not in measured.stamp()


def test_choosing_a_row_read_setting_needs_a_margin_by_both_measures():
    """The build's own setting stays unless another beat it by more than the margin in both the median of
    the turns' ratios and the median rates; among several that do, the fastest."""
    from mixchat.speed.kernels import prefetch

    def choose(speedup: dict, rate: dict) -> str:
        return prefetch._choose({"speedup": {"build+on": 1.0, **speedup}, "gb_per_second": {"build+on": 10.0, **rate}})

    assert choose({"build+off": 1.2, "one+on": 1.1}, {"build+off": 12.0, "one+on": 11.0}) == "build+off"
    assert choose({"build+off": 1.2, "one+on": 1.3}, {"build+off": 12.0, "one+on": 13.0}) == "one+on"
    assert choose({"build+off": 1.02, "one+on": 1.01}, {"build+off": 10.2, "one+on": 10.1}) == "build+on"
    assert choose({"one+off": 1.2}, {"one+off": 10.2}) == "build+on"  # rates disagree: a busy machine
    assert choose({"one+off": 1.01}, {"one+off": 12.0}) == "build+on"
    # the fastest by rate fails the ratio test: the one that passes both is taken, not the build's own
    assert choose({"build+off": 1.2, "one+on": 1.02}, {"build+off": 12.0, "one+on": 12.5}) == "build+off"


@needs_kernels
def test_the_row_reads_change_no_result():
    """Prefetches only move data and rows per pass do not change any row's sums: every format's products are
    the same bits with or without them (99 rows: a pass of several rows leaves some over)."""
    from mixchat.speed.kernels import prefetch

    lib = kernels.library()
    g = gen(7)
    n = 99

    def one_length(k: int):  # -> its products, called
        x = torch.randn(3, k, generator=g)
        w = torch.randn(n, k, generator=g).to(torch.bfloat16)
        q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        scale = torch.rand(n, generator=g) + 0.5
        packed = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
        s4, z4 = (torch.rand(n, k // 128, generator=g).to(kernels.INT4_PARAMS),
                  torch.randn(n, k // 128, generator=g).to(kernels.INT4_PARAMS))
        s64, z64 = (torch.rand(n, k // 64, generator=g).to(kernels.INT4_PARAMS),
                    torch.randn(n, k // 64, generator=g).to(kernels.INT4_PARAMS))
        return lambda: [
            kernels.linear_bf16(x[:1], w), kernels.linear_bf16(x, w), kernels.linear_int8(x[:1], q, scale),
            kernels.linear_int4(x[:1], packed, s4, z4, 128), kernels.linear_int4(x, packed, s4, z4, 128),
            kernels.linear_int4(x[:1], packed, s64, z64, 64)]

    # short rows, and long ones (past mc_short_row_k) whose int8 x still fits one row per pass
    short, long = one_length(4096), one_length(lib.mc_short_row_k() + 1024)

    def products() -> list[torch.Tensor]:
        return short() + long()

    products()
    kinds = [(i, r) for i in range(len(prefetch.FORMATS)) for r in range(len(prefetch.ROWS))]
    try:
        got = []
        for one_row in ((0, 0), (1, 1), (1, 0), (0, 1)):  # (short rows, long rows)
            on = lib.mc_prefetch_default()
            for pf in ((on, 0), (0, 64), (64, 32)):  # (short rows, long rows): each kind its own distance
                for i, r in kinds:
                    lib.mc_set_prefetch(i, r, pf[r])
                    lib.mc_set_one_row(i, r, one_row[r])
                got.append(products())
    finally:
        kernels.reapply_settings()
    for other in got[1:]:
        assert all(torch.equal(a, b) for a, b in zip(got[0], other, strict=True))


@needs_kernels
def test_one_row_per_pass_only_where_the_rows_x_fits_beside_the_stream():
    """mc_set_one_row applies to rows whose x, as the kernel reads it, takes at most 16 KiB (bf16 x is bf16 with
    vdpbf16ps, else fp32; int8 and int4 read 8-bit x): a 7B's w2 (K = 14336) keeps the build's rows in bf16,
    where one row read 0.54 of the probe against 0.74 on Zen 4. Either way the sums are the same."""
    from mixchat.speed.kernels import prefetch

    lib = kernels.library()
    formats = range(len(prefetch.FORMATS))
    bf16_x = 2 if lib.mc_bf16dot() else 4
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 14336, generator=g)
    w = (torch.randn(40, 14336, generator=g) * 0.02).to(torch.bfloat16)
    short_k = lib.mc_short_row_k()
    assert 4096 <= short_k < 14336  # a 7B's two row lengths fall on either side
    try:
        got = []
        for on in ((1, 1), (0, 0), (1, 0), (0, 1)):  # (short rows, long rows)
            for i in formats:
                for r in (0, 1):
                    lib.mc_set_one_row(i, r, on[r])
            assert lib.mc_one_row_applies(0, 4096) == (on[0] and 4096 * bf16_x <= 16384)
            assert lib.mc_one_row_applies(0, 14336) == 0
            assert lib.mc_one_row_applies(1, short_k) == on[0] and lib.mc_one_row_applies(1, short_k + 1) == on[1]
            assert lib.mc_one_row_applies(1, 14336) == on[1] and lib.mc_one_row_applies(2, 16384) == on[1]
            assert lib.mc_one_row_applies(1, 16385) == 0 and lib.mc_one_row_applies(2, 1 << 20) == 0
            got.append((kernels.linear_bf16(x, w), kernels.linear_bf16(x[:, :4096], w[:, :4096].contiguous())))
        assert all(torch.equal(a, b) for other in got[1:] for a, b in zip(got[0], other, strict=True))
        assert lib.mc_one_row_applies(len(prefetch.FORMATS), 4096) < 0 and lib.mc_one_row_applies(0, 0) < 0
    finally:
        kernels.reapply_settings()


@needs_kernels
def test_measuring_the_row_reads_times_every_format_in_each_setting(monkeypatch):
    from mixchat.speed.kernels import prefetch

    lib = kernels.library()
    kernels.linear_bf16(torch.randn(1, 64), torch.randn(8, 64).to(torch.bfloat16))  # threads set
    formats = range(len(prefetch.FORMATS))
    kinds = [(i, r) for i in formats for r in range(len(prefetch.ROWS))]
    before = [(lib.mc_get_prefetch(i, r), lib.mc_get_one_row(i, r)) for i, r in kinds]
    monkeypatch.setattr(prefetch, "_BYTES", 8 * 2**20)
    found = prefetch.measure(lib, rounds=3)
    # one row per pass is timed where it applies: bf16's short rows (x in bf16 with vdpbf16ps, 8 KiB; fp32,
    # 16 KiB, without), int8's rows of both lengths (x 4 and 14 KiB), never bf16's long rows nor int4
    one_row = {("bf16", "short"), ("int8", "short"), ("int8", "long")}
    for fmt in prefetch.FORMATS:
        for rows in prefetch.ROWS:
            figures = found[fmt][rows]
            want = set(prefetch.CONFIGS) if (fmt, rows) in one_row else {"build+on", "build+off"}
            assert set(figures["gb_per_second"]) == want == set(figures["speedup"]), (fmt, rows)
            assert all(rate > 0 for rate in figures["gb_per_second"].values())
            assert figures["speedup"]["build+on"] == 1.0
            assert figures["choice"] == prefetch._choose(figures)
    assert found["columns"] == {"short": 4096, "long": 14336}
    assert found["measured"] and found["cpus"] >= 1  # and the load, where the OS has one
    assert [(lib.mc_get_prefetch(i, r), lib.mc_get_one_row(i, r)) for i, r in kinds] == before  # put back


@needs_kernels
def test_measuring_the_prompt_gemms_may_measure_the_row_prefetch_first(monkeypatch, tmp_path):
    """The prompt-GEMM measurement's first kernel call sets the row prefetch, which may need its own
    measurement then: the two wait on separate locks (one lock for both deadlocked the first bench)."""
    from mixchat.speed import linear
    from mixchat.speed.kernels import measured, prefetch

    real_gemm, real_prefetch = linear.measure_prompt_gemm, prefetch.measure
    monkeypatch.setattr(linear, "measure_prompt_gemm", lambda: real_gemm(rows=24, n=64, k=256, repeats=1))
    monkeypatch.setattr(prefetch, "_BYTES", 4 * 2**20)
    monkeypatch.setattr(prefetch, "measure", lambda lib: real_prefetch(lib, rounds=1))
    monkeypatch.setattr(measured, "choice_file", lambda lib, name: tmp_path / name)
    monkeypatch.setattr(measured, "_found", {})
    monkeypatch.setenv("MIXCHAT_NATIVE_BF16", "1")
    for name in ("MIXCHAT_PROMPT_GEMM", "MIXCHAT_ROW_PREFETCH"):
        monkeypatch.delenv(name, raising=False)
    kernels.reapply_settings()
    answer = []
    try:
        worker = threading.Thread(target=lambda: answer.append(linear.prompt_gemm()), daemon=True)
        worker.start()
        worker.join(timeout=120)
        assert not worker.is_alive(), "prompt_gemm() hung measuring the row prefetch inside its own measurement"
    finally:
        monkeypatch.undo()
        kernels.reapply_settings()
    assert answer[0] in ("kernels", "torch")
    assert (tmp_path / "prompt-gemm.json").exists() and (tmp_path / prefetch.FILE).exists()


@needs_kernels
def test_a_failed_prefetch_measurement_keeps_the_builds_distances(monkeypatch):
    """A measurement that cannot run (no memory for its weights) costs the choice, never the product."""
    from mixchat.speed.kernels import measured, prefetch

    def fail(lib: object) -> dict:
        raise MemoryError("no room for the measurement's weights")

    lib = kernels.library()
    monkeypatch.setattr(prefetch, "measure", fail)
    monkeypatch.setattr(measured, "choice_file", lambda lib_, name: None)
    monkeypatch.setattr(measured, "_found", {})
    monkeypatch.delenv("MIXCHAT_ROW_PREFETCH", raising=False)
    kernels.reapply_settings()
    try:
        x, w = torch.randn(1, 64), torch.randn(8, 64).to(torch.bfloat16)
        assert torch.equal(kernels.linear_bf16(x, w), kernels.linear_bf16(x, w))
        if lib.mc_simd():
            kinds = [(i, r) for i in range(3) for r in range(2)]
            assert [lib.mc_get_prefetch(i, r) for i, r in kinds] == [lib.mc_prefetch_default()] * 6
            assert [lib.mc_get_one_row(i, r) for i, r in kinds] == [0] * 6
    finally:
        monkeypatch.undo()
        kernels.reapply_settings()
