"""Hardening under a real gunicorn: faults that once crashed workers, damaged archives or
failed whole folders, each reproduced the way it was found.

* The CRC-32 cache under ``--user nobody --preload``: a file the workers cannot write stops
  start-up; a writable one is used by every worker, and no SQLite connection crosses a fork
  (one opened by the master and inherited by its workers once killed them with SIGBUS).
* A cache that breaks while the server runs (locked, deleted, replaced) is logged once per
  process and bypassed: downloads never fail because of it.
* A wrong CRC-32 in the cache (a flipped bit, or a forgery with a valid check value) never
  reaches an archive: resumed and full downloads stay exact.
* Folders holding symlink loops, dangling links, FIFOs, sockets, devices, links out of the
  roots and unreadable subfolders are zipped without those entries, never answered with 500.
* A direct file rewritten in place while a range of it goes out aborts the transfer (the client
  sees an error, not a body that matches neither version); replacing it atomically (write, then
  rename) sends the old version whole.

The application is ``tests/server_app.py``; ``tests/servers.py`` starts and stops gunicorn, and
``tests/gunicorn_hooks.py`` makes each worker report which zipmiddleware it imported, so a run
from another checkout of the project is known to test that checkout.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import re
import shutil
import socket
import sqlite3
import stat
import subprocess
import tempfile
import time
import zipfile
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from zipmiddleware import crccache
from zipmiddleware.crccache import Key

from .clients import (
    TOOL_ENV,
    assert_good_zip,
    curl_download,
    kill_part_way,
    read_headers,
    request,
    run,
    sha256,
    sha256_file,
    size_of,
    unavailable,
    wait_for,
)
from .conftest import User
from .gunicorn_hooks import imported_from, this_checkout_runs
from .servers import PROJECT, TESTS, GunicornServer

pytestmark = pytest.mark.server

MIB = 1024 * 1024
APP = "tests.server_app:app"
HOOKS = ["-c", str(TESTS / "gunicorn_hooks.py")]
# How long a worker trusts that its cache file is still the one it opened; a cache broken at
# run time is noticed at the first use after this (the store's own constant, 5 s).
RECHECK_SECONDS = getattr(crccache, "RECHECK_SECONDS", 5.0)
# A wrong CRC-32 that still carries a valid check value: only someone able to write the cache
# (and to run the package's own function) can make one.
guard = crccache.guard


def random_bytes(seed: int, size: int) -> bytes:
    """Incompressible bytes that are the same on every run."""
    return random.Random(seed).randbytes(size)


# A game folder: big enough that a rate-limited client can be killed part-way and that its
# CRC-32s cost real reading, small enough that every download takes a fraction of a second.
GAME_FILES = {
    "readme.txt": b"A game folder for the hardening tests.\n" * 50,
    "data/part-1.bin": random_bytes(11, 6 * MIB + 17),
    "data/part-2.bin": random_bytes(12, 6 * MIB + 4093),
    "data/more/part-3.bin": random_bytes(13, 5 * MIB + 1),
    "part-4.bin": random_bytes(14, 6 * MIB),
}
# A smaller one for the concurrent load, with names that are not ASCII.
SMALL_FILES = {
    "one.txt": b"the first entry\n" * 4000,
    "Ünïcödé/two.bin": random_bytes(15, 700_001),
    "sub/three.bin": random_bytes(16, 1_300_000),
}


# -- helpers -----------------------------------------------------------------------------------


@pytest.fixture
def shared() -> Iterator[Path]:
    """A fresh folder every user may look into (pytest's temporary folders are root's alone)."""
    top = Path(tempfile.mkdtemp(prefix="zm-hardening-"))
    try:
        os.chmod(top, 0o755)
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


def write_files(root: Path, files: dict[str, bytes]) -> Path:
    """Write ``files`` under ``root``, readable by every user."""
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
    return root


# The Debian package of a client program, where its name differs.
PACKAGES = {"7z": "p7zip-full"}


def need(*programs: str) -> None:
    """Skip (or, in CI, fail) a test whose client program is missing."""
    for program in programs:
        if shutil.which(program) is None:
            unavailable(
                f"{program} is not installed (Debian: apt-get install {PACKAGES.get(program, program)})"
            )


def gunicorn(
    data: Path,
    *,
    cache: Path | None = None,
    user: User | None = None,
    workers: int = 1,
    log_level: str | None = None,
) -> GunicornServer:
    """A gunicorn serving ``tests/server_app.py`` over ``data``; with ``user``, its workers run as
    that user (``--user``/``--group``) and the app is loaded by the master, as root (``--preload``).
    ``log_level``: the middleware's messages from that level on reach the log (default: warnings)."""
    env = {"ZM_TEST_DATA": str(data)}
    if log_level is not None:
        env["ZM_TEST_LOG_LEVEL"] = log_level
    if cache is not None:
        env["ZM_TEST_CRC_CACHE"] = str(cache)
    args = [*HOOKS]
    if user is not None:
        # The warm-up imports everything in the master: once 'nobody', the worker may not be able
        # to read the Python installation any more (it may live in root's home folder).
        env["ZM_TEST_WARMUP"] = "1"
        args += ["--user", str(user.uid), "--group", user.group, "--preload"]
    if workers != 1:
        args += ["--workers", str(workers)]
    return GunicornServer(APP, pythonpath=[PROJECT], env=env, args=args)


def assert_runs_this_checkout(server: GunicornServer) -> None:
    """Every worker imported the zipmiddleware beside these tests, not another installed copy."""
    this_checkout_runs(server.log)


def worker_deaths(log: str) -> list[str]:
    """gunicorn's lines about workers that died (a signal such as SIGBUS, an exit, a timeout)."""
    pattern = re.compile(r"Worker \(pid:\d+\) (was sent|exited)|WORKER TIMEOUT|SIGBUS|SIGSEGV")
    return [line for line in log.splitlines() if pattern.search(line)]


def open_sqlite_files(pid: int) -> list[str]:
    """What process ``pid`` holds open among SQLite files (databases, their -wal and -shm)."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if ".sqlite" in target:
                found.append(target)
    return sorted(found)


def crc_tables(connection: sqlite3.Connection) -> dict[str, list[str]]:
    """The cache's tables that hold CRC-32s, with their columns: ``file_crc`` (whole files) and
    ``prefix_crc`` (checkpoints), each row keyed by ``name, size, version`` and carrying a check
    value, ``guard``."""
    names = [row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    tables = {}
    for name in names:
        columns = [row[1] for row in connection.execute(f"PRAGMA table_info({name})")]
        if "crc" in columns:
            tables[name] = columns
    return tables


def whole_file_crcs(cache: Path) -> dict[Key, int]:
    """The CRC-32 of every whole file in the cache, keyed as the package keys it."""
    if not cache.is_file():
        return {}
    connection = sqlite3.connect(f"file:{cache}?mode=ro", uri=True, timeout=10)
    try:
        rows = connection.execute("SELECT name, size, version, crc FROM file_crc").fetchall()
    except sqlite3.OperationalError:  # created, but no table yet
        return {}
    finally:
        connection.close()
    return {Key(name, size, version): crc for name, size, version, crc in rows}


def file_keys(data: Path, folder: str, files: dict[str, bytes]) -> dict[Key, int]:
    """What a correct cache holds for ``files`` in ``data``/``folder`` (``data`` being the
    server's root): key -> CRC-32 (empty files are never stored). A file's key is the same on
    every host with a copy of it: its path from the root's own name on, its size and its mtime
    in ns (no device, inode or ctime)."""
    top = Path(os.path.realpath(data))
    keys = {}
    for rel, content in files.items():
        if content:
            st = os.stat(top / folder / rel)
            keys[Key(f"{top.name}/{folder}/{rel}", st.st_size, str(st.st_mtime_ns))] = zlib.crc32(content)
    return keys


def assert_7z_finds_nothing(path: Path) -> None:
    """``7z t``: exit 0, "Everything is Ok", and neither warnings nor a header error."""
    need("7z")
    result = run(["7z", "t", path])
    output = (result.stdout + result.stderr).decode(errors="replace")
    assert result.returncode == 0, output
    assert "Everything is Ok" in output, output
    assert "warning" not in output.lower() and "Headers Error" not in output, output


def entries(body: bytes) -> dict[str, bytes]:
    """Every file entry of an archive, after checking all CRC-32s."""
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        assert archive.testzip() is None
        return {info.filename: archive.read(info) for info in archive.infolist() if not info.is_dir()}


def downloads_and_ranges(server: GunicornServer, folders: dict[str, dict[str, bytes]], rounds: int) -> None:
    """Full downloads and ranges of each folder, eight at a time; every answer must be exact.

    The ranges start anywhere in the archive, so their CRC-32s come from the cache or are
    computed (the cold path) while other requests fill the cache.
    """
    jobs: list[tuple[str, int | None]] = []  # (folder, None for the whole archive or where a range starts)
    for name in folders:
        for number in range(rounds):
            jobs.append((name, None))
            jobs.append((name, number * 997))  # from near the start to the end
            jobs.append((name, -(number + 1) * 150_000))  # a suffix: the end of the archive

    def fetch(job: tuple[str, int | None]) -> tuple[str, int | None, int, bytes]:
        name, start = job
        headers = {}
        if start is not None:
            headers["Range"] = f"bytes={start}-" if start >= 0 else f"bytes={start}"
        response, body = request(server, "GET", f"/folder/{name}", headers)
        return name, start, response.status, body

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(fetch, jobs))
    full: dict[str, bytes] = {}
    for name, start, status, body in answers:
        if start is None:
            assert status == 200, (name, body[:300])
            assert entries(body) == folders[name]
            assert full.setdefault(name, body) == body, f"two full downloads of {name} differ"
    for name, start, status, body in answers:
        if start is not None:
            assert status == 206, (name, start, body[:300])
            assert body == full[name][start:], (name, start)


# -- A. the CRC-32 cache under --user nobody --preload -------------------------------------------


def make_unwritable_cache(shared: Path, case: str, user: User) -> Path:
    """A cache path that ``user`` cannot write, as an administrator might leave it."""
    folder = shared / "cache"
    folder.mkdir(mode=0o755)
    cache = folder / "crc.sqlite"
    if case in ("files-of-root", "file-of-root-in-a-folder-of-nobody"):
        # Left by an earlier run as root: a valid cache file in WAL mode, root's, 0644.
        connection = sqlite3.connect(cache)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("CREATE TABLE IF NOT EXISTS kept (x)")
        connection.commit()
        connection.close()
        os.chmod(cache, 0o644)
    if case == "file-of-root-in-a-folder-of-nobody":
        os.chown(folder, user.uid, user.gid)
    return cache


@pytest.mark.parametrize("case", ["folder-of-root", "files-of-root", "file-of-root-in-a-folder-of-nobody"])
def test_a_cache_the_workers_cannot_write_stops_start_up(shared: Path, nobody: User, case: str) -> None:
    """A cache file the workers cannot write must stop gunicorn at start-up, with an error naming
    ``crc_cache``, although the master (root) could write it: the check is made as the workers'
    user. Before, the master opened the file as root and every worker inherited that connection
    (the workers of the report then died of SIGBUS)."""
    data = write_files(shared / "data" / "small", SMALL_FILES).parent
    cache = make_unwritable_cache(shared, case, nobody)
    before = {p.name for p in cache.parent.iterdir()}
    server = gunicorn(data, cache=cache, user=nobody)
    try:
        server.start()
    except RuntimeError as failed:
        message = str(failed)
    else:
        try:
            log = server.log()
            workers = imported_from(log)
        finally:
            server.stop()
            server.cleanup()
        pytest.fail(
            f"gunicorn started with a cache its workers cannot write ({case}); "
            f"workers imported {workers}; log:\n{log[-3000:]}"
        )
    assert "during start-up" in message, message
    assert "ConfigError: crc_cache: " in message, message  # the setting, named as configured
    # The check left nothing behind that the workers could not use later.
    left = [p for p in cache.parent.iterdir() if p.name not in before]
    assert all(p.stat().st_uid == nobody.uid for p in left), [(p.name, p.stat().st_uid) for p in left]

    # The same set-up with workers running as root starts: only the workers' user made it fail.
    with gunicorn(data, cache=cache) as running:
        assert_runs_this_checkout(running)
        response, body = request(running, "GET", "/folder/small")
        assert response.status == 200 and entries(body) == SMALL_FILES


def test_a_cache_in_a_folder_of_the_workers_user_is_used_by_every_worker(shared: Path, nobody: User) -> None:
    """The set-up of the report that lost 7 workers in 4 s: ``--preload --user nobody`` and a
    cache folder that belongs to nobody. Every worker survives concurrent downloads and ranges,
    the master holds no SQLite file open (no connection crosses a fork), each worker holds its
    own, and the cache file is nobody's and filled."""
    data = shared / "data"
    write_files(data / "game", GAME_FILES)
    write_files(data / "small", SMALL_FILES)
    folder = shared / "cache"
    folder.mkdir(mode=0o700)
    os.chown(folder, nobody.uid, nobody.gid)
    cache = folder / "crc.sqlite"
    with gunicorn(data, cache=cache, user=nobody, workers=2) as server:
        assert wait_for(lambda: len(server.worker_pids()) == 2, 10), server.worker_pids()
        workers = server.worker_pids()
        assert_runs_this_checkout(server)

        downloads_and_ranges(server, {"game": GAME_FILES, "small": SMALL_FILES}, rounds=4)
        time.sleep(0.5)  # a worker that crashes on its last answer is gone by now
        assert worker_deaths(server.log()) == [], server.log()[-5000:]
        assert server.worker_pids() == workers

        assert open_sqlite_files(server.master_pid) == [], (
            "the master holds the cache open: its workers inherit it"
        )
        for pid in workers:
            held = open_sqlite_files(pid)
            assert held.count(str(cache)) <= 1, f"worker {pid} holds the cache file more than once: {held}"
        assert cache.stat().st_uid == nobody.uid, (
            "the cache file was created by root, not by the workers' user"
        )
        expected = file_keys(data, "game", GAME_FILES) | file_keys(data, "small", SMALL_FILES)
        assert wait_for(lambda: whole_file_crcs(cache) == expected, 10), (
            whole_file_crcs(cache),
            server.log()[-3000:],
        )
        assert [line for line in server.log().splitlines() if "CRC-32 cache" in line] == []


# -- B. a cache broken at run time -------------------------------------------------------------


def break_cache(cache: Path, breakage: str) -> None:
    folder = cache.parent
    if breakage == "folder-locked":
        os.chmod(folder, 0)  # the workers' user owns it, and now cannot even look into it
    elif breakage == "folder-deleted":
        shutil.rmtree(folder)
    elif breakage == "file-replaced-by-a-folder":
        for path in folder.glob(cache.name + "*"):
            path.unlink()
        cache.mkdir()
    else:
        raise AssertionError(breakage)


@pytest.mark.parametrize("breakage", ["folder-locked", "folder-deleted", "file-replaced-by-a-folder"])
def test_a_cache_broken_at_run_time_is_logged_once_and_bypassed(
    shared: Path, nobody: User, breakage: str
) -> None:
    """After the cache's folder is locked, deleted, or its file replaced by a folder, downloads
    and ranges stay exact, the worker logs one clear warning (not one per request, and not
    nothing while it writes into a deleted file) and lives on. A lock only stops a user that is
    not root, so that case runs its worker as nobody."""
    data = shared / "data"
    write_files(data / "game", GAME_FILES)
    write_files(data / "small", SMALL_FILES)
    folder = shared / "cache"
    folder.mkdir(mode=0o700)
    user = nobody if breakage == "folder-locked" else None
    if user is not None:
        os.chown(folder, user.uid, user.gid)
    cache = folder / "crc.sqlite"
    with gunicorn(data, cache=cache, user=user) as server:
        assert_runs_this_checkout(server)
        worker = server.worker_pid
        response, body = request(server, "GET", "/folder/small")
        assert response.status == 200 and entries(body) == SMALL_FILES
        expected = file_keys(data, "small", SMALL_FILES)
        assert wait_for(lambda: whole_file_crcs(cache) == expected, 5), server.log()[-3000:]

        break_cache(cache, breakage)
        time.sleep(RECHECK_SECONDS + 0.5)  # past the time a worker trusts its open file
        downloads_and_ranges(server, {"game": GAME_FILES, "small": SMALL_FILES}, rounds=2)
        downloads_and_ranges(server, {"small": SMALL_FILES}, rounds=2)

        log = server.log()
        warnings = [line for line in log.splitlines() if "CRC-32 cache" in line and "cannot be used" in line]
        assert len(warnings) == 1, f"expected one warning from the one worker, got {warnings}:\n{log[-3000:]}"
        assert str(cache) in warnings[0]
        assert worker_deaths(log) == [], log[-3000:]
        assert server.worker_pids() == [worker]
        assert "Traceback" not in log, log[-3000:]


# -- C. wrong CRC-32s in the cache ---------------------------------------------------------------


def damage_crcs(cache: Path) -> int:
    """Flip the lowest bit of every stored CRC-32 (whole files and checkpoints) and leave each row's
    check value as it was: what one flipped bit on disk, or a careless writer, does. SQLite has no
    XOR operator: ``crc + 1 - 2 * (crc & 1)`` flips bit 0."""
    connection = sqlite3.connect(cache, timeout=10)
    try:
        with connection:
            return sum(
                connection.execute(f"UPDATE {table} SET crc = crc + 1 - 2 * (crc & 1)").rowcount
                for table in crc_tables(connection)
            )
    finally:
        connection.close()


def forge_crcs(cache: Path) -> int:
    """Replace every whole file's CRC-32 by a wrong one (bit 0 flipped) and recompute its row's
    check value with the package's own function, so the row looks intact."""
    connection = sqlite3.connect(cache, timeout=10)
    try:
        with connection:
            rows = connection.execute("SELECT name, size, version, crc FROM file_crc").fetchall()
            for name, size, version, crc in rows:
                wrong = crc ^ 1
                check = guard(Key(name, size, version), size, wrong)
                connection.execute(
                    "UPDATE file_crc SET crc = ?, guard = ? WHERE name = ? AND size = ? AND version = ?",
                    (wrong, check, name, size, version),
                )
            return len(rows)
    finally:
        connection.close()


@pytest.fixture
def game_server(tmp_path: Path) -> Iterator[tuple[GunicornServer, Path, Path]]:
    """A server (workers as root) over the game folder, with its own SQLite cache file."""
    data = write_files(tmp_path / "data" / "game", GAME_FILES).parent
    (tmp_path / "cache").mkdir()
    cache = tmp_path / "cache" / "crc.sqlite"
    with gunicorn(data, cache=cache) as server:
        assert_runs_this_checkout(server)
        yield server, data, cache


def test_resume_with_damaged_cached_crcs_gives_an_exact_archive(
    game_server: tuple[GunicornServer, Path, Path], tmp_path: Path
) -> None:
    """The report's case: every cached CRC-32 off by one bit, a download killed part-way and
    resumed with ``curl -C -``. curl ended with 0 and the archive failed ``unzip -t`` and ``7z t``.
    Now the damaged rows are noticed (their check value no longer matches) and ignored: the
    resumed file is the very archive an uninterrupted download gives."""
    need("curl", "unzip", "7z")
    server, data, cache = game_server
    url = f"{server.url}/folder/game"
    full = curl_download(url, tmp_path, "full.zip")
    assert_good_zip(full.path, GAME_FILES)
    expected = file_keys(data, "game", GAME_FILES)
    assert wait_for(lambda: whole_file_crcs(cache) == expected, 5), server.log()[-3000:]

    output = tmp_path / "resumed.zip"
    command = ["curl", "-sS", "--limit-rate", "4M", "-o", output, url]
    partial = kill_part_way(command, output, 2 * MIB, tmp_path / "curl.log")
    assert 0 < partial < full.size
    assert damage_crcs(cache) >= len(expected)
    assert all(whole_file_crcs(cache)[key] == crc ^ 1 for key, crc in expected.items())

    headers = tmp_path / "resume.headers"
    result = run(["curl", "-sS", "--fail", "--max-time", "20", "-C", "-", "-D", headers, "-o", output, url])
    assert result.returncode == 0, result.stderr
    status, answer = read_headers(headers)
    assert status == 206
    assert answer["content-range"] == [f"bytes {partial}-{full.size - 1}/{full.size}"]
    assert_good_zip(output, GAME_FILES)
    assert_7z_finds_nothing(output)
    assert sha256_file(output) == full.sha256
    assert "damaged row" in server.log(), server.log()[-3000:]


def test_forged_cached_crcs_are_corrected_by_a_full_download(
    game_server: tuple[GunicornServer, Path, Path], tmp_path: Path
) -> None:
    """Wrong CRC-32s that carry a valid check value (someone who can write the cache recomputed
    it): a full download reads every file anyway, so the CRC-32s computed from the data win. The
    archive is exact, the mismatch is logged as corrected, and the cache holds the right values
    again, so the ranges that rely on it are exact too."""
    need("curl", "unzip", "7z")
    server, data, cache = game_server
    url = f"{server.url}/folder/game"
    first = curl_download(url, tmp_path, "first.zip")
    expected = file_keys(data, "game", GAME_FILES)
    assert wait_for(lambda: whole_file_crcs(cache) == expected, 5), server.log()[-3000:]
    assert forge_crcs(cache) == len(expected)
    assert all(whole_file_crcs(cache)[key] == crc ^ 1 for key, crc in expected.items())

    second = curl_download(url, tmp_path, "second.zip")
    assert_good_zip(second.path, GAME_FILES)
    assert_7z_finds_nothing(second.path)
    assert second.sha256 == first.sha256
    assert "corrected" in server.log(), server.log()[-3000:]
    assert wait_for(lambda: whole_file_crcs(cache) == expected, 5), whole_file_crcs(cache)

    body = first.path.read_bytes()
    for start in (len(body) - 300, len(body) // 2, 1000):
        response, part = request(server, "GET", "/folder/game", {"Range": f"bytes={start}-"})
        assert (response.status, part) == (206, body[start:]), start


# -- D. folders holding loops, links and special files -------------------------------------------


def test_a_symlink_loop_does_not_break_its_folders(shared: Path) -> None:
    """The report's one-liner, ``ln -s self d/self``: the folder and its parent answered 500
    (``Too many levels of symbolic links`` from the walk). The README promises such links are
    skipped: both are zipped without it."""
    data = shared / "data"
    in_d = {"good.bin": b"good\n" * 1000, "sub/also.txt": b"also good\n"}
    write_files(data / "top" / "d", in_d)
    write_files(data / "top", {"top.txt": b"top\n"})
    os.symlink("self", data / "top" / "d" / "self")
    in_top = {"top.txt": b"top\n", **{f"d/{rel}": content for rel, content in in_d.items()}}
    with gunicorn(data) as server:
        assert_runs_this_checkout(server)
        for name, expected in [("top/d", in_d), ("top", in_top)]:
            response, body = request(server, "GET", f"/folder/{name}")
            assert response.status == 200, (name, response.status, body[:300])
            assert entries(body) == expected, name
        assert "Traceback" not in server.log(), server.log()[-3000:]


def test_a_folder_of_loops_links_special_files_and_an_unreadable_folder(shared: Path, nobody: User) -> None:
    """Everything a walk may meet that cannot be served, side by side with files that can: a
    symlink loop onto itself, a loop of two links, a dangling link, a FIFO (opening it would
    block), a UNIX socket, a device node, a link to a folder outside the roots, and a folder
    nobody may read; a link to a folder inside the roots is followed. The folder and its parent
    are zipped with exactly the good files, read by ``unzip -t``; the log says what was skipped.
    An unreadable *file* still refuses its folder (403): an archive must not silently lack it."""
    data = shared / "data"
    outside = write_files(shared / "outside", {"secret.txt": b"outside every root\n"})
    good = {"good.bin": random_bytes(21, 300_000), "sub/deep.txt": b"deep\n" * 100}
    write_files(data / "top" / "d", good)
    write_files(data, {"top/top.txt": b"top\n", "library/manual.txt": b"followed link\n" * 10})
    write_files(data / "top" / "d" / "locked", {"hidden.bin": b"in a folder nobody may read\n"})
    write_files(data / "refused", {"ok.txt": b"ok\n", "locked.bin": b"unreadable file\n"})
    d = data / "top" / "d"
    os.symlink("self", d / "self")
    os.symlink("b", d / "a")
    os.symlink("a", d / "b")
    os.symlink("missing.bin", d / "dangling")
    os.symlink(outside, d / "outside")
    os.symlink("../../library", d / "inside")
    os.mkfifo(d / "fifo")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(d / "socket"))  # the socket file stays after the close
    with contextlib.suppress(PermissionError):  # without CAP_MKNOD (a container), no device
        os.mknod(d / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))  # /dev/null's numbers
    os.chmod(d / "locked", 0)
    os.chmod(data / "refused" / "locked.bin", 0)

    in_d = {**good, "inside/manual.txt": b"followed link\n" * 10}
    in_top = {"top.txt": b"top\n", **{f"d/{rel}": content for rel, content in in_d.items()}}
    need("unzip")
    with gunicorn(data, user=nobody, log_level="INFO") as server:
        assert_runs_this_checkout(server)
        for name, expected in [("top/d", in_d), ("top", in_top)]:
            response, body = request(server, "GET", f"/folder/{name}")
            assert response.status == 200, (name, response.status, body[:300])
            assert entries(body) == expected, name
            path = shared / f"{name.replace('/', '-')}.zip"
            path.write_bytes(body)
            assert_good_zip(path, expected)
        response, body = request(server, "GET", "/folder/refused")
        assert response.status == 403, body[:300]

        log = server.log()
        assert "Traceback" not in log, log[-3000:]
        skipped = [
            ("self", "loop"),
            ("a", "loop"),
            ("b", "loop"),
            ("dangling", ""),
            ("fifo", ""),
            ("socket", ""),
            ("outside", "outside the roots"),
            ("locked", ""),
        ]
        if (d / "null").exists():
            skipped.append(("null", ""))
        for name, reason in skipped:
            mentions = [
                line for line in log.splitlines() if "skipping" in line and re.search(rf"['/]{name}/?'", line)
            ]
            assert any(reason in line for line in mentions), (name, log[-3000:])


# -- E. a direct file changed while it is sent ------------------------------------------------------


BIG = 64 * MIB


@pytest.fixture
def big_file_server(tmp_path: Path) -> Iterator[tuple[GunicornServer, Path, bytes]]:
    """A server over one 64 MiB file: too big to sit in the socket buffers, so a rate-limited
    client is still far from its end when the test changes it."""
    data = tmp_path / "data"
    data.mkdir()
    content = os.urandom(BIG)
    (data / "big.bin").write_bytes(content)
    with gunicorn(data) as server:
        assert_runs_this_checkout(server)
        yield server, data / "big.bin", content


def start_curl(url: str, output: Path, headers: Path, *options: str) -> subprocess.Popen[bytes]:
    need("curl")
    return subprocess.Popen(
        ["curl", "-sS", "--max-time", "60", *options, "-D", headers, "-o", output, url],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=TOOL_ENV,
    )


@pytest.mark.parametrize("change", ["overwritten", "truncated", "overwritten, mtime set back"])
def test_a_range_of_a_file_rewritten_in_place_is_aborted(
    big_file_server: tuple[GunicornServer, Path, bytes], tmp_path: Path, change: str
) -> None:
    """A 206 of a file rewritten in place (same size, other bytes ahead of the transfer) ended
    with curl's exit 0 and a body that matched neither version. Now the transfer is cut: curl
    fails (18, "transfer closed with outstanding read data remaining"), what it got is a
    prefix of the old version, and the log says why."""
    server, path, old = big_file_server
    output, headers = tmp_path / "range.bin", tmp_path / "range.headers"
    # 8 MB/s: the whole range would take 8 s, so the change lands early in it.
    curl = start_curl(f"{server.url}/file/{path.name}", output, headers, "--limit-rate", "8M", "-r", "100-")
    try:
        assert wait_for(lambda: size_of(output) >= MIB or curl.poll() is not None, 20, 0.005)
        assert curl.poll() is None, curl.stderr.read() if curl.stderr else b""
        before = os.stat(path)
        with open(path, "r+b") as file:
            if change.startswith("overwritten"):
                file.seek(40 * MIB)
                file.write(bytes(byte ^ 0xFF for byte in old[40 * MIB : 41 * MIB]) * 8)
            else:
                file.truncate(32 * MIB)
        # rsync --inplace --times, cp -p, touch -r: the ETag (mtime and size) stays the same, by
        # design; only the ctime tells, and the check while sending still looks at it.
        if change.endswith("set back"):
            os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        _, stderr = curl.communicate(timeout=60)
    finally:
        if curl.poll() is None:
            curl.kill()
            curl.wait()
    status, answer = read_headers(headers)
    assert status == 206 and answer["content-range"] == [f"bytes 100-{BIG - 1}/{BIG}"]
    assert curl.returncode != 0, f"curl ended well with a body of {size_of(output)} bytes: {stderr!r}"
    # 18: "transfer closed with outstanding read data remaining"; 56: the connection was reset.
    assert curl.returncode in (18, 56), stderr
    got = output.read_bytes()
    assert len(got) < BIG - 100
    assert got == old[100 : 100 + len(got)], "the part sent is not the old version"
    log = server.log()
    assert any("abort" in line and path.name in line for line in log.splitlines()), log[-3000:]
    assert worker_deaths(log) == []


def test_a_file_truncated_during_sendfile_ends_the_connection(
    big_file_server: tuple[GunicornServer, Path, bytes],
) -> None:
    """A full 200 goes out by sendfile, which stops quietly at a truncated file's end: gunicorn
    kept the connection and put the next pipelined response inside this body. Now the closed
    body sees the change and shuts the connection down: a short body, and nothing after it."""
    server, path, old = big_file_server
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        second = "GET /file/nothing-here HTTP/1.1\r\nHost: x\r\n\r\n"
        sock.sendall(f"GET /file/{path.name} HTTP/1.1\r\nHost: x\r\n\r\n{second}".encode())
        got = b""
        while len(got) < MIB:
            got += sock.recv(65536)
        os.truncate(path, 2 * MIB)  # in place, as `cp new old` does
        sock.settimeout(15)
        while chunk := sock.recv(1 << 20):
            got += chunk
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and f"Content-Length: {BIG}".encode() in head
    assert len(body) < BIG, "the body looked whole"
    assert b"HTTP/1.1 " not in body, "the next response went out inside this body"
    assert body == old[: len(body)]
    assert any("changed while it was sent" in line for line in server.log().splitlines())


def test_a_file_replaced_atomically_during_a_transfer_is_sent_whole(
    big_file_server: tuple[GunicornServer, Path, bytes], tmp_path: Path
) -> None:
    """What the README recommends: write the new version beside the old one, then rename it over
    it. A transfer under way keeps the old file open and sends it whole, for the 200 (sendfile)
    as for a 206; the next request gets the new version. (This held before the fixes too.)"""
    server, path, old = big_file_server
    url = f"{server.url}/file/{path.name}"
    transfers = {
        "full": (tmp_path / "full.bin", tmp_path / "full.headers", ()),
        "range": (tmp_path / "range.bin", tmp_path / "range.headers", ("-r", "100-")),
    }
    curls = {
        name: start_curl(url, output, headers, "--limit-rate", "16M", *options)
        for name, (output, headers, options) in transfers.items()
    }
    try:
        assert wait_for(lambda: all(size_of(t[0]) >= MIB for t in transfers.values()), 20, 0.005)
        assert all(curl.poll() is None for curl in curls.values())
        new = os.urandom(BIG)
        staged = path.with_name(path.name + ".new")
        staged.write_bytes(new)
        os.replace(staged, path)
        results = {name: curl.communicate(timeout=60) for name, curl in curls.items()}
    finally:
        for curl in curls.values():
            if curl.poll() is None:
                curl.kill()
                curl.wait()
    for name, curl in curls.items():
        assert curl.returncode == 0, (name, results[name][1])
    assert read_headers(transfers["full"][1])[0] == 200
    assert read_headers(transfers["range"][1])[0] == 206
    assert sha256_file(transfers["full"][0]) == sha256(old)
    assert sha256_file(transfers["range"][0]) == sha256(old[100:])
    response, body = request(server, "GET", f"/file/{path.name}")
    assert response.status == 200 and sha256(body) == sha256(new)
