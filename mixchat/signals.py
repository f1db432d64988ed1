"""Signals while the model writes, one policy for the one-shot command and line mode.

Ctrl+C (SIGINT), SIGTERM (a `kill`, a service manager stopping it) and SIGHUP (the terminal or ssh
session went away) all mean "stop": the first asks the generator to stop after the current token, so
the partial reply is kept, marked stopped, saved with its KV cache, and the summary printed; a second
one aborts at once (KeyboardInterrupt). The exit status then says which signal it was (128 + its
number, as shells report it).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Terminated(BaseException):  # noqa: N818 - like KeyboardInterrupt, what it says is what happened
    """SIGTERM or SIGHUP arrived while nothing was being generated (e.g. at the line-mode prompt)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class StopOnSignals:
    """`with StopOnSignals() as stop:` pass `stop.event` to the generator as its cancel flag."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def __enter__(self) -> StopOnSignals:
        # Only the main thread may install handlers (tests drive front ends from other threads).
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.event.is_set():
            raise KeyboardInterrupt
        self.signum = signum
        self.event.set()

    def __exit__(self, *exc: object) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()

    @property
    def exit_code(self) -> int | None:
        """128 + the signal's number once one arrived (130 for Ctrl+C), else None."""
        return 128 + self.signum if self.signum is not None else None

    @property
    def terminated(self) -> bool:
        """True for SIGTERM/SIGHUP: the whole program should end, not only the reply."""
        return self.signum is not None and self.signum != signal.SIGINT


class TerminateOnSignals:
    """Between replies (line mode's prompt): SIGTERM and SIGHUP raise Terminated where the program
    is, so it unwinds through its `finally` blocks (the terminal is restored) instead of dying."""

    def __enter__(self) -> TerminateOnSignals:
        self._old: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                if s != signal.SIGINT:
                    self._old[s] = signal.signal(s, self._handle)
        return self

    @staticmethod
    def _handle(signum: int, frame: FrameType | None) -> None:
        raise Terminated(signum)

    def __exit__(self, *exc: object) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
