"""The CRC-32 store in a database that many hosts share (zipmiddleware/crcdatabase.py).

Against a real PostgreSQL (the ``postgresql_url`` fixture, tests/postgres.py) and SQLite through
SQLAlchemy: round trips, checkpoints, many keys at once, damaged rows, two "hosts", a forked
worker, a database that is down or never answers, the ``crc_cache`` setting, and two
middlewares on two copies of a folder that share what they learn.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy
from werkzeug.test import Client, TestResponse

from zipmiddleware import ConfigError, ZipMiddleware, ZipTarget, crcdatabase
from zipmiddleware.config import build_settings, flask_settings
from zipmiddleware.crccache import Key, SQLiteCrcCache, storable_name
from zipmiddleware.crcdatabase import FILE_TABLE, PREFIX_TABLE, DatabaseCrcCache

from .conftest import plain_app, read_zip, write_tree
from .postgres import free_port, postgresql_url_fixture  # noqa: F401  (the fixture "postgresql_url")

MIB = 1 << 20
WARNED = "cannot be used"


@pytest.fixture(params=[pytest.param("postgresql", marks=pytest.mark.server), "sqlite", "portable"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database URL: the shared PostgreSQL, or an SQLite file of this test ("portable": the
    same file through the statements for databases other than PostgreSQL and SQLite)."""
    if request.param == "postgresql":
        return str(request.getfixturevalue("postgresql_url"))
    return f"sqlite:///{tmp_path / 'crc.sqlite'}"


@pytest.fixture
def make(request: pytest.FixtureRequest) -> Callable[[str], DatabaseCrcCache]:
    """Makes stores as the test's database wants them."""
    portable = (
        getattr(request.node, "callspec", None) and request.node.callspec.params.get("url") == "portable"
    )

    def made(url: str) -> DatabaseCrcCache:
        cache = DatabaseCrcCache(url)
        if portable:
            cache.backend = "portable"
        return cache

    return made


@pytest.fixture
def unique() -> str:
    """A prefix of this test's names: the PostgreSQL database is shared by every test."""
    return f"t-{uuid.uuid4().hex[:12]}/"


def warnings_of(caplog: pytest.LogCaptureFixture, text: str = WARNED) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


# -- the store ---------------------------------------------------------------------------------


def test_round_trip_of_crcs_and_checkpoints(
    url: str, make: Callable[[str], DatabaseCrcCache], unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    cache = make(url)
    a = Key(unique + "games/doom/doom.wad", 11_159_000, "1700000000123456789")
    b = Key(unique + "Spiele/Über Größe/ファイル 🎮.bin", 2**63 - 1, "1")
    c = Key(unique + "s3/bucket/key", 5, '"etag-with-quotes"')
    missing = Key(unique + "missing", 1, "1")
    assert cache.get_many([a, b, missing]) == {}
    cache.put_many({a: 0xDEADBEEF, b: 0, c: 7})
    assert cache.get_many([a, b, c, missing]) == {a: 0xDEADBEEF, b: 0, c: 7}
    cache.put_many({a: 0xFFFFFFFF})  # a corrected value replaces the row
    assert cache.get_many({a}) == {a: 0xFFFFFFFF}

    big = Key(unique + "big.iso", 40 * MIB, "99")
    assert cache.get_checkpoints([big]) == {}
    cache.put_checkpoints(big, [(16 * MIB, 1), (32 * MIB, 2)])
    cache.put_checkpoints(big, [(32 * MIB, 3)])  # replaced
    assert cache.get_checkpoints([big, a]) == {big: [(16 * MIB, 1), (32 * MIB, 3)]}
    # The whole file's CRC-32 makes its checkpoints useless: they go.
    cache.put_many({big: 12345})
    assert cache.get_checkpoints([big]) == {}
    assert cache.get_many([big]) == {big: 12345}
    assert not warnings_of(caplog)


def test_keys_no_column_can_hold_stay_in_memory(
    url: str, make: Callable[[str], DatabaseCrcCache], unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    cache = make(url)
    odd = Key(unique + "bad\udcff-surrogate", 10, "1")  # no UTF-8: a database refuses it
    nul = Key(unique + "nul\0name", 10, "1")
    fine = Key(unique + "fine", 10, "1")
    cache.put_many({odd: 1, nul: 2, fine: 3})
    cache.put_checkpoints(odd, [(4, 5)])
    assert cache.get_many([odd, nul, fine]) == {odd: 1, nul: 2, fine: 3}
    assert cache.get_checkpoints([odd]) == {odd: [(4, 5)]}
    assert DatabaseCrcCache(url).get_many([odd, nul, fine]) == {fine: 3}  # another host: the row only
    assert not warnings_of(caplog)


def test_twenty_thousand_keys_in_one_lookup(
    url: str, make: Callable[[str], DatabaseCrcCache], unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(crcdatabase, "WRITE_ROWS", 6_000)  # written in 4 transactions
    cache = make(url)
    keys = [
        Key(f"{unique}games/folder-{i // 100}/file-{i}.bin", 1000 + i, str(1_700_000_000 + i))
        for i in range(20_000)
    ]
    started = time.perf_counter()
    cache.put_many({key: i for i, key in enumerate(keys)})
    wrote = time.perf_counter() - started
    lookups = []
    for _ in range(3):
        started = time.perf_counter()
        found = cache.get_many(keys)
        lookups.append(time.perf_counter() - started)
        assert len(found) == 20_000 and found[keys[12_345]] == 12_345
    assert len(make(url).get_many(keys)) == 20_000  # another host: every part reached the database
    started = time.perf_counter()
    assert cache.get_many(keys[:300] + [Key(unique + "none", 1, "1")]) == {
        key: i for i, key in enumerate(keys[:300])
    }
    few = time.perf_counter() - started
    print(
        f"\n{cache!r}: put_many of 20,000 keys {wrote:.3f} s; get_many of 20,000 keys"
        f" {', '.join(f'{t:.3f}' for t in lookups)} s; of 301 keys {few * 1000:.1f} ms"
    )
    assert min(lookups) < 3.0
    assert few < 0.5


def test_a_damaged_row_reads_as_missing(
    url: str, make: Callable[[str], DatabaseCrcCache], unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    cache = make(url)
    good, bad = Key(unique + "good", 100, "1"), Key(unique + "bad", 100, "1")
    cache.put_many({good: 1111, bad: 2222})
    cache.put_checkpoints(bad, [(16, 3333), (32, 4444)])
    engine = sqlalchemy.create_engine(url)
    with engine.begin() as connection:
        connection.execute(
            sqlalchemy.text(f"UPDATE {FILE_TABLE} SET crc = crc + 1 WHERE name = :name"), {"name": bad.name}
        )
        connection.execute(
            sqlalchemy.text(f'UPDATE {PREFIX_TABLE} SET crc = 0 WHERE name = :name AND "offset" = 32'),
            {"name": bad.name},
        )
    engine.dispose()
    assert cache.get_many([good, bad]) == {good: 1111}
    assert cache.get_checkpoints([bad]) == {bad: [(16, 3333)]}
    assert len(warnings_of(caplog, "a damaged row")) == 2
    assert not warnings_of(caplog)  # a damaged row is no outage


def test_two_hosts_see_each_others_rows(
    url: str, make: Callable[[str], DatabaseCrcCache], unique: str
) -> None:
    host_a, host_b = make(url), make(url)
    one, two = Key(unique + "one", 1, "1"), Key(unique + "two", 2, "2")
    host_a.put_many({one: 1})
    host_b.put_many({two: 2})
    host_b.put_checkpoints(
        one, [(8, 9)]
    )  # (the whole file's CRC-32 is known: a checkpoint is useless, but kept)
    assert host_a.get_many([one, two]) == host_b.get_many([one, two]) == {one: 1, two: 2}
    assert host_a.get_checkpoints([one]) == {one: [(8, 9)]}


def racing_writers(url: str, count: int) -> list[Key]:
    """``count`` processes started at once, each making the tables (or finding them made) and
    writing and reading a key of its own; asserts that none failed, gives their keys."""
    keys = [Key("raced", 1, str(index)) for index in range(count)]
    children = []
    for index, key in enumerate(keys):
        pid = os.fork()
        if pid == 0:  # the child: make the tables (or find them), write, look up, report
            code = 1
            try:
                logging.disable(logging.CRITICAL)
                cache = DatabaseCrcCache(url)
                cache.put_many({key: index})
                code = 0 if cache.get_many([key]) == {key: index} and not cache._here().failing else 2
            finally:
                os._exit(code)
        children.append(pid)
    assert [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children] == [0] * count
    return keys


@pytest.mark.server
def test_tables_made_by_many_processes_at_once(postgresql_url: str, tmp_path: Path) -> None:
    """Several processes find the tables missing and create them together: none fails."""
    schema = f"s_{uuid.uuid4().hex[:10]}"
    admin = sqlalchemy.create_engine(postgresql_url)
    with admin.begin() as connection:
        connection.execute(sqlalchemy.text(f"CREATE SCHEMA {schema}"))
    admin.dispose()
    url = f"{postgresql_url}?options=-csearch_path%3D{schema}"
    keys = racing_writers(url, 6)
    assert len(DatabaseCrcCache(url).get_many(keys)) == 6
    with admin.begin() as connection:
        connection.execute(sqlalchemy.text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


def test_sqlite_tables_made_by_many_processes_at_once(tmp_path: Path) -> None:
    """The same through SQLite, which says a table made meanwhile "already exists"."""
    url = f"sqlite:///{tmp_path / 'crc.sqlite'}"
    keys = racing_writers(url, 8)
    assert len(DatabaseCrcCache(url).get_many(keys)) == 8


@pytest.mark.server
def test_a_write_that_deadlocks_with_another_hosts_is_tried_again(
    postgresql_url: str, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="zipmiddleware")
    cache = DatabaseCrcCache(postgresql_url)
    first, second = Key(unique + "a", 1, "1"), Key(unique + "b", 2, "2")
    cache.put_many({first: 1, second: 2})
    other = sqlalchemy.create_engine(postgresql_url)
    with other.connect() as connection:
        transaction = connection.begin()
        # This side waits long before looking for deadlocks: the store's write is the one undone.
        connection.execute(sqlalchemy.text("SET LOCAL deadlock_timeout = '20s'"))
        lock = f"SELECT crc FROM {FILE_TABLE} WHERE name = :name FOR UPDATE"
        connection.execute(sqlalchemy.text(lock), {"name": second.name})
        writer = threading.Thread(target=cache.put_many, args=({first: 11, second: 22},))
        writer.start()  # takes the first row, then waits for the second
        time.sleep(0.5)
        connection.execute(sqlalchemy.text(lock), {"name": first.name})  # a deadlock
        transaction.commit()
        writer.join(10)
    other.dispose()
    assert "trying again after" in caplog.text and "deadlock" in caplog.text
    assert not warnings_of(caplog)
    assert DatabaseCrcCache(postgresql_url).get_many([first, second]) == {first: 11, second: 22}


@pytest.mark.server
def test_a_forked_child_has_its_own_connections(postgresql_url: str, unique: str) -> None:
    cache = DatabaseCrcCache(postgresql_url)
    parent, child = Key(unique + "parent", 1, "1"), Key(unique + "child", 2, "2")
    cache.put_many({parent: 1})  # the parent's pool now holds a connection

    def backend_pid() -> int:
        engine = cache._here().engine
        assert engine is not None
        with engine.connect() as connection:
            return int(connection.execute(sqlalchemy.text("SELECT pg_backend_pid()")).scalar_one())

    before = backend_pid()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read_end)
            ok = cache.get_many([parent]) == {parent: 1}
            cache.put_many({child: 2})
            ok = ok and cache.get_many([child]) == {child: 2}
            ok = ok and backend_pid() != before  # a connection of its own
            gc.collect()  # whatever it inherited is collected now: it must not close the parent's
            os.write(write_end, b"ok" if ok else b"wrong")
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as report:
        assert report.read() == b"ok"
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert cache.get_many([parent, child]) == {parent: 1, child: 2}
    assert backend_pid() == before  # the parent's connection survived the child


# -- a database that cannot be used ---------------------------------------------------------------


class Forwarder:
    """A TCP port that forwards to another once started; before that nothing listens on it.
    Without a target: accept and never answer (a database that hangs). ``frozen``: connections
    stay open, and nothing more goes through them (a server that stopped, a paused machine)."""

    def __init__(self, target: tuple[str, int] | None = None) -> None:
        self.port = free_port()
        self.target = target
        self.frozen = False
        self.server: socket.socket | None = None
        self.sockets: list[socket.socket] = []

    def start(self) -> None:
        self.server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        server = self.server
        assert server is not None
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            self.sockets.append(client)
            if self.target is None:
                continue  # never answers
            upstream = socket.create_connection(self.target)
            self.sockets.append(upstream)
            for one, other in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(one, other), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                while self.frozen and self.server is not None:
                    time.sleep(0.05)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        """Stop listening and cut every connection (shut down: a close alone leaves a connection
        that a thread is reading from open)."""
        server, self.server = self.server, None
        for sock in [*([server] if server is not None else []), *self.sockets]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self.sockets.clear()


@pytest.fixture
def forwarder(postgresql_url: str) -> Iterator[Forwarder]:
    parsed = sqlalchemy.make_url(postgresql_url)
    forwarding = Forwarder((str(parsed.host), int(parsed.port or 5432)))
    yield forwarding
    forwarding.stop()


@pytest.mark.server
def test_a_database_that_is_down_is_memory_until_it_is_back(
    postgresql_url: str,
    forwarder: Forwarder,
    unique: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(crcdatabase, "RETRY_SECONDS", 0.5)
    caplog.set_level(logging.INFO, logger="zipmiddleware")
    url = sqlalchemy.make_url(postgresql_url).set(port=forwarder.port, password="s3cret")
    cache = DatabaseCrcCache(url.render_as_string(hide_password=False))
    learnt, later = Key(unique + "learnt", 1, "1"), Key(unique + "later", 2, "2")
    started = time.monotonic()
    assert cache.get_many([learnt]) == {}
    cache.put_many({learnt: 1})  # no error: kept in memory
    cache.put_checkpoints(later, [(16, 5)])
    assert cache.get_many([learnt]) == {learnt: 1}
    assert cache.get_checkpoints([later]) == {later: [(16, 5)]}
    assert time.monotonic() - started < 5
    warned = warnings_of(caplog)
    assert len(warned) == 1, warned
    assert "s3cret" not in caplog.text and "***" in warned[0] and str(forwarder.port) in warned[0]
    assert "s3cret" not in repr(cache)

    forwarder.start()  # the database is back; the process notices within RETRY_SECONDS
    assert cache.get_many([learnt]) == {learnt: 1}  # before it tries again: memory
    time.sleep(0.6)
    cache.put_many({later: 2})
    assert DatabaseCrcCache(postgresql_url).get_many([learnt, later]) == {later: 2}  # in the database
    assert cache.get_many([learnt, later]) == {learnt: 1, later: 2}  # what memory learnt meanwhile stays
    assert "can be used again" in caplog.text
    assert len(warnings_of(caplog)) == 1

    forwarder.stop()  # a second outage is logged again, once
    for _ in range(3):
        assert cache.get_many([later]) == {}
    assert len(warnings_of(caplog)) == 2


@pytest.mark.server
def test_a_database_that_stops_answering_mid_connection_costs_a_download_its_deadline(
    postgresql_url: str,
    forwarder: Forwarder,
    unique: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pooled connection whose server stopped answering (its statement_timeout cannot run):
    the wait is cut client-side, and the next try, once the database answers again, has a new
    pool."""
    monkeypatch.setattr(crcdatabase, "DEADLINE_SECONDS", 1.0)
    monkeypatch.setattr(crcdatabase, "RETRY_SECONDS", 0.5)
    forwarder.start()
    cache = DatabaseCrcCache(
        str(sqlalchemy.make_url(postgresql_url).set(port=forwarder.port).render_as_string(False))
    )
    key = Key(unique + "frozen", 1, "1")
    cache.put_many({key: 7})
    assert cache.get_many([key]) == {key: 7}  # a connection in the pool, in use
    forwarder.frozen = True
    started = time.monotonic()
    assert cache.get_many([key]) == {}
    cache.put_many({key: 8})  # memory, at once
    assert time.monotonic() - started < 2.5
    assert len(warnings_of(caplog)) == 1 and "did not answer" in warnings_of(caplog)[0]
    forwarder.frozen = False
    time.sleep(0.6)
    assert cache.get_many([key]) == {key: 7}  # the database again, through a new connection


def test_a_database_that_never_answers_delays_a_download_a_few_seconds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    silent = Forwarder()  # accepts connections, never answers
    silent.start()
    try:
        cache = DatabaseCrcCache(f"postgresql+psycopg://postgres@127.0.0.1:{silent.port}/db")
        key = Key("a", 1, "1")
        started = time.monotonic()
        assert cache.get_many([key]) == {}
        first = time.monotonic() - started
        started = time.monotonic()
        cache.put_many({key: 1})
        assert cache.get_many([key]) == {key: 1}
        assert 2 < first < 5 and time.monotonic() - started < 0.5  # then memory, at once
        assert len(warnings_of(caplog)) == 1
    finally:
        silent.stop()


def test_a_database_down_at_start_does_not_stop_the_application(caplog: pytest.LogCaptureFixture) -> None:
    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nothing"
    middleware = ZipMiddleware(plain_app, crc_cache=url)
    assert isinstance(middleware.settings.crc_cache, DatabaseCrcCache)
    assert not caplog.records  # nothing connects before the first lookup


# -- the setting -----------------------------------------------------------------------------------


def test_the_setting_takes_database_urls(tmp_path: Path) -> None:
    cache = build_settings({"crc_cache": "postgresql+psycopg://zip:secret@db.example:5433/crc"}).crc_cache
    assert isinstance(cache, DatabaseCrcCache)
    assert repr(cache) == "DatabaseCrcCache('postgresql+psycopg://zip:***@db.example:5433/crc')"
    cache = build_settings({"crc_cache": f"sqlite:///{tmp_path}/crc.sqlite"}).crc_cache  # four slashes
    assert isinstance(cache, SQLiteCrcCache) and cache.path == str(tmp_path / "crc.sqlite")
    assert isinstance(build_settings({"crc_cache": "sqlite://"}).crc_cache, SQLiteCrcCache)
    # What was there before: paths, ":memory:", objects.
    assert isinstance(build_settings({"crc_cache": str(tmp_path / "c.sqlite")}).crc_cache, SQLiteCrcCache)
    assert repr(build_settings({"crc_cache": ":memory:"}).crc_cache) == "SQLiteCrcCache(':memory:')"
    database = DatabaseCrcCache(f"sqlite:///{tmp_path}/d.sqlite")
    assert build_settings({"crc_cache": database}).crc_cache is database


@pytest.mark.parametrize(
    "value, problem",
    [
        ("postgresql+nosuchdriver://zip:secret@db/crc", "Can't load plugin"),
        ("nosuchdatabase://db/crc", "Can't load plugin"),
        ("://db", "cannot use"),
        ("postgresql+asyncpg://db/crc", "asyncpg"),  # not installed, or an asyncio driver: refused either way
        ("sqlite:///relative.sqlite", "4 slashes"),
        ("sqlite://host/crc.sqlite", "4 slashes"),
        ("sqlite:////no/such/folder/crc.sqlite", "does not exist"),
    ],
)
def test_bad_urls_name_the_setting(value: str, problem: str) -> None:
    with pytest.raises(ConfigError, match="^crc_cache: ") as raised:
        build_settings({"crc_cache": value})
    assert problem in str(raised.value) and "secret" not in str(raised.value)
    with pytest.raises(ConfigError, match="^ZIPSTREAM_CRC_CACHE: "):
        flask_settings({"ZIPSTREAM_CRC_CACHE": value})


# -- two hosts, one store, end to end ----------------------------------------------------------------


def rchar() -> int:
    """Bytes this process has read through read(2) and friends so far."""
    with open("/proc/self/io") as io:
        return next(int(line.split()[1]) for line in io if line.startswith("rchar:"))


def get(client: Client, **headers: str) -> TestResponse:
    response = client.open("/d", headers=headers, buffered=True)
    response.get_data()
    return response


@pytest.mark.server
def test_a_range_on_another_host_uses_what_the_first_one_learnt(postgresql_url: str, tmp_path: Path) -> None:
    """Host A sends a folder whole; host B, with a copy of the folder elsewhere (same name, same
    mtimes), then serves the archive's end from the CRC-32s A left in the shared store."""
    tag = uuid.uuid4().hex[:8]  # the folder's name: this test's own keys in the shared database
    host_a = write_tree(
        tmp_path / "hostA" / f"games-{tag}",
        {
            "doom/doom.wad": os.urandom(3 * MIB),
            "quake/id1/pak0.pak": os.urandom(2 * MIB + 17),
            "Über/Grüße.txt": "Grüße\n".encode() * 1000,
            "empty.cfg": b"",
        },
    )
    host_b = tmp_path / "hostB" / host_a.name
    shutil.copytree(host_a, host_b, copy_function=shutil.copy2)

    def middleware(root: Path) -> Client:
        return Client(
            ZipMiddleware(
                plain_app,
                routes={"/d": lambda request: ZipTarget.from_directory(root)},
                roots=[str(root)],
                crc_cache=postgresql_url,
            )
        )

    whole = get(middleware(host_a))
    assert whole.status_code == 200
    assert read_zip(whole.data)["Über/Grüße.txt"] == "Grüße\n".encode() * 1000
    client_b = middleware(host_b)
    before = rchar()
    tail = get(client_b, Range="bytes=-3000")  # the central directory: every entry's CRC-32
    assert rchar() - before < MIB, "host B read the files instead of using the shared store"
    assert tail.status_code == 206
    assert tail.data == whole.data[-3000:]
    assert tail.headers["ETag"] == whole.headers["ETag"]
    late = get(client_b, Range=f"bytes={len(whole.data) - 2 * MIB}-")
    assert late.status_code == 206 and late.data == whole.data[-2 * MIB :]


def test_every_name_is_stored_as_text_of_its_own() -> None:
    """Names a store cannot keep as they are (bytes that are no UTF-8, NUL, lone surrogates)
    are escaped, and their own backslashes doubled: no two names share a key."""
    names = [
        os.fsdecode(b"caf\xe9.bin"),  # the bytes of a Latin-1 file name
        "caf\\xe9.bin",  # a name holding those very characters
        "x\0y",
        "x\\x00y",
        "a\\b",
        "a\\\\b",
        "plain.bin",
        "été.bin",
        "a\ud800",  # a surrogate no file name has
        os.fsdecode(b"a\xed\xa0\x80"),
    ]
    stored = [storable_name(name) for name in names]
    assert len(set(stored)) == len(names), stored
    assert storable_name("plain.bin") == "plain.bin" and storable_name("été.bin") == "été.bin"
    assert all("\0" not in text for text in stored)
    for text in stored:
        text.encode("utf-8")  # any store takes it
