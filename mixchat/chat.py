"""A conversation being held: its messages, its Session (KV cache) and its saving.

Every front end (one-shot command, line mode, TUI) sends turns through `Chat.send`, which is
where the rules about data live: the user's message is committed before the model starts, the
reply is committed as it streams (every SAVE_EVERY_TOKENS tokens or SAVE_EVERY_SECONDS) and at the
end with its stop reason, and the KV cache is written beside the store afterwards.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import asdict

from mixchat.chat_format import Message, encode_chat
from mixchat.engine import Engine
from mixchat.errors import ContextError, MixchatError, NonFiniteError
from mixchat.generation import Done, PrefillProgress, Session, TokenEvent
from mixchat.kvstore import SessionPool
from mixchat.sampling import SamplingSettings
from mixchat.store import Conversation, Store

SAVE_EVERY_TOKENS = 8
SAVE_EVERY_SECONDS = 1.0


def _valid_ids(ids, vocab: int) -> bool:
    """Saved token ids are used verbatim only if they can be: the store is a file, and an id past
    the vocabulary would index outside the embedding table (the text is re-tokenized instead)."""
    return isinstance(ids, list) and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab
                                         for i in ids)


class Chat:
    def __init__(self, engine: Engine, pool: SessionPool, store: Store | None = None,
                 conversation: Conversation | None = None, system: str | None = None) -> None:
        self.engine, self.pool, self.store, self.conversation = engine, pool, store, conversation
        self.system = system if system is not None else (conversation.system if conversation else None)
        self.messages: list[Message] = []
        self.notes: list[str] = []  # things the user should be told (discarded caches, model changes)
        if conversation is not None:
            if conversation.model_fingerprint != engine.fingerprint:
                self.notes.append(f"note: conversation {conversation.id} was held with another model "
                                  f"({conversation.model_path}); continuing it with {engine.release.folder}")
            vocab = engine.args.vocab_size
            self.messages = [Message(m.role, m.content, ids=m.token_ids if m.role == "assistant"
                                     and _valid_ids(m.token_ids, vocab) else None)
                             for m in store.messages(conversation.id)]
            self.session = pool.get(conversation.id)
            self.notes += pool.notes
            pool.notes.clear()
        else:
            self.session = Session(engine)

    @property
    def id(self) -> str | None:
        return self.conversation.id if self.conversation else None

    def prompt(self, text: str | None = None) -> list[int]:
        """The tokens for the model to answer `text` after the history (or the history alone)."""
        extra = [Message("user", text)] if text is not None else []
        return encode_chat(self.engine.tokenizer, self.messages + extra, self.system)

    def context_used(self) -> int:
        return self.session.cache.pos

    def send(self, text: str, settings: SamplingSettings, cancel: threading.Event | None = None,
             save: bool = True) -> Iterator[PrefillProgress | TokenEvent | Done]:
        prompt = self.prompt(text)
        limit = self.session.context_limit
        if len(prompt) >= limit:
            e = self.engine
            why = (e.context_note if e.context_note and limit == e.context else
                   "params.json's max_seq_len" if limit == e.args.max_seq_len else "as --context or the settings ask")
            raise ContextError(
                f"the conversation would be {len(prompt)} tokens but the context holds {limit} ({why}); start a new "
                "conversation or shorten the message"
            )
        save = save and self.store is not None
        created = False
        if save and self.conversation is None:
            self.conversation = self.store.create(str(self.engine.release.folder), self.engine.fingerprint,
                                                  self.system, asdict(settings))
            self.pool.adopt(self.conversation.id, self.session)
            created = True
        position = len(self.messages)  # where the user's message goes, in the store as here
        reply_id = None
        try:
            if save:
                # The user's message is on disk before the model starts.
                self.store.add_message(self.conversation.id, "user", text)
                reply_id = self.store.add_message(self.conversation.id, "assistant", "", [])
        except BaseException:
            self._undo(position, created)
            raise
        self.messages.append(Message("user", text))
        yield from self._reply(prompt, settings, cancel, reply_id, position, created)

    def _undo(self, position: int, created: bool) -> None:
        """A turn failed before the model wrote a token: leave no trace of it, so the conversation
        reads as before (a failed `-c` must not leave a junk message behind at every try)."""
        del self.messages[position:]
        if self.store is None or self.conversation is None:
            return
        try:
            if created:
                self.store.delete(self.conversation.id)
                self.pool.forget(self.conversation.id)
                self.conversation = None
            else:
                self.store.truncate(self.conversation.id, position)
        except MixchatError:
            pass  # the store is what failed: the error being raised already says so

    def _reply(self, prompt, settings, cancel, reply_id, position, created) -> Iterator[PrefillProgress | TokenEvent
                                                                                         | Done]:
        ids: list[int] = []
        experts: list = []
        text = ""
        last_save = time.monotonic()
        start = len(self.session.tokens)
        finished = False
        try:
            for event in self.session.generate(prompt, settings, cancel):
                if isinstance(event, TokenEvent):
                    text += event.text
                    if event.id >= 0:
                        ids.append(event.id)
                        if event.experts is not None:
                            experts.append(event.experts)
                        due = len(ids) % SAVE_EVERY_TOKENS == 0 or time.monotonic() - last_save > SAVE_EVERY_SECONDS
                        if reply_id is not None and due:
                            self.store.update_message(reply_id, text, ids, experts or None)
                            last_save = time.monotonic()
                elif isinstance(event, Done):
                    event.timings = {
                        "prefill_tokens_per_second": round(event.prefill_tokens_per_second, 3),
                        "decode_tokens_per_second": round(event.decode_tokens_per_second, 3),
                        "time_to_first_token": round(event.time_to_first_token, 3),
                        "cached_tokens": event.cached_tokens, "prefilled_tokens": event.prefilled_tokens,
                    }
                    self.messages.append(Message("assistant", event.text, ids=list(event.generated)))
                    finished = True  # from here on nothing is left to undo or keep
                    if reply_id is not None:
                        self.store.update_message(reply_id, event.text, event.generated, experts or None,
                                                  event.stop, event.timings)
                        if note := self.pool.save(self.conversation.id):
                            event.notes.append(note)
                yield event
        except GeneratorExit:
            # The consumer stopped reading (stdout closed, the terminal hung up): what was written is
            # kept as a stopped reply, and the cache still holds it for the next turn.
            if not finished:
                self._keep_partial(reply_id, text, ids, experts, "interrupted")
            raise
        except BaseException as exc:
            if finished:
                raise
            if isinstance(exc, NonFiniteError):
                self.session.forget_from(start)  # the turn's keys and values are NaN: never reuse them
            else:
                self.session.resync()
            if isinstance(exc, KeyboardInterrupt):  # a second Ctrl+C: what was typed and written stays
                self._keep_partial(reply_id, text, ids, experts, "interrupted")
            elif not ids:
                self._undo(position, created)
            else:
                self._keep_partial(reply_id, text, ids, experts, "error")
            raise

    def _keep_partial(self, reply_id, text: str, ids: list[int], experts: list, stop: str) -> None:
        self.messages.append(Message("assistant", text, ids=list(ids)))
        if reply_id is None:
            return
        try:
            self.store.update_message(reply_id, text, ids, experts or None, stop)
            self.pool.save(self.conversation.id)
        except MixchatError:
            pass  # the store itself failed; what was committed every few tokens stays

    def regenerate(self, settings: SamplingSettings, cancel: threading.Event | None = None,
                   save: bool = True) -> Iterator[PrefillProgress | TokenEvent | Done]:
        """Replace the last reply. The prompt is the history up to it, which the cache already holds
        (the session rewinds instead of recomputing)."""
        if not self.messages or self.messages[-1].role != "assistant":
            raise ValueError("there is no reply to regenerate")
        return self.edit(len(self.messages) - 2, self.messages[-2].content, settings, cancel, save)

    def edit(self, index: int, text: str, settings: SamplingSettings, cancel: threading.Event | None = None,
             save: bool = True) -> Iterator[PrefillProgress | TokenEvent | Done]:
        """Replace user message `index` (and everything after it) with `text`, then answer it."""
        if not 0 <= index < len(self.messages) or self.messages[index].role != "user":
            raise ValueError(f"message {index} is not a user message")
        del self.messages[index:]
        if save and self.store is not None and self.conversation is not None:
            self.store.truncate(self.conversation.id, index)
        return self.send(text, settings, cancel, save)
