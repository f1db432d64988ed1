"""The builds of the kernels agree: native (AVX-512 row kernels where the CPU has them: vpdpbusd with VNNI,
vpmaddubsw without), native with VNNI turned off, and avx2 (the AVX2 code as an AVX2-only CPU runs it) give
the same products. The integer dot products of the Q8 paths are exact in every build; what may differ is
the order of the fp32 additions, so each build is held to the fp64 reference within one fp32 sum's bound
(tolerance.product_bound) and the builds to each other within two. Data with the edge values: int8 weights
-128 and 127, x blocks whose rounding reaches +-127, nibbles 0 and 15, and K / N sizes that leave partial
vectors (K % 64 == 32 for int8, K % 128 == 64 for int4, N not a multiple of the row blocks).
"""

from __future__ import annotations

import ctypes
import subprocess

import pytest
import torch
from tolerance import FP64, Q8_ROUNDINGS, WEIGHT_ROUNDINGS, assert_within, gamma, int4_parts, magnitude, product_bound

from mixchat.speed import kernels
from mixchat.speed.kernels import loader

pytestmark = pytest.mark.skipif(not kernels.available(), reason="needs the compiled kernels")


def _level(lib: ctypes.CDLL) -> int:
    return lib.mc_simd_level()  # 0 portable, 1 AVX2, 2 AVX-512, 3 AVX-512 + VNNI


def _compiler_targets(macro: str) -> bool:
    """Whether the C compiler defines `macro` under -march=native (what the native build sees)."""
    cc = kernels._compiler()
    out = subprocess.run([cc, "-march=native", "-dM", "-E", "-"], input="", capture_output=True, text=True,
                         timeout=60).stdout if cc else ""
    return f"#define {macro} " in out


def _cpu_has(*flags: str) -> bool:
    have = (loader._cpu_flags() or "").split()
    return all(f in have for f in flags)


@pytest.fixture(scope="module")
def libs() -> dict[str, ctypes.CDLL]:
    out = {"native": kernels.library()}
    try:
        with kernels.forced_isa("avx2"):
            out["avx2"] = kernels.library()
    except kernels.KernelError as e:
        pytest.skip(f"no avx2 build here: {e}")
    if _level(out["native"]) == 3:  # the AVX-512 kernels without vpdpbusd: vpmaddubsw + vpmaddwd
        out["native-novnni"] = loader.load(kernels.build(flags=(*kernels.isa_flags("native"), "-mno-avx512vnni")))
    if out["native"].mc_bf16dot():  # the AVX-512 build of a CPU without AVX512-BF16: the fp32 GEMM tile only
        out["native-nobf16"] = loader.load(kernels.build(flags=(*kernels.isa_flags("native"), "-mno-avx512bf16")))
    return out


def test_the_builds_run_the_code_they_say(libs):
    assert _level(libs["avx2"]) == 1
    if _cpu_has("avx512f", "avx512bw", "avx512vl"):
        assert _level(libs["native"]) == (3 if _cpu_has("avx512_vnni") else 2)
    if "native-novnni" in libs:
        assert _level(libs["native-novnni"]) == 2
    # vdpbf16ps where the compiler targets AVX512-BF16 (a CPU with it, and a gcc new enough to know it), never
    # in the avx2 build
    assert libs["native"].mc_bf16dot() == (_level(libs["native"]) >= 2 and _compiler_targets("__AVX512BF16__"))
    if libs["native"].mc_bf16dot():
        assert _cpu_has("avx512_bf16")
    assert not libs["avx2"].mc_bf16dot()
    if "native-nobf16" in libs:
        assert not libs["native-nobf16"].mc_bf16dot() and _level(libs["native-nobf16"]) == _level(libs["native"])


def _run(lib: ctypes.CDLL, name: str, x: torch.Tensor, n: int, *args) -> torch.Tensor:
    y = torch.empty(x.shape[0], n)
    ptrs = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args]
    loader._call(lib, name, x.data_ptr(), x.shape[0], x.shape[1], *ptrs, n, y.data_ptr())
    return y


def _agree(results: dict[str, torch.Tensor], want: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    for name, got in results.items():
        assert_within(got, want, bound, f"{name} {what}")
    base = results["avx2"]
    for name, got in results.items():
        assert_within(got, base, 2 * bound, f"{name} against avx2, {what}")


def bound_of(x: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:
    mag = magnitude(x, w.float())
    return product_bound(mag, k) + gamma(k, FP64) * mag


def _x(t: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g)
    x[:, ::37] *= 25  # outliers: each block's largest |x| rounds to +-127
    x[:, 5::64] = -x[:, 5::64].abs() * 40
    return x


@pytest.mark.parametrize("n,k", [(7, 32), (33, 96), (130, 4096 + 32), (19, 1024)])
@pytest.mark.parametrize("t", [1, 2, 3, 5, 8, 9])
@pytest.mark.parametrize("threads", [1, 2])
def test_int8_q8_is_the_same_in_every_build(libs, n, k, t, threads, monkeypatch):
    monkeypatch.setattr(loader, "_threads", threads)
    g = torch.Generator().manual_seed(n * k + t)
    x = _x(t, k, n + t)
    q = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    q[0, ::3] = -128
    q[-1, 1::3] = 127
    scale = torch.rand(n, generator=g) * 0.01 + 1e-4
    results = {name: _run(lib, "mc_linear_int8_q8", x, n, q, scale) for name, lib in libs.items()}
    xr, w = kernels.quantize_x_q8(x), q.float() * scale[:, None]
    want = xr.double() @ w.double().T
    mag = magnitude(xr, w)
    bound = product_bound(mag, k, WEIGHT_ROUNDINGS["int8"] + Q8_ROUNDINGS) + gamma(k, FP64) * mag
    _agree(results, want, bound, f"int8 q8 T={t} N={n} K={k}")


@pytest.mark.parametrize("n,k,group", [(7, 64, 32), (9, 64, 64), (33, 192, 32), (33, 192, 64), (70, 1024, 128),
                                       (21, 4096 + 64, 64), (5, 384, 128)])
@pytest.mark.parametrize("t", [1, 2, 3, 5, 8, 9])
@pytest.mark.parametrize("threads", [1, 2])
def test_int4_q8_is_the_same_in_every_build(libs, n, k, group, t, threads, monkeypatch):
    monkeypatch.setattr(loader, "_threads", threads)
    g = torch.Generator().manual_seed(n * k + t + group)
    q = torch.randint(0, 16, (n, k), generator=g)
    q[0, ::2] = 0
    q[0, 1::2] = 15
    q[-1, ::3] = 15
    packed = kernels.pack_int4(q)
    scale = (torch.rand(n, k // group, generator=g) * 0.05 + 0.001).to(kernels.INT4_PARAMS)
    zero = (torch.randn(n, k // group, generator=g) * 0.05).to(kernels.INT4_PARAMS)
    x = _x(t, k, n + t)
    results = {name: _run(lib, "mc_linear_int4_q8", x, n, packed, scale, zero, group) for name, lib in libs.items()}
    xr = kernels.quantize_x_q8(x, kernels.q8_block(group))
    w = kernels.dequantize_int4(packed, scale, zero, group)
    want = xr.double() @ w.double().T
    mag = magnitude(xr, int4_parts(packed, scale, zero, group))
    bound = product_bound(mag, k, WEIGHT_ROUNDINGS["int4"] + Q8_ROUNDINGS) + gamma(k, FP64) * mag
    _agree(results, want, bound, f"int4 q8 g{group} T={t} N={n} K={k}")


@pytest.mark.parametrize("n,k", [(7, 33), (33, 96), (130, 4096 + 17), (19, 1024 + 48)])
@pytest.mark.parametrize("t", [1, 2, 3, 5, 8])
def test_bf16_is_the_same_in_every_build(libs, n, k, t):
    g = torch.Generator().manual_seed(n * k + t)
    x = torch.randn(t, k, generator=g)
    w = (torch.randn(n, k, generator=g) * 0.05).to(torch.bfloat16)
    results = {name: _run(lib, "mc_linear_bf16", x, n, w) for name, lib in libs.items()}
    # A build with vdpbf16ps multiplies x rounded to bf16 (bf16_rows_x): each build is held to the product of
    # the x it multiplies; the builds that multiply x as it is, to each other too.
    same_x = {}
    for name, lib in libs.items():
        xr = kernels.bf16_x(x, lib)
        mag = magnitude(xr, w.float())
        bound = product_bound(mag, k) + gamma(k, FP64) * mag
        assert_within(results[name], xr.double() @ w.double().T, bound, f"{name} bf16 T={t} N={n} K={k}")
        if not lib.mc_bf16dot():
            same_x[name] = results[name]
    _agree(same_x, x.double() @ w.double().T, bound_of(x, w, k), f"bf16 T={t} N={n} K={k}")


@pytest.mark.parametrize("n,k", [(7, 40), (33, 256 + 16), (70, 520), (130, 1024)])
@pytest.mark.parametrize("t", [12, 13, 40])
@pytest.mark.parametrize("threads", [1, 2])
def test_the_gemm_is_the_same_in_every_build_bit_for_bit(libs, n, k, t, threads):
    """Prompts (from the GEMM's row count on): the AVX-512 tile (6 rows x 32 outputs) sums each output over
    k in the AVX2 tile's order, so the builds agree exactly, also on the outputs past the last pair of
    16-output blocks and across the threads' shares. (The vdpbf16ps tile, which rounds x, is switched off
    here: test_kernels holds it to its own bound.)"""
    g = torch.Generator().manual_seed(n * k + t)
    x = torch.randn(t, k, generator=g)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    q = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, generator=g) + 0.1
    s = torch.randn(k, n, generator=g).to(torch.bfloat16)  # transposed bf16 [K, N]
    got = {}
    for name, lib in libs.items():
        lib.mc_set_threads(threads)
        lib.mc_set_gemm_bf16dot(0)
        assert t >= lib.mc_get_gemm_min_rows()
        got[name] = (_run(lib, "mc_linear_bf16", x, n, w), _run(lib, "mc_linear_int8", x, n, q, scale),
                     _run(lib, "mc_linear_bf16_t", x, n, s))
        lib.mc_set_gemm_bf16dot(1)
        lib.mc_set_threads(kernels.get_num_threads())
    ref = x.double() @ w.double().t()
    mag = magnitude(x, w.float())
    assert_within(got["native"][0].double(), ref, product_bound(mag, k) + gamma(k, FP64) * mag, "bf16 GEMM")
    for name in got:
        for a, b in zip(got[name], got["avx2"], strict=True):
            assert torch.equal(a, b), name
