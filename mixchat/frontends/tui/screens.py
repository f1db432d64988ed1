"""Modal screens: settings sheet, confirmation, rename, help."""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Grid, Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Markdown, Select, Static

from mixchat import settings as settings_mod
from mixchat.errors import MixchatError
from mixchat.frontends.tui import modelpicker
from mixchat.frontends.tui.literal import literal
from mixchat.frontends.tui.modelpicker import FolderCheck, verdict_text
from mixchat.frontends.tui.widgets import LineInput
from mixchat.safetext import one_line, visible
from mixchat.settings import Settings
from mixchat.speed.qformat import CHOICES, fitting_choices, parse_quant

FIELD_HELP = {
    "model": "release folder (params.json, consolidated weights, tokenizer.model or tekken.json); Ctrl+L lists "
             "recent ones",
    "system": "system prompt, placed as mistral-common places it; empty = none",
    "temperature": "0 = greedy; higher is more varied", "top_p": "nucleus mass, (0, 1]; 1 = off",
    "top_k": "0 = off", "repeat_penalty": "1 = off; over the last 64 tokens", "max_tokens": "new tokens per reply",
    "seed": "empty = random", "draft": "tokens guessed ahead from the conversation per pass; 0 = off; same reply",
    "dtype": "auto: bf16 on a CPU with AVX2, else fp32",
    "quant": "weight-only, cached after the first load; int4-32/64/128: group size",
    "memory_budget_gb": "Mixtral: 0 = all weights in memory; else experts load on demand within it",
    "threads": "0 = torch's choice",
    "kv_memory_gb": "live KV caches across open conversations",
    "context": "tokens per conversation; 0 = max_seq_len or what fits in memory",
    "expert_layer": "layer whose routing colours the tokens",
    "when_full": "a full conversation: drop its oldest turns from the model's view, or stop and say so",
}


def choices(name: str, current: str) -> list[tuple[str, str]] | None:
    """The values a field may take, for a Select; None for a free field."""
    if name == "dtype":
        values = ["auto", "bf16", "fp16", "fp32"]
    elif name == "quant":
        values = list(CHOICES)
    elif name == "when_full":
        values = list(settings_mod.WHEN_FULL)
    elif name == "threads":
        values = [str(i) for i in range((os.cpu_count() or 1) + 1)]
    else:
        return None
    if current not in values:  # a value saved on a bigger machine stays choosable
        values.append(current)
    return [("0 (torch's choice)" if name == "threads" and v == "0" else v, v) for v in values]


class SettingsScreen(FolderCheck, ModalScreen[Settings | None]):
    DEFAULT_CSS = """
    SettingsScreen { align: center middle; }
    SettingsScreen > Vertical {
        width: 96%; max-width: 110; height: 96%; border: thick $primary; background: $surface;
    }
    SettingsScreen Grid { grid-size: 2; grid-columns: 18 1fr; grid-rows: auto; height: auto; grid-gutter: 0 1; }
    SettingsScreen Grid > Label { padding: 1 0 0 1; text-style: bold; }
    SettingsScreen .field { height: auto; }
    SettingsScreen .help { color: $text-muted; padding: 0 1; height: auto; }
    SettingsScreen #model-check { padding: 0 1; height: auto; }
    SettingsScreen #error { color: $error; height: auto; padding: 0 1; }
    SettingsScreen Horizontal { height: auto; align: right middle; }
    """
    BINDINGS = [("escape", "cancel", "Cancel"), ("ctrl+s", "save", "Save")]
    AUTO_FOCUS = "#set-model"

    def __init__(self, settings: Settings, running: str | None = None) -> None:
        super().__init__()
        self.settings = settings
        # The folder the app runs now (the demo model when none is saved): an empty model field means
        # "keep that one", and its verdict and per-choice memory are what a choice of quant would cost.
        self.running = running
        self.quants: dict[str, frozenset[str]] = {}  # per checked folder: the --quant choices its shapes allow
        # Inputs draw control characters raw, so a value holding any is shown with them made
        # visible; left as shown, the field keeps its original value (see collect).
        self.shown: dict[str, tuple[str, str]] = {}

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static("[b]Settings[/b]  Ctrl+S saves, Esc cancels. Saved for new conversations; sampling and "
                         "the system prompt also apply to the open one.")
            with VerticalScroll():
                with Grid():
                    for f in fields(Settings):
                        value = getattr(self.settings, f.name)
                        raw = "" if value is None else str(value)
                        self.shown[f.name] = (visible(raw), raw)
                        yield Label(f.name.replace("_", " "))
                        with Vertical(classes="field"):
                            options = choices(f.name, raw)
                            if options is not None:
                                yield Select(options, value=raw, allow_blank=False, id=f"set-{f.name}")
                            else:
                                yield LineInput(visible(raw), id=f"set-{f.name}")
                            if f.name == "model":
                                # The verdict quotes the folder's path and the loader's errors: literal text.
                                yield Static("", id="model-check")
                            yield Static(FIELD_HELP.get(f.name, ""), classes="help", markup=False)
            # Outside the scrolling form: a refused value is said where Ctrl+S was pressed, at any height.
            yield Static("", id="error")
            with Horizontal():
                yield Button("Cancel", id="cancel")
                yield Button("Save", id="save", variant="primary")

    def on_mount(self) -> None:
        self.check_later(self._folder_to_check(), self._show_verdict)

    def check_folder(self, folder: str) -> tuple[bool, str]:
        allowed: set[str] = set()
        verdict = modelpicker.folder_verdict(folder, allowed)
        if verdict[0]:
            self.quants[folder.strip()] = frozenset(allowed)
        return verdict

    def _folder_to_check(self) -> str:
        return self.value("model") or self.running or ""

    def _show_verdict(self, folder: str, verdict: tuple[bool, str] | None) -> None:
        if self._folder_to_check() != folder.strip():
            return  # typed on since
        text = verdict_text(verdict)
        if verdict is not None and not self.value("model"):
            text = Text(f"empty: the app keeps {one_line(folder)}\n", style="dim") + text
        self.query_one("#model-check", Static).update(text)

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "set-model":
            self.query_one("#model-check", Static).update(Text("checking…", style="dim"))
            self.check_later(self._folder_to_check(), self._show_verdict)

    def value(self, name: str) -> str:
        """What field `name` holds: its original value while it still shows that unchanged."""
        widget = self.query_one(f"#set-{name}")
        if isinstance(widget, Select):
            return str(widget.value)
        text = widget.value
        shown, original = self.shown.get(name, (None, None))
        return (original if text == shown else text).strip()

    def collect(self) -> Settings:
        values = {}
        for f in fields(Settings):
            raw = self.value(f.name)
            kind = f.type if isinstance(f.type, str) else f.type.__name__
            try:
                if "int" in kind and "None" in kind:
                    values[f.name] = int(raw) if raw else None
                elif kind.startswith("int"):
                    values[f.name] = int(raw or 0)
                elif kind.startswith("float"):
                    values[f.name] = float(raw)
                elif f.name == "model" and raw:  # saved: a relative folder would be another one elsewhere
                    values[f.name] = os.path.abspath(Path(raw).expanduser())
                else:
                    values[f.name] = raw
            except ValueError:
                raise MixchatError(f"{f.name}: {raw!r} is not a number") from None
        s = Settings(**values)
        s.check()
        return s

    def action_save(self) -> None:
        try:
            settings = self.collect()
            allowed = self.quants.get(self._folder_to_check())
            spec = parse_quant(settings.quant)
            if spec is not None and allowed is not None and spec.label not in allowed:
                # refused now, not after a reload that would then fail
                fitting = " or ".join(fitting_choices(spec, lambda other: other.label in allowed))
                raise MixchatError(f"quant {settings.quant}: groups of {spec.group} do not divide this model's input "
                                   f"dimensions; choose {fitting}")
            self.dismiss(settings)
        except MixchatError as exc:
            message = str(exc)
            for f in fields(Settings):
                if message.startswith(f.name):
                    # named as its label reads, and the field takes the focus, which scrolls the form to it
                    message = f.name.replace("_", " ") + message[len(f.name):]
                    self.query_one(f"#set-{f.name}").focus()
                    break
            self.query_one("#error", Static).update(literal(message))

    def action_cancel(self) -> None:
        self.dismiss(None)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.action_save() if event.button.id == "save" else self.action_cancel()


class ConfirmScreen(ModalScreen[bool]):
    """Asks before something that cannot be undone. No letter answers it (typing "today" into the
    conversation list once confirmed a delete with its "y"): the safe button has the focus, so
    Enter cancels; confirming takes Tab (or an arrow) to the other button, then Enter, or a click."""

    DEFAULT_CSS = """
    ConfirmScreen { align: center middle; }
    ConfirmScreen > Vertical { width: 60; height: auto; border: thick $error; background: $surface; padding: 1 2; }
    ConfirmScreen Horizontal { height: auto; align: right middle; margin-top: 1; }
    ConfirmScreen Button { margin-left: 1; }
    """
    BINDINGS = [("escape", "no", "Cancel"), ("left", "app.focus_previous", "Previous"),
                ("right", "app.focus_next", "Next")]
    AUTO_FOCUS = "#no"

    def __init__(self, question: str, yes: str = "Delete") -> None:
        super().__init__()
        self.question, self.yes = question, yes

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(literal(self.question))
            yield Static(Text(f"Tab to “{self.yes}”, then Enter; Esc or Enter here cancels.", style="dim"))
            with Horizontal():
                yield Button("Cancel", id="no")
                yield Button(Text(self.yes), id="yes", variant="error")

    def action_no(self) -> None:
        self.dismiss(False)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")


class RenameScreen(ModalScreen[str | None]):
    DEFAULT_CSS = """
    RenameScreen { align: center middle; }
    RenameScreen > Vertical { width: 70; height: auto; border: thick $primary; background: $surface; padding: 1 2; }
    """
    BINDINGS = [("escape", "cancel", "Cancel")]

    def __init__(self, title: str) -> None:
        super().__init__()
        self.title_text = title

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static("New title (Enter to save, Esc to cancel)")
            yield LineInput(one_line(self.title_text), id="title")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        # Unchanged: keep the title as stored (the box shows its control characters as glyphs).
        title = event.value.strip()
        self.dismiss(title if title and title != one_line(self.title_text).strip() else None)

    def action_cancel(self) -> None:
        self.dismiss(None)


HELP = """\
# mixchat

Type a message in the box at the bottom and press **Enter** to send it; **Ctrl+J** starts a new
line; **Up** recalls what you typed before. **Ctrl+P** lists every command, with its key.

| key | does |
|---|---|
| Enter | send (from the input) |
| Esc | stop the reply (kept, marked *stopped*, saved); with nothing to stop, unpin the expert view's token |
| Ctrl+O | the conversation list: Enter opens · F6 renames · Delete deletes |
| | a delete asks: Tab to *Delete*, then Enter (Enter alone or Esc cancels) |
| | typing there filters the list and searches inside the conversations; Enter opens the first match |
| Ctrl+N | new conversation, in a new tab · Ctrl+F4 closes the tab (it stays saved) |
| Ctrl+PgDn | next tab · Ctrl+PgUp previous tab · Alt+1 … Alt+9 tab by number (where the terminal reports Alt) |
| F2 | settings · F3 expert view · F4 / Shift+F4 next / previous expert layer · F1 this help |
| Ctrl+L | choose a model: recent release folders, or type a path (→ completes a folder name) |
| Ctrl+R, F5 | regenerate the last reply (the KV cache rewinds; the history is not recomputed) |
| F12 | edit your last message: it comes back into the input; Enter resends it |
| F8 / F9 | copy the last reply / its last code block (or those of the message you clicked) |
| Ctrl+B | show or hide the conversation list |
| Ctrl+P | every command: also rename, delete or export (Markdown, JSON) the open conversation |
| Ctrl+Q | quit: a reply being written is stopped, kept (marked *stopped*) and saved first |

The input keeps its own editing keys: Ctrl+A / Ctrl+E (start / end of line), Ctrl+W (delete a
word), Ctrl+K / Ctrl+U (delete to the end / start), Ctrl+Z / Ctrl+Y (undo / redo), Ctrl+arrows
(word by word).

The tabs open when you quit are opened again at the next start.

The status bar shows the model, the speed while it writes (tokens per second, time to first token,
prefill speed), and on its second line how much of the context is used (and how many tokens of
older turns were dropped from the model's view to make room), and how many tokens the KV cache
re-used. What happens when the context is full is a setting (`when full`): the oldest turns drop
out of the model's view (they stay saved), or the reply stops.

The expert view (Mixtral-style models) colours each generated token by the expert it went to at
the chosen layer, like the routing figure of the Mixtral paper. It follows the newest token; click
a token to pin it and see its experts and weights at every layer (click it again, or Esc, to
follow the reply again); the heat-map gives the share of this conversation's tokens each expert
took at each layer, in per cent.
"""


class HelpScreen(ModalScreen[None]):
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll {
        width: 90%; max-width: 100; height: 90%; border: thick $primary; background: $surface;
    }
    """
    BINDINGS = [("escape", "dismiss", "Close"), ("f1", "dismiss", "Close"), ("q", "dismiss", "Close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Markdown(HELP)
