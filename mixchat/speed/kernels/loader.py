"""Building and loading the compiled kernels (mixchat/speed/csrc): the compiler, the ISA builds, the
cache folder, the ctypes bindings, the self-check's call, the loaded library and its thread settings.

The C source is compiled on first use with the system C compiler (`gcc -O3 -march=native -fopenmp`) into
a cache folder keyed by the sources, compiler, flags and CPU, and loaded with ctypes (which releases the
GIL during the call). A self-check against torch runs once after loading (selfcheck.py). Without a
compiler, on a failed build or self-check, or with MIXCHAT_KERNELS=0, `available()` is False, `reason()`
says why in one line, and the `linear_*` functions still work through slow pure-torch equivalents.

MIXCHAT_KERNEL_ISA picks the build (see isa_flags): native (the default), avx2 (the AVX2+FMA code as an
AVX2-only CPU runs it, whatever this CPU has beyond that) or portable (the plain C loops). Each build
has its own cache folder; reason() names the one loaded, and forced_isa() swaps another in for a block
(tests run every side of the CPU-dependent code on one machine).

Threads: each call uses torch.get_num_threads() threads unless set_num_threads() says otherwise. The
library is linked against libgomp; torch is imported first, so the dynamic loader resolves that to the
libgomp torch already loaded: one OpenMP runtime, one pool of worker threads shared with torch's own ops,
no oversubscription. Like torch's, those workers spin a while between parallel regions; on a machine
whose cores are busy with other work that spinning costs up to half the throughput (torch's ops lose too),
and OMP_WAIT_POLICY=passive, or one thread, avoids it.

MIXCHAT_KERNEL_CACHE overrides the cache folder (default: platformdirs' user cache, `kernels/`).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from mixchat.paths import env_flag
from mixchat.speed import hugepages

CSRC = Path(__file__).parent.parent / "csrc"


def source() -> Path:
    """The unity-build file the compiler is given: csrc/kernels.c, which #includes the other parts (one
    translation unit, so the compiler inlines across them as it did when they were one file)."""
    return CSRC / "kernels.c"


def _source_files() -> list[Path]:
    """Every file a build reads: the cache key covers them all, so editing a part file rebuilds."""
    return sorted([*CSRC.glob("*.c"), *CSRC.glob("*.h")])

ISAS = ("native", "avx2", "portable")
_COMMON = ("-fopenmp", "-shared", "-fPIC", "-std=gnu11", "-fvisibility=hidden")
ABI_VERSION = 12  # must match MC_ABI_VERSION in csrc/common.h
GEMM_MIN_ROWS = 12  # the C side's default (mc_get_gemm_min_rows)
# mc_simd_level(): which row kernels the compiler's feature macros chose for this build.
SIMD_LEVELS = {0: "scalar code", 1: "AVX2+FMA code", 2: "AVX-512 code", 3: "AVX-512 code with VNNI"}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_reason: str | None = None  # None: not tried yet
_opened: dict[str, tuple[ctypes.CDLL, str]] = {}  # ISA -> its library, loaded and self-checked, and reason()
_threads: int | None = None
_lib_threads: dict[int, int] = {}  # library handle -> the thread count it was last given


class KernelError(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------------
# Building and loading
# ----------------------------------------------------------------------------------------------------


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


def _cpu_flags() -> str | None:
    """The CPU's feature flags as /proc/cpuinfo lists them, or None where there is no such file."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _cpu_signature() -> str:
    # -march=native bakes the CPU's instruction set into the library: a home folder shared between
    # machines must not hand an AVX-512 build to an AVX2 machine.
    return _cpu_flags() or platform.machine() + " " + platform.processor()


def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def isa_flags(isa: str) -> tuple[str, ...]:
    """The compiler flags of one build of the kernels.

    native    -march=native: the AVX2+FMA intrinsics where the CPU has them, the plain C loops where not.
              The compiler also tunes the plain C parts (K tails, norms, epilogues) for this CPU: AVX-512
              where it has it, and where it fuses multiply-adds (tuning for Zen avoids chains of them), so
              results differ from the avx2 build's in the last bits, within the same rounding bounds.
    avx2      -march=x86-64-v3 (AVX2, FMA, F16C, BMI, MOVBE, LZCNT): the intrinsics exactly as an AVX2-only
              CPU runs them, generic tuning, no AVX-512 anywhere, whatever this CPU has.
    portable  MC_PORTABLE: the plain C loops (no intrinsics), for baseline x86-64 on x86 (no FMA, so no
              contraction into fused multiply-adds either); the fused decode step needs the intrinsics, so
              the model keeps its plain path with this build.
    """
    if isa == "native":
        target: tuple[str, ...] = ("-march=native",)
    elif isa == "avx2":
        target = ("-march=x86-64-v3",)
    elif isa == "portable":
        target = (("-march=x86-64",) if _x86() else ()) + ("-DMC_PORTABLE",)
    else:
        raise ValueError(f"kernel ISA must be one of {', '.join(ISAS)}, not {isa!r}")
    return ("-O3", *target, *_COMMON)


FLAGS = isa_flags("native")


def requested_isa() -> str:
    """The build MIXCHAT_KERNEL_ISA asks for (unset or empty: native); ValueError for an unknown name."""
    isa = os.environ.get("MIXCHAT_KERNEL_ISA", "").strip().lower() or "native"
    if isa not in ISAS:
        raise ValueError(f"MIXCHAT_KERNEL_ISA={isa}: not one of {', '.join(ISAS)}")
    return isa


# What -march=x86-64-v3 lets the compiler use anywhere, by /proc/cpuinfo's names ("abm" is LZCNT).
_X86_64_V3 = ("avx2", "fma", "f16c", "bmi1", "bmi2", "movbe", "abm")


def _cannot_run(isa: str) -> str | None:
    """Why this CPU cannot run the `isa` build (its first unknown instruction would kill the process), or
    None."""
    if isa != "avx2":
        return None  # native is what the CPU has; portable is the baseline
    if not _x86():
        return f"the avx2 build needs an x86-64 CPU, not {platform.machine()}"
    flags = _cpu_flags()
    if flags is None:
        has = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
        return None if has else "the avx2 build needs AVX2, which torch does not see on this CPU"
    missing = [f for f in _X86_64_V3 if f not in flags.split()]
    return f"the avx2 build needs {', '.join(missing)}, which this CPU lacks" if missing else None


def cache_root() -> Path:
    if value := os.environ.get("MIXCHAT_KERNEL_CACHE"):
        return Path(value).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("mixchat", appauthor=False)) / "kernels"


def build(cc: str | None = None, flags: tuple[str, ...] = FLAGS, root: Path | None = None) -> Path:
    """Compile the kernels (source(); or reuse the cached build) and return the path of the shared library.

    Concurrent builders are harmless: each compiles to its own temporary file and renames it into place
    (atomic on POSIX), so readers only ever see a complete library, and the last identical copy wins.
    """
    cc = cc or _compiler()
    if cc is None:
        raise KernelError("no C compiler found (set CC or install gcc)")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelError(f"C compiler {cc} does not run: {e}") from None
    key = hashlib.sha256()
    sources = (f.name.encode() + b"\0" + f.read_bytes() for f in _source_files())
    for part in (*sources, cc.encode(), version.encode(), " ".join(flags).encode(),
                 _cpu_signature().encode(), str(ABI_VERSION).encode()):
        key.update(part + b"\0")
    folder = (root or cache_root()) / key.hexdigest()[:24]
    lib = folder / "libmixchat.so"
    if lib.exists():
        return lib
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".libmixchat-", suffix=".so", dir=folder)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *flags, "-o", tmp, str(source()), "-lm"], capture_output=True, text=True,
                              timeout=600)
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.splitlines() if "error" in ln] or proc.stderr.splitlines() or ["?"]
            raise KernelError(f"build failed: {lines[0].strip()}")
        os.replace(tmp, lib)
    except subprocess.TimeoutExpired:
        raise KernelError("build timed out") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def _bind(lib: ctypes.CDLL) -> None:
    i64, i32 = ctypes.c_int64, ctypes.c_int
    vp = ctypes.c_void_p
    lib.mc_abi_version.restype = i32
    lib.mc_simd.restype = i32
    lib.mc_simd_level.restype = i32
    lib.mc_read_probe.argtypes, lib.mc_read_probe.restype = [vp, i64, i32, i32], ctypes.c_double
    lib.mc_set_threads.argtypes = [i32]
    lib.mc_get_threads.restype = i32
    # format (MC_FMT_*), row kind (MC_ROWS_*: short, long)
    lib.mc_set_prefetch.argtypes, lib.mc_set_prefetch.restype = [i32, i32, i64], i32
    lib.mc_get_prefetch.argtypes, lib.mc_get_prefetch.restype = [i32, i32], i64
    lib.mc_prefetch_default.restype = i64
    lib.mc_short_row_k.restype = i64
    lib.mc_set_one_row.argtypes, lib.mc_set_one_row.restype = [i32, i32, i32], i32
    lib.mc_get_one_row.argtypes, lib.mc_get_one_row.restype = [i32, i32], i32
    lib.mc_one_row_applies.argtypes, lib.mc_one_row_applies.restype = [i32, i64], i32
    lib.mc_set_gemm_min_rows.argtypes = [i32]
    lib.mc_get_gemm_min_rows.restype = i32
    lib.mc_set_bf16t_ksplit.argtypes = [i32]
    lib.mc_bf16dot.restype = i32
    lib.mc_set_gemm_bf16dot.argtypes = [i32]
    lib.mc_get_gemm_bf16dot.restype = i32
    for name in ("mc_linear_bf16", "mc_linear_bf16_t"):
        getattr(lib, name).argtypes = [vp, i32, i64, vp, i64, vp]
    for name in ("mc_linear_int8", "mc_linear_int8_q8"):
        getattr(lib, name).argtypes = [vp, i32, i64, vp, vp, i64, vp]
    for name in ("mc_linear_int4", "mc_linear_int4_q8"):
        getattr(lib, name).argtypes = [vp, i32, i64, vp, vp, vp, i32, i64, vp]
    for name in ("mc_linear_multi", "mc_linear_rows"):
        getattr(lib, name).argtypes = [i32, vp, i32, i64, i32, vp, vp, vp, i32, vp, vp]
    lib.mc_decode_attention.argtypes = [vp, vp, i32, vp, vp, vp, i32, i64, vp, vp, vp, i64]
    lib.mc_decode_ffn.argtypes = [vp, vp, i32]
    lib.mc_decode_moe.argtypes = [vp, vp, i32, vp, vp, vp, i32]
    for name in ("mc_linear_bf16", "mc_linear_bf16_t", "mc_linear_int8", "mc_linear_int8_q8", "mc_linear_int4",
                 "mc_linear_int4_q8", "mc_linear_multi", "mc_linear_rows", "mc_decode_attention", "mc_decode_ffn",
                 "mc_decode_moe"):
        getattr(lib, name).restype = i32


def load(path: Path) -> ctypes.CDLL:
    """Load and bind a built library, then run the self-check; raises KernelError on any failure."""
    lib = ctypes.CDLL(str(path))
    _bind(lib)
    if lib.mc_abi_version() != ABI_VERSION:
        raise KernelError(f"library ABI {lib.mc_abi_version()} != {ABI_VERSION}")
    # Imported here: both import this module for the library state.
    from mixchat.speed.kernels.decode import check_struct_sizes
    from mixchat.speed.kernels.selfcheck import self_check

    check_struct_sizes(lib)
    self_check(lib)
    return lib


def _open(isa: str) -> tuple[ctypes.CDLL, str]:
    """The `isa` build, loaded and self-checked (once per process), and what reason() says of it; raises
    KernelError with the first failure."""
    if isa in _opened:
        return _opened[isa]
    if (why := _cannot_run(isa)) is not None:
        raise KernelError(why)
    flags = isa_flags(isa)
    # A compiler that rejects -march=native or -fopenmp (clang without libomp) still gets a working, if
    # slower, library; the other builds exist to pin one code path, so their -march stays.
    attempts = [flags]
    if "-march=native" in flags:
        attempts.append(tuple(f for f in flags if f != "-march=native"))
    attempts.append(tuple(f for f in attempts[-1] if f != "-fopenmp"))
    first: KernelError | None = None
    for attempt in attempts:
        try:
            lib = load(build(flags=attempt))
        except KernelError as e:
            first = first or KernelError(str(e).splitlines()[0])
            if not str(e).startswith("build failed"):
                break  # a compiler that does not run, or a library that fails its self-check: stop there
            continue
        except Exception as e:  # noqa: BLE001 - availability must never take the caller down with it
            first = first or KernelError(f"{type(e).__name__}: {e}".splitlines()[0])
            break
        notes = [f"{isa} build", SIMD_LEVELS.get(lib.mc_simd_level(), "unknown code")]
        if lib.mc_bf16dot():
            notes[-1] += "; vdpbf16ps for bf16"
        if isa == "native" and not lib.mc_simd():
            notes[-1] += ": the CPU or compiler lacks AVX2+FMA+F16C"
        if attempt != flags:
            notes.append(f"built without {' '.join(sorted(set(flags) - set(attempt)))}")
        _opened[isa] = lib, f"ok ({'; '.join(notes)})"
        return _opened[isa]
    raise first or KernelError("not built")


def _init() -> None:
    global _lib, _reason
    if not env_flag("MIXCHAT_KERNELS", True):
        _reason = "disabled by MIXCHAT_KERNELS=0"
        return
    try:
        _lib, _reason = _open(requested_isa())
    except (ValueError, KernelError) as e:
        _reason = str(e)


def _get() -> ctypes.CDLL | None:
    if _reason is None:
        with _lock:
            if _reason is None:
                _init()
    return _lib


def available() -> bool:
    """True when the compiled kernels are loaded and passed their self-check (builds on first call)."""
    return _get() is not None


def reason() -> str:
    """One line: 'ok (the build loaded, its code path)', or why the kernels are unavailable."""
    _get()
    return _reason or "not loaded"


def library() -> ctypes.CDLL | None:
    """The loaded library (whatever forced_isa swapped in), or None: what objects holding pointers into
    it (speed.decoder's fused layers) compare to see they are still current."""
    return _get()


def simd() -> bool:
    """Whether the loaded library runs the AVX2+FMA code, which the fused decode step (DecodeLayer) needs."""
    return (lib := _get()) is not None and bool(lib.mc_simd())


@contextlib.contextmanager
def forced_isa(isa: str) -> Iterator[None]:
    """Within the block the kernels run the `isa` build (see isa_flags) as if MIXCHAT_KERNEL_ISA chose it,
    so one machine takes every side of the CPU-dependent code; the process's own build comes back after.
    DecodeLayer/DecodeMoe objects keep the library they were made with. Raises KernelError where that
    build cannot be built or run here."""
    global _lib, _reason
    lib, why = _open(isa)
    with _lock:
        saved = _lib, _reason
        _lib, _reason = lib, why
    try:
        yield
    finally:
        with _lock:
            _lib, _reason = saved


def set_num_threads(n: int | None) -> None:
    """Threads per kernel call; None (the default) follows torch.get_num_threads()."""
    global _threads
    if n is not None and n < 1:
        raise ValueError(f"threads must be at least 1, not {n}")
    _threads = n


def get_num_threads() -> int:
    return _threads or torch.get_num_threads()


def reapply_settings() -> None:
    """Have the next call of each library set its thread count and prefetch distances again (from
    MIXCHAT_ROW_PREFETCH or the kept measurement, see prefetch.py): after a test or benchmark set them by hand."""
    _lib_threads.clear()


def set_gemm_min_rows(n: int) -> None:
    """From how many rows of x on the register-tiled GEMM replaces the matrix-vector kernels (benchmarks
    and tests move it; the default is where the two cross on an AVX2 EPYC)."""
    if n < 1:
        raise ValueError(f"rows must be at least 1, not {n}")
    if (lib := _get()) is not None:
        lib.mc_set_gemm_min_rows(n)


def bf16dot() -> bool:
    """Whether the loaded build has the prompt GEMM on vdpbf16ps (AVX512-BF16: x rounded to bf16, sums in
    fp32; gemm.c), which bf16 and int8 products of get_gemm_min_rows() rows or more take unless
    set_gemm_bf16dot(False)."""
    return (lib := _get()) is not None and bool(lib.mc_bf16dot())


def set_gemm_bf16dot(on: bool) -> None:
    """Whether prompts take the vdpbf16ps GEMM where the build has one (the default) or the fp32 one (to
    compare the two; tests take both)."""
    if (lib := _get()) is not None:
        lib.mc_set_gemm_bf16dot(int(on))


def simd_level() -> int:
    """The loaded build's row kernels: 0 scalar, 1 AVX2+FMA, 2 AVX-512, 3 AVX-512 with VNNI (see SIMD_LEVELS);
    -1 without the kernels."""
    return lib.mc_simd_level() if (lib := _get()) is not None else -1


def read_probe(gib: float = 1.0, threads: int | None = None, reps: int = 5,
               buffer: torch.Tensor | None = None) -> float:
    """The memory read rate in GB/s (1e9 bytes/s) that the loaded build's widest loads reach over a buffer of
    `gib` GiB (csrc/probe.c), best of `reps` passes, on `threads` threads (None: get_num_threads()): the
    ceiling the kernels' own read rates compare to. `buffer` (contiguous, at least 1 MiB) is read instead of
    a fresh one, for repeated short probes. Raises KernelError without the compiled kernels."""
    if (lib := _get()) is None:
        raise KernelError(reason())
    # in pages of the size the weights get (hugepages.empty), written so that every page is really there
    buf = buffer if buffer is not None else hugepages.empty((int(gib * (1 << 30)),)).fill_(1)
    if not buf.is_contiguous() or buf.device.type != "cpu":
        raise KernelError("read_probe: the buffer must be a contiguous CPU tensor")
    rate = lib.mc_read_probe(buf.data_ptr(), buf.nbytes, threads or get_num_threads(), reps)
    if rate < 0:
        raise KernelError(f"mc_read_probe failed with code {rate:.0f} ({buf.nbytes} bytes, reps={reps})")
    return rate


def set_transposed_split(over_k: bool) -> None:
    """How threads share a bf16 weight stored transposed (the torrent w2) for up to 8 rows of x: over K,
    each streaming whole rows of the stored tensor (the default, about twice the read rate), or over N
    (the older path, kept so tests and benchmarks can compare the two)."""
    if (lib := _get()) is not None:
        lib.mc_set_bf16t_ksplit(int(over_k))


def get_gemm_min_rows() -> int:
    lib = _get()
    return lib.mc_get_gemm_min_rows() if lib is not None else GEMM_MIN_ROWS



def settle() -> None:
    """Give the loaded library its thread count and prefetch distances now (measuring the prefetch the first
    time on this machine, about a second) rather than at its first product: before timed work."""
    if (lib := _get()) is not None:
        _settle(lib)


def _settle(lib: ctypes.CDLL) -> None:
    n = get_num_threads()
    if _lib_threads.get(lib._handle) == n:  # by handle: loading one file twice gives one C state
        return
    lib.mc_set_threads(n)
    # Imported here: it imports this module for the library state.
    from mixchat.speed.kernels.prefetch import apply

    apply(lib, n)
    _lib_threads[lib._handle] = n


def _call(lib: ctypes.CDLL, name: str, *args: object) -> None:
    _settle(lib)
    rc = getattr(lib, name)(*args)
    if rc != 0:
        raise KernelError(f"{name} failed with code {rc}")
