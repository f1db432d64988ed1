"""MixchatApp: the Textual front end. It holds the engine for the worker threads but never touches
tensors: it sends turns through mixchat.chat.Chat in a worker thread, and the worker reports
back only by posting messages (post_message never waits, so drawing cannot slow decoding).

Everything shown that the user, the model or a file wrote goes through mixchat.tui.literal (or
one_line / visible): Textual would read it as markup, and a terminal obeys its control characters.

The app's jobs beyond layout, model loading, status and the small actions are mixins, one module
each: the conversation list (mixchat.tui.conversations), sending and streaming replies
(mixchat.tui.sending), and quitting on Ctrl+Q or a signal (mixchat.tui.quitting).
"""

from __future__ import annotations

import re
import threading
from collections import Counter

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.css.query import NoMatches
from textual.notifications import SeverityLevel
from textual.widgets import Footer, ProgressBar, TabbedContent

from mixchat import settings as settings_mod
from mixchat.errors import MixchatError
from mixchat.safetext import one_line, visible
from mixchat.settings import Settings
from mixchat.tui import clipboard, history
from mixchat.tui.conversations import ConversationsMixin
from mixchat.tui.expertpanel import ExpertPanel
from mixchat.tui.messages import ModelFailed, ModelLoaded, ModelProgress
from mixchat.tui.panes import ChatPane
from mixchat.tui.quitting import QuittingMixin
from mixchat.tui.screens import HelpScreen, SettingsScreen
from mixchat.tui.sending import SendingMixin
from mixchat.tui.sidebar import ConversationList, Sidebar
from mixchat.tui.status import StatusBar, status_text
from mixchat.tui.widgets import LineInput, MessageView, PromptInput

CODE_BLOCK = re.compile(r"```[^\n]*\n(.*?)```", re.S)


# The mixins come before App: their action_quit and run override App's.
class MixchatApp(ConversationsMixin, SendingMixin, QuittingMixin, App):
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
    """
    # priority: the input (a TextArea) has its own meaning for these keys and would swallow them.
    BINDINGS = [
        ("escape", "stop", "Stop"),
        ("ctrl+r", "regenerate", "Regenerate"),
        Binding("ctrl+e", "edit_last", "Edit last", priority=True),
        Binding("ctrl+y", "copy_reply", "Copy", priority=True),
        Binding("ctrl+k", "copy_code", "Copy code", priority=True),
        ("ctrl+n", "new_chat", "New"),
        Binding("ctrl+w", "close_tab", "Close tab", priority=True),
        ("ctrl+b", "toggle_sidebar", "Sidebar"),
        # priority: handled as it is read, so keys typed right after it already find the list.
        Binding("ctrl+o", "focus_sidebar", "Conversations", priority=True),
        ("f1", "help", "Help"),
        ("f2", "settings", "Settings"),
        ("f3", "toggle_experts", "Experts"),
        ("f4", "next_layer", "Layer+"),
        ("ctrl+q", "quit", "Quit"),
    ]

    def __init__(self, model: str | None = None, settings: Settings | None = None, first_message: str | None = None,
                 store=None, demo_note: str | None = None) -> None:
        super().__init__()
        self.settings = settings or settings_mod.load()
        self.model_folder = model or self.settings.model
        self.first_message = first_message
        self.demo_note = demo_note
        self._demo_folder = self.model_folder if demo_note else None
        if store is None:
            from mixchat import paths
            from mixchat.store import Store

            store = Store(paths.store_path())
        self.store = store
        self.engine = None
        self.pool = None
        self.model_error: str | None = None
        self.show_experts = False
        self._panes = 0
        self._filter = ""
        self._history = history.load()
        self._queued: list[str] = []  # typed before the model was loaded
        self._quitting = False
        self._signals: list[int] = []
        self._watchdog: threading.Timer | None = None
        self._finished = False  # run() has returned

    # -- layout ----------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        # Kept as attributes: App.query_one searches the active screen, which is a modal one
        # while the settings or help are open, and the workers' messages keep arriving then.
        # The filter box keeps its text on focus: typing in the list moves there, key by key.
        self.filter_box = LineInput(placeholder="filter conversations", id="filter", select_on_focus=False)
        self.sidebar, self.conversations = Sidebar(), ConversationList(self.filter_box, id="conversations")
        self.tabs, self.load_bar = TabbedContent(id="tabs"), ProgressBar(id="load", total=100, show_eta=False)
        self.prompt = PromptInput(self._history, id="prompt")
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
        await self.new_pane()
        # Focus now, not via focus() (queued behind keys typed during start-up: a Ctrl+O then
        # went to the list and the prompt took the focus back from under the typing).
        self.screen.set_focus(self.prompt)
        self.set_interval(0.25, self.update_status)
        if self.model_folder:
            self.load_model(self.model_folder)
        else:
            self.model_error = "no model: press F2 and set the model folder (a Mistral/Mixtral release)"
        if self.demo_note:
            self.notify(self.demo_note, timeout=12)
        self.update_status()

    def on_unmount(self) -> None:
        self._release_signals()

    def notify(self, message: str, *, title: str = "", severity: SeverityLevel = "information",
               timeout: float | None = None, markup: bool = False) -> None:
        """Textual's notify, but never markup: notices quote paths, titles, errors and replies.
        `markup` is accepted for Textual's own callers and ignored."""
        super().notify(visible(message), title=one_line(title), severity=severity, timeout=timeout, markup=False)

    # -- model loading (worker thread) -----------------------------------------------------------

    @work(thread=True, exclusive=True, group="load")
    def load_model(self, folder: str) -> None:
        from mixchat.engine import Engine

        try:
            engine = Engine.load(folder, dtype=self.settings.dtype, threads=self.settings.threads or None,
                                 quant=self.settings.quant, show_progress=False,
                                 memory_budget=self.settings.memory_budget_gb * 1e9 or None,
                                 context=self.settings.context or None,
                                 on_progress=lambda d, t: self.post_message(ModelProgress(d, t)))
        except MixchatError as exc:
            self.post_message(ModelFailed(str(exc)))
            return
        self.post_message(ModelLoaded(engine))

    def on_model_progress(self, msg: ModelProgress) -> None:
        bar = self.load_bar
        bar.add_class("active")
        bar.update(total=msg.total, progress=msg.done)

    async def on_model_loaded(self, msg: ModelLoaded) -> None:
        from mixchat import kvstore, paths

        self.load_bar.remove_class("active")
        self.engine, self.model_error = msg.engine, None
        self.pool = kvstore.SessionPool(self.engine, paths.kv_dir(), int(self.settings.kv_memory_gb * 1e9))
        for pane in self.tabs.query(ChatPane):
            self.attach_chat(pane)
        self.update_status()
        self.refresh_experts()
        if self.first_message:
            self._queued.insert(0, self.first_message)
            self.first_message = None
        if self._queued:
            self.send(self._queued.pop(0))  # one at a time: the rest were typed while it loaded
            if self._queued:
                self.prompt.load_text("\n\n".join(self._queued))
                self._queued.clear()

    def on_model_failed(self, msg: ModelFailed) -> None:
        self.load_bar.remove_class("active")
        self.model_error = msg.error
        self.notify(msg.error, title="the model could not be loaded", severity="error", timeout=15)
        self.update_status()

    def attach_chat(self, pane: ChatPane) -> None:
        from mixchat.chat import Chat

        conv = self.store.get(pane.cid) if pane.cid else None
        pane.chat = Chat(self.engine, self.pool, self.store, conv, self.settings.system or None)
        for note in pane.chat.notes:
            self.notify(note, timeout=10)

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
        if cid:
            for i, m in enumerate(self.store.messages(cid)):
                tokens = None
                if m.experts and m.token_ids and len(m.experts) == len(m.token_ids) and self.engine_tokenizer():
                    tokens = self._token_texts(m.token_ids, m.experts)
                await pane.log_view.mount(MessageView(m.role, m.content, i, m.stop, tokens))
                if m.experts:
                    for e in m.experts:
                        pane.count_usage(e)
            pane.log_view.scroll_end(animate=False)
        if self.engine is not None:
            self.attach_chat(pane)
        return pane

    def engine_tokenizer(self):
        return self.engine.tokenizer if self.engine else None

    def _token_texts(self, ids: list[int], experts: list) -> list:
        from mixchat.tokenizer import StreamDecoder

        dec = StreamDecoder(self.engine.tokenizer)
        return [(dec.push(t), e, None) for t, e in zip(ids, experts, strict=False)]

    async def _close_pane(self, pane: ChatPane) -> None:
        pane.cancel.set()
        await self.tabs.remove_pane(pane.id)
        if not list(self.tabs.query(ChatPane)):
            await self.new_pane()

    # -- status ----------------------------------------------------------------------------------

    def update_status(self) -> None:
        text = self._status_text()
        if text != getattr(self, "_last_status", None):  # the timer ticks 4x a second; redraw only changes
            self._last_status = text
            self.status_bar.update(text)

    def _status_text(self) -> str:
        demo = self._demo_folder is not None and self.model_folder == self._demo_folder
        return status_text(self.engine, self.pane, self.model_error, self.model_folder, demo)

    def refresh_experts(self) -> None:
        panel = self.expert_panel
        pane = self.pane
        if self.engine is None or pane is None:
            return
        a = self.engine.args
        n = a.moe.num_experts if a.moe else 0
        usage = pane.usage or [Counter() for _ in range(a.n_layers)]
        panel.show(a.moe is not None, n, min(self.settings.expert_layer, a.n_layers - 1),
                   getattr(self, "_selected", None) or pane.last_token, usage,
                   "selected token" if getattr(self, "_selected", None) else "last token")

    # -- actions ---------------------------------------------------------------------------------

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

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_settings(self) -> None:
        self.push_screen(SettingsScreen(self.settings), self._settings_saved)

    def _settings_saved(self, new: Settings | None) -> None:
        if new is None:
            return
        if new.context != self.settings.context and self.engine is not None:
            try:  # new conversations take it; the open ones keep the cache they have
                self.engine.set_context(new.context or None, "context")
            except MixchatError as exc:
                self.notify(str(exc), title="context not changed", severity="error", timeout=12)
                new.context = self.settings.context
        old, self.settings = self.settings, new
        settings_mod.save(new)
        pane = self.pane
        if pane and pane.chat:
            pane.chat.system = new.system or None  # the open conversation takes the new system prompt
            if pane.chat.id:
                self.store.update_settings(pane.chat.id, pane.chat.system, vars(new.sampling()))
        reload = ("model", "dtype", "threads", "quant", "memory_budget_gb")
        if any(getattr(new, k) != getattr(old, k) for k in reload) and new.model:
            self.model_folder, self.engine = new.model, None
            for p in self.tabs.query(ChatPane):
                p.chat = None
            self.load_model(new.model)
        if self.pool:
            self.pool.memory_budget = int(new.kv_memory_gb * 1e9)
        self.refresh_experts()
        self.notify("settings saved")

    def action_toggle_experts(self) -> None:
        self.show_experts = not self.show_experts
        self.expert_panel.set_class(self.show_experts, "shown")
        self._recolour()
        self.refresh_experts()

    def action_next_layer(self) -> None:
        if self.engine is None:
            return
        self.settings.expert_layer = (self.settings.expert_layer + 1) % self.engine.args.n_layers
        self._recolour()
        self.refresh_experts()
        self.notify(f"expert view: layer {self.settings.expert_layer}")

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
        pane = self.pane
        views = pane.views() if pane else []
        if message_index < len(views) and token_index < len(views[message_index].tokens):
            self._selected = views[message_index].tokens[token_index]
            self.refresh_experts()
