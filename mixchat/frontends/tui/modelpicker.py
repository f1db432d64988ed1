"""Choosing a model: the recent release folders with the loader's verdict on each, a path field that
completes folder names, and the question a conversation written with another model asks.

A folder is checked from its headers only (mixchat.release.inspection.inspect_release, what `mixchat
inspect` shows): no weight is read, so it takes as long on 87 GB as on 87 MB. Even so it runs in a
worker thread, a moment after the typing stops, never on the UI thread at each keystroke."""

from __future__ import annotations

import os
from pathlib import Path

from rich.text import Text
from textual import events, on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.suggester import Suggester
from textual.timer import Timer
from textual.widgets import Button, Input, Label, ListItem, ListView, Static

from mixchat.errors import MixchatError
from mixchat.frontends.tui.literal import literal
from mixchat.frontends.tui.widgets import LineInput
from mixchat.progress import human_bytes
from mixchat.safetext import one_line

CHECK_DELAY = 0.3  # seconds without typing before a folder is checked
MAX_ENTRIES = 2000  # a folder with more entries is not listed for completion: the UI thread waits on it


def folder_verdict(folder: str, quants: set[str] | None = None) -> tuple[bool, str]:
    """The loader's verdict on a release folder from its headers: (usable, one or two lines). `quants`, if
    given, receives the --quant choices the folder's shapes allow (int8, int4-32 ...)."""
    from mixchat.release.inspection import inspect_release

    try:
        r = inspect_release(Path(folder).expanduser())
    except MixchatError as exc:
        return False, str(exc)
    except OSError as exc:  # unreadable in a way the release checks did not foresee
        return False, f"{folder}: {exc.strerror or exc}"
    if r["problem"]:
        return False, r["problem"]
    if quants is not None:
        quants.update(k for k in r["memory_estimate_bytes"] if k != "bf16")
    memory = ", ".join(f"{k} {human_bytes(v)}" for k, v in r["memory_estimate_bytes"].items())
    return True, f"ok: {r['family']}, {r['layout']} layout\nweights in memory: {memory}"


class DirectorySuggester(Suggester):
    """Completes the typed path to the first folder whose name starts with what follows the last '/'."""

    def __init__(self) -> None:
        super().__init__(use_cache=False, case_sensitive=True)  # folders come and go

    async def get_suggestion(self, value: str) -> str | None:
        if not value:
            return None
        head, _, prefix = value.rpartition("/")
        parent = Path(os.path.expanduser(head + "/" if head or value.startswith("/") else "."))
        try:
            with os.scandir(parent) as entries:
                names = []
                for n, entry in enumerate(entries):
                    if n >= MAX_ENTRIES:
                        return None
                    if entry.name.startswith(prefix) and (prefix.startswith(".") or not entry.name.startswith(".")) \
                            and entry.is_dir():
                        names.append(entry.name)
        except OSError:
            return None
        names = [n for n in sorted(names) if n != prefix]
        return (value[: len(value) - len(prefix)] + names[0] + "/") if names else None


class FolderCheck:
    """For a screen with a folder field: check it in a worker, CHECK_DELAY after the last change,
    and show the verdict only if the field still holds that folder."""

    _check_timer: Timer | None = None

    def check_later(self, folder: str, show) -> None:
        if self._check_timer is not None:
            self._check_timer.stop()
        if not folder.strip():
            show(folder, None)
            return
        self._check_timer = self.set_timer(CHECK_DELAY, lambda: self._check_now(folder, show))

    def _check_now(self, folder: str, show) -> None:
        def work() -> None:
            verdict = self.check_folder(folder)
            self.app.call_from_thread(show, folder, verdict)

        self.run_worker(work, thread=True, exclusive=True, group="folder-check")

    def check_folder(self, folder: str) -> tuple[bool, str]:
        """The verdict, in the worker thread (a screen may keep more of what the check found)."""
        return folder_verdict(folder)


def verdict_text(verdict: tuple[bool, str] | None) -> Text:
    if verdict is None:
        return Text("")
    ok, line = verdict
    # The verdict quotes paths and the loader's errors: literal text, never markup.
    return literal(line, style="green" if ok else "red")


class ModelPicker(FolderCheck, ModalScreen[str | None]):
    """Recent release folders (newest first) and a path field; Enter on either loads that folder."""

    DEFAULT_CSS = """
    ModelPicker { align: center middle; }
    ModelPicker > Vertical { width: 96%; max-width: 110; height: 90%; border: thick $primary;
        background: $surface; padding: 0 1; }
    ModelPicker #picker-path-check { height: auto; min-height: 2; padding: 0 1; }
    ModelPicker ListView { height: 1fr; border: round $primary-darken-2; }
    ModelPicker ListItem { padding: 0 1; margin-bottom: 1; }
    ModelPicker .help { color: $text-muted; }
    ModelPicker Horizontal { height: auto; align: right middle; }
    """
    BINDINGS = [("escape", "cancel", "Cancel")]
    AUTO_FOCUS = "#picker-path"

    def __init__(self, recent: list[str], current: str | None = None) -> None:
        super().__init__()
        self.recent = list(recent)
        self.current = current
        self.verdicts: dict[str, tuple[bool, str]] = {}

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(Text("Choose a model", style="bold"))
            yield Static("A Mistral/Mixtral release folder: type its path (→ completes a folder name) "
                         "and press Enter, or pick a recent one below.", classes="help")
            yield LineInput(placeholder="/path/to/release-folder", id="picker-path", suggester=DirectorySuggester())
            yield Static("", id="picker-path-check")
            yield Label(Text("Recent folders", style="bold"))
            items = [ListItem(Static(self._row(f), classes="row"), name=f) for f in self.recent]
            if not items:
                yield Static("none yet: the folders you load are listed here", classes="help")
            yield ListView(*items, id="picker-recent")
            with Horizontal():
                yield Button("Cancel", id="cancel")
                yield Button("Load", id="pick-load", variant="primary")

    def on_mount(self) -> None:
        def work() -> None:
            for folder in self.recent:
                verdict = folder_verdict(folder)
                self.app.call_from_thread(self._show_recent, folder, verdict)

        if self.recent:
            self.run_worker(work, thread=True, group="recent-check")

    def _row(self, folder: str) -> Text:
        row = Text(one_line(Path(folder).name) or one_line(folder), style="bold")
        if folder == self.current:
            row.append("  (loaded now)", style="italic")
        row.append("\n" + one_line(folder), style="dim")
        verdict = self.verdicts.get(folder)
        row.append("\n")
        if verdict is None:
            row.append("checking…", style="dim")
        else:
            ok, line = verdict
            row.append(one_line(line.split("\n")[0]), style="green" if ok else "red")
        return row

    def _show_recent(self, folder: str, verdict: tuple[bool, str]) -> None:
        self.verdicts[folder] = verdict
        for item in self.query(ListItem):
            if item.name == folder:
                item.query_one(".row", Static).update(self._row(folder))

    def _show_path(self, folder: str, verdict: tuple[bool, str] | None) -> None:
        if self.query_one("#picker-path", Input).value == folder:
            self.query_one("#picker-path-check", Static).update(verdict_text(verdict))

    @on(Input.Changed, "#picker-path")
    def path_changed(self, event: Input.Changed) -> None:
        self.check_later(event.value, self._show_path)

    @on(Input.Submitted, "#picker-path")
    def path_submitted(self, event: Input.Submitted) -> None:
        self._choose(event.value)

    @on(ListView.Selected, "#picker-recent")
    def recent_selected(self, event: ListView.Selected) -> None:
        self._choose(event.item.name or "")

    def _choose(self, folder: str) -> None:
        folder = folder.strip()
        if folder:
            self.dismiss(os.path.abspath(Path(folder).expanduser()))  # saved: valid from any working directory

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "pick-load":
            self._choose(self.query_one("#picker-path", Input).value)
        else:
            self.dismiss(None)

    def action_cancel(self) -> None:
        self.dismiss(None)


class ModelMismatchScreen(ModalScreen[str | None]):
    """A conversation opened while another model is loaded: switch to its model, go on with this
    one knowingly, or close the tab. Answers "switch", "continue" or "close" (Esc: continue)."""

    DEFAULT_CSS = """
    ModelMismatchScreen { align: center middle; }
    ModelMismatchScreen > VerticalScroll { width: 90%; max-width: 90; height: auto; max-height: 100%;
        border: thick $warning; background: $surface; padding: 1 2; }
    ModelMismatchScreen Horizontal { height: auto; align: right middle; margin-top: 1; }
    ModelMismatchScreen Button { margin-left: 1; }
    ModelMismatchScreen Horizontal.stacked { layout: vertical; }
    ModelMismatchScreen Horizontal.stacked Button { width: 100%; margin-left: 0; }
    """
    STACK_BELOW = 90  # columns under which the three answers stack (side by side, the last was cut off unseen)
    BINDINGS = [("escape", "go_on", "Continue")]

    def __init__(self, wanted: str, loaded: str, available: bool) -> None:
        super().__init__()
        self.wanted, self.loaded, self.available = wanted, loaded, available
        # AUTO_FOCUS, not focus() in on_mount alone: that is queued, and the screen's default auto-focus
        # gave the scrolling box the focus first (a race the test suite lost on CI).
        self.AUTO_FOCUS = "#switch" if available else "#continue"

    def compose(self) -> ComposeResult:
        with VerticalScroll():  # scrolls on a small terminal: every answer stays reachable
            text = Text("This conversation was written with another model.\n\n", style="bold")
            text.append(f"Last written with: {one_line(self.wanted)}\n")
            text.append(f"Loaded now:        {one_line(self.loaded)}\n\n")
            if self.available:
                text.append("Switch to its model (every tab then uses it; the model the app starts with stays as "
                            "saved), or go on with the loaded one: "
                            "the model would read a history another model wrote.")
            else:
                text.append("Its folder is not there any more (moved or deleted). Go on with the loaded model, "
                            "or load that release folder with Ctrl+L.", style="yellow")
            yield Static(text)
            with Horizontal():
                if self.available:
                    yield Button("Switch model", id="switch", variant="primary")
                yield Button("Continue with the loaded model", id="continue")
                yield Button("Close the tab", id="close")

    def on_mount(self) -> None:
        self._fit(self.app.size.width)
        if self.focused is None:  # AUTO_FOCUS does nothing while the terminal window is in the background
            self.query_one(self.AUTO_FOCUS, Button).focus()

    def on_resize(self, event: events.Resize) -> None:
        self._fit(event.size.width)

    def _fit(self, width: int) -> None:
        self.query_one(Horizontal).set_class(width < self.STACK_BELOW, "stacked")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id)

    def action_go_on(self) -> None:
        self.dismiss("continue")
