"""A CRC-32 store in a database that many hosts share, through SQLAlchemy.

``crc_cache = "postgresql+psycopg://zip:secret@db.example/downloads"``: what one host learns
(a full download's CRC-32s, a cut download's checkpoints) serves every host whose copy of a
file has the same :class:`~.crccache.Key`, so a range or a resume that lands on another host
starts warm. Needs SQLAlchemy (``pip install 'zipmiddleware[sql]'``) and the database's driver
(``psycopg[binary]`` for PostgreSQL).

Two tables, created by the first process that uses the database if they are missing (or made
beforehand, with these columns, for a user that may not create tables)::

    zipmiddleware_file_crc   (name, size, version, crc, guard)            key (name, size, version)
    zipmiddleware_prefix_crc (name, size, version, "offset", crc, guard)  key (..., "offset")

The same contract as :class:`~.crccache.SQLiteCrcCache`: rows carry a check value, so a damaged
row reads as missing, and a store problem never fails a download. Connections and statements
have short timeouts (:data:`TIMEOUT_SECONDS`); a database that cannot be used (down, too slow,
refusing the user) is logged once per outage, and the process keeps CRC-32s in memory
meanwhile and tries the database again after :data:`RETRY_SECONDS`. A database that is down
when the application starts does not stop it: configuration only checks the URL and driver.

PostgreSQL and SQLite are what this is tested with (lookups and writes there take arrays or a
``VALUES`` list, one statement for hundreds of keys); other databases get portable SQL.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from .crccache import Checkpoint, Key, MemoryCrcCache, guard
from .errors import ConfigError

if TYPE_CHECKING:
    from sqlalchemy import Connection, Engine, Executable, MetaData, Table
    from sqlalchemy.engine import URL

logger = logging.getLogger("zipmiddleware")

T = TypeVar("T")

SETTING = "crc_cache"
FILE_TABLE = "zipmiddleware_file_crc"
PREFIX_TABLE = "zipmiddleware_prefix_crc"
# How long a connection attempt, a wait for a pooled connection and (where the driver lets us
# say so) one statement may take: a stuck database delays a download by about this much, once.
TIMEOUT_SECONDS = 3
# The longest a download waits for the store, whatever the database does: a server that stopped
# answering (a paused machine, a failover whose address black-holes) leaves a query waiting for
# ever, since statement_timeout is the server's own. A connection and a statement, and a second.
DEADLINE_SECONDS = 2 * TIMEOUT_SECONDS + 1
# How long a process keeps to memory after the database failed before it tries it again.
RETRY_SECONDS = 30.0
# How often a write that lost a race with another host's (a deadlock) is tried again.
RETRIES = 2
# Keys per lookup and rows per write statement. PostgreSQL takes them as arrays; elsewhere a
# lookup has three parameters per key (within every database's limit) and is padded to a power
# of two with a key no row has (size -1), so that there are few statements to compile.
BATCH = 500
SMALL_BATCH = 256
# Rows per write transaction: a download that learnt very many CRC-32s at once (a one-pass
# archive of 100,000 files) writes them in parts, each within DEADLINE_SECONDS.
WRITE_ROWS = 10_000
NO_KEY = ("", -1, "")
# BIGINT's bound: a size or an offset past it (none is) is kept in memory.
BIGINT = 1 << 63
# MySQL cannot index TEXT: names are VARCHAR there, as long as its key's 3072 bytes allow.
MYSQL_NAME, MYSQL_VERSION = 700, 64
KEY_COLUMNS = ("name", "size", "version")

# The per-process state of a parent, kept (and never used) by a forked child: collecting it
# would close the parent's connections, and a driver such as libpq says goodbye to the server
# over the very socket the parent still uses.
_INHERITED: list[object] = []


class _Process:
    """What one process has: its engine (made on first use), its memory, how the database is."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.engine: Engine | None = None
        self.ready = False  # the tables are there
        self.failing = False  # in an outage: memory until retry_at
        self.retry_at = 0.0
        self.memory = MemoryCrcCache()


class DatabaseCrcCache:
    """CRC-32s and checkpoints in a database shared by many hosts (see the module's text).

    ``url`` is an SQLAlchemy URL with a synchronous driver; it is parsed and its driver
    imported now (a :class:`~.errors.ConfigError` naming ``crc_cache`` otherwise), but nothing
    connects before the first lookup. Each process has its own engine (connection pool, with
    ``pool_pre_ping``), made again in a forked child.
    """

    def __init__(self, url: str) -> None:
        try:
            import sqlalchemy
        except ImportError:
            raise ConfigError(
                SETTING, "a database CRC-32 store needs SQLAlchemy: pip install 'zipmiddleware[sql]'"
            ) from None
        if not isinstance(url, str) or not url.strip():
            raise ConfigError(SETTING, f"expected a database URL, got {url!r}")
        try:
            self.url: URL = sqlalchemy.make_url(url.strip())
            dialect = self.url.get_dialect()
            dialect.import_dbapi()  # the driver must import now, not at the first request
        except Exception as exc:  # ArgumentError, NoSuchModuleError, ImportError of a driver
            raise ConfigError(SETTING, f"cannot use {_hidden_password(url)!r}: {exc}") from None
        if getattr(dialect, "is_async", False):
            raise ConfigError(
                SETTING,
                f"{self.url.drivername!r} is an asyncio driver; use a synchronous one (postgresql+psycopg)",
            )
        self.backend = self.url.get_backend_name()
        self._quote = dialect().identifier_preparer.quote
        self._metadata, self._files, self._prefixes = _tables()
        self._statements: dict[tuple[str, str, int], Executable] = {}
        self._lock = threading.Lock()
        self._process: _Process | None = None
        reference = weakref.ref(self)

        def after_fork_in_child() -> None:
            cache = reference()
            if cache is not None:
                cache._lock = threading.Lock()  # a parent's thread may have held it at the fork
                if cache._process is not None:
                    _INHERITED.append(cache._process)
                    cache._process = None

        os.register_at_fork(after_in_child=after_fork_in_child)

    def __repr__(self) -> str:
        return f"DatabaseCrcCache({self._shown()!r})"

    # -- the public store ------------------------------------------------------------

    def get_many(self, keys: Iterable[Key]) -> dict[Key, int]:
        keys = list(keys)
        process = self._here()
        stored = [key for key in keys if self._storable(key)]
        rows = self._lookup(process, self._files, stored)
        found = {key: crc for key, _, crc in rows or ()}
        # What memory holds: learnt while the database was down, or keys no column can hold.
        missing = [key for key in keys if key not in found]
        if missing:
            found.update(process.memory.get_many(missing))
        return found

    def put_many(self, items: Mapping[Key, int]) -> None:
        if not items:
            return
        process = self._here()
        stored = {key: crc for key, crc in items.items() if self._storable(key)}
        rows = [_row(key, crc) for key, crc in sorted(stored.items())]  # one lock order for all hosts

        def write(part: list[dict[str, Any]], connection: Connection) -> bool:
            self._upsert(connection, self._files, part)
            # The whole file's CRC-32 makes its checkpoints useless.
            self._delete_checkpoints(connection, part)
            return True

        parts = [rows[start : start + WRITE_ROWS] for start in range(0, len(rows), WRITE_ROWS)]
        done = bool(rows) and all(self._run(process, functools.partial(write, part)) for part in parts)
        if done:
            # Memory gives way to the database, but must not keep a value corrected since.
            held = process.memory.get_many(stored)
            kept = {key: crc for key, crc in items.items() if key not in stored or key in held}
        else:
            kept = dict(items)
        if kept:
            process.memory.put_many(kept)

    def get_checkpoints(self, keys: Iterable[Key]) -> dict[Key, list[Checkpoint]]:
        keys = list(keys)
        process = self._here()
        stored = [key for key in keys if self._storable(key)]
        rows = self._lookup(process, self._prefixes, stored)
        found: dict[Key, list[Checkpoint]] = {}
        for key, offset, crc in rows or ():
            found.setdefault(key, []).append((offset, crc))
        missing = [key for key in keys if key not in found]
        if missing:
            found.update(process.memory.get_checkpoints(missing))
        return {key: sorted(points) for key, points in found.items()}

    def put_checkpoints(self, key: Key, checkpoints: Iterable[Checkpoint]) -> None:
        points = dict(checkpoints)  # one row per offset
        if not points:
            return
        process = self._here()
        if self._storable(key) and all(0 <= offset < BIGINT for offset in points):
            rows = [_row(key, crc, offset) for offset, crc in sorted(points.items())]

            def write(connection: Connection) -> bool:
                self._upsert(connection, self._prefixes, rows)
                return True

            if self._run(process, write):
                return
        process.memory.put_checkpoints(key, points.items())

    # -- the database, or memory when it fails -----------------------------------------

    def _here(self) -> _Process:
        """This process's state; a forked child makes its own (the fork hook also clears it)."""
        process = self._process
        if process is not None and process.pid == os.getpid():
            return process
        with self._lock:
            process = self._process
            if process is None or process.pid != os.getpid():
                if process is not None:
                    _INHERITED.append(process)
                process = self._process = _Process()
            return process

    def _run(self, process: _Process, work: Callable[[Connection], T]) -> T | None:
        """``work`` in one transaction; None when the database cannot be used now."""
        with process.lock:
            if process.failing:
                now = time.monotonic()
                if now < process.retry_at:
                    return None
                process.retry_at = now + RETRY_SECONDS  # this thread tries; the others keep to memory
            if process.engine is None:
                try:
                    process.engine = self._engine()
                except Exception as exc:
                    self._fail(process, exc)
                    return None
            engine = process.engine

        def transaction() -> T:
            if not process.ready:
                self._create_tables(engine)
                process.ready = True
            for attempt in range(RETRIES + 1):
                try:
                    with engine.begin() as connection:
                        return work(connection)
                except Exception as exc:
                    if attempt == RETRIES or not _transient(exc):
                        raise
                    # A deadlock with another host's write: after a moment (so that the other
                    # one has finished), once more.
                    logger.debug("CRC-32 store %s: trying again after %s", self._shown(), self._reason(exc))
                    time.sleep(random.uniform(0.05, 0.2) * (attempt + 1))
            raise AssertionError("unreachable")

        try:
            result = _in_time(transaction, DEADLINE_SECONDS)
        except Exception as exc:  # the database's problem never becomes the download's
            with process.lock:
                if isinstance(exc, TimeoutError) and process.engine is engine:
                    process.engine = None  # its connection is stuck: the next try makes a new pool
                self._fail(process, exc)
            return None
        if process.failing:
            with process.lock:
                if process.failing:
                    process.failing = False
                    logger.info("CRC-32 store %s can be used again", self._shown())
        return result

    def _fail(self, process: _Process, exc: BaseException) -> None:
        """Under the process's lock: memory for the next :data:`RETRY_SECONDS`, logged once an outage."""
        process.retry_at = time.monotonic() + RETRY_SECONDS
        if process.failing:
            logger.debug("CRC-32 store %s still cannot be used: %s", self._shown(), self._reason(exc))
            return
        process.failing = True
        logger.warning(
            "CRC-32 store %s cannot be used (%s): this process keeps CRC-32s in memory meanwhile, "
            "so ranges of large archives may read more, and tries the database again in %g s",
            self._shown(),
            self._reason(exc),
            RETRY_SECONDS,
        )

    def _engine(self) -> Engine:
        import sqlalchemy

        options: dict[str, Any] = {"pool_pre_ping": True, "connect_args": _connect_args(self.url)}
        if self.backend != "sqlite":  # SQLite's pools do not wait for a connection
            options["pool_timeout"] = TIMEOUT_SECONDS
        return sqlalchemy.create_engine(self.url, **options)

    def _create_tables(self, engine: Engine) -> None:
        """The tables if they are missing. Another process creating them at the same moment
        makes one of the two fail (PostgreSQL: a duplicate table or type; SQLite: a table that
        already exists): a second look then finds them."""
        from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

        try:
            self._metadata.create_all(engine, checkfirst=True)
        except (IntegrityError, ProgrammingError, OperationalError) as exc:
            # (an OperationalError is also what a database that is down gives: not tried again)
            if isinstance(exc, OperationalError) and "already exists" not in str(exc.orig):
                raise
            self._metadata.create_all(engine, checkfirst=True)

    # -- the statements ------------------------------------------------------------------

    def _lookup(self, process: _Process, table: Table, keys: list[Key]) -> list[tuple[Key, int, int]] | None:
        """:meth:`_select` in a transaction of its own; None when the database cannot be used now."""
        if not keys:
            return []
        return self._run(process, lambda connection: self._select(connection, table, keys))

    def _select(self, connection: Connection, table: Table, keys: list[Key]) -> list[tuple[Key, int, int]]:
        """Rows for ``keys`` whose check value holds, as (key, offset, crc)."""
        found: list[tuple[Key, int, int]] = []
        checkpoints = table is self._prefixes
        batch = BATCH if self.backend == "postgresql" else SMALL_BATCH
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), batch):
            chunk = {(key.name, key.size, key.version): key for key in unique[start : start + batch]}
            values: dict[str, Any]
            if self.backend == "postgresql":  # arrays: one statement for any number of keys
                size, values = 0, _arrays(list(chunk), "nsv")
            else:
                size = _bucket(len(chunk))
                padded = [*chunk, *[NO_KEY] * (size - len(chunk))]
                values = {
                    f"{name}{index}": value
                    for index, wanted in enumerate(padded)
                    for name, value in zip("nsv", wanted, strict=True)
                }
            for row in connection.execute(self._lookup_statement(table, size), values):
                key = chunk[(row[0], row[1], row[2])]
                at, crc, check = (row[3], row[4], row[5]) if checkpoints else (key.size, row[3], row[4])
                if check != guard(key, at, crc):
                    logger.warning("CRC-32 store %s: a damaged row for %s is ignored", self._shown(), key)
                    continue
                found.append((key, at, crc))
        return found

    def _lookup_statement(self, table: Table, size: int) -> Executable:
        """The lookup of keys in ``table``, each by the primary key: their name, size, version and
        the table's other columns. Made once per table (and size) as text, which SQLAlchemy
        compiles once per process (a ``values()`` construct it compiles for every query:
        ~0.1 s for 256 keys).

        PostgreSQL: the keys as three arrays (parameters n, s and v), each looked up in a lateral
        subquery (a plain join makes PostgreSQL hash a table of up to some 100,000 rows for every
        query); SQLite: a join with the keys as a ``VALUES`` list of ``size`` rows (parameters
        n0, s0, v0, n1...; SQLite scans the whole table for a row-value ``IN``); other
        databases: a row-value ``IN``."""
        statement = self._statements.get(("select", table.name, size))
        if statement is not None:
            return statement
        import sqlalchemy

        selected = ", ".join(self._quote(name) for name in table.c.keys()[3:])
        same = "name = n AND size = s AND version = v"
        if self.backend == "postgresql":  # OFFSET 0: a lookup per key, never a scan of the table
            statement = sqlalchemy.text(
                f"SELECT n, s, v, found.* FROM unnest(CAST(:n AS TEXT[]), CAST(:s AS BIGINT[]),"
                f" CAST(:v AS TEXT[])) AS wanted (n, s, v) CROSS JOIN LATERAL (SELECT {selected}"
                f" FROM {self._quote(table.name)} WHERE {same} OFFSET 0) AS found"
            )
        elif self.backend == "sqlite":
            rows = ", ".join(f"(:n{index}, CAST(:s{index} AS BIGINT), :v{index})" for index in range(size))
            statement = sqlalchemy.text(
                f"WITH wanted (n, s, v) AS (VALUES {rows}) SELECT n, s, v, {selected} FROM wanted"
                f" JOIN {self._quote(table.name)} ON {same}"
            )
        else:
            key = sqlalchemy.tuple_(table.c.name, table.c.size, table.c.version)
            wanted = [
                sqlalchemy.tuple_(*(sqlalchemy.bindparam(f"{name}{index}") for name in "nsv"))
                for index in range(size)
            ]
            statement = sqlalchemy.select(*table.c).where(key.in_(wanted))
        self._statements[("select", table.name, size)] = statement
        return statement

    def _upsert(self, connection: Connection, table: Table, rows: list[dict[str, Any]]) -> None:
        """Insert ``rows``, replacing those with the same primary key."""
        import sqlalchemy

        if self.backend == "postgresql":  # arrays, BATCH rows a statement
            for start in range(0, len(rows), BATCH):
                values = _arrays([tuple(row.values()) for row in rows[start : start + BATCH]], list(rows[0]))
                connection.execute(self._postgresql_upsert(table), values)
        elif self.backend == "sqlite":  # a statement per row costs little in-process
            from sqlalchemy.dialects import sqlite

            statement = sqlite.insert(table)
            statement = statement.on_conflict_do_update(
                index_elements=list(table.primary_key.columns),
                set_={"crc": statement.excluded.crc, "guard": statement.excluded.guard},
            )
            connection.execute(statement, rows)
        else:  # delete and insert, in the caller's transaction
            self._delete(connection, table, rows, table.primary_key.columns.keys())
            connection.execute(sqlalchemy.insert(table), rows)

    def _postgresql_upsert(self, table: Table) -> Executable:
        statement = self._statements.get(("upsert", table.name, 0))
        if statement is None:
            import sqlalchemy

            columns = table.c.keys()
            types = [
                "BIGINT" if column in ("size", "offset", "crc", "guard") else "TEXT" for column in columns
            ]
            arrays = ", ".join(
                f"CAST(:{column} AS {kind}[])" for column, kind in zip(columns, types, strict=True)
            )
            key = ", ".join(self._quote(column.name) for column in table.primary_key.columns)
            named = ", ".join(self._quote(column) for column in columns)
            statement = sqlalchemy.text(
                f"INSERT INTO {self._quote(table.name)} ({named})"
                f" SELECT * FROM unnest({arrays}) ON CONFLICT ({key})"
                " DO UPDATE SET crc = EXCLUDED.crc, guard = EXCLUDED.guard"
            )
            self._statements[("upsert", table.name, 0)] = statement
        return statement

    def _delete_checkpoints(self, connection: Connection, rows: list[dict[str, Any]]) -> None:
        """Delete every checkpoint of the files of ``rows``."""
        if self.backend != "postgresql":
            self._delete(connection, self._prefixes, rows, KEY_COLUMNS)
            return
        statement = self._statements.get(("delete", PREFIX_TABLE, 0))
        if statement is None:
            import sqlalchemy

            statement = self._statements["delete", PREFIX_TABLE, 0] = sqlalchemy.text(
                f"DELETE FROM {self._quote(PREFIX_TABLE)} USING unnest(CAST(:name AS TEXT[]),"
                " CAST(:size AS BIGINT[]), CAST(:version AS TEXT[])) AS gone (n, s, v)"
                " WHERE name = n AND size = s AND version = v"
            )
        for start in range(0, len(rows), BATCH):
            keys = [(row["name"], row["size"], row["version"]) for row in rows[start : start + BATCH]]
            connection.execute(statement, _arrays(keys, KEY_COLUMNS))

    def _delete(
        self, connection: Connection, table: Table, rows: list[dict[str, Any]], columns: Iterable[str]
    ) -> None:
        """Delete the rows of ``table`` that have the ``columns`` of one of ``rows``."""
        import sqlalchemy

        if not rows:
            return
        names = list(columns)
        condition = sqlalchemy.and_(*(table.c[name] == sqlalchemy.bindparam(f"k_{name}") for name in names))
        connection.execute(
            sqlalchemy.delete(table).where(condition),
            [{f"k_{name}": row[name] for name in names} for row in rows],
        )

    # -- helpers -------------------------------------------------------------------------

    def _storable(self, key: Key) -> bool:
        """Whether the database can hold ``key`` (text it can store, a size BIGINT can): the few
        others are kept in memory."""
        try:
            name, size, version = key
            if not (isinstance(name, str) and isinstance(version, str) and isinstance(size, int)):
                return False
            if not (name.isascii() and version.isascii()):
                name.encode("utf-8")  # a lone surrogate is no text a database takes
                version.encode("utf-8")
            if self.backend in ("mysql", "mariadb") and (
                len(name) > MYSQL_NAME or len(version) > MYSQL_VERSION
            ):
                return False
            return 0 <= size < BIGINT and "\0" not in name and "\0" not in version
        except (ValueError, TypeError):  # UnicodeEncodeError, a tuple of another length
            return False

    def _shown(self) -> str:
        return self.url.render_as_string(hide_password=True)

    def _reason(self, exc: BaseException) -> str:
        """The error in one short line, without the statement and its parameters (thousands of
        keys) that SQLAlchemy's message carries, nor the password."""
        original = getattr(exc, "orig", None)
        error = original if isinstance(original, BaseException) else exc
        lines = str(error).strip().splitlines()
        text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
        if self.url.password:
            text = text.replace(str(self.url.password), "***")
        return text[:300]


def _in_time(work: Callable[[], T], seconds: float) -> T:
    """``work()`` in a thread of its own, waited for at most ``seconds`` (TimeoutError after,
    and the thread is left to end whenever its database answers; a daemon, so it never holds
    the process up at exit). One thread per call: a few per download, and none waits."""
    outcome: list[tuple[bool, Any]] = []
    done = threading.Event()

    def run() -> None:
        try:
            outcome.append((True, work()))
        except BaseException as exc:
            outcome.append((False, exc))
        finally:
            done.set()

    threading.Thread(target=run, name="zipmiddleware-crc-store", daemon=True).start()
    if not done.wait(seconds):
        raise TimeoutError(f"the database did not answer within {seconds:g} s")
    succeeded, value = outcome[0]
    if succeeded:
        return value  # type: ignore[no-any-return]
    raise value


def _transient(exc: BaseException) -> bool:
    """Whether ``exc`` is a write that lost a race with another host's (a deadlock, a
    serialization failure, a row inserted meanwhile), which succeeds when tried again."""
    original = getattr(exc, "orig", None)
    code = getattr(original, "sqlstate", None) or getattr(original, "pgcode", None)
    return isinstance(code, str) and (code.startswith("40") or code == "23505")


def _row(key: Key, crc: int, offset: int | None = None) -> dict[str, Any]:
    """A row of the files' table, or with ``offset`` one of the checkpoints' table, in the
    order of the table's columns."""
    row: dict[str, Any] = {"name": key.name, "size": key.size, "version": key.version}
    if offset is not None:
        row["offset"] = offset
    row["crc"] = crc
    row["guard"] = guard(key, key.size if offset is None else offset, crc)
    return row


def _arrays(rows: list[tuple[Any, ...]], names: Iterable[str]) -> dict[str, list[Any]]:
    """Columns of ``rows`` as one list each, named ``names``."""
    columns: list[list[Any]] = [[] for _ in range(len(rows[0]))] if rows else []
    for row in rows:
        for column, value in zip(columns, row, strict=True):
            column.append(value)
    return dict(zip(names, columns, strict=True))


def _bucket(count: int) -> int:
    """The least power of two (at most :data:`SMALL_BATCH`) not below ``count``."""
    return min(SMALL_BATCH, 1 << max(0, count - 1).bit_length())


def _tables() -> tuple[MetaData, Table, Table]:
    import sqlalchemy

    def key() -> list[sqlalchemy.Column[Any]]:
        name = sqlalchemy.Text().with_variant(sqlalchemy.String(MYSQL_NAME), "mysql", "mariadb")
        version = sqlalchemy.Text().with_variant(sqlalchemy.String(MYSQL_VERSION), "mysql", "mariadb")
        return [
            sqlalchemy.Column("name", name, primary_key=True),
            sqlalchemy.Column("size", sqlalchemy.BigInteger, primary_key=True, autoincrement=False),
            sqlalchemy.Column("version", version, primary_key=True),
        ]

    def values() -> list[sqlalchemy.Column[Any]]:
        return [
            sqlalchemy.Column("crc", sqlalchemy.BigInteger, nullable=False),
            sqlalchemy.Column("guard", sqlalchemy.BigInteger, nullable=False),
        ]

    metadata = sqlalchemy.MetaData()
    files = sqlalchemy.Table(FILE_TABLE, metadata, *key(), *values())
    offset = sqlalchemy.Column("offset", sqlalchemy.BigInteger, primary_key=True, autoincrement=False)
    prefixes = sqlalchemy.Table(PREFIX_TABLE, metadata, *key(), offset, *values())
    return metadata, files, prefixes


def _connect_args(url: URL) -> dict[str, Any]:
    """Short timeouts for the drivers we know, unless the URL sets them itself."""
    backend, driver = url.get_backend_name(), url.get_driver_name()
    wanted: dict[str, Any] = {}
    if backend == "postgresql" and driver in ("psycopg", "psycopg2"):
        wanted = {"connect_timeout": TIMEOUT_SECONDS}
        options = str(url.query.get("options", ""))
        if "statement_timeout" not in options:  # the URL's own options, and ours
            wanted["options"] = f"{options} -c statement_timeout={TIMEOUT_SECONDS * 1000}".strip()
    elif backend == "postgresql" and driver == "pg8000":
        wanted = {"timeout": TIMEOUT_SECONDS}
    elif backend in ("mysql", "mariadb") and driver in ("pymysql", "mysqldb"):
        wanted = dict.fromkeys(("connect_timeout", "read_timeout", "write_timeout"), TIMEOUT_SECONDS)
    elif backend == "sqlite":
        wanted = {"timeout": TIMEOUT_SECONDS}  # how long a writer waits for another
    return {name: value for name, value in wanted.items() if name == "options" or name not in url.query}


def _hidden_password(url: str) -> str:
    try:
        import sqlalchemy

        return str(sqlalchemy.make_url(url).render_as_string(hide_password=True))
    except Exception:
        return "<database URL>"
