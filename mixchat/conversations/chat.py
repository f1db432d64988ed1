"""A conversation being held: its messages, its Session (KV cache) and its saving.

Every front end (one-shot command, line mode, TUI) sends turns through `Chat.send`, which is
where the rules about data live: the user's message is committed before the model starts, the
reply is committed as it streams (every SAVE_EVERY_TOKENS tokens or SAVE_EVERY_SECONDS) and at the
end with its stop reason, and the KV cache is written beside the store afterwards.

It is also where a full context is handled (`when_full`): see Chat.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from mixchat.conversations.kvstore import SessionPool
from mixchat.conversations.store import Conversation, Store
from mixchat.engine.engine import Engine
from mixchat.engine.generation import Done, PrefillProgress, Session, TokenEvent
from mixchat.engine.sampling import SamplingSettings
from mixchat.errors import ContextError, MixchatError, NonFiniteError
from mixchat.paths import same_folder
from mixchat.settings import WHEN_FULL
from mixchat.text.chat_format import Message, encode_chat

SAVE_EVERY_TOKENS = 8
SAVE_EVERY_SECONDS = 1.0
# A turn needs room for its reply: this share of the context (or max_tokens, if less) must be free
# after the prompt, or the oldest turns are dropped.
REPLY_SHARE = 4
# A cut keeps at most this share of the context (kept history + the new message): dropping in bulk
# moves the cut rarely, and between cuts the prompt's prefix stays as cached.
KEEP_SHARE = 2


@dataclass
class ContextTrimmed:
    """Yielded by Chat.send before any PrefillProgress when the oldest turns were dropped from what
    the model sees, so the turn fits the context. `dropped_messages` and `dropped_tokens` are what
    this cut took away (earlier cuts not counted), `kept_tokens` the prompt the model reads now (kept
    history and the new message), `context_start` the index in Chat.messages of the first message it
    still sees. The messages stay in the store; the kept ones are re-read (prefilled) next."""

    dropped_messages: int
    dropped_tokens: int
    kept_tokens: int
    context_start: int

    def note(self, limit: int) -> str:
        return (f"note: dropped the oldest {self.dropped_messages} messages ({self.dropped_tokens} tokens) to fit the "
                f"{limit}-token context; the model no longer sees them")


def _valid_ids(ids, vocab: int) -> bool:
    """Saved token ids are used verbatim only if they can be: the store is a file, and an id past
    the vocabulary would index outside the embedding table (the text is re-tokenized instead)."""
    return isinstance(ids, list) and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab
                                         for i in ids)


def _turn_start(messages: list[Message], i: int) -> bool:
    """Whether the model's view may begin at message i: Mistral's formats start with a user turn, and
    a cut between two user messages would change the text of the turn they merge into."""
    if i == len(messages):
        return True  # nothing kept but the new message
    return messages[i].role == "user" and (i == 0 or messages[i - 1].role != "user")


class Chat:
    """One conversation. `messages` is the whole history (message i is at position i in the store);
    the model sees `messages[context_start:]`, after the system prompt.

    A full context (`send(..., when_full="drop")`, the default): when the history, the new message
    and room for a reply (a quarter of the context, or max_tokens if less) would not fit, the oldest
    turns are dropped from the model's view in bulk, so that what is kept and the new message take
    at most half the context; `context_start` moves forward (saved with the conversation, and read
    back when it is reopened), send yields a ContextTrimmed event before the prefill and adds a note
    to Done.notes. Until the next cut the prompt's prefix is what the cache holds, so each turn
    prefills only itself. `when_full="stop"` refuses the turn instead, with one line saying what to
    do. A new message that does not fit even alone is refused either way.

    For a context gauge: `context_used()` tokens are in the cache now, out of
    `session.context_limit`; the model sees from message `context_start` on; `dropped_messages()`
    messages (`dropped_tokens()` tokens, as the model once read them) are no longer seen.
    """

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
            stored = store.messages(conversation.id)
            self.messages = [Message(m.role, m.content, ids=m.token_ids if m.role == "assistant"
                                     and _valid_ids(m.token_ids, vocab) else None)
                             for m in stored]
            self.context_start = self._saved_start = self._start_from(conversation.context_start)
            self.session = pool.get(conversation.id)
            self.notes += pool.notes
            pool.notes.clear()
        else:
            self.context_start = self._saved_start = 0
            self.session = Session(engine)
        self._dropped: tuple[int, int] | None = None  # (context_start, its dropped_tokens()), computed once

    def _start_from(self, saved: int) -> int:
        """The saved cut, if it can still be one (the store is a file: a start past the end, or in the
        middle of a turn, is not trusted; the whole history is seen and the next turn cuts anew)."""
        return saved if 0 <= saved <= len(self.messages) and _turn_start(self.messages, saved) else 0

    @property
    def id(self) -> str | None:
        return self.conversation.id if self.conversation else None

    def prompt(self, text: str | None = None, start: int | None = None) -> list[int]:
        """The tokens for the model to answer `text` after the history it sees (from message `start`,
        default context_start; without `text`, that history alone)."""
        extra = [Message("user", text)] if text is not None else []
        start = self.context_start if start is None else start
        return encode_chat(self.engine.tokenizer, self.messages[start:] + extra, self.system)

    def context_used(self) -> int:
        return self.session.cache.pos

    def dropped_messages(self) -> int:
        """Messages the model no longer sees (the first context_start ones)."""
        return self.context_start

    def dropped_tokens(self) -> int:
        """Tokens of the messages the model no longer sees, as it read them (system prompt aside)."""
        if self._dropped is None or self._dropped[0] != self.context_start:
            self._dropped = (self.context_start, self._tokens_of(0, self.context_start))
        return self._dropped[1]

    def _tokens_of(self, begin: int, end: int) -> int:
        if end <= begin:
            return 0
        return len(encode_chat(self.engine.tokenizer, self.messages[begin:end])) - 1  # not their BOS

    def _why(self, limit: int) -> str:
        e = self.engine
        return (e.context_note if e.context_note and limit == e.context else
                "params.json's max_seq_len" if limit == e.args.max_seq_len else "as --context or the settings ask")

    def _cut(self, text: str, limit: int) -> tuple[int, list[int]]:
        """The first message to keep so that the kept turns and the new message take at most
        limit // KEEP_SHARE tokens (all turns dropped if even that is too many), and that prompt.
        The prompt shrinks as the cut moves on, so the cut is found by bisection over turn starts:
        a few encodings, not one per turn, on a long conversation."""
        cuts = [i for i in range(self.context_start + 1, len(self.messages) + 1) if _turn_start(self.messages, i)]
        prompts: dict[int, list[int]] = {}

        def prompt(k: int) -> list[int]:
            if k not in prompts:
                prompts[k] = self.prompt(text, cuts[k])
            return prompts[k]

        target = limit // KEEP_SHARE
        lo, hi = 0, len(cuts) - 1  # cuts[-1] (only the new message) is the last resort
        while lo < hi:
            mid = (lo + hi) // 2
            if len(prompt(mid)) <= target:
                hi = mid
            else:
                lo = mid + 1
        return cuts[lo], prompt(lo)

    def _persist_start(self) -> None:
        if self.store is not None and self.conversation is not None and self._saved_start != self.context_start:
            self.store.set_context_start(self.conversation.id, self.context_start)
            self._saved_start = self.conversation.context_start = self.context_start

    def send(self, text: str, settings: SamplingSettings, cancel: threading.Event | None = None,
             save: bool = True, when_full: str = "drop"
             ) -> Iterator[ContextTrimmed | PrefillProgress | TokenEvent | Done]:
        """Answer `text` after the history. `when_full` says what a full context does: "drop" the
        oldest turns from the model's view (a ContextTrimmed event says so first), or "stop"."""
        if when_full not in WHEN_FULL:
            raise ValueError(f"when_full must be one of {WHEN_FULL}, not {when_full!r}")
        prompt = self.prompt(text)
        limit = self.session.context_limit
        previous_start = self.context_start
        trimmed = None
        room = max(1, min(settings.max_tokens, limit // REPLY_SHARE))
        if when_full == "drop" and len(prompt) + room > limit and self.context_start < len(self.messages):
            cut, kept = self._cut(text, limit)
            if len(kept) < limit:
                trimmed = ContextTrimmed(cut - self.context_start, self._tokens_of(self.context_start, cut),
                                         len(kept), cut)
            prompt = kept  # too long even alone: refused below, and nothing was cut
        if len(prompt) >= limit:
            alone = self.prompt(text, len(self.messages))
            if len(alone) < limit:  # only under "stop": under "drop" the history would have made room
                fix = ("start a new conversation, shorten the message, or let the oldest turns make room "
                       "(--when-full drop, or when_full in the settings)")
            else:
                fix = "shorten the message" + (" or the system prompt" if self.system else "") + \
                      (" (it does not fit even without the history)" if self.context_start < len(self.messages)
                       else "")
            raise ContextError(f"the conversation would be {len(prompt)} tokens but the context holds {limit} "
                               f"({self._why(limit)}); {fix}")
        save = save and self.store is not None
        created = False
        if save and self.conversation is None:
            self.conversation = self.store.create(self._folder(), self.engine.fingerprint,
                                                  self.system, asdict(settings))
            self.pool.adopt(self.conversation.id, self.session)
            created = True
        position = len(self.messages)  # where the user's message goes, in the store as here
        reply_id = None
        if trimmed is not None:
            self.context_start = trimmed.context_start
        try:
            if save:
                # The user's message is on disk before the model starts.
                self.store.add_message(self.conversation.id, "user", text)
                reply_id = self.store.add_message(self.conversation.id, "assistant", "", [])
                self._persist_start()
        except BaseException:
            self._undo(position, created, previous_start)
            raise
        self.messages.append(Message("user", text))
        yield from self._reply(prompt, settings, cancel, reply_id, position, created, trimmed, previous_start)

    def _undo(self, position: int, created: bool, context_start: int) -> None:
        """A turn failed before the model wrote a token: leave no trace of it, so the conversation
        reads as before (a failed `-c` must not leave a junk message behind at every try), nor of
        the cut it made."""
        del self.messages[position:]
        cut_saved = self._saved_start == self.context_start != context_start  # this turn saved its cut
        self.context_start = context_start
        if self.store is None or self.conversation is None:
            return
        try:
            if cut_saved and not created:
                self._persist_start()
            if created:
                self.store.delete(self.conversation.id)
                self.pool.forget(self.conversation.id)
                self.conversation = None
            else:
                self.store.truncate(self.conversation.id, position)
        except MixchatError:
            pass  # the store is what failed: the error being raised already says so

    def _reply(self, prompt, settings, cancel, reply_id, position, created, trimmed, previous_start
               ) -> Iterator[ContextTrimmed | PrefillProgress | TokenEvent | Done]:
        ids: list[int] = []
        experts: list = []
        text = ""
        last_save = time.monotonic()
        start = len(self.session.tokens)
        finished = False
        try:
            if trimmed is not None:
                yield trimmed  # inside the try: a consumer that stops here still leaves a proper turn
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
                        **({"drafted_tokens": event.drafted, "accepted_tokens": event.accepted}
                           if event.drafted else {}),
                    }
                    self.messages.append(Message("assistant", event.text, ids=list(event.generated)))
                    if trimmed is not None:
                        event.notes.insert(0, trimmed.note(self.session.context_limit))
                    finished = True  # from here on nothing is left to undo or keep
                    if reply_id is not None:
                        self.store.update_message(reply_id, event.text, event.generated, experts or None,
                                                  event.stop, event.timings)
                        if note := self._save_cache(wrote=bool(event.generated)):
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
                self._undo(position, created, previous_start)
            else:
                self._keep_partial(reply_id, text, ids, experts, "error")
            raise

    def _folder(self) -> str:
        """The model's folder as the store keeps it: absolute (a relative one would name another folder from
        another working directory), links kept as given."""
        return os.path.abspath(self.engine.release.folder)  # "../m2" tidied: the folder it starts from may go

    def _other_model(self) -> bool:
        """Whether the conversation was last written by another model (the same folder spelt another way,
        e.g. through a link, with the same fingerprint, is the same model)."""
        conv = self.conversation
        return conv.model_fingerprint != self.engine.fingerprint or not same_folder(conv.model_path, self._folder())

    def _save_cache(self, wrote: bool) -> str | None:
        """Save the cache after a turn, and the model that made it once that model wrote a token: its latest
        reply and its cache are then this model's, and `-c`, `list` and the sidebar name it. A turn another
        model stopped before its first token leaves the conversation, and its cache on disk, its own model's."""
        other = self._other_model()
        if other and not wrote:
            return None
        note = self.pool.save(self.conversation.id)
        if other:
            folder = self._folder()
            self.store.set_model(self.conversation.id, folder, self.engine.fingerprint)
            self.conversation.model_path, self.conversation.model_fingerprint = folder, self.engine.fingerprint
        return note

    def _keep_partial(self, reply_id, text: str, ids: list[int], experts: list, stop: str) -> None:
        self.messages.append(Message("assistant", text, ids=list(ids)))
        if reply_id is None:
            return
        try:
            self.store.update_message(reply_id, text, ids, experts or None, stop)
            self._save_cache(wrote=bool(ids))
        except MixchatError:
            pass  # the store itself failed; what was committed every few tokens stays

    def regenerate(self, settings: SamplingSettings, cancel: threading.Event | None = None,
                   save: bool = True, when_full: str = "drop"
                   ) -> Iterator[ContextTrimmed | PrefillProgress | TokenEvent | Done]:
        """Replace the last reply. The prompt is the history up to it, which the cache already holds
        (the session rewinds instead of recomputing)."""
        if not self.messages or self.messages[-1].role != "assistant":
            raise ValueError("there is no reply to regenerate")
        return self.edit(len(self.messages) - 2, self.messages[-2].content, settings, cancel, save, when_full)

    def edit(self, index: int, text: str, settings: SamplingSettings, cancel: threading.Event | None = None,
             save: bool = True, when_full: str = "drop"
             ) -> Iterator[ContextTrimmed | PrefillProgress | TokenEvent | Done]:
        """Replace user message `index` (and everything after it) with `text`, then answer it. A
        message the model no longer saw becomes the first it sees."""
        if not 0 <= index < len(self.messages) or self.messages[index].role != "user":
            raise ValueError(f"message {index} is not a user message")
        del self.messages[index:]
        self.context_start = min(self.context_start, index)
        if save and self.store is not None and self.conversation is not None:
            self.store.truncate(self.conversation.id, index)
            self._persist_start()
        return self.send(text, settings, cancel, save, when_full)
