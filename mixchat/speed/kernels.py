"""Compiled kernels (mixchat/speed/csrc/gemv.c) for linear layers on CPU with bf16, int8 and int4 weights.

Decoding reads every weight once per token, so a token costs (weight bytes) / (memory bandwidth). On AVX2
machines torch's CPU kernels for these formats stream at a third to two thirds of what fp32 GEMV (MKL)
reaches; the matrix-vector kernels here come within 65-85% of it on one core, at 1.5-3x torch
(benchmarks/gemv.py), and read each weight once for up to 8 (bf16, int8) or 4 (int4) rows of x, so T = 4
costs little more than T = 1. From get_gemm_min_rows() rows of x on (prompts), a register-tiled GEMM
takes over: it converts 16 x 256 tiles of the weight to fp32 in L1 and runs at the FMA units' pace, so
prompts need no fp32 copy of any weight, whatever its format.

    linear_bf16(x, w)                          w bfloat16 [N, K], or the transpose of a contiguous [K, N]
    linear_int8(x, q, scale)                   q int8 [N, K], scale fp32 [N]
    linear_int4(x, packed, scale, zero, group) packed uint8 [N, K/2] (pack_int4), scale/zero fp32 [N, K/G]

    DecodeLayer(...), DecodeMoe(...)           one decoded token through a whole layer (csrc/decode.c)

x is [..., K] in any float dtype (computed in fp32); the result is fp32 [..., N]. Below the GEMM's row
count linear_int8 and linear_int4 round x to int8 per 32 columns unless exact=True (see linear_int4's
docstring for why and what it costs).

The C source is compiled on first use with the system C compiler (`gcc -O3 -march=native -fopenmp`) into
a cache folder keyed by source, compiler, flags and CPU, and loaded with ctypes (which releases the GIL
during the call). A self-check against torch runs once after loading. Without a compiler, on a failed
build or self-check, or with MIXCHAT_KERNELS=0, `available()` is False, `reason()` says why in one line,
and the `linear_*` functions still work through slow pure-torch equivalents.

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
import torch.nn.functional as F

from mixchat.paths import env_flag

SOURCE = Path(__file__).with_name("csrc") / "kernels.c"  # includes the other csrc/ parts
ISAS = ("native", "avx2", "portable")
_COMMON = ("-fopenmp", "-shared", "-fPIC", "-std=gnu11", "-fvisibility=hidden")
ABI_VERSION = 5  # must match MC_ABI_VERSION in csrc/common.h
INT4_GROUPS = (32, 64, 128)
MAX_ROWS = {"bf16": 8, "int8": 8, "int4": 8}  # rows of x served by one pass over the weight
GEMM_MIN_ROWS = 12  # the C side's default (mc_get_gemm_min_rows)

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
              model.py keeps its plain path with this build.
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
    """Compile gemv.c (or reuse the cached build) and return the path of the shared library.

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
    sources = (f.read_bytes() for f in sorted([*SOURCE.parent.glob("*.c"), *SOURCE.parent.glob("*.h")]))
    for part in (*sources, cc.encode(), version.encode(), " ".join(flags).encode(),
                 _cpu_signature().encode(), str(ABI_VERSION).encode()):
        key.update(part + b"\0")
    folder = (root or cache_root()) / key.hexdigest()[:24]
    lib = folder / "libgemv.so"
    if lib.exists():
        return lib
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".libgemv-", suffix=".so", dir=folder)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *flags, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True,
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
    lib.mc_set_threads.argtypes = [i32]
    lib.mc_get_threads.restype = i32
    lib.mc_set_gemm_min_rows.argtypes = [i32]
    lib.mc_get_gemm_min_rows.restype = i32
    lib.mc_set_bf16t_ksplit.argtypes = [i32]
    for name in ("mc_linear_bf16", "mc_linear_bf16_t"):
        getattr(lib, name).argtypes = [vp, i32, i64, vp, i64, vp]
    for name in ("mc_linear_int8", "mc_linear_int8_q8"):
        getattr(lib, name).argtypes = [vp, i32, i64, vp, vp, i64, vp]
    for name in ("mc_linear_int4", "mc_linear_int4_q8"):
        getattr(lib, name).argtypes = [vp, i32, i64, vp, vp, vp, i32, i64, vp]
    lib.mc_linear_multi.argtypes = [i32, vp, i32, i64, i32, vp, vp, vp, i32, vp, vp]
    lib.mc_decode_attention.argtypes = [vp, vp, vp, vp, vp, i32, i64, i64, i64, vp]
    lib.mc_decode_ffn.argtypes = [vp, vp]
    lib.mc_decode_moe.argtypes = [vp, vp, vp, vp, vp, i32]
    lib.mc_read_probe.argtypes, lib.mc_read_probe.restype = [vp, i64, i32, i32], ctypes.c_double
    for name in ("mc_linear_bf16", "mc_linear_bf16_t", "mc_linear_int8", "mc_linear_int8_q8", "mc_linear_int4",
                 "mc_linear_int4_q8", "mc_linear_multi", "mc_decode_attention", "mc_decode_ffn",
                 "mc_decode_moe"):
        getattr(lib, name).restype = i32


def load(path: Path) -> ctypes.CDLL:
    """Load and bind a built library, then run the self-check; raises KernelError on any failure."""
    lib = ctypes.CDLL(str(path))
    _bind(lib)
    if lib.mc_abi_version() != ABI_VERSION:
        raise KernelError(f"library ABI {lib.mc_abi_version()} != {ABI_VERSION}")
    _self_check(lib)
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
        notes = [f"{isa} build", "AVX2+FMA code" if lib.mc_simd() else "scalar code"]
        if isa == "native" and not lib.mc_simd():
            notes[-1] += ": the CPU or compiler lacks AVX2+FMA"
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
    it (model.py's fused decode layers) compare to see they are still current."""
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


def set_gemm_min_rows(n: int) -> None:
    """From how many rows of x on the register-tiled GEMM replaces the matrix-vector kernels (benchmarks
    and tests move it; the default is where the two cross on an AVX2 EPYC)."""
    if n < 1:
        raise ValueError(f"rows must be at least 1, not {n}")
    if (lib := _get()) is not None:
        lib.mc_set_gemm_min_rows(n)


def set_transposed_split(over_k: bool) -> None:
    """How threads share a bf16 weight stored transposed (the torrent w2) for up to 8 rows of x: over K,
    each streaming whole rows of the stored tensor (the default, about twice the read rate), or over N
    (the older path, kept so tests and benchmarks can compare the two)."""
    if (lib := _get()) is not None:
        lib.mc_set_bf16t_ksplit(int(over_k))


def read_probe(gib: float = 1.0, threads: int | None = None, reps: int = 5) -> float:
    """The memory read rate in GB/s (1e9 bytes/s) the widest loads of the loaded build reach over a buffer
    of `gib` GiB (csrc/probe.c), best of `reps` passes, with `threads` threads (None: get_num_threads()):
    the ceiling the kernels' read rates compare to. Raises KernelError without the compiled kernels."""
    if (lib := _get()) is None:
        raise KernelError(reason())
    buf = torch.ones(int(gib * (1 << 30)), dtype=torch.uint8)  # written, so every page is really there
    rate = lib.mc_read_probe(buf.data_ptr(), buf.numel(), threads or get_num_threads(), reps)
    if rate < 0:
        raise KernelError(f"mc_read_probe failed with code {rate:.0f} (gib={gib}, reps={reps})")
    return rate


def get_gemm_min_rows() -> int:
    lib = _get()
    return lib.mc_get_gemm_min_rows() if lib is not None else GEMM_MIN_ROWS


def _rounds_x(exact: bool, rows: int, k: int, kind: str = "int8") -> bool:
    """Whether linear_int8/int4 round x to int8 per 32 columns. int8: only where the matrix-vector kernels
    run (from the GEMM's row count on the fp32 GEMM is faster). int4: always (unless exact), since its
    integer kernel, taking 8 rows of x per pass, also beats the GEMM on prompts (126-141 against 113-116
    GFLOP/s on a 7B's shapes, 128 rows, 2 AVX2 cores)."""
    return not exact and k % 32 == 0 and (kind == "int4" or rows < get_gemm_min_rows())


# ----------------------------------------------------------------------------------------------------
# Argument checks and calls
# ----------------------------------------------------------------------------------------------------


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


def _call(lib: ctypes.CDLL, name: str, *args: object) -> None:
    n = get_num_threads()
    if _lib_threads.get(lib._handle) != n:  # by handle: loading one file twice gives one C state
        lib.mc_set_threads(n)
        _lib_threads[lib._handle] = n
    rc = getattr(lib, name)(*args)
    if rc != 0:
        raise KernelError(f"{name} failed with code {rc}")


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


def linear_int8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, exact: bool = False) -> torch.Tensor:
    """y = (x @ q.T) * scale in fp32. q int8 [N, K], scale float32 [N].
    Like linear_int4, and like llama.cpp's Q8_0, x is rounded to int8 per 32 columns for products of
    fewer rows than the GEMM takes (K % 32 == 0): with fp32 x a core converts only about 4 weights per
    cycle, under the memory read rate, while integer multiply-adds keep up with it. exact=True keeps x
    in fp32."""
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


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[N, K] integers in 0..15 -> uint8 [N, K/2], q[:, 2j] in the low nibble and q[:, 2j+1] in the high."""
    if q.dim() != 2 or q.shape[1] % 2:
        raise ValueError(f"q must be [N, K] with K even, not {tuple(q.shape)}")
    if q.is_floating_point() or q.dtype == torch.bool:
        raise TypeError(f"q must be an integer tensor, not {q.dtype}")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise ValueError("q values must be in 0..15")
    q8 = q.to(torch.uint8)
    return (q8[:, 0::2] | (q8[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> uint8 [N, K] in 0..15 (inverse of pack_int4)."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).view(packed.shape[0], -1)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    """The fp32 weight [N, K]: (q - 8) * scale + zero, per group of `group` along K."""
    q = unpack_int4(packed).float()
    n, k = q.shape
    g = q.view(n, k // group, group)
    return ((g - 8) * scale[..., None] + zero[..., None]).view(n, k)


def q8_block(group: int) -> int:
    """Columns of x per int8 scale in linear_int4's default path: a whole group for groups of 128 (the
    kernel then adds a group's integer products before converting them), 32 otherwise."""
    return 128 if group == 128 else 32


def quantize_x_q8(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """What linear_int4's default path does to x, in torch: round x [T, K] (K % 32 == 0) to int8 in blocks
    of 32 with scale max|x| / 127, and return the dequantised fp32 values (for references and error checks)."""
    t, k = x.shape
    b = x.float().reshape(t, k // block, block)
    # Same arithmetic as the C side: v = rint(x * (127 / amax)), clamped to +-127, then v * (amax / 127).
    amax = b.abs().amax(dim=-1, keepdim=True)
    d = amax / 127
    # a true division: `127 / amax` would run as reciprocal(amax) * 127, one more rounding than the C
    # side's, which flips values a hair from .5 (seen: -117.49998 rounded the other way)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    v = torch.round(b * inv).clamp_(-127, 127)
    return (v * d).reshape(t, k)


def linear_int4(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int,
                exact: bool = False) -> torch.Tensor:
    """y = x @ w.T with w = (q - 8) * scale + zero per group of `group` along K, in fp32.

    packed uint8 [N, K/2] (see pack_int4), scale and zero float32 [N, K/G]; K % 64 == 0, group in 32/64/128.

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
        _check_weight(t, name, torch.float32)
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
MULTI_MAX = 8  # MC_MULTI_MAX in gemv.c


def linear_many(x: torch.Tensor, kind: str, weights: list[tuple[torch.Tensor, ...]],
                group: int = 0) -> list[torch.Tensor]:
    """[linear_bf16 / linear_int8 / linear_int4 of x with each weight], in one kernel call.

    weights holds (w,) for bf16 (contiguous), (q, scale) for int8, (packed, scale, zero) for int4 (all
    with the same group). Same results as the single calls (int8/int4 round x the same way), but x is
    prepared once and the threads run through all the weights in one parallel region instead of meeting
    after each: for one decoded token that is the q/k/v and the w1/w3 products of every layer."""
    if kind not in _MULTI_KINDS:
        raise ValueError(f"kind must be one of {sorted(_MULTI_KINDS)}, not {kind!r}")
    if not 1 <= len(weights) <= MULTI_MAX:
        raise ValueError(f"between 1 and {MULTI_MAX} weights, not {len(weights)}")
    dtype = {"bf16": torch.bfloat16, "int8": torch.int8, "int4": torch.uint8}[kind]
    for parts in weights:
        _check_weight(parts[0], "w", dtype)
    k = weights[0][0].shape[1] * (2 if kind == "int4" else 1)
    if any(p[0].shape[1] * (2 if kind == "int4" else 1) != k for p in weights):
        raise ValueError("the weights of linear_many must share K")
    if kind == "int4":
        _check_int4_k(k, group)
    for parts in weights:
        for name, t in zip(("scale", "zero"), parts[1:], strict=False):
            _check_weight(t, name, torch.float32, dim=1 if kind == "int8" else 2)
            if t.shape[0] != parts[0].shape[0]:
                raise ValueError(f"{name} has {t.shape[0]} rows, the weight {parts[0].shape[0]}")
    return linear_many_lib(_get(), x, kind, weights, group, k)


def linear_many_lib(lib: ctypes.CDLL | None, x: torch.Tensor, kind: str, weights: list[tuple[torch.Tensor, ...]],
                    group: int = 0, k: int | None = None) -> list[torch.Tensor]:
    """linear_many's call into a given library (the self-check's, before the module has one); no checks."""
    k = k or weights[0][0].shape[1] * (2 if kind == "int4" else 1)
    x2 = _rows(x, k)
    if lib is None or x2.shape[0] == 0:
        single = {"bf16": lambda p: linear_bf16(x2, *p), "int8": lambda p: linear_int8(x2, *p),
                  "int4": lambda p: linear_int4(x2, *p, group)}[kind]
        return [_shaped(single(p), x) for p in weights]
    n, ns = len(weights), [p[0].shape[0] for p in weights]
    ys = [torch.empty(x2.shape[0], m, dtype=torch.float32) for m in ns]
    arr = ctypes.c_void_p * n
    scales = arr(*(p[1].data_ptr() for p in weights)) if kind != "bf16" else None
    zeros = arr(*(p[2].data_ptr() for p in weights)) if kind == "int4" else None
    args = (_MULTI_KINDS[kind], _ptr(x2), x2.shape[0], k, n, arr(*(p[0].data_ptr() for p in weights)), scales, zeros,
            group, (ctypes.c_int64 * n)(*ns), arr(*(y.data_ptr() for y in ys)))
    if lib is _lib:
        _call(lib, "mc_linear_multi", *args)
    elif (rc := lib.mc_linear_multi(*args)) != 0:  # the self-check's library keeps its own thread count
        raise KernelError(f"mc_linear_multi failed with code {rc}")
    return [_shaped(y, x) for y in ys]


# ----------------------------------------------------------------------------------------------------
# Self-check
# ----------------------------------------------------------------------------------------------------


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
    s, z = scale[..., None], zero[..., None]
    return torch.maximum(s.abs() * q + (z - 8 * s).abs(), (s * (q - 8)).abs() + z.abs()).view(n, k)


def _self_check(lib: ctypes.CDLL) -> None:
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
            _close(f"bf16 T={t} N={n} K={k}", y, x, w.float())

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
                    sc = torch.rand(n, k // g, generator=gen) + 0.1
                    zp = torch.randn(n, k // g, generator=gen)
                    w4, w4_abs = dequantize_int4(packed, sc, zp, g), _int4_abs(packed, sc, zp, g)
                    for fn, xr in (("mc_linear_int4", x), ("mc_linear_int4_q8", quantize_x_q8(x, q8_block(g)))):
                        if getattr(lib, fn)(_ptr(x), t, k, _ptr(packed), _ptr(sc), _ptr(zp), g, n, _ptr(y)) != 0:
                            raise KernelError(f"self-check failed: {fn} refused valid arguments")
                        _close(f"{fn} T={t} N={n} K={k} G={g}", y, xr, w4, w4_abs)
        # Several weights in one call (one per format), against the single-weight kernels.
        x = torch.randn(2, 128, generator=gen)
        ws = [torch.randn(n, 128, generator=gen).to(torch.bfloat16) for n in (24, 40)]
        for got, w in zip(linear_many_lib(lib, x, "bf16", [(w,) for w in ws]), ws, strict=True):
            _close("multi bf16", got, x, w.float())
        qs = [(torch.randint(-127, 128, (n, 128), generator=gen, dtype=torch.int8), torch.rand(n, generator=gen) + 0.1)
              for n in (24, 40)]
        for got, (q, s) in zip(linear_many_lib(lib, x, "int8", qs), qs, strict=True):
            _close("multi int8", got, quantize_x_q8(x), q.float() * s[:, None])
        p4 = [(pack_int4(torch.randint(0, 16, (n, 128), generator=gen)), torch.rand(n, 4, generator=gen) + 0.1,
               torch.randn(n, 4, generator=gen)) for n in (24, 40)]
        for got, (pk, sc, zp) in zip(linear_many_lib(lib, x, "int4", p4, 32), p4, strict=True):
            _close("multi int4", got, quantize_x_q8(x), dequantize_int4(pk, sc, zp, 32), _int4_abs(pk, sc, zp, 32))
        # The GEMM path (many rows of x): partial tiles in T and N, K not a multiple of its block.
        t, n, k = 2 * lib.mc_get_gemm_min_rows() + 1, 40, 320
        x = torch.randn(t, k, generator=gen)
        y = torch.empty(t, n)
        w = torch.randn(n, k, generator=gen).to(torch.bfloat16)
        lib.mc_linear_bf16(_ptr(x), t, k, _ptr(w), n, _ptr(y))
        _close(f"bf16 GEMM T={t} N={n} K={k}", y, x, w.float())
        wt = torch.randn(k, n, generator=gen).to(torch.bfloat16)
        for rows in (1, t):
            lib.mc_linear_bf16_t(_ptr(x), rows, k, _ptr(wt), n, _ptr(y))
            _close(f"bf16 transposed T={rows} N={n} K={k}", y[:rows], x[:rows], wt.float().T)
        q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
        s = torch.rand(n, generator=gen) + 0.1
        lib.mc_linear_int8(_ptr(x), t, k, _ptr(q), _ptr(s), n, _ptr(y))
        _close(f"int8 GEMM T={t} N={n} K={k}", y, x, q.float() * s[:, None])
        packed = pack_int4(torch.randint(0, 16, (n, k), generator=gen))
        sc, zp = torch.rand(n, k // 64, generator=gen) + 0.1, torch.randn(n, k // 64, generator=gen)
        w4, w4_abs = dequantize_int4(packed, sc, zp, 64), _int4_abs(packed, sc, zp, 64)
        lib.mc_linear_int4(_ptr(x), t, k, _ptr(packed), _ptr(sc), _ptr(zp), 64, n, _ptr(y))
        _close(f"int4 GEMM T={t} N={n} K={k}", y, x, w4, w4_abs)
        lib.mc_linear_int4_q8(_ptr(x), t, k, _ptr(packed), _ptr(sc), _ptr(zp), 64, n, _ptr(y))  # 8-row slices
        _close(f"int4 Q8 T={t} N={n} K={k}", y, quantize_x_q8(x), w4, w4_abs)
    finally:
        lib.mc_set_threads(saved)


# ----------------------------------------------------------------------------------------------------
# One decoded token through a whole layer (csrc/decode.c)
# ----------------------------------------------------------------------------------------------------


class _LayerStruct(ctypes.Structure):
    """mc_layer in csrc/decode.c, field for field."""

    _fields_ = [*((name, ctypes.c_int32) for name in ("kind", "group", "n_heads", "n_kv_heads", "head_dim", "has_ffn",
                                                      "norm_bf16", "unused")),
                ("dim", ctypes.c_int64), ("hidden", ctypes.c_int64), ("eps", ctypes.c_float),
                ("attn_norm", ctypes.c_void_p), ("ffn_norm", ctypes.c_void_p), ("w", ctypes.c_void_p * 7),
                ("scale", ctypes.c_void_p * 7), ("zero", ctypes.c_void_p * 7)]


_CACHE_DTYPES = {torch.bfloat16: 1, torch.float32: 0}  # KV cache and norm weights: the "is bf16" flag


def _simd_lib() -> ctypes.CDLL:
    lib = _get()
    if lib is None or not lib.mc_simd():
        raise ValueError("the compiled AVX2+FMA kernels are not loaded")
    return lib


def _check_decode_k(kind: str, k: int, group: int) -> None:
    """What the one-pass kernels need of K for a weight in `kind` (decode.c's layer_ok and mc_decode_moe)."""
    if kind == "int4":
        _check_int4_k(k, group)
    elif kind == "int8" and k % 32:
        raise ValueError(f"int8 decode needs K % 32 == 0 (K={k})")


def _check_parts(kind: str, parts: list[tuple[torch.Tensor, ...]], shapes: list[tuple[int, int]],
                 transposed: int | None = None) -> None:
    """Kernel parts (see linear_many) in `kind` for weights of logical shapes [N, K]; parts[transposed], if
    given, is the [N, K] view of a contiguous bf16 [K, N] tensor (the torrent layout's w2)."""
    wide = 2 if kind == "int4" else 1
    dtype = {"bf16": torch.bfloat16, "int8": torch.int8, "int4": torch.uint8}[kind]
    for i, (p, (n, k)) in enumerate(zip(parts, shapes, strict=True)):
        _check_weight(p[0].t() if i == transposed else p[0], "w", dtype)
        if tuple(p[0].shape) != (n, k // wide):
            raise ValueError(f"weight of shape {list(p[0].shape)} where the layer needs {[n, k // wide]}")
        for t in p[1:]:
            _check_weight(t, "scale", torch.float32, dim=t.dim())


class DecodeLayer:
    """A transformer layer as csrc/decode.c takes it: for one decoded token, the attention block and the
    dense feed-forward are one call each (norm, products, rotary, cache write, attention, activation and
    residual in C) instead of about forty torch ops.

    attn holds the kernel parts (see linear_many) of wq, wk, wv, wo; ffn those of w1, w2, w3, or None
    (MoE layers: the experts stay in Python). All in one format. Raises ValueError for anything the C
    side does not take, so the caller can keep the plain path.
    """

    def __init__(self, kind: str, group: int, n_heads: int, n_kv_heads: int, head_dim: int, eps: float,
                 attn_norm: torch.Tensor, ffn_norm: torch.Tensor, attn: list[tuple[torch.Tensor, ...]],
                 ffn: list[tuple[torch.Tensor, ...]] | None) -> None:
        lib = _simd_lib()
        if kind not in _MULTI_KINDS:
            raise ValueError(f"kind must be one of {sorted(_MULTI_KINDS)}, not {kind!r}")
        dim, qd, kvd = attn_norm.shape[0], n_heads * head_dim, n_kv_heads * head_dim
        parts = attn + (ffn or [])
        hidden = ffn[0][0].shape[0] if ffn else 0
        want = [(qd, dim), (kvd, dim), (kvd, dim), (dim, qd)] + ([(hidden, dim), (dim, hidden), (hidden, dim)] if ffn
                                                                 else [])
        for _, k in want:
            _check_decode_k(kind, k, group)
        _check_parts(kind, parts, want)
        norms = (attn_norm, ffn_norm)
        if any(w.dtype != attn_norm.dtype or w.dtype not in _CACHE_DTYPES or not w.is_contiguous() or not w.is_cpu
               or tuple(w.shape) != (dim,) for w in norms):
            raise ValueError("the norm weights must be contiguous [dim] tensors, both bf16 or both fp32")
        self._parts, self._norms = parts, norms  # the C side holds their pointers: keep them alive
        s = _LayerStruct(kind=_MULTI_KINDS[kind], group=group, n_heads=n_heads, n_kv_heads=n_kv_heads,
                         head_dim=head_dim, has_ffn=int(ffn is not None),
                         norm_bf16=_CACHE_DTYPES[attn_norm.dtype], dim=dim, hidden=hidden, eps=eps,
                         attn_norm=attn_norm.data_ptr(), ffn_norm=ffn_norm.data_ptr())
        order = [0, 1, 2, 3] + ([4, 5, 6] if ffn else [])
        for i, p in zip(order, parts, strict=True):
            s.w[i] = p[0].data_ptr()
            if len(p) > 1:
                s.scale[i] = p[1].data_ptr()
            if len(p) > 2:
                s.zero[i] = p[2].data_ptr()
        self._struct = s
        self._ref = ctypes.byref(s)
        self._lib = lib
        self.has_ffn = ffn is not None
        self.moe: DecodeMoe | None = None  # set by the caller for a MoE layer the C side takes whole

    def attention(self, h: torch.Tensor, rotation: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot: int, length: int, mask: torch.Tensor | None) -> None:
        """h (fp32 [1, dim], contiguous) += the attention block for one token at cache slot `slot`.
        rotation: complex64 [1, head_dim/2]; k_cache/v_cache: this layer's [n_kv_heads, capacity, head_dim]
        (bf16 or fp32); attention reads slots [0, length), mask (bool [1, length]) says which."""
        _call(self._lib, "mc_decode_attention", self._ref, h.data_ptr(), rotation.data_ptr(), k_cache.data_ptr(),
              v_cache.data_ptr(), _CACHE_DTYPES[k_cache.dtype], k_cache.shape[1], slot, length,
              None if mask is None else mask.data_ptr())

    def ffn(self, h: torch.Tensor) -> None:
        """h (fp32 [1, dim], contiguous) += the dense feed-forward of one token."""
        _call(self._lib, "mc_decode_ffn", self._ref, h.data_ptr())

    @staticmethod
    def takes(h: torch.Tensor, k_cache: torch.Tensor) -> bool:
        """Whether a step with this residual and cache can go through DecodeLayer."""
        return h.dtype == torch.float32 and h.shape[0] == 1 and h.is_contiguous() and h.is_cpu \
            and k_cache.dtype in _CACHE_DTYPES and k_cache.is_contiguous()


class _MoeStruct(ctypes.Structure):
    """mc_moe in csrc/decode.c, field for field."""

    _fields_ = [*((name, ctypes.c_int32) for name in ("kind", "group", "n_experts", "top_k", "norm_bf16",
                                                      "w2_transposed")),
                ("dim", ctypes.c_int64), ("hidden", ctypes.c_int64), ("eps", ctypes.c_float),
                ("ffn_norm", ctypes.c_void_p), ("gate", ctypes.c_void_p), ("w", ctypes.c_void_p),
                ("scale", ctypes.c_void_p), ("zero", ctypes.c_void_p)]


class DecodeMoe:
    """A Mixtral feed-forward as csrc/decode.c takes it: for one decoded token, norm, router, top-k and the
    chosen experts in one call. gate: the bf16 router [n_experts, dim]; experts: per expert the kernel parts
    of w1, w2, w3 (see linear_many), all in one format; w2_transposed: every w2 is the [dim, hidden] view of
    a contiguous bf16 [hidden, dim] tensor (the torrent layout). Experts loaded on demand: kind None and
    every expert None; they come through __call__'s fetch, the first of them setting the format. Raises
    ValueError for anything the C side does not take."""

    def __init__(self, kind: str | None, group: int, top_k: int, eps: float, ffn_norm: torch.Tensor,
                 gate: torch.Tensor, experts: list[tuple[tuple[torch.Tensor, ...], ...] | None],
                 w2_transposed: bool = False) -> None:
        lib = _simd_lib()
        _check_weight(gate, "gate", torch.bfloat16)
        n_experts, dim = gate.shape
        if len(experts) != n_experts or not 1 <= top_k <= n_experts or n_experts > 256:
            raise ValueError(f"{len(experts)} experts for a router of {n_experts}, top {top_k}")
        if ffn_norm.dtype not in _CACHE_DTYPES or not ffn_norm.is_contiguous() or tuple(ffn_norm.shape) != (dim,):
            raise ValueError("the norm weight must be a contiguous bf16 or fp32 [dim] tensor")
        self._dims = (dim, 0)
        self._kind: str | None = None
        arr = ctypes.c_void_p * (3 * n_experts)
        self._w, self._scale, self._zero = arr(), arr(), arr()
        self._experts: list = [None] * n_experts  # the C side holds their pointers: keep them alive
        self._keep = (gate, ffn_norm)
        s = _MoeStruct(n_experts=n_experts, top_k=top_k, norm_bf16=_CACHE_DTYPES[ffn_norm.dtype], dim=dim, eps=eps,
                       ffn_norm=ffn_norm.data_ptr(), gate=gate.data_ptr(), w=ctypes.addressof(self._w),
                       scale=ctypes.addressof(self._scale), zero=ctypes.addressof(self._zero))
        self._struct, self._ref, self._lib, self.top_k = s, ctypes.byref(s), lib, top_k
        if kind is not None:
            known = [ex for ex in experts if ex is not None]
            if len(known) != n_experts:
                raise ValueError("resident experts must all be given")
            self._configure((kind, group, w2_transposed), known[0])
            for e, ex in enumerate(known):
                self._check_expert(ex)
                self._set(e, ex)

    def _configure(self, fmt: tuple[str, int, bool], ex: tuple[tuple[torch.Tensor, ...], ...]) -> None:
        """Set the experts' format from (kind, group, w2 transposed) and one expert's parts."""
        kind, group, transposed = fmt
        if kind not in _MULTI_KINDS or (transposed and kind != "bf16"):
            raise ValueError(f"kind must be one of {sorted(_MULTI_KINDS)} (bf16 for a transposed w2), not {kind!r}")
        dim, hidden = self._dims[0], ex[0][0].shape[0]
        for k in (dim, hidden):
            _check_decode_k(kind, k, group)
        self._kind, self._transposed, self._dims = kind, transposed, (dim, hidden)
        st = self._struct
        st.kind, st.group, st.w2_transposed, st.hidden = _MULTI_KINDS[kind], group, int(transposed), hidden
        self._fmt = fmt

    def _check_expert(self, ex: tuple[tuple[torch.Tensor, ...], ...]) -> None:
        dim, hidden = self._dims
        _check_parts(self._kind, list(ex), [(hidden, dim), (dim, hidden), (hidden, dim)],
                     transposed=1 if self._transposed else None)

    def _set(self, e: int, ex: tuple[tuple[torch.Tensor, ...], ...]) -> None:
        for i, p in enumerate(ex):
            self._w[3 * e + i] = p[0].data_ptr()
            self._scale[3 * e + i] = p[1].data_ptr() if len(p) > 1 else None
            self._zero[3 * e + i] = p[2].data_ptr() if len(p) > 2 else None
        self._experts[e] = ex

    def __call__(self, h: torch.Tensor, fetch=None) -> tuple[torch.Tensor, torch.Tensor]:
        """h (fp32 [1, dim], contiguous) += the MoE feed-forward; returns the chosen experts (int64 [1, top_k],
        best first) and their mixing weights (fp32 [1, top_k]), as MoeFeedForward does.

        fetch(xn, chosen) -> per chosen expert ((kind, group, w2 transposed), the parts of w1, w2, w3): for
        experts loaded on demand, called between routing and the experts (xn: the normed input, fp32 [1, dim],
        for predicting the next layer). The first fetched expert sets the format when kind was None."""
        chosen = torch.empty(1, self.top_k, dtype=torch.int64)
        weights = torch.empty(1, self.top_k, dtype=torch.float32)
        xn = torch.empty(1, self._dims[0], dtype=torch.float32)
        args = (self._ref, h.data_ptr(), xn.data_ptr(), chosen.data_ptr(), weights.data_ptr())
        if fetch is None:
            _call(self._lib, "mc_decode_moe", *args, 3)
            return chosen, weights
        _call(self._lib, "mc_decode_moe", *args, 1)
        ids = chosen[0].tolist()
        for e, (fmt, ex) in zip(ids, fetch(xn, ids), strict=True):
            if self._kind is None:
                self._configure(fmt, ex)
            elif fmt != self._fmt:
                raise ValueError(f"an expert in format {fmt}, the others in {self._fmt}")
            self._check_expert(ex)
            self._set(e, ex)
        try:
            _call(self._lib, "mc_decode_moe", *args, 2)
        finally:  # hold no expert past the call: the on-demand cache must be able to free it
            for e in ids:
                self._w[3 * e: 3 * e + 3] = [None] * 3
                self._experts[e] = None
        return chosen, weights
