"""The conversation list in the sidebar: filtering it, opening, renaming and deleting what it lists."""

from __future__ import annotations

from textual import on
from textual.await_complete import AwaitComplete
from textual.message_pump import MessagePump
from textual.widgets import Input, ListItem, ListView, Static

from mixchat.errors import MixchatError
from mixchat.frontends.tui.panes import ChatPane, tab_label
from mixchat.frontends.tui.quitting import STOP_WAIT_SECONDS
from mixchat.frontends.tui.screens import ConfirmScreen, RenameScreen
from mixchat.frontends.tui.sidebar import conversation_row, hit_row
from mixchat.frontends.tui.widgets import MessageView

SEARCH_HITS = 30  # message hits listed under the matching titles


class ConversationsMixin(MessagePump):
    """MixchatApp's sidebar behaviour. Mixed into the app, it uses the app's widgets (sidebar,
    conversations, tabs, prompt), its store and pool, and its panes (new_pane, _close_pane, _wait_for).

    MessagePump as the base (not object): Textual's metaclass registers @on handlers only on its
    own classes; on a plain mixin they would be silently never called."""

    # -- the list --------------------------------------------------------------------------------

    def refresh_sidebar(self) -> AwaitComplete:
        """Rebuild the conversation list: every conversation, or with a filter, those whose title
        holds it, then the messages that hold its words (the store's search). Await it before moving
        its cursor: until then the old rows are still there (keys sent right after Ctrl+O found the
        cursor on a vanishing row)."""
        view = self.conversations
        removed = view.clear()
        items = []
        needle = self._filter.lower()
        summaries = self.store.list()
        for s in summaries:
            if needle and needle not in s.title.lower():
                continue
            item = ListItem(Static(conversation_row(s)))
            item.cid, item.position = s.id, None
            items.append(item)
        if needle:
            listed = {item.cid for item in items}
            by_id = {s.id: s for s in summaries}
            try:
                hits = self.store.search(self._filter, SEARCH_HITS)
            except MixchatError:  # too many words, and the like: the titles still filter
                hits = []
            for hit in hits:
                if hit.conversation_id in listed or hit.conversation_id not in by_id:
                    continue  # one row per conversation: its title's, or its first message that matched
                # A title the plain filter missed (the search folds accents, matches word starts).
                row = hit_row(hit) if hit.position >= 0 else conversation_row(by_id[hit.conversation_id])
                item = ListItem(Static(row))
                item.cid, item.position = hit.conversation_id, (hit.position if hit.position >= 0 else None)
                items.append(item)
                listed.add(hit.conversation_id)
        return AwaitComplete(removed, view.extend(items))

    @on(Input.Changed, "#filter")
    async def filter_changed(self, event: Input.Changed) -> None:
        self._filter = event.value.strip()
        await self.refresh_sidebar()

    @on(Input.Submitted, "#filter")
    async def filter_submitted(self) -> None:
        """Enter in the filter opens the first match (the list keeps the rest for the arrows)."""
        view = self.conversations
        if view.children:
            view.index = 0
            await self.open_conversation(view.children[0].cid, view.children[0].position)
        else:
            self.screen.set_focus(view)

    @on(ListView.Selected, "#conversations")
    async def open_selected(self, event: ListView.Selected) -> None:
        await self.open_conversation(event.item.cid, getattr(event.item, "position", None))

    async def open_conversation(self, cid: str, position: int | None = None) -> None:
        """Show conversation `cid` (its tab if open, else a new one), scrolled to message `position`."""
        pane = next((p for p in self.tabs.query(ChatPane) if p.holds(cid)), None)
        if pane is not None:
            self.tabs.active = pane.id
        else:
            try:
                conv = self.store.get(cid)
            except MixchatError as exc:  # removed meanwhile (`mixchat rm` in another terminal)
                self.notify(str(exc), severity="warning")
                self.refresh_sidebar()
                return
            pane = await self.new_pane(conv.id, conv.title)
        self.prompt.focus()
        if position is not None:
            views = [v for v in pane.query(MessageView) if v.index == position]
            if views:
                pane.log_view.scroll_to_widget(views[0], animate=False, top=True)

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
        if chosen := self._highlighted():
            self.ask_delete(*chosen)

    def ask_delete(self, cid: str, title: str) -> None:
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
        self._sidebar_made_way = False  # the user's choice now, not one a resize undoes
        self._sidebar_chosen = not self.sidebar.has_class("hidden")

    async def action_focus_sidebar(self) -> None:
        if self.sidebar.has_class("hidden"):
            self._sidebar_made_way, self._sidebar_chosen = False, True  # asked for: a resize keeps it
        self.sidebar.remove_class("hidden")
        await self.refresh_sidebar()
        self.screen.set_focus(self.conversations)  # now: the keys typed next must find it there
        if self.conversations.children:
            self.conversations.index = 0
