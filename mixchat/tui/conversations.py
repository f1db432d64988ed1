"""The conversation list in the sidebar: filtering it, opening, renaming and deleting what it lists."""

from __future__ import annotations

from textual import on
from textual.await_complete import AwaitComplete
from textual.message_pump import MessagePump
from textual.widgets import Input, ListItem, ListView, Static

from mixchat.errors import MixchatError
from mixchat.tui.panes import ChatPane, tab_label
from mixchat.tui.quitting import STOP_WAIT_SECONDS
from mixchat.tui.screens import ConfirmScreen, RenameScreen
from mixchat.tui.sidebar import conversation_row


class ConversationsMixin(MessagePump):
    """MixchatApp's sidebar behaviour. Mixed into the app, it uses the app's widgets (sidebar,
    conversations, tabs, prompt), its store and pool, and its panes (new_pane, _close_pane, _wait_for).

    MessagePump as the base (not object): Textual's metaclass registers @on handlers only on its
    own classes; on a plain mixin they would be silently never called."""

    # -- the list --------------------------------------------------------------------------------

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

    # -- rename and delete -----------------------------------------------------------------------

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

    # -- showing the sidebar ---------------------------------------------------------------------

    def action_toggle_sidebar(self) -> None:
        self.sidebar.toggle_class("hidden")

    async def action_focus_sidebar(self) -> None:
        self.sidebar.remove_class("hidden")
        await self.refresh_sidebar()
        self.screen.set_focus(self.conversations)  # now: the keys typed next must find it there
        if self.conversations.children:
            self.conversations.index = 0

