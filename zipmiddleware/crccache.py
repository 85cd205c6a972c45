"""The CRC-32 cache: what makes a range of a ZIP cheap.

A ZIP's data descriptors and central directory hold every entry's CRC-32, so a
range starting late in an archive needs the CRC-32 of the files before it. They
are kept here, keyed by what identifies a file's content on every host (its name
below its root, size and mtime in ns; an object's key, size and ETag: see
:class:`Key`), and filled as a side effect of every full download
and of every range that reads a whole file. A download cut short inside a file
also leaves *checkpoints*: the CRC-32 of the file's first N bytes, every
:data:`CHECKPOINT_EVERY` bytes, so that resuming it never reads the whole head of
that file again.

What the cache is trusted for: a CRC-32 found here goes into archives without the
file being read, so whoever can write the cache can make downloads fail their
checksums (never leak a file: the data always comes from the file itself). Keep
the cache where only the service's user can write. Rows carry a check value, so a
row damaged on disk reads as missing, and every time a response reads a whole
file anyway the value is compared with the data: a mismatch is logged and
corrected.

What keeps an SQLite store from growing with every rewrite of the same files: a name keeps
rows for its :data:`VERSIONS_KEPT` versions written last, so a file rewritten (or an object
replaced) leaves at most that many behind. A few rather than one, since versions of a name
can be in use at once: two copies of a file whose mtimes differ, two roots whose folders have
the same name.

What never happens: a cache problem failing a download. A store that cannot be
read or written is logged once and replaced by memory for the rest of the process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import stat
import struct
import tempfile
import threading
import time
import weakref
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import NamedTuple, Protocol, runtime_checkable

logger = logging.getLogger("zipmiddleware")


class Key(NamedTuple):
    """A file's content as far as the cache (and the validators) know, the same on every host
    that has a copy of it: for a file, its path from its root folder's name on, its size and
    its mtime in ns (see ``planning.FileSnapshot.key``); for a versioned source such as an S3
    object, its name ("s3://bucket/key"), size and version (the ETag). So what one host learns
    serves all of them (see :mod:`.crcdatabase` for a store they share). ``name`` is text any
    store can keep (see :func:`storable_name`)."""

    name: str
    size: int
    version: str


# (offset, CRC-32 of the file's bytes [0, offset))
Checkpoint = tuple[int, int]

# How far apart a file's checkpoints are: a resume inside a file re-reads at most
# this much of the file's head (16 MiB: ~5 ms from page cache, ~0.1 s from disk).
CHECKPOINT_EVERY = 16 * 1024 * 1024
# A memory store keeps at most this many files (~200 bytes each); the oldest go first.
MEMORY_ENTRIES = 1_000_000
# How often a file store checks that its file is still there (was it deleted?).
RECHECK_SECONDS = 5.0
MEMORY = ":memory:"
# The tables' format (SQLite's user_version): a file of another one is set up anew.
SCHEMA = 4
# How many versions of a name an SQLite store keeps (those written last): see the module doc.
VERSIONS_KEPT = 4
# Keeping them: once a write (at ?3) has made a name's versions too many, the rows of those
# written before the last ?2 go (never rows of this very write).
_PRUNE_FILES = (
    "DELETE FROM file_crc WHERE name = ?1 AND written < ?3 AND (size, version) NOT IN"
    " (SELECT size, version FROM file_crc WHERE name = ?1 ORDER BY written DESC LIMIT ?2)"
)
_PRUNE_PREFIXES = (
    "DELETE FROM prefix_crc WHERE name = ?1 AND written < ?3 AND (size, version) NOT IN"
    " (SELECT size, version FROM prefix_crc WHERE name = ?1 GROUP BY size, version"
    " ORDER BY max(written) DESC LIMIT ?2)"
)


@runtime_checkable
class CrcCache(Protocol):
    """Where CRC-32s of whole files are kept between requests.

    A store may also keep checkpoints (``get_checkpoints``/``put_checkpoints`` as in
    :class:`SQLiteCrcCache`); without them a resume inside a file reads its whole head.
    """

    def get_many(self, keys: Iterable[Key]) -> dict[Key, int]:
        """The CRC-32s known for these keys; unknown keys are left out."""

    def put_many(self, items: Mapping[Key, int]) -> None:
        """Remember these CRC-32s. Must never raise for a storage problem: log it."""


def storable_name(name: str) -> str:
    """``name`` as text every store can keep, one text per name: a name from the file system
    that is no UTF-8 (its bytes escaped as lone surrogates), or holds a NUL, is written with
    backslash escapes, and its own backslashes doubled (so no two names give the same text)."""
    if name.isascii() and "\0" not in name and "\\" not in name:
        return name
    try:
        raw = name.encode("utf-8", "surrogateescape")  # os.fsdecode's escapes: the bytes themselves
    except UnicodeEncodeError:  # a surrogate no file name has: Python's own escapes, quoted
        return ascii(name)
    text = raw.replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")
    return text.replace("\0", "\\x00")


def guard(key: Key, offset: int, crc: int) -> int:
    """The check value stored with a row: a damaged row (one bit is enough) reads as missing."""
    text = f"{key.name}\0{key.version}".encode("utf-8", "surrogateescape")
    return zlib.crc32(struct.pack("<2QI", key.size, offset, crc) + text)


class MemoryCrcCache:
    """CRC-32s and checkpoints in this process's memory, the oldest forgotten first."""

    def __init__(self, limit: int = MEMORY_ENTRIES) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._crcs: OrderedDict[Key, int] = OrderedDict()
        self._checkpoints: OrderedDict[Key, dict[int, int]] = OrderedDict()

    def get_many(self, keys: Iterable[Key]) -> dict[Key, int]:
        with self._lock:
            return {key: self._crcs[key] for key in keys if key in self._crcs}

    def put_many(self, items: Mapping[Key, int]) -> None:
        with self._lock:
            for key, crc in items.items():
                self._crcs[key] = crc
                self._crcs.move_to_end(key)
                self._checkpoints.pop(key, None)  # the whole file's CRC makes them useless
            while len(self._crcs) > self.limit:
                self._crcs.popitem(last=False)

    def get_checkpoints(self, keys: Iterable[Key]) -> dict[Key, list[Checkpoint]]:
        with self._lock:
            return {key: sorted(self._checkpoints[key].items()) for key in keys if key in self._checkpoints}

    def put_checkpoints(self, key: Key, checkpoints: Iterable[Checkpoint]) -> None:
        with self._lock:
            self._checkpoints.setdefault(key, {}).update(checkpoints)
            self._checkpoints.move_to_end(key)
            while len(self._checkpoints) > self.limit // 16:
                self._checkpoints.popitem(last=False)

    def __repr__(self) -> str:
        return "MemoryCrcCache()"


def default_path() -> str:
    """The store used when none is configured: one file per user in the temporary folder,
    shared by every worker and thread of that user, so a resume that lands on another
    worker (or after a restart) finds what the first download learnt."""
    return os.path.join(tempfile.gettempdir(), f"zipmiddleware-{os.geteuid()}", "crc32.sqlite")


def _private_folder(folder: str) -> None:
    """Create ``folder`` for this user only, or check that it is this user's and private."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(folder, 0o700)
    st = os.lstat(folder)  # never follow a link someone else planted in /tmp
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise PermissionError(f"{folder} is not a private folder of this user")


class SQLiteCrcCache:
    """CRC-32s in an SQLite file shared by every worker and thread (WAL mode).

    ``path``: the file (its folder must exist); ``None`` or ``":memory:"``: memory only.
    :meth:`per_user` gives the store used when none is configured (:func:`default_path`).

    No connection ever crosses a fork: none is opened before the first lookup, and an
    open one is closed just before any ``fork()`` of this process and reopened lazily
    after it (SQLite forbids carrying a connection into a child: it may corrupt the
    WAL, and gunicorn workers that inherited one from the master crashed with SIGBUS).
    Writers wait for each other (``busy_timeout``). Any error is logged once and the
    process carries on with a :class:`MemoryCrcCache` instead.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *, per_user: bool = False) -> None:
        # None: the per-user default file, which depends on the user each process runs as.
        self.path: str | None = None if per_user else os.fspath(path or MEMORY)
        self.memory_only = self.path == MEMORY
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None
        self._identity: tuple[int, int] | None = None  # of the file the connection has open
        self._checked = 0.0
        self._fallback: MemoryCrcCache | None = MemoryCrcCache() if self.memory_only else None
        if self.path is not None and not self.memory_only:
            folder = os.path.dirname(os.path.abspath(self.path))
            if not os.path.isdir(folder):
                raise ValueError(f"the folder of {self.path!r} does not exist")
        reference = weakref.ref(self)

        def before_fork() -> None:
            cache = reference()
            if cache is not None:
                cache._lock.acquire()
                cache._disconnect()

        def after_fork_in_parent() -> None:
            cache = reference()
            if cache is not None:
                cache._lock.release()

        def after_fork_in_child() -> None:
            cache = reference()
            if cache is not None:
                cache._lock.release()
                if not cache.memory_only:  # a worker decides for itself whether it can use the file
                    cache._fallback = None

        os.register_at_fork(
            before=before_fork, after_in_parent=after_fork_in_parent, after_in_child=after_fork_in_child
        )

    @classmethod
    def per_user(cls) -> SQLiteCrcCache:
        """The store used when none is configured: :func:`default_path`, opened when first used."""
        return cls(per_user=True)

    # -- the public store ------------------------------------------------------------

    def get_many(self, keys: Iterable[Key]) -> dict[Key, int]:
        keys = list(keys)
        rows = self._rows(keys, "file_crc", "crc, guard")
        if rows is None:
            return self._memory().get_many(keys)
        return {key: crc for key, offset, crc in rows}

    def put_many(self, items: Mapping[Key, int]) -> None:
        if not items:
            return
        now = time.time_ns()
        rows = [(*key, crc, guard(key, key.size, crc), now) for key, crc in items.items()]
        done = self._write(
            ("INSERT OR REPLACE INTO file_crc VALUES (?, ?, ?, ?, ?, ?)", rows),
            (  # the whole file's CRC-32 makes its checkpoints useless
                "DELETE FROM prefix_crc WHERE name = ? AND size = ? AND version = ?",
                [row[:3] for row in rows],
            ),
            (_PRUNE_FILES, [(name, VERSIONS_KEPT, now) for name in {key.name for key in items}]),
        )
        if not done:
            self._memory().put_many(items)

    def get_checkpoints(self, keys: Iterable[Key]) -> dict[Key, list[Checkpoint]]:
        keys = list(keys)
        rows = self._rows(keys, "prefix_crc", "offset, crc, guard")
        if rows is None:
            return self._memory().get_checkpoints(keys)
        found: dict[Key, list[Checkpoint]] = {}
        for key, offset, crc in rows:
            found.setdefault(key, []).append((offset, crc))
        return {key: sorted(points) for key, points in found.items()}

    def put_checkpoints(self, key: Key, checkpoints: Iterable[Checkpoint]) -> None:
        points = list(checkpoints)
        if not points:
            return
        now = time.time_ns()
        rows = [(*key, offset, crc, guard(key, offset, crc), now) for offset, crc in points]
        if not self._write(
            ("INSERT OR REPLACE INTO prefix_crc VALUES (?, ?, ?, ?, ?, ?, ?)", rows),
            (_PRUNE_PREFIXES, [(key.name, VERSIONS_KEPT, now)]),
        ):
            self._memory().put_checkpoints(key, points)

    def check_writable(self) -> None:
        """Write and delete a row with a connection of its own, closed at once: raises
        ``sqlite3.Error`` or ``OSError`` when this process cannot use the file."""
        if self.path is None or self.memory_only:
            return
        connection = self._open()
        try:
            with connection:
                connection.execute("BEGIN IMMEDIATE")
                connection.execute("INSERT OR REPLACE INTO file_crc VALUES ('', -1, '', 0, 0, 0)")
                connection.execute("DELETE FROM file_crc WHERE size = -1")
        finally:
            connection.close()

    def check_writable_as(self, become: Callable[[], None] | None) -> None:
        """:meth:`check_writable` in a child process that first calls ``become`` (to take on
        the user gunicorn's workers will run as), so that a master running as root notices a
        file its workers cannot write, and creates nothing they could not use."""
        if become is None:
            self.check_writable()
            return
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: take on the workers' user, try, report, never return
            code = 1
            try:
                os.close(read_end)
                become()
                self.check_writable()
                code = 0
            except BaseException as exc:
                os.write(write_end, f"{exc} (as uid {os.geteuid()})".encode()[:2000])
            finally:
                os._exit(code)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as report:
            message = report.read().decode(errors="replace")
        if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0:
            raise PermissionError(message or "the check as the workers' user failed")

    def __repr__(self) -> str:
        return "SQLiteCrcCache.per_user()" if self.path is None else f"SQLiteCrcCache({self.path!r})"

    # -- SQLite, or memory when it fails --------------------------------------------

    def _memory(self) -> MemoryCrcCache:
        with self._lock:
            if self._fallback is None:
                self._fallback = MemoryCrcCache()
            return self._fallback

    def _fail(self, exc: BaseException) -> None:
        """Log once, close, and keep CRC-32s in memory for the rest of this process."""
        if self._fallback is None:
            self._fallback = MemoryCrcCache()
            logger.warning(
                "CRC-32 cache %s cannot be used (%s): this process keeps CRC-32s in memory from now on, "
                "so ranges of large archives may read more; check the file's folder and owner",
                self._file(),
                exc,
            )
        self._disconnect()

    def _rows(self, keys: list[Key], table: str, columns: str) -> list[tuple[Key, int, int]] | None:
        """Rows for ``keys`` whose check value holds, as (key, offset, crc); None: use memory."""
        found: list[tuple[Key, int, int]] = []
        with self._lock:
            connection = self._connected()
            if connection is None:
                return None
            try:
                for batch in range(0, len(keys), 200):
                    chunk = {tuple(key): key for key in keys[batch : batch + 200]}
                    places = ", ".join(["(?, ?, ?)"] * len(chunk))
                    values = [value for stored in chunk for value in stored]
                    # A join with the keys, so that each is looked up by the primary key (a row-value
                    # "IN (VALUES ...)" makes SQLite scan the whole table once per query).
                    query = (
                        f"WITH wanted(n, s, v) AS (VALUES {places}) SELECT n, s, v, {columns}"
                        f" FROM wanted JOIN {table} ON name = n AND size = s AND version = v"
                    )
                    for row in connection.execute(query, values):
                        key = chunk[row[:3]]
                        offset, crc, check = row[3:] if len(row) == 6 else (key.size, *row[3:])
                        if check != guard(key, offset, crc):
                            logger.warning("CRC-32 cache %s: a damaged row for %s is ignored", self.path, key)
                            continue
                        found.append((key, offset, crc))
            except sqlite3.Error as exc:
                self._fail(exc)
                return None
        return found

    def _write(self, *steps: tuple[str, Sequence[tuple[object, ...]]]) -> bool:
        """Run each (statement, rows) for every row, all in one transaction."""
        with self._lock:
            connection = self._connected()
            if connection is None:
                return False
            try:
                with connection:
                    connection.execute("BEGIN IMMEDIATE")
                    for statement, rows in steps:
                        connection.executemany(statement, rows)
            except sqlite3.Error as exc:
                self._fail(exc)
                return False
        return True

    def _connected(self) -> sqlite3.Connection | None:
        """This process's connection (under the lock); None once it has failed."""
        if self._fallback is not None:
            return None
        try:
            if self._connection is not None and time.monotonic() - self._checked > RECHECK_SECONDS:
                self._checked = time.monotonic()
                st = os.stat(self._file())
                if (st.st_dev, st.st_ino) != self._identity:  # deleted or replaced: start anew
                    logger.warning("CRC-32 cache %s was deleted or replaced: reopening it", self.path)
                    self._disconnect()
            if self._connection is None:
                self._connection = self._open()
                st = os.stat(self._file())
                self._identity, self._checked = (st.st_dev, st.st_ino), time.monotonic()
        except (sqlite3.Error, OSError) as exc:
            self._fail(exc)
            return None
        return self._connection

    def _file(self) -> str:
        """The file to use; the default one depends on the user this process runs as."""
        return default_path() if self.path is None else self.path

    def _open(self) -> sqlite3.Connection:
        path = self._file()
        if self.path is None:
            _private_folder(os.path.dirname(path))
        connection = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            if connection.execute("PRAGMA user_version").fetchone()[0] != SCHEMA:
                with connection:  # one process sets the tables up; the others find them done
                    connection.execute("BEGIN IMMEDIATE")
                    if connection.execute("PRAGMA user_version").fetchone()[0] != SCHEMA:
                        _create_tables(connection)
        except BaseException:
            connection.close()
            raise
        return connection

    def __del__(self) -> None:
        # Close now: Python's sqlite3 connection sits in a reference cycle with its statement
        # cache, so left to itself it stays open until a garbage collection, across any fork.
        with contextlib.suppress(Exception):
            self._disconnect()

    def _disconnect(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(sqlite3.Error):
                self._connection.close()
            self._connection = None


def _create_tables(connection: sqlite3.Connection) -> None:
    """Today's tables, replacing those of an older format (their keys meant something else)."""
    for old in ("crc32", "file_crc", "prefix_crc"):
        connection.execute(f"DROP TABLE IF EXISTS {old}")
    connection.execute(
        "CREATE TABLE file_crc (name TEXT, size INTEGER, version TEXT, crc INTEGER NOT NULL,"
        " guard INTEGER NOT NULL, written INTEGER NOT NULL, PRIMARY KEY (name, size, version)) WITHOUT ROWID"
    )
    connection.execute(
        "CREATE TABLE prefix_crc (name TEXT, size INTEGER, version TEXT, offset INTEGER,"
        " crc INTEGER NOT NULL, guard INTEGER NOT NULL, written INTEGER NOT NULL,"
        " PRIMARY KEY (name, size, version, offset)) WITHOUT ROWID"
    )
    connection.execute(f"PRAGMA user_version = {SCHEMA}")
