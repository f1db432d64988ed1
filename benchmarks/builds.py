"""One-token products of several builds of the kernels, each against its own read probe, in turns.

    python benchmarks/builds.py --kind bf16 --build= --build=-mno-avx512bf16 [--reps 12]
    python benchmarks/builds.py --kind int8 --build= --build="-DMC_INT8_T1_R=4 -DMC_INT8_T1_S=1"

Each --build=FLAGS is extra compiler flags on top of the native build's (empty: the native build itself), so
one machine compares code paths (vdpbf16ps against the AVX-512 F split, -D tunables) without editing
a file. Per rep and build: the build's read probe (csrc/probe.c, its widest loads, 1 GiB), then one row
of x through a 7B layer's weights three times over (1.3 GB of bf16: far past the L3), then the probe
again; the figure is the products' GB/s over the faster of the two probes, so a machine whose read rate
drifts from one second to the next (this project's VMs: 27-58 GB/s within minutes) is compared with
itself at that moment. Medians over the reps. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time
from collections.abc import Callable

import torch

from mixchat.speed import hugepages, kernels
from mixchat.speed.kernels import loader
from mixchat.speed.kernels.formats import INT4_PARAMS, pack_int4

SHAPES = [(14336, 4096), (4096, 14336), (14336, 4096), (4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096)]


def pinned(t: torch.Tensor) -> torch.Tensor:
    """t copied into huge pages (where the kernel has them), where the engine keeps weights."""
    return hugepages.empty(tuple(t.shape), t.dtype).copy_(t)


def products(kind: str, lib: ctypes.CDLL, gen: torch.Generator) -> tuple[Callable[[], None], int]:
    """A call that runs one row of x through every weight of three 7B layers, and the bytes it reads. The
    weights sit in huge pages, as the model holds them (and as the probe reads)."""
    calls, total = [], 0
    y = torch.empty(1, 14336)
    xs = {k: torch.randn(1, k, generator=gen) for k in (4096, 14336)}
    for n, k in SHAPES * 3:
        x = xs[k]
        if kind == "bf16":
            w = pinned((torch.randn(n, k, generator=gen) * 0.02).to(torch.bfloat16))
            calls.append((lib.mc_linear_bf16, (x.data_ptr(), 1, k, w.data_ptr(), n, y.data_ptr()), (w,)))
            total += w.numel() * 2
        elif kind == "int8":
            q = pinned(torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8))
            s = torch.rand(n, generator=gen)
            calls.append((lib.mc_linear_int8_q8, (x.data_ptr(), 1, k, q.data_ptr(), s.data_ptr(), n, y.data_ptr()),
                          (q, s)))
            total += q.numel() + 4 * n
        else:
            p = pinned(pack_int4(torch.randint(0, 16, (n, k), generator=gen)))
            s = pinned(torch.rand(n, k // 128, generator=gen).to(INT4_PARAMS))
            z = pinned(torch.rand(n, k // 128, generator=gen).to(INT4_PARAMS))
            calls.append((lib.mc_linear_int4_q8, (x.data_ptr(), 1, k, p.data_ptr(), s.data_ptr(), z.data_ptr(), 128,
                                                  n, y.data_ptr()), (p, s, z)))
            total += p.numel() + 4 * s.numel()

    keep = (y, xs)  # the calls hold raw pointers into these: they must outlive products()

    def run() -> None:
        assert keep
        for fn, args, _keep in calls:
            if fn(*args) != 0:
                raise SystemExit(f"{fn.__name__} failed")

    return run, total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", choices=["bf16", "int8", "int4"], default="bf16")
    ap.add_argument("--build", action="append", default=None, help="extra flags for one build (repeat)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=12)
    ns = ap.parse_args()
    builds = ns.build or [""]
    libs = {}
    for extra in builds:
        lib = loader.load(kernels.build(flags=(*kernels.isa_flags("native"), *extra.split())))
        lib.mc_set_threads(ns.threads)
        libs[extra or "native"] = lib
    buf = hugepages.empty((1 << 30,)).fill_(1)  # the pages loader.read_probe reads
    runs = {name: products(ns.kind, lib, torch.Generator().manual_seed(0)) for name, lib in libs.items()}
    for run, _ in runs.values():
        run()  # first touch
    ratio: dict[str, list[float]] = {name: [] for name in libs}
    rate: dict[str, list[float]] = {name: [] for name in libs}
    probes: list[float] = []
    for _ in range(ns.reps):
        for name, lib in libs.items():
            run, total = runs[name]
            before = lib.mc_read_probe(buf.data_ptr(), buf.numel(), ns.threads, 2)
            start = time.perf_counter()
            run()
            gbs = total / (time.perf_counter() - start) / 1e9
            probe = max(before, lib.mc_read_probe(buf.data_ptr(), buf.numel(), ns.threads, 2))
            ratio[name].append(gbs / probe)
            rate[name].append(gbs)
            probes.append(probe)
    print(f"{ns.kind}, one row of x, {runs[next(iter(runs))][1] / 1e9:.2f} GB per pass, {ns.threads} threads; "
          f"the probes read {min(probes):.1f}-{max(probes):.1f} GB/s")
    for name, lib in libs.items():
        print(f"  {name:40s} {statistics.median(rate[name]):6.1f} GB/s, {statistics.median(ratio[name]):.3f} of the "
              f"probe (level {lib.mc_simd_level()}, vdpbf16ps {bool(lib.mc_bf16dot())})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
