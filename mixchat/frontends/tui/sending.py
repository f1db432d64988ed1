"""Sending a message and streaming its reply: the generation worker thread and the messages it
posts back (Prefilling, ContextCut, TokensStreamed, GenerationFinished, GenerationFailed), and the
actions on the reply being written (stop, regenerate, edit the last message).

Tokens reach the UI in batches (TokenBatch), drawn at most every DRAW_SECONDS: one message and
one redraw per token kept the UI thread (and the GIL) busy enough to slow decoding down to a third."""

from __future__ import annotations

import gc
import threading
import time

from textual import on, work
from textual.message_pump import MessagePump

from mixchat.errors import MixchatError
from mixchat.frontends.tui import history
from mixchat.frontends.tui.messages import (
    ContextCut,
    GenerationFailed,
    GenerationFinished,
    Prefilling,
    TokenBatch,
    TokensStreamed,
)
from mixchat.frontends.tui.panes import ChatPane, tab_label
from mixchat.frontends.tui.widgets import MessageView, PromptInput

# A reply is redrawn at most every DRAW_SECONDS (a terminal shows no more), and less often when the
# UI thread's work since the last redraw comes to more than UI_SHARE of the time: composing a
# 120x40 screen takes 10-40 ms of CPU on a small machine, all of it holding the GIL the decoding
# thread needs between its torch ops. A slow model's tokens still show about as they come; a fast
# one's come in fewer, larger pieces (at worst every MAX_DRAW_SECONDS). The first tokens show at
# once; the second redraw waits FIRST_WAIT_SECONDS (the first one's cost, mounting the reply
# included, is known only when the second comes), unless an earlier reply measured the cost.
DRAW_SECONDS = 1 / 30
FIRST_WAIT_SECONDS = 0.25
MAX_DRAW_SECONDS = 1.0
UI_SHARE = 0.03
MOUNT_WAIT_SECONDS = 0.5  # at most, for the new messages to be on screen before the model starts
EXPERT_PANEL_SECONDS = 0.5  # the expert panel (a table over every layer) follows the stream this often


class SendingMixin(MessagePump):
    """MixchatApp's turns. Mixed into the app, it uses the app's settings, store, prompt, tabs and
    pane, its queue of messages typed while loading (_queued), and its status and expert view.

    MessagePump as the base (not object): Textual's metaclass registers @on handlers only on its
    own classes; on a plain mixin they would be silently never called."""

    # -- sending ---------------------------------------------------------------------------------

    @on(PromptInput.Submitted)
    def prompt_submitted(self, event: PromptInput.Submitted) -> None:
        try:
            history.append(event.text)
        except OSError as exc:  # the message still goes; only its Up-arrow recall is lost
            self.notify(f"could not add it to the input history: {exc.strerror or exc}", severity="warning")
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
            elif self.engine is not None:
                # loaded, but this conversation was written with another model and the question is unanswered
                self.prompt.load_text(text)
                self.check_model(pane)
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
        moe = self.engine is not None and self.engine.args.moe is not None
        # A dense model's reply has no routing to colour: it streams as Markdown either way.
        pane.reply.expert_layer = self.settings.expert_layer if self.show_experts and moe else None
        pane.log_view.mount(pane.reply)
        pane.log_view.scroll_end(animate=False)
        pane.cancel.clear()
        pane.busy = True
        pane.phase = "prefilling"
        pane.stats = {"started": time.monotonic(), "count": 0}
        # The first tokens show at once (drawn_at 0); then as the last reply's redraws allowed.
        pane.drawn_at, pane.draw_every = 0.0, pane.draw_every or FIRST_WAIT_SECONDS
        # The worker runs from now (a quit waits for it and so the message is saved), but begins
        # once the new messages are on screen: mounting and laying them out takes the UI thread
        # 20-60 ms, which would otherwise be taken from the first tokens' decoding.
        mounted = threading.Event()
        self.call_after_refresh(mounted.set)
        # While replies stream, the cyclic garbage collector looks only at objects made since: a full
        # collection walks every object of the process (100-300 ms holding the GIL, several times a
        # reply) and the decoding thread waits for it. Unfrozen when no reply is being written, so
        # what became garbage meanwhile is still collected.
        gc.freeze()
        pane.worker = self.generate(pane, kind, text, index, settings, mounted)

    # -- the reply (worker thread) ---------------------------------------------------------------

    @work(thread=True, group="generate")
    def generate(self, pane: ChatPane, kind: str, text: str, index: int | None, settings,
                 mounted: threading.Event | None = None) -> None:
        from mixchat.conversations.chat import ContextTrimmed
        from mixchat.engine.generation import Done, PrefillProgress, TokenEvent

        chat, pid = pane.chat, pane.id
        first = 0.0
        count = 0
        batch: TokenBatch | None = None
        if mounted is not None:
            mounted.wait(MOUNT_WAIT_SECONDS)
        try:
            events = chat.edit(index, text, settings, pane.cancel) if kind == "edit" else \
                chat.send(text, settings, pane.cancel)
            for ev in events:
                if self.return_code is not None:
                    # The app is ending (even by a crash, which unmounts nothing): stop, so the
                    # reply is saved as interrupted and the process is not kept alive decoding.
                    pane.cancel.set()
                if isinstance(ev, TokenEvent):
                    # Per token, only this: the UI takes the tokens in batches (see TokenBatch).
                    count += 1
                    now = time.monotonic()
                    token = (ev.text, ev.experts, ev.expert_weights)
                    if batch is None or not batch.add(token, count, now):
                        batch = TokenBatch(first or now)
                        first = batch.first
                        batch.add(token, count, now)
                        self.post_message(TokensStreamed(pid, batch))
                    continue
                if isinstance(ev, PrefillProgress):
                    self.post_message(Prefilling(pid, ev.done, ev.total))
                elif isinstance(ev, ContextTrimmed):
                    # Counted here, off the UI thread: the dropped messages are tokenized again.
                    self.post_message(ContextCut(pid, ev.context_start, chat.dropped_tokens(),
                                                 chat.session.context_limit))
                elif isinstance(ev, Done):
                    self.post_message(GenerationFinished(pid, ev.text, ev.stop, {
                        "ttft": ev.time_to_first_token, "prefill_tps": ev.prefill_tokens_per_second,
                        "decode_tps": ev.decode_tokens_per_second, "cached": ev.cached_tokens,
                        "prefilled": ev.prefilled_tokens, "generated": len(ev.generated), "drafted": ev.drafted,
                        "accepted": ev.accepted, "rank_wait_ms": ev.rank_wait_per_token * 1e3}, chat.id,
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

    def on_context_cut(self, msg: ContextCut) -> None:
        pane = self._pane(msg.pane_id)
        if pane is not None:
            pane.show_context_cut(msg.context_start, msg.dropped_tokens, msg.context)

    def on_tokens_streamed(self, msg: TokensStreamed) -> None:
        pane = self._pane(msg.pane_id)
        if pane is None:
            return
        pane.pending = msg.batch
        wait = pane.drawn_at + pane.draw_every - time.monotonic()
        if wait > 0:
            # Too soon after the last redraw: the worker goes on adding to this batch meanwhile.
            self.set_timer(wait, lambda: self._draw_tokens(msg.pane_id, msg.batch))
        else:
            self._draw_tokens(msg.pane_id, msg.batch)

    def _draw_tokens(self, pane_id: str, batch: TokenBatch) -> None:
        pane = self._pane(pane_id)
        if pane is None or batch.taken:  # the tab was closed, or the end of the reply drew it
            return
        tokens = batch.take()
        now, cpu = time.monotonic(), time.thread_time()
        if pane.drawn_at:
            # What the UI thread spent since the last redraw (that redraw's composing included).
            pane.draw_every = min(MAX_DRAW_SECONDS, max(DRAW_SECONDS, (cpu - pane.drawn_cpu) / UI_SHARE))
        pane.pending, pane.drawn_at, pane.drawn_cpu = None, now, cpu
        if pane.reply is None or not tokens:
            return
        pane.phase = "writing"
        pane.reply.extend(tokens)
        for _, experts, _ in tokens:
            pane.count_usage(experts)
        pane.last_token = tokens[-1]
        pane.stats.update(tps=batch.tokens_per_second(), count=batch.count, last=now)
        if batch.count == len(tokens):  # the reply's first batch
            pane.stats["ttft"] = now - pane.stats["started"]
        pane.log_view.scroll_end(animate=False)
        if self.show_experts and pane is self.pane and now - pane.panel_drawn >= EXPERT_PANEL_SECONDS:
            pane.panel_drawn = now
            self.refresh_experts()

    def _unfreeze_heap(self) -> None:
        if not any(p.busy for p in self.tabs.query(ChatPane)):
            gc.unfreeze()

    def on_generation_finished(self, msg: GenerationFinished) -> None:
        for note in msg.notes:  # told even when the tab is gone
            self.notify(note, severity="warning", timeout=10)
        pane = self._pane(msg.pane_id)
        if pane is None:
            self._unfreeze_heap()
            return
        if pane.pending is not None:  # the last tokens, still waiting for their redraw
            self._draw_tokens(pane.id, pane.pending)
        if msg.conversation_id and pane.cid != msg.conversation_id:
            pane.cid = msg.conversation_id
        pane.busy, pane.phase = False, msg.reason
        pane.stats.update(msg.stats, tps=msg.stats["decode_tps"])
        if pane.reply is not None:
            pane.reply.finish(msg.reason, msg.text)
        pane.sync_context_cut()  # an edit may have moved it back
        if pane.cid:
            try:
                self.tabs.get_tab(pane.id).label = tab_label(self.store.get(pane.cid).title)
            except MixchatError:  # deleted meanwhile (`mixchat rm`): the worker's error says so
                pass
        if self.show_experts and pane is self.pane:
            self.refresh_experts()  # the last token, which the throttled updates may have skipped
        self.refresh_sidebar()
        self.update_status()
        self._unfreeze_heap()

    def on_generation_failed(self, msg: GenerationFailed) -> None:
        pane = self._pane(msg.pane_id)
        if pane is not None:
            if pane.pending is not None:
                self._draw_tokens(pane.id, pane.pending)
            pane.busy, pane.phase = False, "error"
            if pane.reply is not None and not pane.reply.text:
                pane.reply.remove()
                pane.reply = None
            elif pane.reply is not None:
                pane.reply.finish("error", pane.reply.text)  # kept (and saved) as far as it got
        self._unfreeze_heap()
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

