"""The coloured reply body wraps as it streams: what an append shows is what one wrap of the whole
text shows, and every character is kept."""

from __future__ import annotations

import asyncio
import random

import pytest
from rich.style import Style
from rich.text import Text
from textual.app import App

from mixchat.frontends.tui.tokentext import TokenText, wrap_offsets

PIECES = ["Hello", " world", ",", " this", " is", " a", " long", "er", " reply", "\n", "\n", "- item",
          " one\n", "supercalifragilisticexpialidocious" * 2, " 日本語", "のテキスト", " \t tab", "  ",
          " spaces   ", "end."]


def test_wrap_offsets_break_after_words_and_inside_long_ones():
    assert wrap_offsets("aaa bbb ccc", 7) == [8]  # "aaa bbb" fills the line; its space would not
    assert wrap_offsets("aaa bbb ccc", 6) == [4, 8]
    assert wrap_offsets("aaaaaaaaaa", 4) == [4, 8]
    assert wrap_offsets("日本語テキスト", 6) == [3, 6]  # two cells each
    assert wrap_offsets("short", 80) == []


def lines_of(widget: TokenText) -> list[str]:
    height = widget.get_content_height(None, None, widget.size.width)
    return [widget.render_line(y).text.rstrip() for y in range(height)]


@pytest.mark.parametrize("width", [9, 17, 40])
def test_appending_shows_what_one_wrap_shows(width):
    rng = random.Random(width)
    pieces = [rng.choice(PIECES) for _ in range(120)]

    class Two(App):
        CSS = f"TokenText {{ width: {width}; }}"

        def compose(self):
            yield TokenText(id="streamed")
            yield TokenText(id="whole")

    async def scenario():
        async with Two().run_test(size=(80, 200)) as pilot:
            streamed, whole = pilot.app.query_one("#streamed", TokenText), pilot.app.query_one("#whole", TokenText)
            await pilot.pause()
            full = Text()
            for i in range(0, len(pieces), 3):  # in batches, as the app draws them
                part = Text()
                for j, p in enumerate(pieces[i:i + 3]):
                    part.append(p, Style(bgcolor=f"color({(i + j) % 8 + 1})", meta={"@click": f"app.x({i + j})"}))
                full.append_text(part)
                streamed.append(part)
            whole.update(full)
            await pilot.pause()
            assert streamed.size.width == width
            shown = lines_of(streamed)
            assert shown == lines_of(whole)
            # No line is wider than the widget, and no character but a line's end spaces is lost.
            assert all(len(line) <= width for line in shown)
            assert "".join(shown).replace(" ", "") == full.plain.replace(" ", "").replace("\n", "").replace("\t", "")
            # Each token keeps its own style (its click action) on screen.
            actions = {seg.style.meta.get("@click") for y in range(len(shown))
                       for seg in streamed.render_line(y) if seg.style and seg.style.meta}
            assert {f"app.x({k})" for k, p in enumerate(pieces) if p.strip()} <= actions
            assert actions <= {f"app.x({k})" for k in range(len(pieces))}

    asyncio.run(scenario())

