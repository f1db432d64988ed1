"""Sending a message and streaming its reply: the generation worker thread and the messages it
posts back (Prefilling, TokenStreamed, GenerationFinished, GenerationFailed), and the actions on
the reply being written (stop, regenerate, edit the last message)."""

from __future__ import annotations

import time

from textual import on, work
from textual.message_pump import MessagePump

from mixchat.errors import MixchatError
from mixchat.tui import history
from mixchat.tui.messages import GenerationFailed, GenerationFinished, Prefilling, TokenStreamed
from mixchat.tui.panes import ChatPane, tab_label
from mixchat.tui.widgets import MessageView, PromptInput


class SendingMixin(MessagePump):
    """MixchatApp's turns. Mixed into the app, it uses the app's settings, store, prompt, tabs and
    pane, its queue of messages typed while loading (_queued), and its status and expert view.

    MessagePump as the base (not object): Textual's metaclass registers @on handlers only on its
    own classes; on a plain mixin they would be silently never called."""

    # -- sending ---------------------------------------------------------------------------------

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

    # -- the reply (worker thread) ---------------------------------------------------------------

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

    # -- the worker's messages -------------------------------------------------------------------

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

    # -- actions on the reply --------------------------------------------------------------------

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

