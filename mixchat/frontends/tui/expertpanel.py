"""The expert panel: the routing of the newest or pinned token at every layer, and the
conversation's layer x expert usage, every share written as a number (colour alone says nothing
to a reader who cannot tell the experts' colours apart)."""

from __future__ import annotations

from collections import Counter

from rich.style import Style
from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from mixchat.frontends.tui.colors import expert_color
from mixchat.frontends.tui.literal import literal

SHADES = " ░▒▓█"


def share_cell(share: float, compact: bool) -> str:
    """One heat-map cell: a shade and the percentage, or (compact) the percentage alone; 0 is "0"."""
    pct = round(share * 100)
    return f"{pct:>3}" if compact else SHADES[min(4, round(share * 2 * 4))] * 2 + f"{pct}%".rjust(4)


class ExpertPanel(Static):
    """Per layer: the experts the newest/pinned token used, with weights; and the running
    layer × expert usage heat-map of the conversation. Narrow (class "narrow"): a compact layout
    for terminals under 120 columns."""

    DEFAULT_CSS = """
    ExpertPanel { width: 46; height: 1fr; border-left: solid $primary; padding: 0 1; overflow-y: auto; }
    ExpertPanel.narrow { width: 32; padding: 0 0 0 1; }
    """

    def show(self, moe: bool, n_experts: int, layer: int, token: tuple | None, usage: list[Counter],
             title: str = "newest token", compact: bool = False) -> None:
        if not moe:
            self.update(Text("Expert view\n\nThis is a dense model: every token goes through the same "
                             "feed-forward block, so there is no routing to show.", style="italic"))
            return
        out = Table.grid(padding=(0, 1))
        out.add_column()
        out.add_row(Text(f"Expert view · layer {layer} (F4)" if compact else
                         f"Expert view · colour = top expert at layer {layer} (F4/Shift+F4)", style="bold"))
        # A str title would be parsed as markup; the token is model text ("[/INST]" among them).
        tok_table = Table("L" if compact else "layer", "experts (weight)", box=None, padding=(0, 1),
                          title=literal(f"{title}: {token[0]!r}" if token else title, style="table.title"))
        if token and token[1] is not None:
            experts, weights = token[1], token[2]
            for i, ids in enumerate(experts):
                cells = Text()
                for k, e in enumerate(ids):
                    cells.append(f"e{e}", Style(color=expert_color(e), bold=True))
                    cells.append(f"={weights[i][k]:.2f} " if weights else " ")
                tok_table.add_row(Text(f"{i}", style="reverse" if i == layer else ""), cells)
            if not weights:
                tok_table.caption = Text("weights are not saved with a conversation", style="dim")
        out.add_row(tok_table)
        if title.startswith("pinned"):
            out.add_row(Text("Esc, or a click on it again: follow the reply", style="dim"))
        heat = Table(box=None, padding=(0, 0 if compact else 1), collapse_padding=True,
                     title="% of tokens" if compact else "usage this conversation (% of tokens)")
        heat.add_column("L")
        for e in range(n_experts):
            heat.add_column(Text(f"e{e}" if not compact or e < 10 else str(e), style=expert_color(e)),
                            justify="right")
        for i, counts in enumerate(usage):
            total = sum(counts.values()) or 1
            heat.add_row(str(i), *[Text(share_cell(counts.get(e, 0) / total, compact), style=expert_color(e))
                                   for e in range(n_experts)])
        out.add_row(heat)
        self.update(out)
