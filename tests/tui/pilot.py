"""What the Pilot tests share: waiting for a condition, and a widget's content as plain text."""

from __future__ import annotations

import os
import time


async def wait_until(pilot, condition, timeout: float = 60.0, step: float = 0.05) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError("timed out waiting")
        await pilot.pause(step)


def plain(widget, width: int = 300) -> str:
    """What a Static shows, as plain text: its content printed to a recording console (wide, for
    text that wraps on screen)."""
    from rich.console import Console

    console = Console(width=width, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(widget.content)
    return console.export_text()
