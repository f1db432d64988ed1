"""The expert panel: the routing of the newest or pinned token at every layer, and the
conversation's layer x expert usage, every share written as a number (colour alone says nothing
to a reader who cannot tell the experts' colours apart)."""

from __future__ import annotations

from collections import Counter

from rich.style import Style
from rich.text import Text
from textual.widgets import Static

from mixchat.frontends.tui.colors import expert_color

SHADES = " ░▒▓█"


def share_cell(share: float, compact: bool) -> str:
    """One heat-map cell: a shade and the percentage, or (compact) the percentage alone; 0 is "0"."""
    pct = round(share * 100)
    return f"{pct:>3}" if compact else SHADES[min(4, round(share * 2 * 4))] + f"{pct:>3}"


# The panel's text width (its CSS width less border and padding): the heat map is cut into blocks
# of as many experts as fit.
WIDTH, NARROW_WIDTH = 43, 30


class ExpertPanel(Static):
    """Per layer: the experts the newest/pinned token used, with weights; and the running
    layer x expert usage heat-map of the conversation. Narrow (class "narrow"): a compact layout
    for terminals under 120 columns.

    Written as one Text of fixed-width columns: Rich tables measured and laid out again at every
    redraw took more of the UI thread than the whole reply, while the reply streams."""

    DEFAULT_CSS = """
    ExpertPanel { width: 46; height: 1fr; border-left: solid $primary; padding: 0 1; overflow-y: auto; }
    ExpertPanel.narrow { width: 32; padding: 0 0 0 1; }
    """

    _lines = -1  # lines of the text shown last

    def show(self, moe: bool, n_experts: int, layer: int, token: tuple | None, usage: list[Counter],
             title: str = "newest token", compact: bool = False) -> None:
        if not moe:
            self._lines = -1
            self.update(Text("Expert view\n\nThis is a dense model: every token goes through the same "
                             "feed-forward block, so there is no routing to show.", style="italic"))
            return
        out = Text(no_wrap=False)
        out.append(f"Expert view · layer {layer}", "bold")
        out.append(" (F4)\n" if compact else " (F4/Shift+F4)\ncolour = each token's top expert here\n", "dim")
        # Text, not markup: the token is model text ("[/INST]" among them); repr shows its spaces.
        out.append(f"\n{title}: {token[0]!r}\n" if token else f"\n{title}\n", "italic")
        if token and token[1] is not None:
            experts, weights = token[1], token[2]
            out.append("L  experts (weight)\n" if compact else "layer  experts (weight)\n", "bold")
            for i, ids in enumerate(experts):
                out.append(f"{i:<2}", "reverse" if i == layer else "")
                out.append(" " if compact else "     ")
                for k, e in enumerate(ids):
                    out.append(f"e{e}", Style(color=expert_color(e), bold=True))
                    out.append(f"={weights[i][k]:.2f} " if weights else " ")
                out.append("\n")
            if not weights:
                out.append("weights are not saved with a conversation\n", "dim")
        if title.startswith("pinned"):
            out.append("Esc, or a click on it again: follow the reply\n", "dim")
        out.append("\n% of tokens\n" if compact else "\nusage this conversation (% of tokens)\n", "bold")
        cell = 3 if compact else 5
        per_block = max(1, ((NARROW_WIDTH if compact else WIDTH) - 2) // cell)
        for first in range(0, n_experts, per_block):
            block = range(first, min(n_experts, first + per_block))
            out.append("L ", "bold")
            for e in block:
                out.append((f"e{e}" if not compact or e < 10 else str(e)).rjust(cell), expert_color(e))
            out.append("\n")
            for i, counts in enumerate(usage):
                total = sum(counts.values()) or 1
                out.append(f"{i:<2}")
                for e in block:
                    out.append(share_cell(counts.get(e, 0) / total, compact).rjust(cell), expert_color(e))
                out.append("\n")
        out.rstrip()
        # A new layout only when the panel's height changes: one re-arranges the whole screen, and
        # while a reply streams only the numbers do.
        lines = out.plain.count("\n")
        self.update(out, layout=lines != self._lines)
        self._lines = lines
