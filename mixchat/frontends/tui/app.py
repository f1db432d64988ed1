"""MixchatApp: the Textual front end. It holds the engine for the worker threads but never touches
tensors: it sends turns through mixchat.conversations.chat.Chat in a worker thread, and the worker reports
back only by posting messages (post_message never waits, so drawing cannot slow decoding).

Everything shown that the user, the model or a file wrote goes through mixchat.frontends.tui.literal (or
one_line / visible): Textual would read it as markup, and a terminal obeys its control characters.

The app's jobs beyond layout, status and the small actions are mixins, one module each: loading and
choosing the model and the settings sheet (mixchat.frontends.tui.models), the conversation list
(mixchat.frontends.tui.conversations), sending and streaming replies (mixchat.frontends.tui.sending),
and quitting on Ctrl+Q or a signal (mixchat.frontends.tui.quitting).
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from rich.text import Text
from textual import events
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.css.query import NoMatches
from textual.notifications import SeverityLevel
from textual.screen import ModalScreen, Screen
from textual.widgets import Footer, ProgressBar, Static, TabbedContent

from mixchat import settings as settings_mod
from mixchat.errors import MixchatError
from mixchat.frontends.tui import clipboard, history
from mixchat.frontends.tui import state as app_state
from mixchat.frontends.tui.conversations import ConversationsMixin
from mixchat.frontends.tui.expertpanel import ExpertPanel
from mixchat.frontends.tui.messages import ModelFailed
from mixchat.frontends.tui.models import ModelsMixin
from mixchat.frontends.tui.panes import ChatPane
from mixchat.frontends.tui.quitting import QuittingMixin
from mixchat.frontends.tui.screens import HelpScreen, RenameScreen
from mixchat.frontends.tui.sending import SendingMixin
from mixchat.frontends.tui.sidebar import ConversationList, Sidebar
from mixchat.frontends.tui.status import StatusBar, status_text
from mixchat.frontends.tui.widgets import LineInput, MessageView, PromptInput
from mixchat.safetext import one_line, visible
from mixchat.settings import Settings

CODE_BLOCK = re.compile(r"```[^\n]*\n(.*?)```", re.S)


NARROW = 120  # below this many columns the expert panel is compact and the sidebar makes way for it
TINY = 64  # below this the sidebar's 32 columns would leave the conversation too few: it makes way for that too

# What a new tab shows until its first message: where to type and where the help is.
HINT = ("Type your message in the box below and press Enter to send it (Ctrl+J starts a new line).\n"
        "F1 help · Ctrl+P every command · F2 settings · Ctrl+L choose a model · Ctrl+O saved conversations")
DEMO_HINT = ("\n\nThis is the small demo model, trained here on Jane Austen: it writes Austen-flavoured "
             "sentences, not answers. Ctrl+L or F2 loads a real Mistral/Mixtral release folder.")

# Every action, for the command palette (Ctrl+P): (title, help with its key, action).
COMMANDS = (
    ("New chat", "Ctrl+N · a new conversation in a new tab", "new_chat"),
    ("Close tab", "Ctrl+F4 · the conversation stays saved", "close_tab"),
    ("Next tab", "Ctrl+PgDn (Alt+1…9: a tab by number, where the terminal reports Alt)", "next_tab"),
    ("Previous tab", "Ctrl+PgUp", "previous_tab"),
    ("Rename this conversation", "F6 in the conversation list", "rename_current"),
    ("Delete this conversation", "Delete in the conversation list; asks first", "delete_current"),
    ("Export this conversation as Markdown", "written to a .md file; the notice says where", "export('markdown')"),
    ("Export this conversation as JSON", "written to a .json file: every message with its metadata", "export('json')"),
    ("Settings", "F2 · model folder, sampling, dtype, threads, memory", "settings"),
    ("Expert view", "F3 · which experts each token went to (Mixtral-style models)", "toggle_experts"),
    ("Next expert layer", "F4", "next_layer"),
    ("Previous expert layer", "Shift+F4", "previous_layer"),
    ("Switch model", "Ctrl+L · recent release folders, or type a path", "pick_model"),
    ("Copy reply", "F8 · the last reply, or the message you clicked", "copy_reply"),
    ("Copy code block", "F9 · the last code block of that message", "copy_code"),
    ("Regenerate the last reply", "Ctrl+R / F5 · the KV cache rewinds", "regenerate"),
    ("Edit your last message", "F12 · it comes back into the input; Enter resends it", "edit_last"),
    ("Stop the reply", "Esc · what was written is kept and saved", "stop"),
    ("Saved conversations", "Ctrl+O · the list on the left, with its filter and search", "focus_sidebar"),
    ("Show or hide the conversation list", "Ctrl+B", "toggle_sidebar"),
    ("Help", "F1 · keys and what the screen shows", "help"),
)


# The mixins come before App: their action_quit and run override App's.
class MixchatApp(ModelsMixin, ConversationsMixin, SendingMixin, QuittingMixin, App):
    TITLE = "mixchat"
    CSS = """
    #main { height: 1fr; }
    #center { width: 1fr; }
    #load { height: 1; display: none; }
    #load.active { display: block; }
    ExpertPanel { display: none; }
    ExpertPanel.shown { display: block; }
    Sidebar.hidden { display: none; }
    TabbedContent { height: 1fr; }
    TabPane { padding: 0; }
    /* The hint is a new tab's first child: alone (the last child too) until the first message. */
    ChatLog > .empty-hint { display: none; color: $text-muted; padding: 1 1; }
    ChatLog > .empty-hint:last-child { display: block; }
    """
    # The input (a TextArea) keeps its own editing keys (Ctrl+A/E/K/U/W/Y/Z, Alt+arrows, F6/F7):
    # the app's actions are on keys it does not use, and every one of them is in the palette.
    # The footer shows only the five a newcomer needs; F1 and Ctrl+P list the rest.
    BINDINGS = [
        # Enter is the input's: it sends from there. Listed so the footer says so; from elsewhere
        # (focus on a message) it sends what the input holds.
        Binding("enter", "send_prompt", "Send"),
        Binding("escape", "stop", "Stop"),
        Binding("f1", "help", "Help"),
        Binding("f2", "settings", "Settings"),
        Binding("f3", "toggle_experts", "Experts"),
        Binding("f4", "next_layer", "Layer+", show=False),
        Binding("shift+f4", "previous_layer", "Layer-", show=False),
        Binding("ctrl+r,f5", "regenerate", "Regenerate", show=False),
        Binding("f12", "edit_last", "Edit last", show=False),
        Binding("f8", "copy_reply", "Copy", show=False),
        Binding("f9", "copy_code", "Copy code", show=False),
        Binding("ctrl+n", "new_chat", "New", show=False),
        Binding("ctrl+f4", "close_tab", "Close tab", show=False),
        Binding("ctrl+pagedown", "next_tab", "Next tab", show=False),
        Binding("ctrl+pageup", "previous_tab", "Previous tab", show=False),
        *[Binding(f"alt+{n}", f"tab({n})", f"Tab {n}", show=False) for n in range(1, 10)],
        Binding("ctrl+l", "pick_model", "Model", show=False),
        Binding("ctrl+b", "toggle_sidebar", "Sidebar", show=False),
        # priority: handled as it is read, so keys typed right after it already find the list.
        Binding("ctrl+o", "focus_sidebar", "Conversations", priority=True, show=False),
        Binding("ctrl+q", "quit", "Quit", show=False),
    ]

    # While a question or a sheet is up, the keys are its own: Ctrl+O moved the focus to the list behind the
    # other-model question (what was typed next filtered the list, Enter and Esc no longer answered it), Ctrl+N
    # opened a tab behind it. Quitting still works (Ctrl+Q saves and leaves); Tab and Ctrl+P are Textual's.
    ANSWER_FIRST = frozenset(b.action.split("(")[0] for b in BINDINGS) - {"quit"}

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        return not (action in self.ANSWER_FIRST and isinstance(self.screen, ModalScreen))

    def __init__(self, model: str | None = None, settings: Settings | None = None, first_message: str | None = None,
                 store=None, demo_note: str | None = None, notes: list[str] | None = None,
                 open_cid: str | None = None, saved_keys: frozenset[str] | None = None,
                 flag_keys: frozenset[str] = frozenset()) -> None:
        super().__init__()
        from mixchat.engine.engine import keep_thread_serial

        keep_thread_serial()  # this (UI) thread's few tensor allocations must not slow the decoding worker
        self.settings = settings or settings_mod.load()
        self.model_folder = model or self.settings.model
        self.first_message = first_message
        self.demo_note = demo_note
        self.start_notes = list(notes or [])  # shown once the screen is up (a settings value left out, ...)
        self.open_cid = open_cid  # -c / --cid: the conversation to open (as the active tab)
        # The settings the user chose (in settings.json, or changed in the sheet since): the only ones saved. The
        # rest are defaults or a release folder's recommendation (the demo's repeat penalty), which must not
        # become the user's choice for every folder because the sheet was saved once.
        # (Given settings without their keys, as tests and embedders build the app: all of them are the user's.)
        if saved_keys is None:
            saved_keys = settings_mod.load_with_keys()[1] if settings is None else settings_mod.KEYS
        self.saved_keys = set(saved_keys)
        self.flag_keys = set(flag_keys)  # the settings a command-line flag chose (until the sheet changes them)
        self._demo_folder = self.model_folder if demo_note else None
        if store is None:
            from mixchat import paths
            from mixchat.conversations.store import Store

            store = Store(paths.store_path())
        self.store = store
        self.engine = None
        self.pool = None
        self.model_error: str | None = None
        self.load_step: str | None = None  # what loading the model does now, for the status bar
        self.show_experts = False
        self._panes = 0
        self._filter = ""
        self._history = history.load()
        self._queued: list[str] = []  # typed before the model was loaded
        self._quitting = False
        self._signals: list[int] = []
        self._watchdog: threading.Timer | None = None
        self._finished = False  # run() has returned
        self.state = app_state.load()
        self._saved_tabs: tuple | None = None  # what the state file holds now
        self._restored = False  # until the last run's tabs are open again, there is nothing to save
        self._state_warned = False
        self._selected: tuple | None = None  # the pinned token (clicked), else None: follow the newest
        self._selected_at: tuple[int, int] | None = None
        self._sidebar_made_way = False  # the sidebar was hidden to make room for the expert panel
        self._sidebar_chosen = False  # shown by the user (Ctrl+B, Ctrl+O) where it would make way: a resize keeps it
        self._model_asked: set[str] = set()  # panes already asked about the model they were written with

    # -- layout ----------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        # Kept as attributes: App.query_one searches the active screen, which is a modal one
        # while the settings or help are open, and the workers' messages keep arriving then.
        # The filter box keeps its text on focus: typing in the list moves there, key by key.
        self.filter_box = LineInput(placeholder="filter / search", id="filter",
                                    select_on_focus=False)
        self.sidebar, self.conversations = Sidebar(), ConversationList(self.filter_box, id="conversations")
        self.tabs, self.load_bar = TabbedContent(id="tabs"), ProgressBar(id="load", total=100, show_eta=False)
        self.prompt = PromptInput(self._history, id="prompt",
                                  placeholder="Type a message, then Enter · F1 help")
        self.expert_panel, self.status_bar = ExpertPanel(id="experts"), StatusBar(id="status")
        with Horizontal(id="main"):
            with self.sidebar:
                yield self.filter_box
                yield self.conversations
            with Vertical(id="center"):
                yield self.tabs
                yield self.load_bar
                yield self.prompt
            yield self.expert_panel
        yield self.status_bar
        yield Footer()

    async def on_mount(self) -> None:
        self._catch_signals()
        self.refresh_sidebar()
        await self._restore_tabs()
        # Focus now, not via focus() (queued behind keys typed during start-up: a Ctrl+O then
        # went to the list and the prompt took the focus back from under the typing).
        self.screen.set_focus(self.prompt)
        self.set_interval(0.25, self.update_status)
        if self.model_folder and self.model_folder == self.settings.model and \
                not Path(self.model_folder).expanduser().is_dir():
            # said as one-shot says it: where the folder came from, and where to choose another
            self.post_message(ModelFailed(f"the model folder saved in the settings ({settings_mod.settings_path()}), "
                                          f"{one_line(self.model_folder)}, is not a folder: choose one with Ctrl+L "
                                          "or F2"))
        elif self.model_folder:
            self.load_model(self.model_folder)
        else:
            self.model_error = "no model: press Ctrl+L or F2 and choose a model folder (a Mistral/Mixtral release)"
        self._fit_width(self.size.width)
        self.update_status()
        for note in self.start_notes:
            self.notify(note, title="settings", severity="warning", timeout=20)

    async def _restore_tabs(self) -> None:
        """Reopen the tabs open when the app last closed; one whose conversation is gone is skipped."""
        for cid in list(self.state.tabs):
            try:
                conv = self.store.get(cid)
            except MixchatError:  # deleted since (`mixchat rm`), or the store is another one now
                continue
            await self.new_pane(conv.id, conv.title)
        if self.open_cid is not None:  # -c / --cid: that conversation, in its tab if one is open, and active
            pane = next((p for p in self.tabs.query(ChatPane) if p.holds(self.open_cid)), None)
            if pane is None:
                conv = self.store.get(self.open_cid)
                pane = await self.new_pane(conv.id, conv.title)
            self.tabs.active = pane.id
        elif self.first_message or not list(self.tabs.query(ChatPane)):
            await self.new_pane()  # the piped first message gets a tab of its own
        elif self.state.active:
            for pane in self.tabs.query(ChatPane):
                if pane.holds(self.state.active):
                    self.tabs.active = pane.id
        self._restored = True
        self.save_tabs()

    def on_unmount(self) -> None:
        self._release_signals()

    def notify(self, message: str, *, title: str = "", severity: SeverityLevel = "information",
               timeout: float | None = None, markup: bool = False) -> None:
        """Textual's notify, but never markup: notices quote paths, titles, errors and replies.
        `markup` is accepted for Textual's own callers and ignored."""
        super().notify(visible(message), title=one_line(title), severity=severity, timeout=timeout, markup=False)

    # -- panes (tabs) ----------------------------------------------------------------------------

    @property
    def pane(self) -> ChatPane | None:
        try:
            active = self.tabs.active_pane
        except NoMatches:  # the app is closing and the tabs are half taken down: the status timer asks
            return None
        return active if isinstance(active, ChatPane) else None

    async def new_pane(self, cid: str | None = None, title: str = "new chat") -> ChatPane:
        self._panes += 1
        pane = ChatPane(f"pane{self._panes}", title, cid)
        tabs = self.tabs
        await tabs.add_pane(pane)
        tabs.active = pane.id
        stored = self.store.messages(cid) if cid else []
        if not stored:
            hint = Text(HINT) + (Text(DEMO_HINT, style="italic") if self._demo_model() else Text())
            await pane.log_view.mount(Static(hint, classes="empty-hint"))
        if cid:
            for i, m in enumerate(stored):
                tokens = None
                if m.experts and m.token_ids and len(m.experts) == len(m.token_ids) and self.engine_tokenizer():
                    tokens = self._token_texts(m.token_ids, m.experts)
                await pane.log_view.mount(MessageView(m.role, m.content, i, m.stop, tokens))
                if m.experts:
                    for e in m.experts:
                        pane.count_usage(e)
            # once the messages are laid out (now the log's height is not known yet, and scrolling to its end
            # left a reopened conversation at its first exchange)
            self.call_after_refresh(pane.log_view.scroll_end, animate=False)
        if self.engine is not None:
            self.attach_chat(pane)
            pane.last_token = self._last_token(pane)
            self.check_model(pane)
        return pane

    @staticmethod
    def _last_token(pane: ChatPane) -> tuple | None:
        """The newest token with routing in a reopened conversation: the expert view starts there."""
        replies = [v for v in pane.views() if v.role == "assistant" and v.tokens]
        return replies[-1].tokens[-1] if replies else None

    def engine_tokenizer(self):
        return self.engine.tokenizer if self.engine else None

    def _token_texts(self, ids: list[int], experts: list) -> list:
        from mixchat.text.tokenizer import StreamDecoder

        dec = StreamDecoder(self.engine.tokenizer)
        return [(dec.push(t), e, None) for t, e in zip(ids, experts, strict=False)]

    async def _close_pane(self, pane: ChatPane) -> None:
        pane.cancel.set()
        await self.tabs.remove_pane(pane.id)
        if not list(self.tabs.query(ChatPane)):
            await self.new_pane()

    # -- status and the state file ----------------------------------------------------------------

    def _demo_model(self) -> bool:
        return self._demo_folder is not None and self.model_folder == self._demo_folder

    def update_status(self) -> None:
        text = self._status_text()
        if text != getattr(self, "_last_status", None):  # the timer ticks 4x a second; redraw only changes
            self._last_status = text
            self.status_bar.update(text, layout=False)  # the bar is 2 lines high whatever it says
        self.save_tabs()

    def _status_text(self) -> Text:
        # The bar's padding takes a column on each side; before the first layout the app's width stands in.
        width = (self.status_bar.size.width or self.size.width) - 2
        return status_text(self.engine, self.pane, self.model_error, self.model_folder, self._demo_model(),
                           width=max(width, 20), when_full=self.settings.when_full, load_step=self.load_step)

    def save_tabs(self) -> None:
        """Keep the open conversations and the active one in the state file, when they changed (a
        new chat learns its id from its first reply, so this runs with the status timer too)."""
        if not self._restored or self._quitting or self.return_code is not None or not self.tabs.is_attached:
            return  # the tabs are being taken down: what the file holds is what was open
        panes = list(self.tabs.query(ChatPane))
        ids = [cid for p in panes if (cid := p.cid or (p.chat.id if p.chat else None))]
        active = self.pane
        active_id = (active.cid or (active.chat.id if active.chat else None)) if active else None
        if (ids, active_id) == self._saved_tabs:
            return
        self._saved_tabs = (ids, active_id)
        self.state.tabs, self.state.active = ids, active_id
        self._write_state()

    def _write_state(self) -> None:
        try:
            app_state.save(self.state)
        except OSError as exc:  # told once: the tabs are not remembered, nothing else is lost
            if not self._state_warned:
                self._state_warned = True
                self.notify(f"could not save the open tabs to {app_state.state_path()}: {exc.strerror or exc}",
                            severity="warning")

    def on_resize(self, event: events.Resize) -> None:
        self._fit_width(event.size.width)
        self.update_status()

    def _fit_width(self, width: int) -> None:
        """Narrow terminals: a compact expert panel, and the sidebar out of its way while it shows."""
        narrow = width < NARROW
        self.expert_panel.set_class(narrow, "narrow")
        if (narrow and self.show_experts) or width < TINY:
            if not self._sidebar_chosen:
                self._make_way()
        elif self._sidebar_made_way:  # wide enough again for what it made way for: back as it was
            self._sidebar_made_way = False
            self.sidebar.remove_class("hidden")
        self.refresh_experts()

    def _make_way(self) -> None:
        """Hide the sidebar for the expert panel (Ctrl+B brings it back; closing the panel too)."""
        if not self.sidebar.has_class("hidden"):
            self.sidebar.add_class("hidden")
            self._sidebar_made_way = True

    # -- the expert view ---------------------------------------------------------------------------

    def refresh_experts(self) -> None:
        panel = self.expert_panel
        pane = self.pane
        if self.engine is None or pane is None or not self.show_experts:
            return
        a = self.engine.args
        n = a.moe.num_experts if a.moe else 0
        usage = pane.usage or [Counter() for _ in range(a.n_layers)]
        # The newest token unless one is pinned (clicked): the panel follows the reply as it streams.
        token = self._selected or pane.last_token
        title = "pinned token" if self._selected else "newest token"
        panel.show(a.moe is not None, n, min(self.settings.expert_layer, a.n_layers - 1), token, usage, title,
                   compact=panel.has_class("narrow"))

    def action_toggle_experts(self) -> None:
        self.show_experts = not self.show_experts
        self.expert_panel.set_class(self.show_experts, "shown")
        if self.show_experts and self.size.width < NARROW:
            self._sidebar_chosen = False  # the panel is the newer choice
            self._make_way()
        elif not self.show_experts and self._sidebar_made_way and self.size.width >= TINY:
            self._sidebar_made_way = False
            self.sidebar.remove_class("hidden")  # it was hidden for the panel: back as it was
        self._recolour()
        self.refresh_experts()

    def _step_layer(self, step: int) -> None:
        if self.engine is None:
            return
        self.settings.expert_layer = (self.settings.expert_layer + step) % self.engine.args.n_layers
        self._recolour()
        self.refresh_experts()
        self.notify(f"expert view: layer {self.settings.expert_layer}", timeout=2)

    def action_next_layer(self) -> None:
        self._step_layer(1)

    def action_previous_layer(self) -> None:
        self._step_layer(-1)

    def _recolour(self) -> None:
        pane = self.pane
        if pane is None:
            return
        for view in pane.views():
            if view.role == "assistant":
                view.expert_layer = self.settings.expert_layer if self.show_experts else None
                if not view.streaming:
                    view.redraw()

    def action_select_token(self, message_index: int, token_index: int) -> None:
        """Pin a clicked token in the expert view; clicking it again unpins (the view follows the reply)."""
        pane = self.pane
        views = pane.views() if pane else []
        if self._selected_at == (message_index, token_index):
            self.unpin_token()
            return
        if message_index < len(views) and token_index < len(views[message_index].tokens):
            self._selected = views[message_index].tokens[token_index]
            self._selected_at = (message_index, token_index)
            self.refresh_experts()

    def unpin_token(self) -> None:
        self._selected = self._selected_at = None
        self.refresh_experts()

    def action_stop(self) -> None:
        pane = self.pane
        if self._selected is not None and not (pane and pane.busy):
            self.unpin_token()  # Esc with nothing to stop lets go of the pinned token
            return
        super().action_stop()

    # -- actions ---------------------------------------------------------------------------------

    def action_send_prompt(self) -> None:
        """Enter pressed outside the input (on a message): send what the input holds."""
        text = self.prompt.text
        if text.strip():
            self.prompt.clear()
            self.prompt.post_message(PromptInput.Submitted(text))

    def _message_to_copy(self) -> tuple[str, str]:
        """The focused message (click or Tab to one), else the last reply."""
        if isinstance(self.focused, MessageView):
            return self.focused.text, "message"
        pane = self.pane
        views = [v for v in pane.views() if v.role == "assistant"] if pane else []
        return (views[-1].text if views else ""), "reply"

    def copy(self, text: str, what: str) -> None:
        if not text:
            self.notify(f"no {what} to copy")
            return
        ways = clipboard.copy(self, text)
        if ways:
            self.notify(f"copied the {what} ({len(text)} characters) via {' and '.join(ways)}")
        else:
            self.notify(f"could not copy the {what}: the terminal refused OSC 52 and no clipboard tool "
                        "(wl-copy, xclip, xsel, pbcopy) is installed", severity="warning")

    def action_copy_reply(self) -> None:
        self.copy(*self._message_to_copy())

    def action_copy_code(self) -> None:
        blocks = CODE_BLOCK.findall(self._message_to_copy()[0])
        self.copy(blocks[-1] if blocks else "", "code block")

    async def action_new_chat(self) -> None:
        await self.new_pane()
        self.prompt.focus()

    async def action_close_tab(self) -> None:
        if self.pane is not None:
            await self._close_pane(self.pane)
            self.save_tabs()

    def _step_tab(self, step: int) -> None:
        panes = list(self.tabs.query(ChatPane))
        if self.pane in panes:
            self.tabs.active = panes[(panes.index(self.pane) + step) % len(panes)].id

    def action_next_tab(self) -> None:
        self._step_tab(1)

    def action_previous_tab(self) -> None:
        self._step_tab(-1)

    def action_tab(self, number: int) -> None:
        panes = list(self.tabs.query(ChatPane))
        if 1 <= number <= len(panes):
            self.tabs.active = panes[number - 1].id

    def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        self._selected = self._selected_at = None  # a pinned token belongs to the tab it was clicked in
        self.refresh_experts()
        self.update_status()
        if isinstance(event.pane, ChatPane):
            self.check_model(event.pane)

    def _current(self) -> tuple[str, str] | None:
        """The active tab's saved conversation: (id, title); None (with a notice) for a new chat."""
        pane = self.pane
        cid = (pane.cid or (pane.chat.id if pane.chat else None)) if pane else None
        if not cid:
            self.notify("this chat is not saved yet: send a message first")
            return None
        try:
            return cid, self.store.get(cid).title
        except MixchatError as exc:
            self.notify(str(exc), severity="warning")
            return None

    def action_rename_current(self) -> None:
        if chosen := self._current():
            cid, title = chosen
            self.push_screen(RenameScreen(title), lambda new: self._rename(cid, new))

    def action_delete_current(self) -> None:
        if chosen := self._current():
            self.ask_delete(*chosen)

    def action_export(self, kind: str) -> None:
        if not (chosen := self._current()):
            return
        from mixchat.frontends.tui import exports

        try:
            path = exports.export_to_file(self.store, chosen[0], kind)
        except (MixchatError, OSError) as exc:
            self.notify(f"could not export: {exc}", severity="error", timeout=10)
            return
        self.notify(f"exported to {path}", timeout=10)

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for title, help_text, action in COMMANDS:
            yield SystemCommand(title, help_text, lambda action=action: self.run_action(action))
