"""Prompt-sized products (prefill): torch's CPU GEMMs against mixchat.speed.kernels' GEMM.

    python benchmarks/gemm.py [--threads 2] [--rows 16 128] [--group 128] [--rounds 3]

For [T, K] x [N, K]^T at a 7B model's MLP shapes, prints GFLOP/s (2 T N K per call) of:
- torch fp32 F.linear on an fp32 weight (MKL sgemm: what a 2x larger fp32 copy of the model would get);
- torch bf16 F.linear (oneDNN; without AVX512-BF16 it converts as it goes);
- bf16 upcast + fp32 F.linear (mixchat's path without its kernels: copy the weight to a reused fp32
  buffer, then MKL);
- mixchat's GEMM on bf16, int8 and int4 weights (converted to fp32 in 16 x 256 tiles as it goes; int4
  through its 8-bit-activation kernel);
- on AVX512-BF16 CPUs, mixchat's vdpbf16ps GEMM on bf16 and int8 weights (x rounded to bf16).
Prefill tokens/s ~= GFLOP/s / (2 x parameters per token). Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from mixchat.speed import kernels


def timed(fn: Callable[[], object], min_s: float) -> float:
    """Seconds per call, over whole calls for at least min_s."""
    fn()
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < min_s or calls == 0:
        fn()
        calls += 1
    return elapsed / calls


def methods(n: int, k: int, group: int) -> list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]]:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen) * 0.02
    wb = w.to(torch.bfloat16)
    buf = torch.empty(n, k)
    out: list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = [
        ("torch fp32 weight (MKL)", lambda x: F.linear(x, w)),
        ("torch bf16 F.linear", lambda x: F.linear(x.to(torch.bfloat16), wb)),
        ("bf16 upcast + fp32 (no kernels)", lambda x: F.linear(x, buf.copy_(wb))),
    ]
    if kernels.available():
        q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
        s = torch.rand(n, generator=gen) * 1e-3
        p = torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8)
        sc = (torch.rand(n, k // group, generator=gen) * 1e-3).to(kernels.INT4_PARAMS)
        zp = (torch.randn(n, k // group, generator=gen) * 1e-3).to(kernels.INT4_PARAMS)
        out += [("mixchat GEMM bf16", lambda x: tile(False, kernels.linear_bf16, x, wb)),
                ("mixchat GEMM int8", lambda x: tile(False, kernels.linear_int8, x, q, s)),
                (f"mixchat GEMM int4 g{group}", lambda x: kernels.linear_int4(x, p, sc, zp, group))]
        if kernels.bf16dot():
            out += [("mixchat vdpbf16ps GEMM bf16", lambda x: tile(True, kernels.linear_bf16, x, wb)),
                    ("mixchat vdpbf16ps GEMM int8", lambda x: tile(True, kernels.linear_int8, x, q, s))]
    return out


def tile(bf16dot: bool, fn: Callable[..., torch.Tensor], *args: torch.Tensor) -> torch.Tensor:
    """fn(*args) through the kernels' vdpbf16ps GEMM or their fp32 one (the default is put back after)."""
    kernels.set_gemm_bf16dot(bf16dot)
    try:
        return fn(*args)
    finally:
        kernels.set_gemm_bf16dot(True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--rows", type=int, nargs="+", default=[16, 128])
    ap.add_argument("--group", type=int, default=128, choices=kernels.INT4_GROUPS)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-s", type=float, default=1.0, help="seconds per method per round")
    ap.add_argument("--shapes", nargs="+", default=["14336x4096", "4096x14336"], help="NxK")
    ns = ap.parse_args()

    torch.set_num_threads(ns.threads)
    print(f"torch {torch.__version__}, {ns.threads} threads, kernels: {kernels.reason()}, "
          f"GEMM from {kernels.get_gemm_min_rows()} rows")
    shapes = [tuple(int(v) for v in s.split("x")) for s in ns.shapes]
    cols = [(n, k, t) for n, k in shapes for t in ns.rows]
    head = f"{'method':34s}" + "".join(f"{f'T={t} {n}x{k}':>20s}" for n, k, t in cols)
    print(head + "\n" + "-" * len(head))
    table: dict[str, list[str]] = {}
    for n, k in shapes:
        ms = methods(n, k, ns.group)
        for t in ns.rows:
            x = torch.randn(t, k)
            secs: dict[str, list[float]] = {label: [] for label, _ in ms}
            for _ in range(ns.rounds):  # in turns, so drift on a shared machine hits every method alike
                for label, fn in ms:
                    secs[label].append(timed(lambda fn=fn, x=x: fn(x), ns.min_s))
            for label, _ in ms:
                s = statistics.median(secs[label])
                table.setdefault(label, []).append(f"{2 * t * n * k / s / 1e9:7.1f} GF {s * 1e3:6.0f}ms")
        del ms
    for label, cells in table.items():
        print(f"{label:34s}" + "".join(f"{c:>20s}" for c in cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
