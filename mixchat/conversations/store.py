"""The conversation store: conversations and their messages, in SQLite (WAL, one short
transaction per write) under the data folder.

Domain dataclasses in, rows out. Every write commits before it returns, so a crash, Ctrl+C or
kill -9 loses at most what was not yet handed to the store. Opening the file, and turning each
sqlite3 or OS failure into a one-line StoreError that names the file and the fix, is storefile.py's
job: no sqlite3 exception leaves either module raw.

`Store(path, readonly=True)` is for commands that only read (list, show, export): it never
creates, migrates or writes anything, so it also works on a store in a read-only folder, on one
from a newer mixchat (as far as the columns it reads still exist) and before any store exists.
"""

from __future__ import annotations

import json
import re
import secrets
import sqlite3
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixchat.conversations import migrations
from mixchat.conversations.storefile import DEFAULT_TIMEOUT as DEFAULT_TIMEOUT  # re-exported: callers import them here
from mixchat.conversations.storefile import SQLITE_MAGIC as SQLITE_MAGIC
from mixchat.conversations.storefile import ConversationDeleted, StoreError, StoreFile
from mixchat.conversations.storefile import db_timeout as db_timeout
from mixchat.safetext import one_line

TITLE_CHARS = 60
# Crockford's base32, lower-cased: digits and letters in ASCII order (so ids sort as their numbers
# do), without i, l and o (taken for 1 and 0 when copied by hand) and u (Crockford's guard against
# ids that spell words). Stores from mixchat 0.3 and before hold hexadecimal ids: a subset of it.
CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"
ID_ALPHABET = frozenset(CROCKFORD)
MIN_PREFIX = 4  # like git's abbreviations: shorter prefixes match too much to act on, `rm` above all
SHORT_ID = 8  # characters of an id that `list` shows and every command accepts
MAX_SEARCH_WORDS = 32


@dataclass
class Conversation:
    id: str
    title: str
    model_path: str
    model_fingerprint: str
    system: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0
    context_start: int = 0  # position of the first message the model still sees (older turns dropped)


@dataclass
class StoredMessage:
    id: int
    conversation_id: str
    position: int
    role: str
    content: str
    token_ids: list[int] | None = None
    experts: list | None = None
    stop: str | None = None  # None: still generating, or the process died mid-reply
    timings: dict[str, Any] | None = None
    created_at: float = 0.0


@dataclass
class Summary:
    id: str
    title: str
    model_path: str
    turns: int
    updated_at: float


@dataclass
class SearchHit:
    """A message (or a title) that holds every word searched for. `snippet` is the stored text as
    it is, control characters included: one_line() it before it reaches a terminal."""

    conversation_id: str
    title: str
    position: int  # the message's position in its conversation; -1 when the title matched
    role: str  # "user" or "assistant"; "title" when the title matched
    snippet: str  # the words around the match ("…" where text was cut); the title for a title hit
    updated_at: float  # the conversation's


def _base32(number: int, width: int) -> str:
    return "".join(CROCKFORD[(number >> (5 * i)) & 31] for i in reversed(range(width)))


def new_id() -> str:
    """A ULID, lower-cased: 10 characters of milliseconds since the epoch (48 bits), then 16 of
    randomness (80 bits). Ids sort by creation time, and two made in the same millisecond, on two
    machines, or in two stores later merged by `import` do not collide. The hexadecimal ids of
    mixchat 0.3 shared their first six characters for years; here the first ten are shared for
    days, so the short form that people see and type is the random end (short_id)."""
    return _base32((time.time_ns() // 1_000_000) & ((1 << 48) - 1), 10) + _base32(secrets.randbits(80), 16)


def short_id(cid: str) -> str:
    """The part of an id people read and type: its last SHORT_ID characters. For a new id they are
    40 random bits; for a 0.3 hexadecimal id, 24 random bits after the milliseconds' last digits.
    A suffix for both kinds (the app's sidebar always showed ids' ends), and every command accepts
    a unique suffix as well as a unique prefix (Store.get)."""
    return cid[-SHORT_ID:]


def make_title(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1].rstrip() + "…"


def _shown(cid: str) -> str:
    """An id as typed, quoted and escaped (it may hold anything), and not too long."""
    return repr(cid if len(cid) <= 40 else cid[:40] + "…")


def check_id(cid: str) -> str:
    """A conversation id or prefix as typed, lower-cased; StoreError unless it is one (so that no
    LIKE or GLOB wildcard, and no empty string, can stand for every id)."""
    shown = _shown(cid)
    if not cid.strip():
        raise StoreError("no conversation id given; `mixchat list` shows them")
    lowered = cid.strip().lower()
    if not set(lowered) <= ID_ALPHABET:
        # Worded like an id that is not there (which it is not), plus why no id can look like it.
        raise StoreError(f"no conversation {shown}: conversation ids are digits and letters (0-9 and a-z without "
                         "i, l, o and u; hexadecimal in stores from mixchat 0.3), as `mixchat list` shows them")
    return lowered


class Store:
    """The conversation store at `path`.

    readonly=False (chat, rm, rename): creates the folder (0700) and file (0600) if missing,
    migrates an older schema, and refuses, at once and with the reason, a file it must not write:
    not a store, corrupt, from a newer mixchat, in a read-only place.
    readonly=True (list, show, export): reads whatever can be read and never writes; a missing
    store reads as empty. Its writes raise StoreError.
    timeout: seconds to wait for another process's write lock (default: db_timeout()).
    `file` is the StoreFile that opened it: its connection and the translation of its errors.
    """

    def __init__(self, path: Path, readonly: bool = False, timeout: float | None = None) -> None:
        self.file = StoreFile(path, readonly, timeout)
        self._columns: str | None = None

    def close(self) -> None:
        self.file.close()

    # What a Store always offered its callers; the file holds them.

    @property
    def path(self) -> Path:
        return self.file.path

    @property
    def readonly(self) -> bool:
        return self.file.readonly

    @property
    def timeout(self) -> float:
        return self.file.timeout

    @property
    def newer(self) -> migrations.NewerSchemaError | None:
        """Set when reading a newer mixchat's store."""
        return self.file.newer

    @property
    def db(self) -> sqlite3.Connection:
        return self.file.db

    def _explain(self, exc: sqlite3.Error, action: str) -> StoreError:
        """The StoreError that a sqlite3 error during `action` ("open", "read", "write") becomes."""
        return self.file.explain(exc, action)

    # -- conversations ---------------------------------------------------------------------------

    def create(self, model_path: str, fingerprint: str, system: str | None = None,
               settings: dict[str, Any] | None = None, title: str = "") -> Conversation:
        now = time.time()
        conv = Conversation(new_id(), title, model_path, fingerprint, system, settings or {}, now, now)
        with self.file.tx() as db:
            db.execute("INSERT INTO conversations (id, title, model_path, model_fingerprint, system, settings,"
                       " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (conv.id, conv.title, conv.model_path, conv.model_fingerprint, conv.system,
                        json.dumps(conv.settings), now, now))
        return conv

    def _conversation(self, row: tuple) -> Conversation:
        cid, title, model_path, fp, system, settings, created, updated, context_start = row
        try:
            parsed = json.loads(settings or "{}")
        except json.JSONDecodeError:
            raise StoreError(f"{self.path}: conversation {cid} has corrupt settings; "
                             f"`mixchat rm {cid}` removes it") from None
        return Conversation(cid, title, model_path, fp, system, parsed, created, updated,
                            context_start if isinstance(context_start, int) and context_start >= 0 else 0)

    @property
    def _COLUMNS(self) -> str:  # noqa: N802 - read like the constant it was
        """The conversation columns; a store opened read-only before migration 3 has no context_start."""
        if self._columns is None:
            names = {row[1] for row in self.db.execute("PRAGMA table_info(conversations)")}
            self._columns = ("id, title, model_path, model_fingerprint, system, settings, created_at, updated_at, "
                             + ("context_start" if "context_start" in names else "0"))
        return self._columns

    def _find(self, db: sqlite3.Connection, cid: str) -> Conversation:
        text = check_id(cid)
        row = db.execute(f"SELECT {self._COLUMNS} FROM conversations WHERE id = ?", (text,)).fetchone()
        if row is not None:
            return self._conversation(row)
        if len(text) < MIN_PREFIX:
            raise StoreError(f"{_shown(cid)} is too short to pick a conversation: give at least {MIN_PREFIX} "
                             "characters of its id (`mixchat list` shows them)")
        # A prefix (what git users type) or a suffix (the short form `list` and the app show); the
        # union, so that text which is the start of one id and the end of another picks neither.
        # substr, not LIKE: LIKE ignores case and has wildcards; the text is plain base32 anyway.
        where = "substr(id, 1, :n) = :t OR (length(id) >= :n AND substr(id, -:n) = :t)"
        params = {"n": len(text), "t": text}
        (count,) = db.execute(f"SELECT COUNT(*) FROM conversations WHERE {where}", params).fetchone()
        if count == 0:
            raise StoreError(f"no conversation {_shown(cid)} in {self.path}; `mixchat list` shows them")
        # Newest first by creation time, not by id: a store holds both 0.3's hex ids and ULIDs,
        # which do not sort against each other.
        rows = db.execute(f"SELECT {self._COLUMNS} FROM conversations WHERE {where} "
                          "ORDER BY created_at DESC, id DESC LIMIT 3", params).fetchall()
        if count > 1:
            shown = ", ".join(f"{r[0]} ({one_line(r[1] or '(untitled)')[:30]})" for r in rows)
            more = f" and {count - len(rows)} more" if count > len(rows) else ""
            raise StoreError(f"{_shown(cid)} matches {count} conversations: {shown}{more}; give more of the id")
        return self._conversation(rows[0])

    def get(self, cid: str) -> Conversation:
        """By full id, or a unique prefix or suffix (the short form, short_id) of at least MIN_PREFIX
        characters; the one-line StoreError for an ambiguous one lists the candidates."""
        with self.file.using():
            return self._find(self.db, cid)

    def latest(self) -> Conversation | None:
        with self.file.using():
            row = self.db.execute(f"SELECT {self._COLUMNS} FROM conversations "
                                  "ORDER BY updated_at DESC, id DESC LIMIT 1").fetchone()
            return self._conversation(row) if row else None

    def list(self) -> list[Summary]:
        with self.file.using():
            rows = self.db.execute("""
                SELECT c.id, c.title, c.model_path, COUNT(m.id), c.updated_at FROM conversations c
                LEFT JOIN messages m ON m.conversation_id = c.id AND m.role = 'user'
                GROUP BY c.id ORDER BY c.updated_at DESC, c.id DESC""").fetchall()
        return [Summary(*r) for r in rows]

    def rename(self, cid: str, title: str) -> Conversation:
        """Found and renamed in one transaction, so it is the conversation the id named then."""
        with self.file.tx() as db:
            conv = self._find(db, cid)
            conv.title, conv.updated_at = make_title(title), time.time()
            db.execute("UPDATE conversations SET title = ?, updated_at = ? WHERE id = ?",
                       (conv.title, conv.updated_at, conv.id))
        return conv

    def update_settings(self, cid: str, system: str | None, settings: dict[str, Any]) -> None:
        with self.file.tx() as db:
            cur = db.execute("UPDATE conversations SET system = ?, settings = ? WHERE id = ?",
                             (system, json.dumps(settings), cid))
            if cur.rowcount == 0:
                raise self._deleted(cid, "its settings were not saved")

    def set_context_start(self, cid: str, position: int) -> None:
        """Record that the model sees this conversation from message `position` on (a full context
        dropped the turns before it; 0: all of it)."""
        with self.file.tx() as db:
            cur = db.execute("UPDATE conversations SET context_start = ? WHERE id = ?", (max(0, int(position)), cid))
            if cur.rowcount == 0:
                raise self._deleted(cid, "where its context starts was not saved")

    def set_model(self, cid: str, model_path: str, fingerprint: str) -> None:
        """Record the model that wrote the conversation's latest turn (and its KV cache), so that it is
        the one `-c`, the sidebar and the next start's question name."""
        with self.file.tx() as db:
            cur = db.execute("UPDATE conversations SET model_path = ?, model_fingerprint = ? WHERE id = ?",
                             (model_path, fingerprint, cid))
            if cur.rowcount == 0:
                raise self._deleted(cid, "the model it was continued with was not recorded")

    def delete(self, cid: str) -> Conversation:
        """Returns what it deleted, for the caller to say so."""
        with self.file.tx() as db:
            conv = self._find(db, cid)
            db.execute("DELETE FROM conversations WHERE id = ?", (conv.id,))  # messages cascade
        return conv

    @staticmethod
    def _deleted(cid: str, what: str) -> ConversationDeleted:
        return ConversationDeleted(cid, f"conversation {cid} was deleted (with `mixchat rm` or in another window), "
                                        f"so {what}; start a new conversation to keep chatting")

    def _require(self, db: sqlite3.Connection, cid: str, what: str) -> None:
        if db.execute("SELECT 1 FROM conversations WHERE id = ?", (cid,)).fetchone() is None:
            raise self._deleted(cid, what)

    # -- messages --------------------------------------------------------------------------------

    def messages(self, cid: str) -> list[StoredMessage]:
        with self.file.using():
            rows = self.db.execute(
                "SELECT id, conversation_id, position, role, content, token_ids, experts, stop, timings, created_at "
                "FROM messages WHERE conversation_id = ? ORDER BY position", (cid,)).fetchall()
        out = []
        for r in rows:
            try:
                ids, experts, timings = (json.loads(x) if x else None for x in (r[5], r[6], r[8]))
            except json.JSONDecodeError:
                raise StoreError(f"{self.path}: message {r[2]} of conversation {cid} is corrupt; "
                                 f"`mixchat rm {cid}` removes the conversation") from None
            out.append(StoredMessage(r[0], r[1], r[2], r[3], r[4], ids, experts, r[7], timings, r[9]))
        return out

    def add_message(self, cid: str, role: str, content: str, token_ids: list[int] | None = None,
                    stop: str | None = None) -> int:
        """Append a message and commit; the first user message titles an untitled conversation."""
        now = time.time()
        with self.file.tx() as db:
            self._require(db, cid, "this message was not saved")
            (position,) = db.execute("SELECT COALESCE(MAX(position) + 1, 0) FROM messages WHERE conversation_id = ?",
                                     (cid,)).fetchone()
            cur = db.execute("INSERT INTO messages (conversation_id, position, role, content, token_ids, stop,"
                             " created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (cid, position, role, content, json.dumps(token_ids) if token_ids is not None else None,
                              stop, now))
            db.execute("UPDATE conversations SET updated_at = ?, title = CASE WHEN title = '' AND ? = 'user' "
                       "THEN ? ELSE title END WHERE id = ?", (now, role, make_title(content), cid))
        return cur.lastrowid

    def update_message(self, mid: int, content: str, token_ids: list[int], experts: list | None = None,
                       stop: str | None = None, timings: dict[str, Any] | None = None) -> None:
        """Save a reply as it streams (called every few tokens and at the end)."""
        with self.file.tx() as db:
            cur = db.execute("UPDATE messages SET content = ?, token_ids = ?, experts = ?, stop = ?, timings = ? "
                             "WHERE id = ?", (content, json.dumps(token_ids), json.dumps(experts) if experts else None,
                                              stop, json.dumps(timings) if timings else None, mid))
            if cur.rowcount == 0:
                # Its conversation was deleted (or the reply edited away) elsewhere: saying nothing
                # would drop the rest of the reply silently.
                raise ConversationDeleted(None, f"the reply being saved (message {mid}) no longer exists: its "
                                                "conversation was deleted (with `mixchat rm` or in another window), "
                                                "so the reply was not saved; start a new conversation to keep chatting")
            db.execute("UPDATE conversations SET updated_at = ? WHERE id = "
                       "(SELECT conversation_id FROM messages WHERE id = ?)", (time.time(), mid))

    def truncate(self, cid: str, position: int) -> None:
        """Drop messages from `position` on (edit and regenerate replace the tail)."""
        with self.file.tx() as db:
            self._require(db, cid, "the edit was not saved")
            db.execute("DELETE FROM messages WHERE conversation_id = ? AND position >= ?", (cid, position))

    def add_conversation(self, title: str, model_path: str, fingerprint: str, system: str | None,
                         settings: dict[str, Any], messages: Sequence[StoredMessage]) -> Conversation:
        """A new conversation (new id) with all its messages, in one transaction: all of it or
        nothing (`mixchat import`). Of each message, its role, content, token_ids, experts, stop,
        timings and created_at are kept; ids and positions are the store's."""
        now = time.time()
        if not title:
            title = next((make_title(m.content) for m in messages if m.role == "user"), "")
        conv = Conversation(new_id(), make_title(title), model_path, fingerprint, system, dict(settings), now, now)
        with self.file.tx() as db:
            db.execute("INSERT INTO conversations (id, title, model_path, model_fingerprint, system, settings,"
                       " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (conv.id, conv.title, conv.model_path, conv.model_fingerprint, conv.system,
                        json.dumps(conv.settings), now, now))
            db.executemany(
                "INSERT INTO messages (conversation_id, position, role, content, token_ids, experts, stop, timings,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(conv.id, position, m.role, m.content, _json_or_null(m.token_ids), _json_or_null(m.experts),
                  m.stop, _json_or_null(m.timings), m.created_at or now) for position, m in enumerate(messages)])
        return conv

    # -- search ----------------------------------------------------------------------------------

    def search(self, text: str, limit: int = 50) -> list[SearchHit]:
        """Messages and titles that hold every word of `text` (each as a word or the start of one,
        ignoring case and accents), newest conversation first, then by position, the title first;
        at most `limit` hits. `text` is plain words: quotes, `*`, `-`, NEAR, AND and the like are
        searched for as words or ignored as punctuation, never obeyed. Works read-only."""
        words = search_words(text)
        if not words or limit <= 0:
            return []
        with self.file.using():
            hits = self._title_hits(words)
            try:
                hits += self._message_hits_fts(words, limit)
            except _NoFts:
                hits += self._message_hits_scan(words, limit)
        # Two stable sorts: by position, then by conversation, newest first.
        hits.sort(key=lambda h: h.position)
        hits.sort(key=lambda h: (h.updated_at, h.conversation_id), reverse=True)
        return hits[:limit]

    def _title_hits(self, words: list[str]) -> list[SearchHit]:
        # Titles are few and short: matched here, by the same rule as the index's.
        rows = self.db.execute("SELECT id, title, updated_at FROM conversations WHERE title != ''")
        return [SearchHit(cid, title, -1, "title", title, updated) for cid, title, updated in rows
                if _holds_words(title, words)]

    def _has_fts(self) -> bool:
        return self.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'message_search'").fetchone() is not None

    def _message_hits_fts(self, words: list[str], limit: int) -> list[SearchHit]:
        if not self._has_fts():
            raise _NoFts
        # Every word quoted as an FTS5 string (so no operator or syntax in it can act) and made a
        # prefix query; strings side by side must all match.
        query = " ".join('"' + w.replace('"', '""') + '"*' for w in words)
        try:
            rows = self.db.execute("""
                SELECT c.id, c.title, m.position, m.role, snippet(message_search, 0, '', '', '…', 16), c.updated_at
                FROM message_search
                JOIN messages m ON m.id = message_search.rowid
                JOIN conversations c ON c.id = m.conversation_id
                WHERE message_search MATCH ?
                ORDER BY c.updated_at DESC, c.id DESC, m.position LIMIT ?""", (query, limit)).fetchall()
        except sqlite3.OperationalError as exc:
            if "no such module" in str(exc):  # a store indexed elsewhere, read by an SQLite without FTS5
                raise _NoFts from None
            raise
        return [SearchHit(*r) for r in rows]

    def _message_hits_scan(self, words: list[str], limit: int) -> list[SearchHit]:
        """Without FTS5 (an SQLite built without it, or a newer store without the index): a LIKE
        scan of every message. LIKE folds ASCII letters only, so here `élan` does not find `Élan`
        and `cafe` does not find `café`, which the index finds; the rest matches as the index does
        (each candidate is checked by the same word rule as titles)."""
        like = " AND ".join("m.content LIKE ? ESCAPE '\\'" for _ in words)
        params = ["%" + w.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%" for w in words]
        rows = self.db.execute(f"""
            SELECT c.id, c.title, m.position, m.role, m.content, c.updated_at
            FROM messages m JOIN conversations c ON c.id = m.conversation_id
            WHERE {like} ORDER BY c.updated_at DESC, c.id DESC, m.position""", params)
        hits = []
        for cid, title, position, role, content, updated in rows:
            if _holds_words(content, words):
                hits.append(SearchHit(cid, title, position, role, _snippet(content, words), updated))
                if len(hits) == limit:
                    break
        return hits


class _NoFts(Exception):
    """This store, or this SQLite, has no full-text index to search."""


_WORD = re.compile(r"[^\W_]+")  # letters and digits, as FTS5's unicode61 tokenizer splits text


def _fold(word: str) -> str:
    """Lower case without accents, as the index compares words."""
    return "".join(c for c in unicodedata.normalize("NFKD", word) if not unicodedata.combining(c)).casefold()


def search_words(text: str) -> list[str]:
    """The words of a search, folded; StoreError for more than MAX_SEARCH_WORDS."""
    words = list(dict.fromkeys(w for w in (_fold(m) for m in _WORD.findall(text)) if w))
    if len(words) > MAX_SEARCH_WORDS:
        raise StoreError(f"the search has {len(words)} words; give at most {MAX_SEARCH_WORDS}")
    return words


def _holds_words(text: str, words: list[str]) -> bool:
    have = [_fold(w) for w in _WORD.findall(text)]
    return all(any(h.startswith(w) for h in have) for w in words)


def _snippet(text: str, words: list[str], tokens: int = 16) -> str:
    """The words around the first match, as FTS5's snippet() cuts them: `tokens` words, the
    text before the first or after the last word kept where the cut reaches the text's start or
    end, "…" where it does not."""
    spans = [(m.start(), m.end(), _fold(m.group())) for m in _WORD.finditer(text)]
    if not spans:
        return text
    first = next((i for i, (_, _, h) in enumerate(spans) if any(h.startswith(w) for w in words)), 0)
    hi = min(len(spans), max(0, first - tokens // 2 + 1) + tokens)
    lo = max(0, hi - tokens)
    start = spans[lo][0] if lo else 0
    end = spans[hi - 1][1] if hi < len(spans) else len(text)
    return ("…" if lo else "") + text[start:end] + ("…" if hi < len(spans) else "")


def _json_or_null(value: Any) -> str | None:
    return json.dumps(value) if value is not None else None
