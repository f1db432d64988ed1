"""MixchatApp: the Textual front end. It holds the engine for the worker threads but never touches
tensors: it sends turns through mixchat.chat.Chat in a worker thread, and the worker reports
back only by posting messages (post_message never waits, so drawing cannot slow decoding).

Everything shown that the user, the model or a file wrote goes through mixchat.tui.literal (or
one_line / visible): Textual would read it as markup, and a terminal obeys its control characters.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import threading
import time
from collections import Counter

from textual import on, work
from textual.app import App, ComposeResult
from textual.await_complete import AwaitComplete
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.css.query import NoMatches
from textual.notifications import SeverityLevel
from textual.widgets import Footer, Input, ListItem, ListView, ProgressBar, Static, TabbedContent

from mixchat import settings as settings_mod
from mixchat.errors import MixchatError
from mixchat.safetext import one_line, visible
from mixchat.settings import Settings
from mixchat.tui import clipboard, history
from mixchat.tui.messages import (
    GenerationFailed,
    GenerationFinished,
    ModelFailed,
    ModelLoaded,
    ModelProgress,
    Prefilling,
    TokenStreamed,
)
from mixchat.tui.panes import ChatPane, tab_label
from mixchat.tui.screens import ConfirmScreen, HelpScreen, RenameScreen, SettingsScreen
from mixchat.tui.status import status_text
from mixchat.tui.widgets import (
    ConversationList,
    ExpertPanel,
    LineInput,
    MessageView,
    PromptInput,
    Sidebar,
    StatusBar,
    conversation_row,
)

CODE_BLOCK = re.compile(r"```[^\n]*\n(.*?)```", re.S)
# How long quitting (or deleting an open conversation) waits for a stopped reply to be saved. A
# reply stops within one token (or one prefill chunk), so this is only hit by a stuck worker.
STOP_WAIT_SECONDS = 5.0
# Ended by these, the app quits as on Ctrl+Q (replies stopped and saved) with exit status 128+signum.
QUIT_SIGNALS = ("SIGTERM", "SIGHUP")
# After a signal, how long past STOP_WAIT_SECONDS the app may take to leave before the process
# ends without it (a hung-up terminal makes Textual's goodbye to it block for ever).
EXIT_GRACE_SECONDS = 3.0


class MixchatApp(App):
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
        loop = asyncio.get_running_loop()
        for signum in self._signals:
            loop.remove_signal_handler(signum)
        self._signals.clear()

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

    # -- panes and the sidebar -------------------------------------------------------------------

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

    def refresh_sidebar(self) -> AwaitComplete:
        """Rebuild the conversation list. Await it before moving its cursor: until then the old
        rows are still there (keys sent right after Ctrl+O found the cursor on a vanishing row)."""
        view = self.conversations
        removed = view.clear()
        items = []
        for s in self.store.list():
            if self._filter and self._filter.lower() not in s.title.lower():
                continue
            item = ListItem(Static(conversation_row(s.title, s.turns, s.id)))
            item.cid = s.id
            items.append(item)
        return AwaitComplete(removed, view.extend(items))

    @on(Input.Changed, "#filter")
    async def filter_changed(self, event: Input.Changed) -> None:
        self._filter = event.value.strip()
        await self.refresh_sidebar()

    @on(Input.Submitted, "#filter")
    def filter_submitted(self) -> None:
        view = self.conversations
        self.screen.set_focus(view)
        if view.children:
            view.index = 0

    @on(ListView.Selected, "#conversations")
    async def open_selected(self, event: ListView.Selected) -> None:
        cid = event.item.cid
        for pane in self.tabs.query(ChatPane):
            if pane.holds(cid):
                self.tabs.active = pane.id
                return
        await self.new_pane(cid, self.store.get(cid).title)
        self.prompt.focus()

    def _highlighted(self) -> tuple[str, str] | None:
        """The conversation under the list's cursor: (id, title)."""
        item = self.conversations.highlighted_child
        if item is None:
            return None
        try:
            return item.cid, self.store.get(item.cid).title
        except MixchatError as exc:  # removed meanwhile (`mixchat rm` in another terminal)
            self.notify(str(exc), severity="warning")
            self.refresh_sidebar()
            return None

    def action_rename_conversation(self) -> None:
        if chosen := self._highlighted():
            cid, title = chosen
            self.push_screen(RenameScreen(title), lambda new: self._rename(cid, new))

    def action_delete_conversation(self) -> None:
        if not (chosen := self._highlighted()):
            return
        cid, title = chosen

        def answered(yes: bool | None) -> None:
            if yes:  # in a worker: it may wait for a reply to stop, and the app keeps drawing meanwhile
                self.run_worker(self._delete(cid), group="delete")

        self.push_screen(ConfirmScreen(f"Delete “{title}” and its saved KV cache?"), answered)

    def _rename(self, cid: str, title: str | None) -> None:
        if not title:
            return
        conv = self.store.rename(cid, title)
        for pane in self.tabs.query(ChatPane):
            if pane.holds(cid):
                self.tabs.get_tab(pane.id).label = tab_label(conv.title)
        self.refresh_sidebar()

    async def _delete(self, cid: str) -> None:
        """Delete a conversation, closing its tab if it is open. A reply being written there is
        stopped and saved first: a worker left running would write into a conversation that no
        longer exists (FOREIGN KEY constraint failed) and write its cache file again."""
        panes = [p for p in self.tabs.query(ChatPane) if p.holds(cid)]
        writing = [p for p in panes if p.writing]
        if writing:
            for pane in writing:
                pane.cancel.set()
            if not await self._wait_for(writing, STOP_WAIT_SECONDS):
                self.notify("the reply did not stop in time, so nothing was deleted; try again", severity="warning")
                return
        for pane in panes:
            await self._close_pane(pane)
        try:
            self.store.delete(cid)
        except MixchatError as exc:  # deleted elsewhere meanwhile, or the store cannot be written
            self.notify(str(exc), severity="warning")
            self.refresh_sidebar()
            return
        if self.pool:
            self.pool.forget(cid)
        else:
            from mixchat import paths

            (paths.kv_dir() / f"{cid}.safetensors").unlink(missing_ok=True)
        self.refresh_sidebar()
        self.notify("conversation deleted")

    async def _wait_for(self, panes: list[ChatPane], timeout: float) -> bool:
        """Wait until the panes' workers have ended (their replies saved); False on timeout."""
        end = time.monotonic() + timeout
        while any(p.writing for p in panes):
            if time.monotonic() > end:
                return False
            await asyncio.sleep(0.05)
        return True

    async def _close_pane(self, pane: ChatPane) -> None:
        pane.cancel.set()
        await self.tabs.remove_pane(pane.id)
        if not list(self.tabs.query(ChatPane)):
            await self.new_pane()

    # -- sending and streaming -------------------------------------------------------------------

    @on(PromptInput.Submitted)
    def prompt_submitted(self, event: PromptInput.Submitted) -> None:
        history.append(event.text)
        self.send(event.text)

    def send(self, text: str) -> None:
        pane = self.pane
        if pane is None:
            return
        if pane.busy:
            self.notify("the model is still writing: Esc stops it")
            self.prompt.load_text(text)  # keep what was typed
            return
        if pane.chat is None:
            if self.model_error:
                self.notify(self.model_error, severity="error")
                self.prompt.load_text(text)  # nothing typed is lost
            else:
                self._queued.append(text)
                self.notify("the model is still loading: your message is sent as soon as it is ready")
            return
        editing, pane.editing = pane.editing, None
        self._start(pane, "edit" if editing is not None else "send", text, editing)

    def _start(self, pane: ChatPane, kind: str, text: str, index: int | None) -> None:
        try:
            settings = self.settings.sampling()
        except MixchatError as exc:
            self.notify(str(exc), severity="error")
            return
        n = len(pane.views()) if index is None else index  # position of the new user message
        if index is not None:  # edit / regenerate: the views from that message on go away
            for view in pane.views()[index:]:
                view.remove()
        pane.log_view.mount(MessageView("user", text, n))
        pane.reply = MessageView("assistant", "", n + 1, None)
        pane.reply.streaming = True
        pane.reply.expert_layer = self.settings.expert_layer if self.show_experts else None
        pane.log_view.mount(pane.reply)
        pane.log_view.scroll_end(animate=False)
        pane.cancel.clear()
        pane.busy = True
        pane.phase = "prefilling"
        pane.stats = {"started": time.monotonic(), "count": 0}
        pane.worker = self.generate(pane, kind, text, index, settings)

    @work(thread=True, group="generate")
    def generate(self, pane: ChatPane, kind: str, text: str, index: int | None, settings) -> None:
        from mixchat.generation import Done, PrefillProgress, TokenEvent

        chat, pid = pane.chat, pane.id
        first = None
        count = 0
        try:
            events = chat.edit(index, text, settings, pane.cancel) if kind == "edit" else \
                chat.send(text, settings, pane.cancel)
            for ev in events:
                if self.return_code is not None:
                    # The app is ending (even by a crash, which unmounts nothing): stop, so the
                    # reply is saved as interrupted and the process is not kept alive decoding.
                    pane.cancel.set()
                if isinstance(ev, TokenEvent):
                    count += 1
                    now = time.monotonic()
                    first = first or now
                    tps = (count - 1) / (now - first) if count > 1 and now > first else 0.0
                    self.post_message(TokenStreamed(pid, ev.id, ev.text, ev.experts, ev.expert_weights, tps, count))
                elif isinstance(ev, PrefillProgress):
                    self.post_message(Prefilling(pid, ev.done, ev.total))
                elif isinstance(ev, Done):
                    self.post_message(GenerationFinished(pid, ev.text, ev.stop, {
                        "ttft": ev.time_to_first_token, "prefill_tps": ev.prefill_tokens_per_second,
                        "decode_tps": ev.decode_tokens_per_second, "cached": ev.cached_tokens,
                        "prefilled": ev.prefilled_tokens, "generated": len(ev.generated)}, chat.id,
                        list(ev.notes)))
        except MixchatError as exc:
            self.post_message(GenerationFailed(pid, str(exc)))
        except Exception as exc:  # noqa: BLE001 - a bug must show in the app, not kill the worker silently
            self.post_message(GenerationFailed(pid, f"{type(exc).__name__}: {exc}"))

    def _pane(self, pane_id: str) -> ChatPane | None:
        try:
            return self.tabs.query_one(f"#{pane_id}", ChatPane)
        except Exception:  # noqa: BLE001 - the tab was closed while the worker ran
            return None

    def on_prefilling(self, msg: Prefilling) -> None:
        pane = self._pane(msg.pane_id)
        if pane:
            pane.phase = f"prefill {msg.done}/{msg.total}"

    def on_token_streamed(self, msg: TokenStreamed) -> None:
        pane = self._pane(msg.pane_id)
        if pane is None or pane.reply is None:
            return
        pane.phase = "writing"
        pane.reply.append(msg.text, msg.experts, msg.weights)
        pane.count_usage(msg.experts)
        pane.last_token = (msg.text, msg.experts, msg.weights)
        pane.stats.update(tps=msg.tokens_per_second, count=msg.count, last=time.monotonic())
        if msg.count == 1:
            pane.stats["ttft"] = time.monotonic() - pane.stats["started"]
        pane.log_view.scroll_end(animate=False)
        if self.show_experts and pane is self.pane:
            self.refresh_experts()

    def on_generation_finished(self, msg: GenerationFinished) -> None:
        for note in msg.notes:  # told even when the tab is gone
            self.notify(note, severity="warning", timeout=10)
        pane = self._pane(msg.pane_id)
        if pane is None:
            return
        if msg.conversation_id and pane.cid != msg.conversation_id:
            pane.cid = msg.conversation_id
        pane.busy, pane.phase = False, msg.reason
        pane.stats.update(msg.stats, tps=msg.stats["decode_tps"])
        if pane.reply is not None:
            pane.reply.streaming = False
            pane.reply.stop = msg.reason
            pane.reply.text = msg.text
            pane.reply.redraw()
        if pane.cid:
            try:
                self.tabs.get_tab(pane.id).label = tab_label(self.store.get(pane.cid).title)
            except MixchatError:  # deleted meanwhile (`mixchat rm`): the worker's error says so
                pass
        self.refresh_sidebar()
        self.update_status()

    def on_generation_failed(self, msg: GenerationFailed) -> None:
        pane = self._pane(msg.pane_id)
        if pane is not None:
            pane.busy, pane.phase = False, "error"
            if pane.reply is not None and not pane.reply.text:
                pane.reply.remove()
                pane.reply = None
        self.notify(msg.error, severity="error", timeout=10)

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

    async def action_quit(self) -> None:
        self.quit_gracefully(0)

    def quit_gracefully(self, code: int = 0) -> None:
        """Stop every reply, wait (at most STOP_WAIT_SECONDS) until the workers have saved them,
        marked interrupted, with their KV caches, then exit with `code` (it becomes
        `self.return_code`, which the CLI returns). Asked again meanwhile, it exits at once."""
        panes = list(self.tabs.query(ChatPane))
        for pane in panes:
            pane.cancel.set()
        writing = [p for p in panes if p.writing]
        if not writing or self._quitting:
            self.exit(return_code=code)
            return
        self._quitting = True
        self.notify("stopping the reply and saving it …")
        self.run_worker(self._exit_when_saved(writing, code), group="quit")

    async def _exit_when_saved(self, panes: list[ChatPane], code: int) -> None:
        await self._wait_for(panes, STOP_WAIT_SECONDS)
        self.exit(return_code=code)

    def _catch_signals(self) -> None:
        """SIGTERM (kill, shutdown) and SIGHUP (the terminal closed) quit like Ctrl+Q; by default
        they would end the process mid-reply with the terminal left in raw mode."""
        try:
            loop = asyncio.get_running_loop()
            for name in QUIT_SIGNALS:
                signum = getattr(signal, name, None)
                if signum is not None:
                    loop.add_signal_handler(signum, self._on_signal, signum)
                    self._signals.append(signum)
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # no signal handlers on this loop (Windows) or thread (not the main one)

    def _on_signal(self, signum: int) -> None:
        code = 128 + signum
        if self._watchdog is None and not self.is_headless:
            # SIGHUP: the terminal is gone, and restoring its modes on the way out then blocks for
            # ever on a write to it (Textual's writer thread died of EIO). The replies are saved
            # first, within STOP_WAIT_SECONDS; past the grace the process ends without the app.
            self._watchdog = threading.Timer(STOP_WAIT_SECONDS + EXIT_GRACE_SECONDS, self._end_process, (code,))
            self._watchdog.daemon = True
            self._watchdog.start()
        # Called by the event loop, outside any message handler: hand over to the app's queue.
        self.call_later(self.quit_gracefully, code)

    def _end_process(self, code: int) -> None:
        if not self._finished:
            os._exit(code)

    def run(self, **kwargs) -> object:
        """App.run; once it has returned, a signal's watchdog (see _on_signal) stands down."""
        try:
            return super().run(**kwargs)
        finally:
            self._finished = True

    def action_stop(self) -> None:
        pane = self.pane
        if pane and pane.busy:
            pane.cancel.set()

    def action_regenerate(self) -> None:
        pane = self.pane
        if not pane or pane.busy or pane.chat is None:
            return
        msgs = pane.chat.messages
        if not msgs or msgs[-1].role != "assistant":
            self.notify("there is no reply to regenerate")
            return
        self._start(pane, "edit", msgs[-2].content, len(msgs) - 2)

    def action_edit_last(self) -> None:
        pane = self.pane
        if not pane or pane.busy or pane.chat is None:
            return
        users = [i for i, m in enumerate(pane.chat.messages) if m.role == "user"]
        if not users:
            return
        pane.editing = users[-1]
        prompt = self.prompt
        prompt.load_text(pane.chat.messages[users[-1]].content)
        prompt.focus()
        self.notify("editing your last message: Enter resends it, the replies after it are replaced")

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

    def action_toggle_sidebar(self) -> None:
        self.sidebar.toggle_class("hidden")

    async def action_focus_sidebar(self) -> None:
        self.sidebar.remove_class("hidden")
        await self.refresh_sidebar()
        self.screen.set_focus(self.conversations)  # now: the keys typed next must find it there
        if self.conversations.children:
            self.conversations.index = 0

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_settings(self) -> None:
        self.push_screen(SettingsScreen(self.settings), self._settings_saved)

    def _settings_saved(self, new: Settings | None) -> None:
        if new is None:
            return
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
