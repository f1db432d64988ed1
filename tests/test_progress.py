"""The progress bar long work draws on stderr, and what it tells a front end that draws its own."""

from __future__ import annotations

import io

from mixchat.progress import WIDTH, Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_bar_fits_80_columns_whatever_its_label():
    out = Terminal()
    label = "reading consolidated-00001-of-00019-with-a-very-long-name.safetensors"
    with Progress(label, 14.5e9, stream=out) as bar:
        bar.update(7e9)
    lines = [line for line in out.getvalue().replace("\n", "\r").split("\r") if line]
    assert lines and all(len(line) <= WIDTH for line in lines), [len(x) for x in lines]
    assert lines[-1].startswith("reading conso") and ".safetensors " in lines[-1] and " 48% 7.0 GB/14.5 GB" in lines[-1]
    short = Terminal()
    with Progress("quantizing to int4-128", 10, stream=short) as bar:
        bar.update(10)
    assert short.getvalue().strip().startswith("quantizing to int4-128 ")  # a short label is kept whole


def test_a_listener_hears_every_step_with_its_label_even_when_nothing_is_drawn():
    heard = []
    with Progress("checking a file", 300, stream=io.StringIO(), listener=lambda *a: heard.append(a)) as bar:
        for _ in range(3):
            bar.advance(100)
    assert heard == [("checking a file", 100, 300), ("checking a file", 200, 300), ("checking a file", 300, 300)]
