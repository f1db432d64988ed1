"""Weight-streaming speed of matrix-vector products: torch's CPU kernels against mixchat.speed.kernels.

    python benchmarks/gemv.py [--threads 2] [--rows 1 4] [--group 64] [--rounds 5] [--min-mb 400]

Prints GB/s of weight bytes read per second (each method's own stored bytes: values plus scales and
zeros) for the two shapes of a 7B model's MLP, [T, 4096] x [14336, 4096] and [T, 14336] x [4096, 14336],
at T = 1 and 4. Decoding is bound by this figure: tokens/s ~= GB/s / (GB of weights per token).

The fp32 line (MKL's sgemv via F.linear) is the reference for the machine's memory read limit. Each
method cycles through enough copies of its weight to exceed --min-mb, so every call streams from
memory rather than from the L3 cache. All methods of a shape are measured in turns, round by round, and
the median over --rounds rounds is reported: on a shared machine the bandwidth left over drifts, and
taking turns keeps the comparison between methods fair even when the absolute figures are not.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from mixchat.speed import kernels

Method = Callable[[torch.Tensor, int], torch.Tensor]


def nbytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def copies_for(size: int, min_bytes: int) -> int:
    return max(1, -(-min_bytes // size))


def run_for(fn: Method, x: torch.Tensor, copies: int, min_s: float) -> tuple[int, float]:
    """Whole cycles over the copies for at least `min_s` seconds: (calls, seconds)."""
    calls, start = 0, time.perf_counter()
    while True:
        for i in range(copies):
            fn(x, i)
        calls += copies
        elapsed = time.perf_counter() - start
        if elapsed >= min_s:
            return calls, elapsed


def methods(n: int, k: int, group: int, min_bytes: int) -> list[tuple[str, Callable[[], tuple[Method, int, int]]]]:
    """(label, setup) pairs; setup builds the weights lazily (so only one format is in memory at a time)
    and returns (fn(x_fp32, copy_index), copies, bytes per call)."""
    gen = torch.Generator().manual_seed(0)

    def base() -> torch.Tensor:
        return torch.randn(n, k, generator=gen) * 0.02

    def fp32() -> tuple[Method, int, int]:
        c = copies_for(n * k * 4, min_bytes)
        ws = [base() for _ in range(c)]
        return (lambda x, i: F.linear(x, ws[i])), c, nbytes(ws[0])

    def torch_bf16() -> tuple[Method, int, int]:
        c = copies_for(n * k * 2, min_bytes)
        ws = [base().to(torch.bfloat16) for _ in range(c)]
        return (lambda x, i: F.linear(x.to(torch.bfloat16), ws[i])), c, nbytes(ws[0])

    def torch_int8() -> tuple[Method, int, int]:
        c = copies_for(n * k, min_bytes)
        qs = [torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8) for _ in range(c)]
        s = (torch.rand(n, generator=gen) * 1e-3).to(torch.bfloat16)
        return (lambda x, i: torch._weight_int8pack_mm(x.to(torch.bfloat16), qs[i], s)), c, nbytes(qs[0], s)

    def torch_int4() -> tuple[Method, int, int]:
        c = copies_for(n * k // 2, min_bytes)
        packs = []
        for _ in range(c):
            q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
            packs.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2))
        sz = torch.rand(k // group, n, 2, generator=gen).to(torch.bfloat16)

        def run(x: torch.Tensor, i: int) -> torch.Tensor:
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packs[i], group, sz)

        return run, c, nbytes(packs[0], sz)

    def ours_bf16() -> tuple[Method, int, int]:
        c = copies_for(n * k * 2, min_bytes)
        ws = [base().to(torch.bfloat16) for _ in range(c)]
        return (lambda x, i: kernels.linear_bf16(x, ws[i])), c, nbytes(ws[0])

    def ours_int8(exact: bool) -> Callable[[], tuple[Method, int, int]]:
        def setup() -> tuple[Method, int, int]:
            c = copies_for(n * k, min_bytes)
            qs = [torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8) for _ in range(c)]
            s = torch.rand(n, generator=gen) * 1e-3
            return (lambda x, i: kernels.linear_int8(x, qs[i], s, exact=exact)), c, nbytes(qs[0], s)

        return setup

    def ours_int4(exact: bool) -> Callable[[], tuple[Method, int, int]]:
        def setup() -> tuple[Method, int, int]:
            per = n * k // 2 + 4 * n * (k // group)  # fp16 scale and zero per group
            c = copies_for(per, min_bytes)
            ws = [(torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8),
                   (torch.rand(n, k // group, generator=gen) * 1e-3).to(kernels.INT4_PARAMS),
                   (torch.randn(n, k // group, generator=gen) * 1e-3).to(kernels.INT4_PARAMS))
                  for _ in range(c)]
            return (lambda x, i: kernels.linear_int4(x, *ws[i], group, exact=exact)), c, nbytes(*ws[0])

        return setup

    out = [("fp32 F.linear (MKL, read limit)", fp32), ("torch bf16 F.linear", torch_bf16),
           ("torch _weight_int8pack_mm", torch_int8), (f"torch int4pack_mm g{group}", torch_int4)]
    if kernels.available():
        out += [("mixchat bf16", ours_bf16), ("mixchat int8 (q8 x)", ours_int8(False)),
                ("mixchat int8 (exact)", ours_int8(True)),
                (f"mixchat int4 g{group} (q8 x)", ours_int4(False)),
                (f"mixchat int4 g{group} (exact)", ours_int4(True))]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--group", type=int, default=64, choices=kernels.INT4_GROUPS)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-s", type=float, default=0.3, help="seconds per round")
    ap.add_argument("--min-mb", type=int, default=400, help="cycle through copies totalling at least this")
    ap.add_argument("--shapes", nargs="+", default=["14336x4096", "4096x14336"], help="NxK")
    ns = ap.parse_args()

    torch.set_num_threads(ns.threads)
    print(f"torch {torch.__version__}, {ns.threads} threads, kernels: {kernels.reason()}")
    shapes = [tuple(int(v) for v in s.split("x")) for s in ns.shapes]
    head = f"{'method':34s}" + "".join(f"{f'T={t} {n}x{k}':>18s}" for n, k in shapes for t in ns.rows)
    print(head)
    print("-" * len(head))
    labels = [label for label, _ in methods(1, 64, ns.group, 0)]
    results: dict[str, list[float]] = {label: [] for label in labels}
    for n, k in shapes:
        # Every method's weights at once, measured in turns round by round: on a shared machine the
        # available bandwidth drifts, and interleaving keeps the comparison fair.
        setups = [(label, *setup()) for label, setup in methods(n, k, ns.group, ns.min_mb << 20)]
        for t in ns.rows:
            x = torch.randn(t, k)
            for _, fn, copies, _ in setups:  # warm up: page in every copy, start the thread pools
                run_for(fn, x, copies, 0.0)
            rates: dict[str, list[float]] = {label: [] for label in labels}
            for _ in range(ns.rounds):
                for label, fn, copies, size in setups:
                    calls, seconds = run_for(fn, x, copies, ns.min_s)
                    rates[label].append(size * calls / seconds / 1e9)
            for label in labels:
                results[label].append(statistics.median(rates[label]))
        del setups
    for label in labels:
        print(f"{label:34s}" + "".join(f"{v:13.1f} GB/s" for v in results[label]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
