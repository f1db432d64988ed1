"""Linear layers' products on the compiled kernels, with their argument checks.

    linear_bf16(x, w)                          w bfloat16 [N, K], or the transpose of a contiguous [K, N]
    linear_int8(x, q, scale)                   q int8 [N, K], scale fp32 [N]
    linear_int4(x, packed, scale, zero, group) packed uint8 [N, K/2] (formats.pack_int4), scale/zero fp16 [N, K/G]
    linear_many(x, kind, weights, group)       several weights of one format in one call

Decoding reads every weight once per token, so a token costs (weight bytes) / (memory bandwidth). On AVX2
machines torch's CPU kernels for these formats stream at a third to two thirds of what fp32 GEMV (MKL)
reaches; the matrix-vector kernels come within 65-85% of it on one core, at 1.5-3x torch
(benchmarks/gemv.py), and read each weight once for up to 8 rows of x, so T = 4 costs little more than
T = 1. From get_gemm_min_rows() rows of x on (prompts), a register-tiled GEMM takes over: it converts
16 x 256 tiles of the weight to fp32 in L1 and runs at the FMA units' pace, so prompts need no fp32 copy
of any weight, whatever its format. On CPUs with AVX512-BF16 the bf16 kernels (one row and the GEMM) and
the int8 GEMM take x rounded to bf16 instead, with vdpbf16ps (bf16_x says which x a build multiplies).

x is [..., K] in any float dtype (computed in fp32); the result is fp32 [..., N]. Below the GEMM's row
count linear_int8 and linear_int4 round x to int8 per 32 columns unless exact=True (see linear_int4's
docstring for why and what it costs). Without the library the same results come from torch.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from mixchat.speed.kernels import loader
from mixchat.speed.kernels.formats import (
    INT4_GROUPS,
    INT4_PARAMS,
    PARAM_DTYPES,
    WEIGHT_DTYPES,
    dequantize_int4,
    q8_block,
    quantize_x_q8,
)
from mixchat.speed.kernels.loader import KernelError, _call, _get, get_gemm_min_rows


def _rounds_x(exact: bool, rows: int, k: int, kind: str = "int8") -> bool:
    """Whether linear_int8/int4 round x to int8 per 32 columns. int8: only where the matrix-vector kernels
    run (from the GEMM's row count on the fp32 GEMM is faster). int4: always (unless exact), since its
    integer kernel, taking 8 rows of x per pass, also beats the GEMM on prompts (126-141 against 113-116
    GFLOP/s on a 7B's shapes, 128 rows, 2 AVX2 cores)."""
    return not exact and k % 32 == 0 and (kind == "int4" or rows < get_gemm_min_rows())


def _check_weight(w: torch.Tensor, name: str, dtype: torch.dtype, dim: int = 2) -> None:
    # One compound test on the fast path: these wrappers run hundreds of times per decoded token.
    if w.dtype == dtype and w.dim() == dim and w.is_cpu and w.is_contiguous():
        return
    if w.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, not {w.dtype}")
    if w.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimensions, not shape {tuple(w.shape)}")
    if not w.is_cpu:
        raise ValueError(f"{name} must be on the CPU, not {w.device}")
    raise ValueError(f"{name} must be contiguous")


def _check_int4_k(k: int, group: int) -> None:
    if group not in INT4_GROUPS or k % group or k % 64:
        raise ValueError(f"int4 needs group in {INT4_GROUPS} dividing K and K % 64 == 0 (K={k}, group={group})")


def _rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """x [..., K] -> contiguous fp32 [T, K] (no copy when it already is one)."""
    if x.dtype == torch.float32 and x.dim() == 2 and x.shape[1] == k and x.is_cpu and x.is_contiguous():
        return x
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the weight {k}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, not {x.dtype}")
    if not x.is_cpu:
        raise ValueError(f"x must be on the CPU, not {x.device}")
    return x.reshape(-1, k).to(torch.float32).contiguous()


def _shaped(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()



def linear_bf16(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """y = x @ w.T in fp32. x [..., K] any float dtype, w bfloat16 [N, K], either contiguous or the transpose
    of a contiguous [K, N] tensor (the torrent layout's expert w2) -> float32 [..., N]."""
    transposed = w.dim() == 2 and not w.is_contiguous() and w.t().is_contiguous()
    _check_weight(w.t() if transposed else w, "w", torch.bfloat16)
    n, k = w.shape
    x2 = _rows(x, k)
    lib = _get()
    if lib is None or x2.shape[0] == 0:
        return _shaped(F.linear(x2, w.float()), x)
    y = torch.empty(x2.shape[0], n, dtype=torch.float32)
    _call(lib, "mc_linear_bf16_t" if transposed else "mc_linear_bf16", _ptr(x2), x2.shape[0], k, _ptr(w), n,
          _ptr(y))
    return _shaped(y, x)


def bf16_x(x: torch.Tensor, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """x as linear_bf16 multiplies it by a weight stored [N, K] (a transposed one keeps x as it is) in the
    loaded build (or `lib`): as it is, except in a build with
    vdpbf16ps (bf16dot), which rounds it to bf16 (to nearest even): in the row kernels over the whole
    32-column blocks (the last K % 32 columns as they are); in the GEMM (from its row count on, K % 8 == 0)
    all of x where K % 32 == 0 and the vdpbf16ps GEMM is on, else none (the fp32 tile). For tests and the
    self-check."""
    lib = lib if lib is not None else _get()
    if lib is None or not lib.mc_bf16dot():
        return x
    k = x.shape[-1]
    rows = x.numel() // max(k, 1)
    if rows >= lib.mc_get_gemm_min_rows() and k % 8 == 0:  # the GEMM's (mc_linear_bf16)
        return x.to(torch.bfloat16).to(x.dtype) if k % 32 == 0 and lib.mc_get_gemm_bf16dot() else x
    k32 = k // 32 * 32
    return torch.cat([x[..., :k32].to(torch.bfloat16).to(x.dtype), x[..., k32:]], dim=-1)


def linear_int8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, exact: bool = False) -> torch.Tensor:
    """y = (x @ q.T) * scale in fp32. q int8 [N, K], scale float32 [N].
    Like linear_int4, and like llama.cpp's Q8_0, x is rounded to int8 per 32 columns for products of
    fewer rows than the GEMM takes (K % 32 == 0): with fp32 x a core converts only about 4 weights per
    cycle, under the memory read rate, while integer multiply-adds keep up with it. From the GEMM's rows
    on, a build with vdpbf16ps rounds x to bf16 (K % 32 == 0; see bf16_x). exact=True keeps x in fp32."""
    _check_weight(q, "q", torch.int8)
    n, k = q.shape
    _check_weight(scale, "scale", torch.float32, dim=1)
    if scale.shape[0] != n:
        raise ValueError(f"scale has {scale.shape[0]} rows, q {n}")
    x2 = _rows(x, k)
    lib = _get()
    if lib is None or x2.shape[0] == 0:
        xr = quantize_x_q8(x2) if _rounds_x(exact, x2.shape[0], k) else x2
        return _shaped(F.linear(xr, q.float()) * scale, x)
    y = torch.empty(x2.shape[0], n, dtype=torch.float32)
    _call(lib, "mc_linear_int8" if exact else "mc_linear_int8_q8", _ptr(x2), x2.shape[0], k, _ptr(q), _ptr(scale),
          n, _ptr(y))
    return _shaped(y, x)



def linear_int4(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int,
                exact: bool = False) -> torch.Tensor:
    """y = x @ w.T with w = (q - 8) * scale + zero per group of `group` along K, in fp32.

    packed uint8 [N, K/2] (see pack_int4), scale and zero float16 [N, K/G]; K % 64 == 0, group in 32/64/128.

    By default x is rounded to int8 in blocks of 32 (one fp32 scale per block, llama.cpp's Q8_0; for
    groups of 128 one scale per group, see q8_block) so the dot products run as integer multiply-adds:
    unpacking nibbles to fp32 costs more ALU time than half a byte per weight of memory traffic leaves,
    so the exact path is compute-bound (most of all at T > 1).
    The rounding moves each x by at most 1/254 of its block's largest |x|; measured on y, about 0.5%
    relative error (1.3% with 50x outlier channels), about 3x what rounding x to bf16 costs (torch's int4
    kernel does that) and a tenth of the 8-10% error of rounding the weights to 4 bits in the first place.
    exact=True keeps x in fp32 (same result as dequantising w, to fp32 rounding).
    """
    _check_weight(packed, "packed", torch.uint8)
    n, half = packed.shape
    k = 2 * half
    _check_int4_k(k, group)
    for name, t in (("scale", scale), ("zero", zero)):
        _check_weight(t, name, INT4_PARAMS)
        if t.shape != (n, k // group):
            raise ValueError(f"{name} must be [{n}, {k // group}], not {tuple(t.shape)}")
    x2 = _rows(x, k)
    lib = _get()
    if lib is None or x2.shape[0] == 0:
        xr = quantize_x_q8(x2, q8_block(group)) if _rounds_x(exact, x2.shape[0], k, "int4") else x2
        return _shaped(F.linear(xr, dequantize_int4(packed, scale, zero, group)), x)
    y = torch.empty(x2.shape[0], n, dtype=torch.float32)
    _call(lib, "mc_linear_int4" if exact else "mc_linear_int4_q8", _ptr(x2), x2.shape[0], k, _ptr(packed),
          _ptr(scale), _ptr(zero), group, n, _ptr(y))
    return _shaped(y, x)


_MULTI_KINDS = {"bf16": 0, "int8": 1, "int4": 2}
MULTI_MAX = 8  # MC_MULTI_MAX in the C source


def linear_many(x: torch.Tensor, kind: str, weights: list[tuple[torch.Tensor, ...]],
                group: int = 0, exact_rows: bool = False) -> list[torch.Tensor]:
    """[linear_bf16 / linear_int8 / linear_int4 of x with each weight], in one kernel call.

    weights holds (w,) for bf16 (contiguous), (q, scale) for int8, (packed, scale, zero) for int4 (all
    with the same group). Same results as the single calls (int8/int4 round x the same way), but x is
    prepared once and the threads run through all the weights in one parallel region instead of meeting
    after each: for one decoded token that is the q/k/v and the w1/w3 products of every layer.
    exact_rows: each row of every result is bit for bit the single call's for that row of x alone (what a
    decoded token gets), at any row count: drafting's verify pass."""
    if kind not in _MULTI_KINDS:
        raise ValueError(f"kind must be one of {sorted(_MULTI_KINDS)}, not {kind!r}")
    if not 1 <= len(weights) <= MULTI_MAX:
        raise ValueError(f"between 1 and {MULTI_MAX} weights, not {len(weights)}")
    for parts in weights:
        _check_weight(parts[0], "w", WEIGHT_DTYPES[kind])
    k = weights[0][0].shape[1] * (2 if kind == "int4" else 1)
    if any(p[0].shape[1] * (2 if kind == "int4" else 1) != k for p in weights):
        raise ValueError("the weights of linear_many must share K")
    if kind == "int4":
        _check_int4_k(k, group)
    for parts in weights:
        for name, t in zip(("scale", "zero"), parts[1:], strict=False):
            _check_weight(t, name, PARAM_DTYPES[kind], dim=1 if kind == "int8" else 2)
            if t.shape[0] != parts[0].shape[0]:
                raise ValueError(f"{name} has {t.shape[0]} rows, the weight {parts[0].shape[0]}")
    return linear_many_lib(_get(), x, kind, weights, group, k, exact_rows)


def linear_many_lib(lib: ctypes.CDLL | None, x: torch.Tensor, kind: str, weights: list[tuple[torch.Tensor, ...]],
                    group: int = 0, k: int | None = None, exact_rows: bool = False) -> list[torch.Tensor]:
    """linear_many's call into a given library (the self-check's, before the module has one); no checks."""
    k = k or weights[0][0].shape[1] * (2 if kind == "int4" else 1)
    x2 = _rows(x, k)
    if lib is None or x2.shape[0] == 0:
        single = {"bf16": lambda p, r: linear_bf16(r, *p), "int8": lambda p, r: linear_int8(r, *p),
                  "int4": lambda p, r: linear_int4(r, *p, group)}[kind]
        if exact_rows and x2.shape[0] > 1:
            return [_shaped(torch.cat([single(p, x2[i:i + 1]) for i in range(x2.shape[0])]), x) for p in weights]
        return [_shaped(single(p, x2), x) for p in weights]
    n, ns = len(weights), [p[0].shape[0] for p in weights]
    ys = [torch.empty(x2.shape[0], m, dtype=torch.float32) for m in ns]
    arr = ctypes.c_void_p * n
    scales = arr(*(p[1].data_ptr() for p in weights)) if kind != "bf16" else None
    zeros = arr(*(p[2].data_ptr() for p in weights)) if kind == "int4" else None
    args = (_MULTI_KINDS[kind], _ptr(x2), x2.shape[0], k, n, arr(*(p[0].data_ptr() for p in weights)), scales, zeros,
            group, (ctypes.c_int64 * n)(*ns), arr(*(y.data_ptr() for y in ys)))
    if lib is loader._lib:
        _call(lib, "mc_linear_rows" if exact_rows else "mc_linear_multi", *args)
    elif (rc := lib.mc_linear_multi(*args)) != 0:  # the self-check's library keeps its own thread count
        raise KernelError(f"mc_linear_multi failed with code {rc}")
    return [_shaped(y, x) for y in ys]
