"""How the row kernels (decode, short prompts) read their weights, measured per machine and weight format:
whether they prefetch in software, and how many weight rows one pass reads side by side.

The kernels prefetch each weight row a few KiB ahead of their reads (csrc/common.h, mc_pf). On the AVX2
EPYC, the Xeon and Zen 4 that took decode closer to the read limit (+10-40 %), and so it does for int8 and
int4 on Zen 5, where it costs bf16 (a one-token product read at 0.81 of the probe with it, 0.99 without).
A one-token pass reads the build's MC_*_T1_R rows side by side (bf16 four with vdpbf16ps, else two; int8
two): on a 2-core Zen 4 four bf16 rows read 10-15 % faster than two, on Zen 5 one row at a time read int8
at 0.93 of the probe against 0.73 for two (in the model's decode 0.82 against 0.73); one row applies only
where the row's x fits in 16 KiB (csrc/common.h, mc_one_row_applies). No CPU feature flag
tells these machines apart. So at the first kernel call of a process, for each library and thread count,
one-token products of each format (bf16; int8 and int4 with 8-bit activations) are timed in each setting
(CONFIGS), in turns, and a format leaves the build's own (rows, prefetch on) only for a setting that is
faster by more than _MARGIN (by the median of the turns' ratios and by the median rates alike: on a busy
machine they disagree). Neither changes a result (prefetches only move data; the rows per pass do not
change any row's sums). int4 is measured with its default groups of 128, whose kernel reads one row per pass
in every build, so only its prefetch is measured. The answer is kept beside the library (measured.py), so
later processes do not measure.
MIXCHAT_ROW_PREFETCH=on or off forces the prefetch for every format, with the build's rows and nothing
measured; other values are ignored, like an unset one.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from mixchat.paths import env_choice
from mixchat.speed import hugepages
from mixchat.speed.kernels import measured

FILE = "row-prefetch.json"
FORMATS = ("bf16", "int8", "int4")  # MC_FMT_* in csrc/common.h, in order
# (one row per pass, prefetch on) by name; the first is the build's own, which a measurement has to beat.
CONFIGS = {"build+on": (False, True), "build+off": (False, False), "one+on": (True, True), "one+off": (True, False)}
DEFAULT = "build+on"
_MEASURED = {"bf16": tuple(CONFIGS), "int8": tuple(CONFIGS), "int4": ("build+on", "build+off")}
# Another setting only when it measured this much faster: elsewhere the status quo, which won where it was tuned.
_MARGIN = 1.05
# Bytes of weights each format's measurement streams (two products): several times any L3 here.
_BYTES = 240 * 2**20


def forced() -> str | None:
    return env_choice("MIXCHAT_ROW_PREFETCH", ("on", "off"))


def apply(lib: object, threads: int) -> None:
    """Set each format's prefetch distance (the build's own, mc_prefetch_default, or 0) and rows per pass in
    `lib` for `threads` threads, as forced() or the kept measurement says (measuring it the first time). A
    measurement that fails (no memory for its weights) leaves the build's own: it costs the choice, never the
    caller's product. Builds without SIMD row kernels do not prefetch, and are left as they are."""
    if not lib.mc_simd():
        return
    if (force := forced()) is not None:
        choices = dict.fromkeys(FORMATS, f"build+{force}")
    else:
        try:
            found = measured.kept(lib, FILE, threads, lambda: measure(lib), _valid)
            choices = {fmt: found[fmt]["choice"] for fmt in FORMATS}
        except Exception:  # noqa: BLE001 - see above
            choices = dict.fromkeys(FORMATS, DEFAULT)
    for i, fmt in enumerate(FORMATS):
        _set(lib, i, choices[fmt])


def _set(lib: object, fmt: int, config: str) -> None:
    one_row, prefetch = CONFIGS[config]
    lib.mc_set_prefetch(fmt, lib.mc_prefetch_default() if prefetch else 0)
    lib.mc_set_one_row(fmt, int(one_row))


def _valid(found: dict) -> bool:
    """A kept measurement is used when each format's figures name exactly the settings measured for it and
    its choice is what _choose makes of them (one taken on a busy machine can contradict itself: its runs'
    median ratio against its median rates), and its weights sat in the pages the model's get now (before 0.7.6
    they were torch's 4 KiB pages: such a measurement is taken again)."""
    try:
        return found.get("pages") == _pages() and all(
            set(found[fmt]["gb_per_second"]) == set(found[fmt]["speedup"]) == set(_MEASURED[fmt])
            and found[fmt]["choice"] == _choose(found[fmt]) for fmt in FORMATS)
    except (KeyError, TypeError, ValueError, AttributeError):
        return False


def _choose(figures: dict) -> str:
    """Among the settings that both the median of the rounds' ratios against the build's own and the ratio of
    the median rates say are faster by more than _MARGIN, the fastest by median rate; else the build's own."""
    rate, speedup = figures["gb_per_second"], figures["speedup"]
    faster = [name for name in rate if name != DEFAULT and speedup[name] > _MARGIN
              and rate[name] > _MARGIN * rate[DEFAULT]]
    return max(faster, key=rate.__getitem__) if faster else DEFAULT


def describe(config: str) -> str:
    """A setting in words: 'one row, prefetch off'."""
    one_row, prefetch = CONFIGS[config]
    return f"{'one row' if one_row else 'build rows'}, prefetch {'on' if prefetch else 'off'}"


def note(lib: object, threads: int) -> str | None:
    """One line for `bench`: each format's setting and its measured rate against the build's own, where a
    measurement decides it (None: forced, not measured in this process, or no SIMD kernels)."""
    if forced() is not None or lib is None or not lib.mc_simd():
        return None
    found = measured.known(lib, FILE, threads)
    if not found or not _valid(found):  # _valid also needs each format's rates
        return None
    parts = []
    for fmt in FORMATS:
        choice, rate = found[fmt]["choice"], found[fmt]["gb_per_second"]
        against = "" if choice == DEFAULT else f" against {rate[DEFAULT]:.1f} with {describe(DEFAULT)}"
        parts.append(f"{fmt} {describe(choice)} ({rate[choice]:.1f} GB/s{against})")
    return f"{'; '.join(parts)}; {measured.when(found)}"


def measure(lib: object, rounds: int = 15) -> dict:
    """For each format, time one-token products through weights of 4,096 and 14,336 columns (a 7B's rows,
    rows sized to _BYTES) at the library's current thread count in each of the format's settings
    (_MEASURED), `rounds` times each in turns (the order reversed every other round). Returns per format the
    choice, the rates (GB/s, medians) and the medians of the rounds' own speedups against the build's own."""
    found: dict = {"distance_bytes": lib.mc_prefetch_default(), "pages": _pages()}
    for i, fmt in enumerate(FORMATS):
        saved = lib.mc_get_prefetch(i), lib.mc_get_one_row(i)
        try:
            found[fmt] = _measure_format(lib, i, _MEASURED[fmt], _products(lib, fmt), rounds)
        finally:
            lib.mc_set_prefetch(i, saved[0])
            lib.mc_set_one_row(i, saved[1])
    return found | measured.stamp()


def _products(lib: object, fmt: str) -> tuple[Callable[[], int], int]:
    """A call running both products of `fmt` (its return code) and the bytes of weights it reads."""
    per_byte = {"bf16": 0.5, "int8": 1, "int4": 2}[fmt]  # weights per byte
    calls, size = [], 0
    # A 7B's dim and hidden size as row lengths, half the bytes each: the model's rows on either side of where
    # one row per pass stops applying (mc_one_row_applies), so the setting is timed where the model uses it.
    for cols in (4096, 14336):
        rows = max(256, int(_BYTES / 2 / cols * per_byte) // 256 * 256)  # tests shrink _BYTES
        x, y = torch.ones(1, cols), torch.empty(1, rows)
        if fmt == "bf16":
            w = (_weight((rows, cols), torch.bfloat16, 1),)
            args = (x.data_ptr(), 1, cols, w[0].data_ptr(), rows, y.data_ptr())
            fn = lib.mc_linear_bf16
        elif fmt == "int8":
            w = (_weight((rows, cols), torch.int8, 1), torch.ones(rows))
            args = (x.data_ptr(), 1, cols, w[0].data_ptr(), w[1].data_ptr(), rows, y.data_ptr())
            fn = lib.mc_linear_int8_q8
        else:
            group = 128
            w = (_weight((rows, cols // 2), torch.uint8, 1), _weight((rows, cols // group), torch.float32, 1),
                 _weight((rows, cols // group), torch.float32, 0))
            args = (x.data_ptr(), 1, cols, w[0].data_ptr(), w[1].data_ptr(), w[2].data_ptr(), group, rows,
                    y.data_ptr())
            fn = lib.mc_linear_int4_q8
        calls.append((fn, args, (x, y, w)))  # the tensors stay alive while the call holds their pointers
        # every byte read: int4's fp32 scale and zero per group of 128 add 12.5 % to its nibbles, as in `bench`
        size += sum(t.numel() * t.element_size() for t in w)

    def run() -> int:
        return calls[0][0](*calls[0][1]) | calls[1][0](*calls[1][1])

    return run, size


def _pages() -> str:
    """The pages the measurement's weights (and the model's) are in: "huge" (advised 2 MiB) or "base"."""
    return "huge" if hugepages.supported() else "base"


def _weight(shape: tuple[int, int], dtype: torch.dtype, value: float) -> torch.Tensor:
    """A tensor in the pages the model's weights get (hugepages.empty): the prefetch matters less where the
    hardware prefetchers need not stop at every 4 KiB, so measured in other pages it could choose wrongly."""
    return hugepages.empty(shape, dtype).fill_(value)


def _measure_format(lib: object, fmt: int, configs: tuple[str, ...], products: tuple[Callable[[], int], int],
                    rounds: int) -> dict:
    run, size = products

    def timed(config: str) -> float:
        _set(lib, fmt, config)
        start = time.perf_counter()
        if rc := run():
            raise RuntimeError(f"the row-read measurement's product failed with code {rc}")
        return time.perf_counter() - start

    for config in configs:  # warm: the pages, the thread pool
        timed(config)
    times: dict[str, list[float]] = {config: [] for config in configs}
    for i in range(rounds):
        for config in configs if i % 2 == 0 else reversed(configs):
            times[config].append(timed(config))
    figures = {
        "gb_per_second": {c: round(size / statistics.median(times[c]) / 1e9, 1) for c in configs},
        "speedup": {c: round(statistics.median(a / b for a, b in zip(times[DEFAULT], times[c], strict=True)), 3)
                    for c in configs},
    }
    return {"choice": _choose(figures), **figures}
