"""The self-check a freshly loaded library must pass before it counts as available: each kernel against
a torch reference, within a rounding bound that holds on any CPU and build."""

from __future__ import annotations

import ctypes

import torch

from mixchat.speed.kernels.formats import (
    INT4_GROUPS,
    INT4_PARAMS,
    dequantize_int4,
    pack_int4,
    q8_block,
    quantize_x_q8,
    unpack_int4,
)
from mixchat.speed.kernels.linear import _ptr, bf16_x, linear_many_lib
from mixchat.speed.kernels.loader import KernelError


def _gamma(n: int) -> float:
    u = 2.0**-24
    return n * u / (1 - n * u)


def _close(name: str, got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, w_abs: torch.Tensor | None = None) -> None:
    """got = x @ w.T as fp32 sums in any order. Each of two fp32 sums of the same K products, with up to 4
    more roundings per term (scales, zero points, the reference's dequantisation), lies within
    gamma_(K+4) * sum |terms| of the exact sum (Higham, 3.1) whatever the order, so the bound holds on any
    CPU and build. w_abs: the terms' weight magnitudes where the kernels sum w's parts separately (int4:
    |scale (q - 8)| + |zero|)."""
    mag = x.double().abs() @ (w.abs() if w_abs is None else w_abs).double().T
    err = (got.double() - (x @ w.T).double()).abs()
    tol = 2 * _gamma(x.shape[-1] + 4) * mag
    if not (err <= tol).all():
        i = int((err - tol).flatten().argmax())
        raise KernelError(f"self-check failed: {name} error {err.flatten()[i]:.3g} > {tol.flatten()[i]:.3g}")


def _int4_abs(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    """|w| for _close's bound on an int4 weight: its parts are summed separately and may cancel, as
    scale * q and zero - 8 scale (AVX2) or scale * (q - 8) and zero (scalar); the larger split per term."""
    q = unpack_int4(packed).float()
    n, k = q.shape
    q = q.view(n, k // group, group)
    s, z = scale.float()[..., None], zero.float()[..., None]
    return torch.maximum(s.abs() * q + (z - 8 * s).abs(), (s * (q - 8)).abs() + z.abs()).view(n, k)


def self_check(lib: ctypes.CDLL) -> None:
    gen = torch.Generator().manual_seed(0)
    saved = lib.mc_get_threads()
    try:
        # 2 threads even on one core, so the parallel split is exercised; the big case crosses the
        # single-thread cut-off in the C runner.
        lib.mc_set_threads(2)
        for t, n, k in ((1, 24, 200), (3, 72, 1024), (5, 40, 64)):
            x = torch.randn(t, k, generator=gen)
            w = torch.randn(n, k, generator=gen).to(torch.bfloat16)
            y = torch.empty(t, n)
            if lib.mc_linear_bf16(_ptr(x), t, k, _ptr(w), n, _ptr(y)) != 0:
                raise KernelError("self-check failed: mc_linear_bf16 refused valid arguments")
            _close(f"bf16 T={t} N={n} K={k}", y, bf16_x(x, lib), w.float())

            q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
            s = torch.rand(n, generator=gen) + 0.1
            if lib.mc_linear_int8(_ptr(x), t, k, _ptr(q), _ptr(s), n, _ptr(y)) != 0:
                raise KernelError("self-check failed: mc_linear_int8 refused valid arguments")
            _close(f"int8 T={t} N={n} K={k}", y, x, q.float() * s[:, None])
            if k % 32 == 0:
                if lib.mc_linear_int8_q8(_ptr(x), t, k, _ptr(q), _ptr(s), n, _ptr(y)) != 0:
                    raise KernelError("self-check failed: mc_linear_int8_q8 refused valid arguments")
                _close(f"int8 Q8 T={t} N={n} K={k}", y, quantize_x_q8(x), q.float() * s[:, None])

            if k % 64 == 0:
                for g in INT4_GROUPS:
                    if k % g:
                        continue
                    packed = pack_int4(torch.randint(0, 16, (n, k), generator=gen))
                    sc = (torch.rand(n, k // g, generator=gen) + 0.1).to(INT4_PARAMS)
                    zp = torch.randn(n, k // g, generator=gen).to(INT4_PARAMS)
                    w4, w4_abs = dequantize_int4(packed, sc, zp, g), _int4_abs(packed, sc, zp, g)
                    for fn, xr in (("mc_linear_int4", x), ("mc_linear_int4_q8", quantize_x_q8(x, q8_block(g)))):
                        if getattr(lib, fn)(_ptr(x), t, k, _ptr(packed), _ptr(sc), _ptr(zp), g, n, _ptr(y)) != 0:
                            raise KernelError(f"self-check failed: {fn} refused valid arguments")
                        _close(f"{fn} T={t} N={n} K={k} G={g}", y, xr, w4, w4_abs)
        # Several weights in one call (one per format), against the single-weight kernels.
        x = torch.randn(2, 128, generator=gen)
        ws = [torch.randn(n, 128, generator=gen).to(torch.bfloat16) for n in (24, 40)]
        for got, w in zip(linear_many_lib(lib, x, "bf16", [(w,) for w in ws]), ws, strict=True):
            _close("multi bf16", got, bf16_x(x, lib), w.float())
        qs = [(torch.randint(-127, 128, (n, 128), generator=gen, dtype=torch.int8), torch.rand(n, generator=gen) + 0.1)
              for n in (24, 40)]
        for got, (q, s) in zip(linear_many_lib(lib, x, "int8", qs), qs, strict=True):
            _close("multi int8", got, quantize_x_q8(x), q.float() * s[:, None])
        p4 = [(pack_int4(torch.randint(0, 16, (n, 128), generator=gen)),
               (torch.rand(n, 4, generator=gen) + 0.1).to(INT4_PARAMS),
               torch.randn(n, 4, generator=gen).to(INT4_PARAMS)) for n in (24, 40)]
        for got, (pk, sc, zp) in zip(linear_many_lib(lib, x, "int4", p4, 32), p4, strict=True):
            _close("multi int4", got, quantize_x_q8(x), dequantize_int4(pk, sc, zp, 32), _int4_abs(pk, sc, zp, 32))
        # The GEMM path (many rows of x): partial tiles in T and N, K not a multiple of its block.
        t, n, k = 2 * lib.mc_get_gemm_min_rows() + 1, 40, 320
        x = torch.randn(t, k, generator=gen)
        y = torch.empty(t, n)
        w = torch.randn(n, k, generator=gen).to(torch.bfloat16)
        q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
        s = torch.rand(n, generator=gen) + 0.1
        # Both tiles where the build has the vdpbf16ps one, which multiplies x rounded to bf16.
        for dot in (0, 1) if lib.mc_bf16dot() else (0,):
            lib.mc_set_gemm_bf16dot(dot)
            xr = x.to(torch.bfloat16).float() if dot else x
            lib.mc_linear_bf16(_ptr(x), t, k, _ptr(w), n, _ptr(y))
            _close(f"bf16 GEMM T={t} N={n} K={k}{' vdpbf16ps' * dot}", y, xr, w.float())
            lib.mc_linear_int8_q8(_ptr(x), t, k, _ptr(q), _ptr(s), n, _ptr(y))
            _close(f"int8 GEMM T={t} N={n} K={k}{' vdpbf16ps' * dot}", y, xr, q.float() * s[:, None])
            lib.mc_linear_int8(_ptr(x), t, k, _ptr(q), _ptr(s), n, _ptr(y))  # exact x: the fp32 tile
            _close(f"int8 GEMM T={t} N={n} K={k} exact", y, x, q.float() * s[:, None])
        wt = torch.randn(k, n, generator=gen).to(torch.bfloat16)
        for rows in (1, t):
            lib.mc_linear_bf16_t(_ptr(x), rows, k, _ptr(wt), n, _ptr(y))
            _close(f"bf16 transposed T={rows} N={n} K={k}", y[:rows], x[:rows], wt.float().T)
        packed = pack_int4(torch.randint(0, 16, (n, k), generator=gen))
        sc = (torch.rand(n, k // 64, generator=gen) + 0.1).to(INT4_PARAMS)
        zp = torch.randn(n, k // 64, generator=gen).to(INT4_PARAMS)
        w4, w4_abs = dequantize_int4(packed, sc, zp, 64), _int4_abs(packed, sc, zp, 64)
        lib.mc_linear_int4(_ptr(x), t, k, _ptr(packed), _ptr(sc), _ptr(zp), 64, n, _ptr(y))
        _close(f"int4 GEMM T={t} N={n} K={k}", y, x, w4, w4_abs)
        lib.mc_linear_int4_q8(_ptr(x), t, k, _ptr(packed), _ptr(sc), _ptr(zp), 64, n, _ptr(y))  # 8-row slices
        _close(f"int4 Q8 T={t} N={n} K={k}", y, quantize_x_q8(x), w4, w4_abs)
    finally:
        lib.mc_set_threads(saved)
