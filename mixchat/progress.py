"""A one-line progress bar on stderr for long work (reading weights, hashing, converting).

Silent when stderr is not a terminal, so piped and scripted runs stay clean.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

# What a long step reports to a front end that draws its own bar (the app): its label, then the
# units done and the total (bytes, unless the step counts something else).
ProgressListener = Callable[[str, int, int], None]


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


WIDTH = 79  # a bar that wraps in an 80-column terminal is redrawn on a new line at every update


def fitted(label: str, room: int) -> str:
    """`label` in at most `room` characters (at least 12): a long file name keeps its start and end."""
    room = max(room, 12)
    if len(label) <= room:
        return label
    head = (room - 1) // 2
    return label[:head] + "…" + label[len(label) - (room - 1 - head):]


class Progress:
    def __init__(self, label: str, total: float, unit: str = "B", stream: TextIO | None = None,
                 enabled: bool | None = None, listener: ProgressListener | None = None) -> None:
        self.label, self.total, self.unit, self.listener = label, max(total, 1), unit, listener
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.done = 0.0
        self.start = self._last = time.monotonic()

    def update(self, done: float) -> None:
        self.done = done
        if self.listener is not None:
            self.listener(self.label, int(done), int(self.total))
        now = time.monotonic()
        if self.enabled and (now - self._last > 0.1 or done >= self.total):
            self._last = now
            self._draw(now)

    def advance(self, n: float) -> None:
        self.update(self.done + n)

    def _fmt(self, n: float) -> str:
        return human_bytes(n) if self.unit == "B" else f"{int(n)}"

    def _draw(self, now: float) -> None:
        frac = min(self.done / self.total, 1.0)
        bar = "█" * int(frac * 16) + "·" * (16 - int(frac * 16))
        rate = self.done / max(now - self.start, 1e-6)
        speed = f"{human_bytes(rate)}/s" if self.unit == "B" else f"{rate:.1f} {self.unit}/s"
        figures = f" {bar} {frac:4.0%} {self._fmt(self.done)}/{self._fmt(self.total)} {speed}  "
        self.stream.write(f"\r{fitted(self.label, WIDTH - len(figures))}{figures}")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
