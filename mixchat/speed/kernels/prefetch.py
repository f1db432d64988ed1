"""How the row kernels (decode, short prompts) read their weights, measured per machine, weight format and
row length: whether they prefetch in software, and how many weight rows one pass reads side by side.

The kernels prefetch each weight row a few KiB ahead of their reads (csrc/common.h, mc_pf). On the AVX2
EPYC, the Xeon and Zen 4 that took decode closer to the read limit (+10-40 %), and so it does for int8 and
int4 on Zen 5, where it costs bf16 (a one-token product read at 0.81 of the probe with it, 0.99 without).
A one-token pass reads the build's MC_*_T1_R rows side by side (bf16 four with vdpbf16ps, else two; int8
two): on a 2-core Zen 4 four bf16 rows read 10-15 % faster than two, on Zen 5 one row at a time read int8
at 0.93 of the probe against 0.73 for two (in the model's decode 0.82 against 0.73); one row applies only
where the row's x fits in 16 KiB (csrc/common.h, mc_one_row_applies). Short rows and long ones want
different settings: on a 2-core Zen 4, int8 in the model's decode read 0.80 of the rate probed between its
tokens with one row per pass and no prefetch on its 4,096-column rows and the build's rows with prefetch on
its 14,336-column w2, against 0.71 with the build's setting everywhere and 0.64-0.74 with one setting for
both. No CPU feature flag tells these machines apart. So at the first kernel call of a process, for each
library and thread count, one-token products of each format (bf16; int8 and int4 with 8-bit activations)
and row kind (ROWS: a 7B's 4,096 and 14,336 columns, on either side of mc_short_row_k) are timed in each
setting (CONFIGS) that applies to them, in turns (each round takes every format and row kind, 2-3 s in
all), and a format's rows leave the build's own (rows, prefetch on) only for a setting that is faster by
more than _MARGIN (by the median of the turns' ratios and by the median rates alike: on a busy machine they
disagree). Neither changes a result (prefetches only move data; the rows per pass do not change any row's
sums). int4 is measured with its default groups of 128, whose
kernel reads one row per pass in every build, so only its prefetch is measured. The answer is kept beside
the library (measured.py), so later processes do not measure.
MIXCHAT_ROW_PREFETCH=on or off forces the prefetch for every format and row length, with the build's rows
and nothing measured; other values are ignored, like an unset one.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from mixchat.paths import env_choice
from mixchat.speed import hugepages
from mixchat.speed.kernels import measured
from mixchat.speed.kernels.formats import INT4_PARAMS

FILE = "row-prefetch.json"
FORMATS = ("bf16", "int8", "int4")  # MC_FMT_* in csrc/common.h, in order
# Row kinds (MC_ROWS_* in csrc/common.h, in order) and the row length each is measured at: a 7B's dim and hidden
# size, the rows the model has on either side of mc_short_row_k.
ROWS = {"short": 4096, "long": 14336}
# (one row per pass, prefetch on) by name; the first is the build's own, which a measurement has to beat.
CONFIGS = {"build+on": (False, True), "build+off": (False, False), "one+on": (True, True), "one+off": (True, False)}
DEFAULT = "build+on"
_PREFETCH_ONLY = ("build+on", "build+off")  # where one row per pass does not apply (and int4, see above)
# Another setting only when it measured this much faster: elsewhere the status quo, which won where it was tuned.
# Products alone understate what a setting gains in the model's decode: on a 2-core Zen 4, one row per pass
# without prefetch on short rows measured 1.03-1.05x (bf16) and 1.05-1.11x (int8) alone, 1.12-1.13x in decode
# (against the rate probed between its tokens), so a margin of 5 % kept bf16 from it about half the time.
_MARGIN = 1.03
# Bytes of weights each format's measurement streams (one product per row kind; all held at once, 750 MB):
# several times any L3 here.
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
    every = [(fmt, rows) for fmt in FORMATS for rows in ROWS]
    if (force := forced()) is not None:
        choices = dict.fromkeys(every, f"build+{force}")
    else:
        try:
            found = measured.kept(lib, FILE, threads, lambda: measure(lib), _valid)
            choices = {(fmt, rows): found[fmt][rows]["choice"] for fmt, rows in every}
        except Exception:  # noqa: BLE001 - see above
            choices = dict.fromkeys(every, DEFAULT)
    for (fmt, rows), config in choices.items():
        _set(lib, fmt, rows, config)


def _set(lib: object, fmt: str, rows: str, config: str) -> None:
    one_row, prefetch = CONFIGS[config]
    f, r = _index(fmt, rows)
    lib.mc_set_prefetch(f, r, lib.mc_prefetch_default() if prefetch else 0)
    lib.mc_set_one_row(f, r, int(one_row))


def _valid(found: dict) -> bool:
    """A kept measurement is used when each format's figures for each row kind name the same known settings,
    the build's own among them, and its choice is what _choose makes of them (one taken on a busy machine can
    contradict itself: its runs' median ratio against its median rates), and its weights sat in the pages the
    model's get now (before 0.7.6 they were torch's 4 KiB pages: such a measurement is taken again) and had
    the row lengths measured now (before 0.7.8 there was one setting per format)."""
    try:
        return found.get("pages") == _pages() and found.get("columns") == ROWS and all(
            DEFAULT in (rates := set(found[fmt][rows]["gb_per_second"])) and rates <= set(CONFIGS)
            and rates == set(found[fmt][rows]["speedup"]) and found[fmt][rows]["choice"] == _choose(found[fmt][rows])
            for fmt in FORMATS for rows in ROWS)
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
        kinds = []
        for rows in ROWS:
            choice, rate = found[fmt][rows]["choice"], found[fmt][rows]["gb_per_second"]
            against = "" if choice == DEFAULT else f" against {rate[DEFAULT]:.1f} with {describe(DEFAULT)}"
            kinds.append(f"{rows} rows {describe(choice)} ({rate[choice]:.1f} GB/s{against})")
        parts.append(f"{fmt} {', '.join(kinds)}")
    return f"{'; '.join(parts)}; {measured.when(found)}"


def measure(lib: object, rounds: int = 25) -> dict:
    """For each format and row kind, time one-token products through weights with rows of ROWS[kind] columns
    (rows sized to half of _BYTES) at the library's current thread count in each of the settings that apply
    (_configs), `rounds` times each in turns (the order reversed every other round). A round takes every
    format and row kind in turn, so each one's turns spread over the whole measurement (2-3 s) rather than a
    fraction of a second: on a VM whose memory rate jumps between two levels every second or so, a
    measurement of one format inside one spell chose by that spell (int8's short rows on a 2-core Zen 4: one
    row without prefetch 1.05-1.11x in slow spells, 0.98-1.02x in fast ones). Returns per format and row kind
    the choice, the rates (GB/s, medians) and the medians of the rounds' own speedups against the build's
    own."""
    cases = [(fmt, rows) for fmt in FORMATS for rows in ROWS]
    saved = {case: (lib.mc_get_prefetch(*_index(*case)), lib.mc_get_one_row(*_index(*case))) for case in cases}
    try:
        configs = {case: _configs(lib, *case) for case in cases}
        products = {case: _product(case[0], ROWS[case[1]], lib) for case in cases}

        def timed(case: tuple[str, str], config: str) -> float:
            _set(lib, *case, config)
            start = time.perf_counter()
            if rc := products[case][0]():
                raise RuntimeError(f"the row-read measurement's product failed with code {rc}")
            return time.perf_counter() - start

        for case in cases:  # warm: the pages, the thread pool
            for config in configs[case]:
                timed(case, config)
        times = {case: {config: [] for config in configs[case]} for case in cases}
        for i in range(rounds):
            for case in cases:
                for config in configs[case] if i % 2 == 0 else reversed(configs[case]):
                    times[case][config].append(timed(case, config))
    finally:
        for case, (distance, one_row) in saved.items():
            lib.mc_set_prefetch(*_index(*case), distance)
            lib.mc_set_one_row(*_index(*case), one_row)
    found: dict = {"distance_bytes": lib.mc_prefetch_default(), "pages": _pages(), "columns": dict(ROWS)}
    for fmt, rows in cases:
        found.setdefault(fmt, {})[rows] = _figures(times[fmt, rows], products[fmt, rows][1])
    return found | measured.stamp()


def _index(fmt: str, rows: str) -> tuple[int, int]:
    """The C side's indices of a format and row kind (MC_FMT_*, MC_ROWS_*)."""
    return FORMATS.index(fmt), list(ROWS).index(rows)


def _configs(lib: object, fmt: str, rows: str) -> tuple[str, ...]:
    """The settings that differ for `fmt`'s rows of kind `rows`: one row per pass only where the C side would
    apply it to such rows (mc_one_row_applies: their x fits beside the weight stream), never for int4."""
    if fmt == "int4":
        return _PREFETCH_ONLY
    f, r = _index(fmt, rows)
    saved = lib.mc_get_one_row(f, r)
    lib.mc_set_one_row(f, r, 1)
    applies = lib.mc_one_row_applies(f, ROWS[rows]) == 1
    lib.mc_set_one_row(f, r, saved)
    return tuple(CONFIGS) if applies else _PREFETCH_ONLY


def _product(fmt: str, cols: int, lib: object) -> tuple[Callable[[], int], int]:
    """A call running a one-token product of `fmt` with rows of `cols` columns (its return code) and the bytes
    of weights it reads."""
    per_byte = {"bf16": 0.5, "int8": 1, "int4": 2}[fmt]  # weights per byte
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
        w = (_weight((rows, cols // 2), torch.uint8, 1), _weight((rows, cols // group), INT4_PARAMS, 1),
             _weight((rows, cols // group), INT4_PARAMS, 0))
        args = (x.data_ptr(), 1, cols, w[0].data_ptr(), w[1].data_ptr(), w[2].data_ptr(), group, rows,
                y.data_ptr())
        fn = lib.mc_linear_int4_q8

    def run(_alive: tuple = (x, y, w)) -> int:  # the tensors live as long as the call holding their pointers
        return fn(*args)

    # every byte read: int4's fp16 scale and zero per group of 128 add 6.25 % to its nibbles, as in `bench`
    return run, sum(t.numel() * t.element_size() for t in w)


def _pages() -> str:
    """The pages the measurement's weights (and the model's) are in: "huge" (advised 2 MiB) or "base"."""
    return "huge" if hugepages.supported() else "base"


def _weight(shape: tuple[int, int], dtype: torch.dtype, value: float) -> torch.Tensor:
    """A tensor in the pages the model's weights get (hugepages.empty): the prefetch matters less where the
    hardware prefetchers need not stop at every 4 KiB, so measured in other pages it could choose wrongly."""
    return hugepages.empty(shape, dtype).fill_(value)


def _figures(times: dict[str, list[float]], size: int) -> dict:
    """The choice, the median rates and the medians of the turns' speedups over the build's own, from each
    setting's times through `size` bytes."""
    figures = {
        "gb_per_second": {c: round(size / statistics.median(t) / 1e9, 1) for c, t in times.items()},
        "speedup": {c: round(statistics.median(a / b for a, b in zip(times[DEFAULT], t, strict=True)), 3)
                    for c, t in times.items()},
    }
    return {"choice": _choose(figures), **figures}
