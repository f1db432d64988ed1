"""Copying text out of a terminal app: OSC 52 first (works over ssh in most terminals), then a
clipboard tool if one is installed. Never raises: a failure is for the caller to report."""

from __future__ import annotations

import shutil
import subprocess

TOOLS = (["wl-copy"], ["xclip", "-selection", "clipboard"], ["xsel", "-ib"], ["pbcopy"])


def copy(app, text: str) -> list[str]:
    """Returns the ways the text was handed over (empty if none worked)."""
    ways = []
    try:
        app.copy_to_clipboard(text)  # OSC 52
        ways.append("OSC 52")
    except Exception:  # noqa: BLE001 - a terminal that cannot take it must not crash the app
        pass
    for tool in TOOLS:
        if shutil.which(tool[0]):
            try:
                subprocess.run(tool, input=text.encode(), timeout=3, check=True, capture_output=True)
                ways.append(tool[0])
                break
            except (OSError, subprocess.SubprocessError):
                continue
    return ways
