"""The expert panel: the routing of the current or selected token at every layer, and the
conversation's layer x expert usage."""

from __future__ import annotations

from collections import Counter

from rich.style import Style
from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from mixchat.tui.colors import expert_color
from mixchat.tui.literal import literal


class ExpertPanel(Static):
    """Per layer: the experts the current/selected token used, with weights; and the running
    layer × expert usage heat-map of the conversation."""

    DEFAULT_CSS = "ExpertPanel { width: 46; height: 1fr; border-left: solid $primary; padding: 0 1; overflow-y: auto; }"

    def show(self, moe: bool, n_experts: int, layer: int, token: tuple | None, usage: list[Counter],
             title: str = "last token") -> None:
        if not moe:
            self.update(Text("Expert view\n\nThis is a dense model: every token goes through the same "
                             "feed-forward block, so there is no routing to show.", style="italic"))
            return
        out = Table.grid(padding=(0, 1))
        out.add_column()
        out.add_row(Text(f"Expert view · colour = top expert at layer {layer}", style="bold"))
        # A str title would be parsed as markup; the token is model text ("[/INST]" among them).
        tok_table = Table("layer", "experts (weight)", box=None, padding=(0, 1),
                          title=literal(f"{title}: {token[0]!r}" if token else title, style="table.title"))
        if token and token[1] is not None:
            experts, weights = token[1], token[2]
            for i, ids in enumerate(experts):
                cells = Text()
                for k, e in enumerate(ids):
                    cells.append(f"e{e}", Style(color=expert_color(e), bold=True))
                    cells.append(f"={weights[i][k]:.2f}  " if weights else "  ")
                tok_table.add_row(Text(f"{i}", style="reverse" if i == layer else ""), cells)
        out.add_row(tok_table)
        heat = Table(box=None, padding=(0, 1), title="usage this conversation (share of tokens)")
        heat.add_column("L")
        for e in range(n_experts):
            heat.add_column(Text(f"e{e}", style=expert_color(e)), justify="right")
        shades = " ░▒▓█"
        for i, counts in enumerate(usage):
            total = sum(counts.values()) or 1
            cells = []
            for e in range(n_experts):
                share = counts.get(e, 0) / total
                cells.append(Text(shades[min(4, round(share * 2 * 4))] * 2 + f"{share:.0%}".rjust(4),
                                  style=expert_color(e)))
            heat.add_row(str(i), *cells)
        out.add_row(heat)
        self.update(out)
