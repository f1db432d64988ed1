"""The widgets of the chat screen. They show text and numbers they are given; none runs the model."""

from __future__ import annotations

from rich.style import Style
from rich.text import Text
from textual import events
from textual.containers import Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Input, Markdown, Static, TextArea

from mixchat.frontends.tui.colors import expert_color, expert_text_color
from mixchat.frontends.tui.literal import literal
from mixchat.frontends.tui.tokentext import TokenText
from mixchat.safetext import one_line, visible


class MessageView(Vertical):
    """One message. An assistant reply streams as Markdown (appended, never re-parsed whole); with
    the expert view on, it shows each token coloured by the expert it went to at the chosen layer,
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
        self._markdown: Markdown | None = None
        self._shown: Text | None = None  # what the Static body shows, appended to while streaming
        self._drawn_layer: int | None = None  # the expert layer the body was composed with
        self._unsent = ""  # streamed text not yet given to the Markdown
        self._pumping = False

    def compose(self):
        yield Static(Text(self._label()), classes="role")
        self._drawn_layer = self.expert_layer
        self._markdown = self._shown = None
        if self.role == "assistant" and not self._colours_tokens():  # as _settle expects
            # Markdown is parsed as Markdown, never as Rich markup; a link only posts LinkClicked
            # (its target is quoted into a fixed `link(...)` action), and open_links=False keeps a
            # model's link from launching a browser: see on_markdown_link_clicked.
            self._unsent = ""
            self._markdown = Markdown("" if self.streaming else visible(self.text), open_links=False)
            yield self._markdown
        else:
            self._shown = self._body()
            # Coloured tokens: a TokenText, which wraps only the last line again as tokens come.
            yield (TokenText(self._shown, classes="body") if self._colours_tokens() else
                   Static(self._shown, classes="body"))

    def on_markdown_link_clicked(self, event: Markdown.LinkClicked) -> None:
        # A reply's links are the model's words, not the user's choice: show where one points
        # (the terminal can open it from there) instead of opening it.
        event.stop()
        self.app.notify(f"link (not opened): {one_line(event.href)}", timeout=10)

    def focus_on_click(self) -> bool:
        # A click on a coloured token selects it for the expert panel; taking the focus too would
        # pull it from the prompt the user is typing in. A click elsewhere focuses the message for
        # Ctrl+Y / Ctrl+K. Textual asks before forwarding the MouseDown, so look at what is under it.
        try:
            style = self.screen.get_style_at(*self.app.mouse_position)
        except Exception:  # noqa: BLE001 - not on screen: nothing under the pointer to protect
            return True
        return "@click" not in style.meta

    def _label(self) -> str:
        marks = {"interrupted": " · stopped", "length": " · cut at the token limit",
                 "context": " · cut: the context is full",
                 "error": " · failed", None: " · unfinished"}
        mark = "" if self.streaming or self.role == "user" else marks.get(self.stop, "")
        return ("you" if self.role == "user" else "assistant") + mark

    def _colours_tokens(self) -> bool:
        """Whether the body is coloured tokens rather than Markdown: with the expert view on, for a
        reply with routing (a reply being written is given an expert layer only on a MoE model)."""
        if self.expert_layer is None:
            return False
        return self.streaming or (bool(self.tokens) and self.tokens[0][1] is not None)

    def _body(self) -> Text:
        if self.expert_layer is None or not self.tokens or self.tokens[0][1] is None:
            return literal(self.text)
        out = Text()
        self._add_tokens(out, 0, self.expert_layer)
        return out

    def _add_tokens(self, out: Text, first: int, layer: int) -> None:
        """Append tokens[first:] to `out`, each on its expert's colour at `layer` (as in the Mixtral
        paper's routing figure) with the text colour that keeps it readable, and clickable for
        details."""
        for i in range(first, len(self.tokens)):
            piece, experts, _ = self.tokens[i]
            if experts is None:  # no routing to colour by
                out.append(visible(piece))
                continue
            e = experts[min(layer, len(experts) - 1)][0]
            out.append(visible(piece), Style(bgcolor=expert_color(e), color=expert_text_color(e),
                                             meta={"@click": f"app.select_token({self.index},{i})"}))

    async def refresh_body(self) -> None:
        await self.remove_children()
        await self.mount_all(list(self.compose()))

    def redraw(self) -> None:
        """refresh_body, run on this widget's own queue. Awaited in one of the app's handlers it
        would hold up the app's queue, and for good if the tab is closed meanwhile (the removal
        waits for that queue while the mount waits for the removed tab)."""
        self.call_later(self.refresh_body)

    def extend(self, pieces: list[tuple[str, list | None, list | None]]) -> None:
        """Streaming: add a batch of tokens to what is shown, without redrawing what is there."""
        first = len(self.tokens)
        self.tokens.extend(pieces)
        added = "".join(p[0] for p in pieces)
        self.text += added
        if self._markdown is not None:
            self._unsent += added
            if not self._pumping:
                self._pumping = True
                self.call_later(self._pump_markdown)
        elif self._shown is not None:
            # A reply that is not Markdown is coloured tokens (see compose), in the layer it began
            # with: a layer chosen meanwhile recolours it all once it ends.
            part = Text()
            self._add_tokens(part, first, self._drawn_layer)
            self._shown.append_text(part)
            self.query_one(".body", TokenText).append(part)

    async def _pump_markdown(self) -> None:
        # One Markdown.append at a time: each works out, when called, which lines it re-parses
        # (from the last top-level block on), so two in flight would mount the same blocks twice.
        # What arrives meanwhile is appended in one go next.
        try:
            while self._markdown is not None and self._unsent:
                raw = self._unsent
                # A CR that may be the first half of CR LF waits for the next piece: `visible`
                # drops it then, and shows it otherwise.
                keep = 1 if raw.endswith("\r") else 0
                chunk, self._unsent = raw[:len(raw) - keep], raw[len(raw) - keep:]
                if not chunk:
                    break
                await self._markdown.append(visible(chunk))
        finally:
            self._pumping = False

    def finish(self, stop: str, text: str) -> None:
        """The reply is done: mark it (stopped, cut...) and settle its text, on this widget's own
        queue (after the Markdown appends still queued there; see redraw for why not awaited)."""
        self.streaming, self.stop = False, stop
        self.call_later(self._settle, text)

    async def _settle(self, text: str) -> None:
        streamed, self.text = self.text, text
        wants_markdown = self.role == "assistant" and not self._colours_tokens()
        if self._drawn_layer != self.expert_layer or (self._markdown is not None) != wants_markdown:
            await self.refresh_body()  # the expert view was switched while it streamed
            return
        self.query_one(".role", Static).update(Text(self._label()))
        if self._markdown is not None:
            await self._pump_markdown()
            if self._unsent or self._markdown.source != visible(text):
                self._unsent = ""
                await self._markdown.update(visible(text))
        elif streamed != text:
            self._shown = self._body()
            self.query_one(".body").update(self._shown)


class ContextDivider(Static):
    """The line above the first message the model still sees, once the oldest were dropped to fit
    its context."""

    DEFAULT_CSS = "ContextDivider { height: 1; margin: 0 0 1 0; color: $warning; text-align: center; }"

    def __init__(self, start: int, dropped_tokens: int | None, context: int | None) -> None:
        super().__init__(Text(context_cut_text(dropped_tokens, context)))
        self.start, self.dropped_tokens, self.context = start, dropped_tokens, context


def context_cut_text(dropped_tokens: int | None, context: int | None) -> str:
    why = f"to fit the {context}-token context" if context else "to fit the context"
    dropped = f"{dropped_tokens} tokens dropped {why}" if dropped_tokens is not None else f"dropped {why}"
    return f"─ the model no longer sees the messages above ({dropped}) ─"


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
