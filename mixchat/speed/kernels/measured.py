"""Choices the kernels make by measuring this machine once: kept beside the loaded library, per thread count.

Some settings depend on the CPU in ways no feature flag tells (which prompt GEMM is faster, whether the row
kernels' software prefetch helps or hurts), so they are measured at first use and written to a small JSON
file in the library's build folder, which a change of source, compiler, flags or CPU replaces. Every later
process then makes the same choice without measuring; deleting the file measures again.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

_found: dict[tuple[str, int], dict] = {}  # (file, threads) -> the measurement
# One lock per kind of measurement: one thread measures, one that asks meanwhile waits for its answer. Per
# kind, because one measurement may need another (the prompt GEMMs' first kernel call sets the row prefetch).
_measuring: dict[str, threading.Lock] = {}
_locks_lock = threading.Lock()


def _lock(name: str) -> threading.Lock:
    with _locks_lock:
        return _measuring.setdefault(name, threading.Lock())


def choice_file(lib: object, name: str) -> Path | None:
    """Where the measurement `name` (a file name) for the loaded library `lib` is kept: beside it."""
    path = getattr(lib, "_name", None)
    return Path(path).parent / name if path else None


def kept(lib: object, name: str, threads: int, measure: Callable[[], dict],
         valid: Callable[[dict], bool]) -> dict:
    """The measurement `name` for `lib` at `threads` threads: this process's, the kept one where `valid` accepts
    it, or a new one from measure() (then kept)."""
    path = choice_file(lib, name)
    key = (str(path), threads)
    if (found := _found.get(key)) is None:
        with _lock(name):
            if (found := _found.get(key)) is None:
                data = _read(path)
                found = data.get(str(threads))
                if not isinstance(found, dict) or not valid(found):
                    found = measure()
                    data[str(threads)] = found
                    _write(path, data)
                _found[key] = found
    return found


def known(lib: object, name: str, threads: int) -> dict | None:
    """What kept() has given in this process for `lib`, `name` and `threads`, without measuring; None if nothing."""
    return _found.get((str(choice_file(lib, name)), threads))


def stamp() -> dict:
    """When a measurement is taken and how busy the machine was (the 1-minute load average against the CPUs):
    one taken beside other work can pick the wrong setting and is kept like any other, so `bench` shows it."""
    found: dict = {"measured": time.strftime("%Y-%m-%d %H:%M:%S"), "cpus": os.cpu_count() or 1}
    with contextlib.suppress(OSError, AttributeError):  # no load average on Windows
        found["load_average"] = round(os.getloadavg()[0], 2)
    return found


def when(found: dict) -> str:
    """'measured 2026-12-02 09:00:34 at load 0.41 on 2 CPUs' (the load where it was recorded)."""
    load = found.get("load_average")
    busy = f" at load {load:.2f} on {found.get('cpus', '?')} CPUs" if isinstance(load, (int, float)) else ""
    return f"measured {found.get('measured', '?')}{busy}"


def discard(lib: object, names: tuple[str, ...]) -> None:
    """Drop the kept measurements `names` of `lib` (every thread count; files and this process's answers), so
    the next kept() measures again: for a measurement taken while other work shared the machine."""
    for name in names:
        if (path := choice_file(lib, name)) is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        for key in [key for key in _found if key[0] == str(path)]:
            del _found[key]


def forget() -> None:
    """Drop this process's answers (tests: the next kept() reads the files again)."""
    _found.clear()


def _read(path: Path | None) -> dict:
    try:
        data = json.loads(path.read_text()) if path is not None else {}
    except (OSError, ValueError):
        return {}  # missing or damaged: measure again
    return data if isinstance(data, dict) else {}


def _write(path: Path | None, data: dict) -> None:
    if path is None:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    try:
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except OSError:  # a cache folder we cannot write: measure again next time, nothing lost
        with contextlib.suppress(OSError):  # on a read-only mount even unlinking a missing file fails
            tmp.unlink()
