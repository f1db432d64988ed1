"""What the Pilot tests share: waiting for a condition, sending a message and waiting for its reply, and
a widget's content as plain text, as given or as drawn."""

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


async def send(pilot, app, text: str) -> None:
    """Type `text` in the prompt, press Enter, and wait until its reply is written and saved."""
    app.prompt.focus()
    app.prompt.load_text(text)
    before = app.pane.reply if app.pane is not None else None
    await pilot.press("enter")
    pane = app.pane
    # A new reply: the previous turn's finished one would satisfy the rest before Enter has travelled
    # to the app on a starved machine.
    await wait_until(pilot, lambda: not pane.busy and pane.reply is not None and pane.reply is not before
                     and not pane.reply.streaming and pane.cid is not None)
    # What the reply's end queued (the sidebar's new rows compose a loop turn later, the reply's last
    # state) has run before the test reads it.
    await pilot.pause()


def region_lines(app, widget) -> list[str]:
    """The lines of text the screen shows in `widget`'s region, as drawn."""
    strips = app.screen._compositor.render_strips()
    r = widget.region
    return [s.crop(r.x, r.right).text for s in strips[r.y:r.bottom]]
