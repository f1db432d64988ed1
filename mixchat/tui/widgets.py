"""The widgets of the chat screen. They show text and numbers they are given; none runs the model."""

from __future__ import annotations

from rich.style import Style
from rich.text import Text
from textual import events
from textual.containers import Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Input, Markdown, Static, TextArea

from mixchat.safetext import one_line, visible
from mixchat.tui.colors import expert_color
from mixchat.tui.literal import literal


class MessageView(Vertical):
    """One message. Assistant text streams in as plain text and settles into Markdown; with the
    expert view on, it shows each token coloured by the expert it went to at the chosen layer,
    and each token is clickable to show its routing at every layer."""

    DEFAULT_CSS = """
    MessageView { height: auto; margin: 0 0 1 0; padding: 0 1; }
    MessageView.user { background: $boost; border-left: thick $accent; }
    MessageView.assistant { border-left: thick $success; }
    MessageView:focus { background: $boost; border-left: thick $warning; }
    MessageView > .role { color: $text-muted; text-style: bold; }
    MessageView > Markdown { margin: 0; padding: 0; }
    MessageView > Static.body { height: auto; link-style: none; link-color: $text; link-background: transparent;
        link-style-hover: bold; link-background-hover: transparent; link-color-hover: $text; }
    """

    can_focus = True  # click or Tab to a message, then Ctrl+Y / Ctrl+K copy it or its code block

    def __init__(self, role: str, text: str = "", index: int = 0, stop: str | None = "eos",
                 tokens: list | None = None) -> None:
        super().__init__(classes=role)
        self.role, self.text, self.index, self.stop = role, text, index, stop
        # (text, experts per layer, weights per layer) for each generated token, when known
        self.tokens: list[tuple[str, list | None, list | None]] = tokens or []
        self.streaming = False
        self.expert_layer: int | None = None  # None: expert colouring off

    def compose(self):
        yield Static(Text(self._label()), classes="role")
        if self.role == "assistant" and not self.streaming and self.expert_layer is None:
            # Markdown is parsed as Markdown, never as Rich markup; a link only posts LinkClicked
            # (its target is quoted into a fixed `link(...)` action), and open_links=False keeps a
            # model's link from launching a browser: see on_markdown_link_clicked.
            yield Markdown(visible(self.text), open_links=False)
        else:
            yield Static(self._body(), classes="body")

    def on_markdown_link_clicked(self, event: Markdown.LinkClicked) -> None:
        # A reply's links are the model's words, not the user's choice: show where one points
        # (the terminal can open it from there) instead of opening it.
        event.stop()
        self.app.notify(f"link (not opened): {one_line(event.href)}", timeout=10)

    def _label(self) -> str:
        marks = {"interrupted": " · stopped", "length": " · cut at the token limit",
                 None: " · unfinished"}
        mark = "" if self.streaming or self.role == "user" else marks.get(self.stop, "")
        return ("you" if self.role == "user" else "assistant") + mark

    def _body(self) -> Text:
        if self.expert_layer is None or not self.tokens or self.tokens[0][1] is None:
            return literal(self.text)
        out = Text()
        for i, (piece, experts, _) in enumerate(self.tokens):
            layer = min(self.expert_layer, len(experts) - 1)
            e = experts[layer][0]
            # Background colour per expert, as in the Mixtral paper's routing figure; click for details.
            out.append(visible(piece), Style(bgcolor=expert_color(e), color="black",
                                             meta={"@click": f"app.select_token({self.index},{i})"}))
        return out

    async def refresh_body(self) -> None:
        await self.remove_children()
        await self.mount_all(list(self.compose()))

    def redraw(self) -> None:
        """refresh_body, run on this widget's own queue. Awaited in one of the app's handlers it
        would hold up the app's queue, and for good if the tab is closed meanwhile (the removal
        waits for that queue while the mount waits for the removed tab)."""
        self.call_later(self.refresh_body)

    def append(self, piece: str, experts, weights) -> None:
        """Streaming: cheap update of a single Static, no re-mount."""
        self.text += piece
        self.tokens.append((piece, experts, weights))
        self.query_one(".body", Static).update(self._body())


class ChatLog(VerticalScroll):
    DEFAULT_CSS = "ChatLog { height: 1fr; padding: 0 1; }"


class PromptInput(TextArea):
    """Multi-line input: Enter sends, Ctrl+J (or Shift+Enter where the terminal reports it) starts
    a new line, Up on the first line recalls earlier inputs."""

    DEFAULT_CSS = "PromptInput { height: auto; max-height: 10; min-height: 3; }"

    class Submitted(Message):
        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    def __init__(self, history: list[str] | None = None, **kw) -> None:
        super().__init__(soft_wrap=True, show_line_numbers=False, **kw)
        self.inputs = history or []
        self._recall = len(self.inputs)

    def load_text(self, text: str) -> None:
        # Text put back here (the history file, a piped first message brought back by Ctrl+E) may
        # hold control characters, which the TextArea would draw raw.
        super().load_text(visible(text))

    async def _on_paste(self, event: events.Paste) -> None:
        event.prevent_default()  # TextArea's own handler is called here, not again by the MRO
        # Terminals send pasted line ends as CR; any other control character is shown, not drawn.
        event.text = visible(event.text.replace("\r\n", "\n").replace("\r", "\n"))
        await super()._on_paste(event)

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            text = self.text.strip()
            if text:
                self.inputs.append(self.text)
                self._recall = len(self.inputs)
                self.post_message(self.Submitted(self.text))
                self.clear()
            return
        if event.key in ("ctrl+j", "shift+enter"):
            event.stop()
            event.prevent_default()
            self.insert("\n")
            return
        if event.key == "up" and self.cursor_location[0] == 0 and self.inputs and self._recall > 0:
            event.stop()
            event.prevent_default()
            self._recall -= 1
            self.load_text(self.inputs[self._recall])
            return
        if event.key == "down" and self._recall < len(self.inputs) and \
                self.cursor_location[0] == self.document.line_count - 1:
            event.stop()
            event.prevent_default()
            self._recall += 1
            self.load_text(self.inputs[self._recall] if self._recall < len(self.inputs) else "")
            return
        await super()._on_key(event)


class LineInput(Input):
    """A one-line Input whose pasted text has its control characters shown, not drawn raw."""

    def _on_paste(self, event: events.Paste) -> None:
        event.text = one_line(event.text)
        super()._on_paste(event)
        event.prevent_default()  # Input's handler ran just now; the MRO would run it again
