"""The conversation store's SQLite file: opening it, holding its one connection, and turning every
sqlite3 or OS failure into a one-line StoreError.

What can go wrong with the file is the user's to fix, so no sqlite3 exception leaves this module
raw: each cause (not a store, corrupt, from a newer mixchat, disk full, locked by another process,
read-only, I/O error, a conversation deleted meanwhile) becomes a one-line StoreError that names
the file and the fix. A failed write changes nothing: its transaction is rolled back whole.

Opened for reading only, it never creates, migrates or writes anything, so it also works on a
store in a read-only folder, on one from a newer mixchat (as far as the columns read still exist)
and before any store exists. What the store holds, and how, is store.py's.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sqlite3
import stat
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

from mixchat.conversations import migrations
from mixchat.errors import MixchatError
from mixchat.paths import make_private_dir

DEFAULT_TIMEOUT = 30.0  # seconds to wait for another process's write; MIXCHAT_DB_TIMEOUT overrides
SQLITE_MAGIC = b"SQLite format 3\x00"

# SQLite's primary result codes (an extended code's low byte).
_PERM, _BUSY, _LOCKED, _READONLY, _IOERR, _CORRUPT = 3, 5, 6, 8, 10, 11
_FULL, _CANTOPEN, _CONSTRAINT, _NOTADB = 13, 14, 19, 26
# Python < 3.11 gives no codes, only the text, which SQLite fixes per code (sqlite3ErrStr).
_TEXTS = [("access permission denied", _PERM), ("database table is locked", _LOCKED),
          ("database is locked", _BUSY), ("readonly database", _READONLY), ("disk I/O error", _IOERR),
          ("malformed", _CORRUPT), ("database or disk is full", _FULL), ("unable to open", _CANTOPEN),
          ("constraint failed", _CONSTRAINT), ("file is not a database", _NOTADB)]


class StoreError(MixchatError):
    """The store cannot be opened, read or written, or a conversation cannot be found."""


class ConversationDeleted(StoreError):
    """A write to a conversation (or reply) that was deleted meanwhile, e.g. with `mixchat rm` while
    it was open in a tab. Nothing was written; `cid` is None when only the reply's id was known."""

    def __init__(self, cid: str | None, message: str) -> None:
        super().__init__(message)
        self.cid = cid


def db_timeout() -> float:
    """Seconds to wait for another process's write lock: $MIXCHAT_DB_TIMEOUT, else 30."""
    value = os.environ.get("MIXCHAT_DB_TIMEOUT")
    if not value:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise StoreError(f"MIXCHAT_DB_TIMEOUT={value!r} is not a number of seconds; unset it or give one, e.g. 30")
    return seconds


def _code(exc: sqlite3.Error) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF
    text = str(exc)
    return next((c for fragment, c in _TEXTS if fragment in text), None)


def _q(path: Path) -> str:
    return shlex.quote(str(path))


def _aside(path: Path) -> Path:
    """A name to move a bad file to that does not overwrite anything."""
    for n in range(1000):
        candidate = path.with_name(path.name + (".bad" if n == 0 else f".bad{n}"))
        if not os.path.lexists(candidate):
            return candidate
    return path.with_name(path.name + f".bad-{int(time.time())}")


def _uri(path: Path, **params: str) -> str:
    return f"file:{urllib.parse.quote(str(path.absolute()))}?{urllib.parse.urlencode(params)}"


# The store files this process holds open through SQLite, by (device, inode), with how many times.
# Closing *any* descriptor of a file drops every POSIX lock the process holds on it, SQLite's included
# (fcntl locks are per process, not per descriptor): reading the header of a file that another Store
# of this process has open with a plain open()/close() would let another process write under that
# Store's feet ("database disk image is malformed"). SQLite defers its own closes for this reason; a
# file it already accepted needs no second look at its header.
_open_here: dict[tuple[int, int], int] = {}
_open_here_lock = threading.Lock()


class StoreFile:
    """The SQLite file of the conversation store at `path`, and its one connection, `db`.

    readonly=False: creates the folder (0700) and file (0600) if missing, migrates an older schema,
    and refuses, at once and with the reason, a file it must not write: not a store, corrupt, from
    a newer mixchat, in a read-only place.
    readonly=True: reads whatever can be read and never writes; a missing store reads as empty.
    Its writes (`tx`) raise StoreError.
    timeout: seconds to wait for another process's write lock (default: db_timeout()).
    """

    def __init__(self, path: Path, readonly: bool = False, timeout: float | None = None) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self.timeout = db_timeout() if timeout is None else timeout
        self.newer: migrations.NewerSchemaError | None = None  # set when reading a newer mixchat's store
        self._corrupt: str | None = None  # SQLite's words, once it found damage: no more writes then
        # The TUI writes from worker threads through this one connection: one transaction at a time.
        self._lock = threading.RLock()
        self.db = self._open_readonly() if readonly else self._open()
        self._inode: tuple[int, int] | None = None
        try:
            st = self.path.stat()
        except OSError:
            return  # a missing store read as empty
        self._inode = (st.st_dev, st.st_ino)
        with _open_here_lock:
            _open_here[self._inode] = _open_here.get(self._inode, 0) + 1

    def close(self) -> None:
        self.db.close()
        if self._inode is not None:
            with _open_here_lock:
                left = _open_here.pop(self._inode, 1) - 1
                if left > 0:
                    _open_here[self._inode] = left
            self._inode = None

    # -- opening ---------------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        self._check_folder(create=True)
        exists = self._check_file()
        # Before SQLite tries: opened read-only it would fail only at the first save, after the
        # user typed a message and waited for the model.
        for target in (self.path.parent, self.path) if exists else (self.path.parent,):
            if not os.access(target, os.W_OK):
                raise self._readonly_error(target)
        if not exists:
            try:
                # Created here rather than by SQLite, which would make it 0644: conversations are
                # private, and SQLite gives the -wal and -shm files the database file's mode.
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            except FileExistsError:
                pass  # another mixchat created it just now
            except OSError as exc:
                raise self._os_error(exc, self.path.parent) from None
        db = self._connect(_uri(self.path, mode="rw"))
        try:
            with self.using(action="open"):
                existing = self._check_is_store(db)
                try:
                    migrations.check_not_newer(db)
                except migrations.NewerSchemaError as exc:
                    raise StoreError(f"cannot write to the conversation store {self.path}: it was {exc}; "
                                     "`mixchat list`, `show` and `export` can still read it") from None
                (user_version,) = db.execute("PRAGMA user_version").fetchone()
                if existing and (migrations.pending(db) or user_version != len(migrations.applied(db))):
                    # Migrating writes all over the file: never into a damaged one. Checked only
                    # then, as it reads the whole file.
                    problem = db.execute("PRAGMA quick_check(1)").fetchone()[0]
                    if problem != "ok":
                        self._corrupt = problem
                        raise self._corrupt_error()
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA foreign_keys=ON")
                db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across app crashes
                migrations.migrate(db)
        except BaseException:
            db.close()
            raise
        return db

    def _open_readonly(self) -> sqlite3.Connection:
        self._check_folder(create=False)
        if not self._check_file() or self.path.stat().st_size == 0:
            return self._empty()
        db = self._connect(_uri(self.path, mode="ro"))
        try:
            db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        except sqlite3.Error as exc:
            db.close()
            wal = self.path.with_name(self.path.name + "-wal")
            # In a read-only folder SQLite cannot create the -shm file that WAL readers share.
            # With no -wal holding recent writes, the file alone is the whole store, and
            # immutable=1 reads it without any side file.
            if _code(exc) not in (_READONLY, _CANTOPEN, _IOERR) or (wal.exists() and wal.stat().st_size > 0):
                raise self.explain(exc, "read") from exc
            db = self._connect(_uri(self.path, mode="ro", immutable="1"))
        try:
            with self.using():
                self._check_is_store(db)
                try:
                    migrations.check_not_newer(db)
                except migrations.NewerSchemaError as exc:
                    self.newer = exc  # read what can be read; columns that went away say so
                else:
                    if migrations.pending(db):
                        db = self._migrated_copy(db)
                db.execute("PRAGMA query_only=ON")
        except BaseException:
            db.close()
            raise
        return db

    def _connect(self, uri: str) -> sqlite3.Connection:
        try:
            # Autocommit mode: transactions are explicit (see `tx`), so none is ever left open.
            return sqlite3.connect(uri, uri=True, isolation_level=None, timeout=self.timeout,
                                   check_same_thread=False)
        except sqlite3.Error as exc:
            raise self.explain(exc, "read" if self.readonly else "open") from exc

    def _empty(self) -> sqlite3.Connection:
        """No store yet: an empty one in memory, so reading commands show nothing instead of
        creating a file."""
        db = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        migrations.migrate(db)
        db.execute("PRAGMA query_only=ON")
        return db

    def _migrated_copy(self, db: sqlite3.Connection) -> sqlite3.Connection:
        """An older schema, read without writing to it: migrate a copy in memory (once the store
        is opened for writing, the file itself is migrated)."""
        mem = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        db.backup(mem)
        db.close()
        migrations.migrate(mem)
        return mem

    def _check_folder(self, create: bool) -> None:
        folder = self.path.parent
        for p in (folder, *folder.parents):
            try:
                if not p.exists():
                    continue
            except OSError:
                break  # cannot look (no permission): what follows says what is wrong
            if not p.is_dir():
                raise StoreError(f"{p} is a file, not a folder, so the conversation store {self.path} cannot be kept "
                                 f"under it; move the file aside (mv {_q(p)} {_q(_aside(p))}) or set MIXCHAT_HOME "
                                 "(or --home) to a folder")
            break
        if create:
            try:
                make_private_dir(folder)
            except OSError as exc:
                raise StoreError(f"cannot create the folder {folder} for the conversation store ({exc.strerror}); "
                                 f"create it (mkdir -p {_q(folder)}) or set MIXCHAT_HOME (or --home) to a folder "
                                 "you can write") from None

    def _check_file(self) -> bool:
        """Whether the file exists; StoreError if it is not one SQLite can use. Looks at the
        header before SQLite does, because SQLite would write into whatever it opens."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise self._os_error(exc, self.path) from None
        if stat.S_ISDIR(st.st_mode):
            raise StoreError(f"{self.path} is a folder, not the conversation store file; move it aside "
                             f"(mv {_q(self.path)} {_q(_aside(self.path))}) so that mixchat can create the store")
        with _open_here_lock:
            held = (st.st_dev, st.st_ino) in _open_here
        if st.st_size and not held:
            try:
                with open(self.path, "rb") as f:
                    head = f.read(len(SQLITE_MAGIC))
            except OSError as exc:
                raise self._os_error(exc, self.path) from None
            if head != SQLITE_MAGIC:
                raise self._not_a_store("it is not an SQLite database, or its first page is damaged")
        return True

    def _check_is_store(self, db: sqlite3.Connection) -> bool:
        """Whether the file holds anything (an empty database is a store not yet made). Another
        program's SQLite database is refused: mixchat would add its tables to it."""
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                                           "AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\'")}
        if tables and "_migrations" not in tables:
            raise self._not_a_store("it is an SQLite database, but another program's")
        return bool(tables)

    # -- errors ----------------------------------------------------------------------------------

    def _not_a_store(self, why: str) -> StoreError:
        bad = _aside(self.path)
        return StoreError(f"cannot open the conversation store {self.path}: {why}, so it is not a mixchat store; "
                          f"mixchat has not changed it. Move it aside (mv {_q(self.path)} {_q(bad)}) and mixchat "
                          f"starts a new, empty store; whatever it holds stays in {bad.name}")

    def _corrupt_error(self) -> StoreError:
        bad = _aside(self.path)
        return StoreError(f"cannot use the conversation store {self.path}: it is corrupt ({self._corrupt}), and "
                          f"mixchat will not write to it. Move it aside (mv {_q(self.path)} {_q(bad)}) and mixchat "
                          f"starts a new, empty store; the conversations in it are not deleted (sqlite3 {_q(bad)} "
                          ".recover > recovered.sql salvages what is readable)")

    def _readonly_error(self, target: Path, detail: str = "") -> StoreError:
        kind = "folder" if target == self.path.parent else "file"
        try:
            read_only_fs = bool(os.statvfs(target).f_flag & os.ST_RDONLY)
            owner = target.stat().st_uid
        except OSError:
            read_only_fs, owner = False, os.geteuid()
        if read_only_fs:
            fix = "remount its file system read-write or set MIXCHAT_HOME (or --home) to a writable folder"
            why = f"the {kind} {target} is on a read-only file system"
        else:
            fix = ("run mixchat as that user, " if owner != os.geteuid() else "") + (
                f"make it writable (chmod u+w {_q(target)}) or set MIXCHAT_HOME (or --home) to a writable folder")
            why = f"the {kind} {target} is read-only" + (f" (it belongs to user id {owner})"
                                                         if owner != os.geteuid() else "")
        return StoreError(f"cannot save conversations in {self.path}: {why}{detail}; {fix}; "
                          "`mixchat list`, `show` and `export` still work")

    def _os_error(self, exc: OSError, target: Path) -> StoreError:
        if isinstance(exc, PermissionError):
            return StoreError(f"cannot open {target} ({exc.strerror}); it may belong to another user: check "
                              f"its owner and mode (ls -ld {_q(target)}) or set MIXCHAT_HOME (or --home) to your "
                              "own folder")
        return StoreError(f"cannot use the conversation store {self.path}: {target}: {exc.strerror or exc}; check "
                          f"that the disk holding {self.path.parent} is mounted and working")

    def explain(self, exc: sqlite3.Error, action: str) -> StoreError:
        """One cause, one line, one fix. `action`: what failed, "open", "read" or "write"."""
        code, detail, folder = _code(exc), str(exc), self.path.parent
        unsaved = {"write": "; this change was not saved, earlier ones are intact",
                   "open": "; the store was not changed"}.get(action, "")
        if code in (_CORRUPT, _NOTADB):
            self._corrupt = detail
            return self._corrupt_error()
        if code == _FULL:
            return StoreError(f"cannot save to {self.path}: the disk holding {folder} is full ({detail}){unsaved}; "
                              f"free some space there (df -h {_q(folder)}) and try again")
        if code in (_BUSY, _LOCKED):
            return StoreError(f"{self.path} is locked by another mixchat process (waited {self.timeout:g} s); "
                              f"close it or try again (MIXCHAT_DB_TIMEOUT=SECONDS waits longer){unsaved}")
        if code in (_READONLY, _PERM) or (code == _CANTOPEN and not os.access(folder, os.W_OK | os.X_OK)):
            target = folder if not os.access(folder, os.W_OK) else self.path
            return self._readonly_error(target, f" ({detail})")
        if code == _IOERR:
            return StoreError(f"cannot {action} {self.path}: disk I/O error "
                              f"({getattr(exc, 'sqlite_errorname', detail)}){unsaved}; the disk may be failing, full "
                              f"or unplugged: check it (dmesg; df -h {_q(folder)}) and try again")
        if code == _CANTOPEN:
            return StoreError(f"cannot open the conversation store {self.path} ({detail}); check that {folder} "
                              "exists and is yours, or set MIXCHAT_HOME (or --home) to a folder you can write")
        if code == _CONSTRAINT and "FOREIGN KEY" in detail:
            return ConversationDeleted(None, "the conversation was deleted (with `mixchat rm` or in another "
                                       "window), so this change was not saved; start a new conversation")
        if "no such module: fts5" in detail:
            # A store whose search index (migration 4) was made by an SQLite with FTS5: every change
            # to its messages updates the index, which this SQLite cannot do.
            return StoreError(f"cannot {action} {self.path}: its search index needs SQLite's FTS5, which the SQLite "
                              f"in this Python ({sqlite3.sqlite_version}) lacks{unsaved}; run mixchat with a Python "
                              "whose sqlite3 has FTS5 (python.org's and the distributions' do)")
        if self.newer is not None and ("no such column" in detail or "no such table" in detail):
            return StoreError(f"cannot read {self.path} ({detail}): it was {self.newer}")
        return StoreError(f"the conversation store {self.path} failed ({type(exc).__name__}: {detail}){unsaved}; "
                          "unless the file was edited by hand, this is a mixchat bug: please report it with this line")

    # -- the connection ------------------------------------------------------------------------

    @contextlib.contextmanager
    def using(self, action: str = "read") -> Iterator[None]:
        """Hold the connection; turn SQLite's errors into StoreError. ProgrammingError and
        InterfaceError are mixchat's bugs (a closed connection, bad parameters), not the file's:
        they keep their traceback."""
        with self._lock:
            try:
                yield
            except (sqlite3.ProgrammingError, sqlite3.InterfaceError):
                raise
            except sqlite3.Error as exc:
                raise self.explain(exc, action) from exc

    @contextlib.contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction on the connection: committed when the block ends, rolled back whole
        if it raises. StoreError at once on a store opened read-only or found corrupt."""
        if self.readonly:
            raise StoreError(f"{self.path} was opened read-only, for reading only; this change was not saved")
        if self._corrupt is not None:
            raise self._corrupt_error()
        with self.using("write"):
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
                self.db.execute("COMMIT")
            except BaseException:
                # SQLite may already have rolled back (a full disk, an I/O error): a ROLLBACK then
                # fails with 'no transaction is active' and would hide the real cause.
                if self.db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self.db.execute("ROLLBACK")
                raise
