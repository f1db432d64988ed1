"""A reply drawn as coloured tokens, appended to while it streams.

A Static re-wraps and re-renders its whole Text on every update: for a reply whose every token is
its own coloured, clickable span that cost grew with the reply and, on two cores, took the CPU the
decode threads needed (the reply streamed at half the speed of the one-shot command). This widget
wraps once: the lines above the last one are kept as rendered strips, and an append re-wraps only
from the start of the last line. Greedy wrapping decides each break from the text before it, so the
lines kept are the ones a full wrap would make."""

from __future__ import annotations

import re

from rich.cells import cell_len
from rich.style import Style
from rich.text import Text
from textual.geometry import Region, Size
from textual.strip import Strip
from textual.widget import Widget

_WORD = re.compile(r"\S*\s*")


def wrap_offsets(line: str, width: int) -> list[int]:
    """Where a line without line ends breaks to fit `width` cells: after whole words (their
    trailing spaces stay on the line, past the edge if need be), and inside a word wider than the
    line."""
    breaks: list[int] = []
    used = 0
    for match in _WORD.finditer(line):
        word = match.group()
        if not word:
            continue
        start = match.start()
        word_cells = cell_len(word.rstrip())
        if used and used + word_cells > width:
            breaks.append(start)
            used = 0
        if word_cells > width:  # fold: as many characters as fit, then the next line
            for i, ch in enumerate(word.rstrip()):
                w = cell_len(ch)
                if used and used + w > width:
                    breaks.append(start + i)
                    used = 0
                used += w
            used += cell_len(word) - word_cells
        else:
            used += cell_len(word)
    return breaks


def _cells(text: Text) -> Text:
    """A copy of `text` whose every character is drawn in the cells it is counted for: a tab is
    four spaces (not a tab stop, which would depend on where the piece it came in began)."""
    if "\t" not in text.plain:
        return text.copy()
    return Text("    ").join(text.split("\t", allow_blank=True))


class TokenText(Widget):
    """Rich Text shown wrapped to the widget's width; `append` adds to its end cheaply."""

    DEFAULT_CSS = "TokenText { height: auto; }"

    def __init__(self, text: Text | None = None, **kw) -> None:
        super().__init__(**kw)
        self.text = _cells(text or Text())
        self._width = -1
        self._strips: list[Strip] = []  # every wrapped line but the last, rendered
        self._rest = Text()  # the last line, after those: re-wrapping starts here; rendered when drawn
        self._style = Style()

    def update(self, text: Text) -> None:
        """Show another Text (a recolouring): wrapped again from the start."""
        self.text, self._width = _cells(text), -1
        self.refresh(layout=True)

    def append(self, text: Text) -> None:
        """Add to the end (the spans keep their styles); only the last line is wrapped again."""
        lines_before = len(self._strips)
        text = _cells(text)
        self.text.append_text(text)
        self._rest.append_text(text)
        if self._width >= 0:
            self._wrap(self._width)
        if len(self._strips) != lines_before or self._width < 0:
            self.refresh(layout=True)
        else:
            self.refresh()

    def _wrap(self, width: int) -> None:
        if width != self._width:
            self._width, self._strips, self._rest = width, [], self.text.copy()
        if width < 1:  # not laid out yet
            return
        tail = self._rest
        starts: list[int] = []  # where each wrapped line begins in `tail`
        pos = 0
        for para in tail.plain.split("\n"):
            starts.extend(pos + cut for cut in (0, *wrap_offsets(para, width)))
            pos += len(para) + 1
        # One divide for all the lines: slicing a Text goes through all its spans each time.
        lines = list(tail.divide(starts[1:]))
        # All but the last line are final: render them once. Each but the last ends in its "\n"
        # where a paragraph ends.
        console = self.app.console
        for line in lines[:-1]:
            if line.plain.endswith("\n"):
                line.right_crop(1)
            line.rstrip_end(width)
            self._strips.append(Strip(list(line.render(console)), cell_len(line.plain)))
        self._rest = lines[-1]

    def get_content_height(self, container: Size, viewport: Size, width: int) -> int:
        if width != self._width:
            self._wrap(width)
        return len(self._strips) + 1

    def render_lines(self, crop: Region) -> list[Strip]:
        # The widget's style (its background under uncoloured text) once per redraw, not per line:
        # it is worked out through every ancestor.
        self._style = self.rich_style
        return super().render_lines(crop)

    def render_line(self, y: int) -> Strip:
        width = self.size.width
        if width != self._width:
            self._wrap(width)
        style = self._style
        if y < len(self._strips):
            strip = self._strips[y]
        elif y == len(self._strips):
            line = self._rest.copy()
            line.rstrip_end(width)
            strip = Strip(list(line.render(self.app.console)), cell_len(line.plain))
        else:
            return Strip.blank(width, style)
        return strip.crop_extend(0, width, None).apply_style(style)

