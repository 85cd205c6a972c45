"""The CRC-32 cache: what makes a range of a ZIP cheap.

A ZIP's data descriptors and central directory hold every entry's CRC-32, so a
range starting late in an archive needs the CRC-32 of the files before it. They
are kept here, keyed by what identifies a file's content on this host (device,
inode, size, mtime in ns), and filled as a side effect of every full download
and of every range that reads a whole file.

Any object with ``get_many`` and ``put_many`` can replace the embedded SQLite
store, e.g. a shared store when several hosts serve the same files.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Iterable, Mapping
from typing import Protocol, runtime_checkable

logger = logging.getLogger("zipmiddleware")

# (st_dev, st_ino, st_size, st_mtime_ns): a file's content as far as the cache knows.
Key = tuple[int, int, int, int]


@runtime_checkable
class CrcCache(Protocol):
    """Where CRC-32s of whole files are kept between requests."""

    def get_many(self, keys: Iterable[Key]) -> dict[Key, int]:
        """The CRC-32s known for these keys; unknown keys are left out."""

    def put_many(self, items: Mapping[Key, int]) -> None:
        """Remember these CRC-32s. Must never raise for a storage problem: log it."""


class SQLiteCrcCache:
    """CRC-32s in an SQLite file (``path``), or in memory when ``path`` is None.

    Safe with several gunicorn workers and threads: each process opens its own
    connection (after a fork too), the file is in WAL mode, writers wait for
    each other (``busy_timeout``), and a write that still fails is only logged:
    the cache is an optimisation, never a reason to fail a download.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = None if path is None else os.fspath(path)
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None
        self._pid = 0
        if self.path is not None:
            directory = os.path.dirname(os.path.abspath(self.path))
            if not os.path.isdir(directory):
                raise ValueError(f"the folder of {self.path!r} does not exist")
            with self._lock:
                self._connect()  # fail at start-up, not at the first download

    def _connect(self) -> sqlite3.Connection:
        if self._connection is None or self._pid != os.getpid():
            connection = sqlite3.connect(
                self.path or ":memory:", timeout=30, isolation_level=None, check_same_thread=False
            )
            if self.path is not None:
                connection.execute("PRAGMA journal_mode=WAL")
                connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute(
                "CREATE TABLE IF NOT EXISTS crc32 (device INTEGER, inode INTEGER, size INTEGER,"
                " mtime_ns INTEGER, crc INTEGER NOT NULL, PRIMARY KEY (device, inode, size, mtime_ns))"
            )
            self._connection, self._pid = connection, os.getpid()
        return self._connection

    def get_many(self, keys: Iterable[Key]) -> dict[Key, int]:
        found: dict[Key, int] = {}
        try:
            with self._lock:
                connection = self._connect()
                for key in keys:
                    row = connection.execute(
                        "SELECT crc FROM crc32 WHERE device = ? AND inode = ? AND size = ? AND mtime_ns = ?",
                        _storable(key),
                    ).fetchone()
                    if row is not None:
                        found[key] = row[0]
        except sqlite3.Error as exc:
            logger.warning("CRC-32 cache %s cannot be read: %s", self.path or ":memory:", exc)
        return found

    def put_many(self, items: Mapping[Key, int]) -> None:
        if not items:
            return
        try:
            with self._lock:
                connection = self._connect()
                with connection:  # one transaction
                    connection.execute("BEGIN IMMEDIATE")
                    connection.executemany(
                        "INSERT OR REPLACE INTO crc32 VALUES (?, ?, ?, ?, ?)",
                        [(*_storable(key), crc) for key, crc in items.items()],
                    )
        except sqlite3.Error as exc:
            logger.warning("CRC-32 cache %s cannot be written: %s", self.path or ":memory:", exc)

    def __repr__(self) -> str:
        return f"SQLiteCrcCache({self.path!r})"


def _storable(key: Key) -> tuple[int, int, int, int]:
    # SQLite integers are signed 64-bit; device numbers and inodes may use all 64 bits.
    return tuple(value - (1 << 64) if value >= (1 << 63) else value for value in key)  # type: ignore[return-value]
