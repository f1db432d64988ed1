"""Whether the row kernels (decode, short prompts) prefetch their weights in software: measured per machine
and per weight format.

The kernels prefetch each weight row a few KiB ahead of their reads (csrc/common.h, mc_pf). On the AVX2
EPYC, the Xeon and Zen 4 that took decode closer to the read limit (+10-40 %), and so it does for int8 and
int4 on Zen 5, where it costs bf16 (a one-token product read at 0.81 of the probe with it, 0.99 without):
no CPU feature flag tells these apart. So at the first kernel call of a process, for each library and thread
count, one-token products of each format (bf16; int8 and int4 with 8-bit activations) are timed with and
without, in turns, and a format's prefetch is turned off only where that is faster by more than _MARGIN
(by the median of the turns' ratios and by the median rates alike: on a busy machine they disagree).
The answer is kept beside the library (measured.py), so later processes do not measure.
MIXCHAT_ROW_PREFETCH=on or off forces either for every format; other values are ignored, like an unset one.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from mixchat.paths import env_choice
from mixchat.speed.kernels import measured

FILE = "row-prefetch.json"
FORMATS = ("bf16", "int8", "int4")  # MC_FMT_* in csrc/common.h, in order
# Off only when it measured this much faster: elsewhere the status quo, which won where it was tuned.
_MARGIN = 1.05
# Bytes of weights each format's measurement streams (two products): several times any L3 here.
_BYTES = 240 * 2**20


def forced() -> str | None:
    return env_choice("MIXCHAT_ROW_PREFETCH", ("on", "off"))


def apply(lib: object, threads: int) -> None:
    """Set each format's prefetch distance in `lib` for `threads` threads: the build's own
    (mc_prefetch_default) or 0, as forced() or the kept measurement says (measuring it the first time).
    A measurement that fails (no memory for its weights) leaves the build's own: it costs the choice, never
    the caller's product. Builds without SIMD row kernels do not prefetch, and are left as they are."""
    if not lib.mc_simd():
        return
    default = lib.mc_prefetch_default()
    if (force := forced()) is not None:
        choices = dict.fromkeys(FORMATS, force)
    else:
        try:
            found = measured.kept(lib, FILE, threads, lambda: measure(lib), _valid)
            choices = {fmt: found[fmt]["choice"] for fmt in FORMATS}
        except Exception:  # noqa: BLE001 - see above
            choices = dict.fromkeys(FORMATS, "on")
    for i, fmt in enumerate(FORMATS):
        lib.mc_set_prefetch(i, default if choices[fmt] == "on" else 0)


def _valid(found: dict) -> bool:
    """A kept measurement is used when each format's choice is what _choose makes of its own figures (one
    taken on a busy machine can contradict itself: its runs' median ratio against its median rates)."""
    try:
        return all(found[fmt]["choice"] == _choose(found[fmt]) for fmt in FORMATS)
    except (KeyError, TypeError):
        return False


def _choose(figures: dict) -> str:
    """Off only when both the median of the rounds' ratios and the ratio of the median rates say that
    running without is faster by more than _MARGIN."""
    ratio, on, off = figures["off_speedup"], figures["on_gb_per_second"], figures["off_gb_per_second"]
    return "off" if ratio > _MARGIN and off > _MARGIN * on else "on"


def note(lib: object, threads: int) -> str | None:
    """One line for `bench`: each format's prefetch and its measured rates, where a measurement decides it
    (None: forced, not measured in this process, or no SIMD kernels)."""
    if forced() is not None or lib is None or not lib.mc_simd():
        return None
    found = measured.known(lib, FILE, threads)
    if not found or not _valid(found):  # _valid also needs each format's rates
        return None
    parts = [f"{fmt} {found[fmt]['choice']} ({found[fmt]['on_gb_per_second']:.1f} GB/s with, "
             f"{found[fmt]['off_gb_per_second']:.1f} without)" for fmt in FORMATS]
    return f"{', '.join(parts)}; measured {found['measured']}"


def measure(lib: object, rounds: int = 15) -> dict:
    """For each format, time one-token products through a [n, 4096] and a [4096, n] weight (a 7B MLP's
    shapes, n sized to _BYTES) at the library's current thread count, with the build's prefetch distance
    and with none, `rounds` times each in turns (who goes first alternating). Returns per format the choice,
    the rates (GB/s, medians) and the median of the rounds' own ratios."""
    found: dict = {"distance_bytes": lib.mc_prefetch_default()}
    for i, fmt in enumerate(FORMATS):
        saved = lib.mc_get_prefetch(i)
        try:
            found[fmt] = _measure_format(lib, i, _products(lib, fmt), rounds)
        finally:
            lib.mc_set_prefetch(i, saved)
    found["measured"] = time.strftime("%Y-%m-%d %H:%M:%S")
    return found


def _products(lib: object, fmt: str) -> tuple[Callable[[], int], int]:
    """A call running both products of `fmt` (its return code) and the bytes of weights it reads."""
    per_byte = {"bf16": 0.5, "int8": 1, "int4": 2}[fmt]  # weights per byte
    k = 4096
    n = int(_BYTES / 2 / k * per_byte) // 256 * 256
    calls, size = [], 0
    for rows, cols in ((n, k), (k, n)):
        x, y = torch.ones(1, cols), torch.empty(1, rows)
        if fmt == "bf16":
            w = (torch.ones(rows, cols, dtype=torch.bfloat16),)
            args = (x.data_ptr(), 1, cols, w[0].data_ptr(), rows, y.data_ptr())
            fn = lib.mc_linear_bf16
        elif fmt == "int8":
            w = (torch.ones(rows, cols, dtype=torch.int8), torch.ones(rows))
            args = (x.data_ptr(), 1, cols, w[0].data_ptr(), w[1].data_ptr(), rows, y.data_ptr())
            fn = lib.mc_linear_int8_q8
        else:
            group = 128
            w = (torch.ones(rows, cols // 2, dtype=torch.uint8), torch.ones(rows, cols // group),
                 torch.zeros(rows, cols // group))
            args = (x.data_ptr(), 1, cols, w[0].data_ptr(), w[1].data_ptr(), w[2].data_ptr(), group, rows,
                    y.data_ptr())
            fn = lib.mc_linear_int4_q8
        calls.append((fn, args, (x, y, w)))  # the tensors stay alive while the call holds their pointers
        size += w[0].numel() * w[0].element_size()  # the weights read (scales are a rounding error)

    def run() -> int:
        return calls[0][0](*calls[0][1]) | calls[1][0](*calls[1][1])

    return run, size


def _measure_format(lib: object, fmt: int, products: tuple[Callable[[], int], int], rounds: int) -> dict:
    run, size = products
    on = lib.mc_prefetch_default()

    def timed(pf: int) -> float:
        lib.mc_set_prefetch(fmt, pf)
        start = time.perf_counter()
        if rc := run():
            raise RuntimeError(f"the prefetch measurement's product failed with code {rc}")
        return time.perf_counter() - start

    timed(on), timed(0)  # warm: the pages, the thread pool
    times: dict[int, list[float]] = {on: [], 0: []}
    for i in range(rounds):
        for pf in (on, 0) if i % 2 == 0 else (0, on):
            times[pf].append(timed(pf))
    figures = {"off_speedup": round(statistics.median(a / b for a, b in zip(times[on], times[0], strict=True)), 3),
               "on_gb_per_second": round(size / statistics.median(times[on]) / 1e9, 1),
               "off_gb_per_second": round(size / statistics.median(times[0]) / 1e9, 1)}
    return {"choice": _choose(figures), **figures}
