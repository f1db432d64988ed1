"""Modal screens: settings sheet, confirmation, rename, help."""

from __future__ import annotations

from dataclasses import fields

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Grid, Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Markdown, Static

from mixchat.errors import MixchatError
from mixchat.progress import human_bytes
from mixchat.qformat import memory_estimates
from mixchat.safetext import one_line, visible
from mixchat.settings import Settings
from mixchat.tui.literal import literal
from mixchat.tui.widgets import LineInput

FIELD_HELP = {
    "model": "release folder (params.json, consolidated weights, tokenizer.model or tekken.json)",
    "system": "system prompt (placed as mistral-common places it)",
    "temperature": "0 = greedy", "top_p": "nucleus mass, (0, 1]", "top_k": "0 = off",
    "repeat_penalty": "1 = off; last 64 tokens", "max_tokens": "new tokens per reply",
    "seed": "empty = random", "dtype": "auto, bf16, fp16, fp32",
    "quant": "none, int8, int4 (-32/-64/-128): weight-only, cached after the first load",
    "memory_budget_gb": "Mixtral: 0 = all weights in memory; else experts load on demand within it",
    "threads": "0 = torch's choice",
    "kv_memory_gb": "live KV caches across open conversations",
    "context": "tokens per conversation; 0 = max_seq_len or what fits in memory",
    "expert_layer": "layer whose routing colours the tokens",
}


def validate_model_folder(folder: str) -> str | None:
    """The loader's own verdict on a folder (names, shapes, tokenizer), without loading weights."""
    if not folder:
        return None
    from mixchat.release import open_release

    try:
        opened = open_release(folder)
    except MixchatError as exc:
        return str(exc)
    a = opened.args
    memory = memory_estimates({k: tuple(t.shape) for k, t in opened.state.items()})
    return f"ok: {opened.layout} layout, {a.n_layers} layers, dim {a.dim}" + (
        f", {a.moe.num_experts} experts top-{a.moe.num_experts_per_tok}" if a.moe else "") + (
        "\nweights in memory: " + ", ".join(f"{k} {human_bytes(v)}" for k, v in memory.items()))


class SettingsScreen(ModalScreen[Settings | None]):
    DEFAULT_CSS = """
    SettingsScreen { align: center middle; }
    SettingsScreen > Vertical {
        width: 90%; max-width: 100; height: 90%; border: thick $primary; background: $surface;
    }
    SettingsScreen Grid { grid-size: 2; grid-columns: 16 1fr; grid-rows: auto; height: auto; grid-gutter: 0 1; }
    SettingsScreen Label { padding: 1 0 0 0; }
    SettingsScreen #model-check { color: $text-muted; padding: 0 1; height: auto; }
    SettingsScreen #error { color: $error; height: auto; padding: 0 1; }
    SettingsScreen Horizontal { height: auto; align: right middle; }
    """
    BINDINGS = [("escape", "cancel", "Cancel"), ("ctrl+s", "save", "Save")]

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.settings = settings
        # Inputs draw control characters raw, so a value holding any is shown with them made
        # visible; left as shown, the field keeps its original value (see collect).
        self.shown: dict[str, tuple[str, str]] = {}

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static("[b]Settings[/b]  (saved for new conversations; sampling and system prompt also "
                         "apply to the open one)")
            with VerticalScroll():
                with Grid():
                    for f in fields(Settings):
                        value = getattr(self.settings, f.name)
                        raw = "" if value is None else str(value)
                        self.shown[f.name] = (visible(raw), raw)
                        yield Label(f.name)
                        yield LineInput(visible(raw), id=f"set-{f.name}",
                                    placeholder=FIELD_HELP.get(f.name, ""), tooltip=FIELD_HELP.get(f.name))
                # The verdict quotes the folder's path and the loader's errors: literal text.
                yield Static(literal(validate_model_folder(self.settings.model) or ""), id="model-check")
                yield Static("", id="error")
            with Horizontal():
                yield Button("Cancel", id="cancel")
                yield Button("Save", id="save", variant="primary")

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "set-model":
            self.query_one("#model-check", Static).update(literal(validate_model_folder(self.value("model")) or ""))

    def value(self, name: str) -> str:
        """What field `name` holds: its original value while it still shows that unchanged."""
        text = self.query_one(f"#set-{name}", Input).value
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
                else:
                    values[f.name] = raw
            except ValueError:
                raise MixchatError(f"{f.name}: {raw!r} is not a number") from None
        s = Settings(**values)
        s.check()
        return s

    def action_save(self) -> None:
        try:
            self.dismiss(self.collect())
        except MixchatError as exc:
            self.query_one("#error", Static).update(literal(str(exc)))

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

Type a message and press **Enter** to send it; **Ctrl+J** starts a new line; **Up** recalls what
you typed before.

| key | does |
|---|---|
| Esc | stop the reply (the partial text is kept, marked *stopped*, and saved) |
| Ctrl+R | regenerate the last reply (the KV cache rewinds; the history is not recomputed) |
| Ctrl+E | edit your last message: it comes back into the input; Enter resends it |
| Ctrl+Y / Ctrl+K | copy the last reply / its last code block (or those of the message you clicked) |
| Ctrl+N | new conversation (in a new tab) · Ctrl+W closes the tab |
| F2 | settings · F3 expert view · F4 next expert layer · F1 this help |
| Ctrl+O | go to the conversation list: Enter opens · F6 renames · Delete deletes; typing filters it |
| | a delete asks: Tab to *Delete*, then Enter (Enter alone or Esc cancels) |
| Ctrl+Q | quit: a reply being written is stopped, kept (marked *stopped*) and saved first |

The status bar shows the speed while the model writes (tokens per second, time to first token,
prefill speed), how much of the context is used, and how many tokens the KV cache re-used.
When the context is full, the reply stops (`cut at the token limit`): start a new conversation.

The expert view (Mixtral-style models) colours each generated token by the expert it went to at
the chosen layer, like the routing figure of the Mixtral paper; click a token to see its experts
and weights at every layer; the heat-map shows how often each expert was used in this conversation.
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
