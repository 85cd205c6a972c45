"""Several hosts serving copies of one folder, sharing one CRC-32 store in PostgreSQL, nginx in front.

Host A's folder ``.../hostA/games`` is copied to host B's ``.../hostB/games`` with
``shutil.copy2``: the same names below the root folder ``games``, the same sizes and mtimes (to
the nanosecond), but other absolute paths, inodes and ctimes. Each host is a real gunicorn
(gthread worker) running ``tests/hosts_app.py``: the built-in ``directory`` resolver at
``/files/<path:subpath>``, ``crc_cache`` = one PostgreSQL database for both (from
tests/postgres.py), and an ``X-Host`` header naming the host that answered. A real nginx
balances between them (round robin) at ``/`` and reaches each one alone at ``/a/`` and ``/b/``.

Checked with real clients:

1. both hosts give the same bytes, Content-Length, ETag and Last-Modified for the folder's ZIP
   and for its large file;
2. a curl download cut part-way on one host resumes on the other with ``If-Range`` (206), asked
   of each host directly and through nginx's round robin;
3. ``wget -c`` (a Range without If-Range) resumes on the other host;
4. headless Chromium, its download cut part-way by a proxy, resumes it on the other host;
5. once host A's full download has filled the shared store, a range of the archive's end on
   host B reads (almost) no file data, while a host whose store is empty reads the files;
6. an ETag from host A is a validator on host B (``If-None-Match``: 304), and one made stale by a
   changed mtime on host B only gets the whole body for ``If-Range``.
"""

from __future__ import annotations

import contextlib
import io
import os
import pwd
import random
import re
import shutil
import socket
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .clients import (
    Download,
    assert_good_zip,
    curl_download,
    kill_part_way,
    read_headers,
    request,
    run,
    sha256,
    sha256_file,
    size_of,
    wait_for,
)
from .nginx import Nginx, nginx_executable
from .postgres import postgresql_url_fixture  # noqa: F401  (the fixture "postgresql_url")
from .servers import PROJECT, GunicornServer, read_bytes
from .test_browser import browser  # noqa: F401  (the fixture: a headless Chromium and its download folder)

pytestmark = pytest.mark.server

MIB = 1 << 20
APP = "tests.hosts_app:app"
ROOT = "games"  # the root folder's name: the same on every host
GAME = "doom"  # the folder zipped, below the root
LARGE = "doom.wad"
ZIP = f"/files/{GAME}"
LARGE_FILE = f"/files/{GAME}/{LARGE}"
SMALL = "maps/e1m1.lmp"  # a small file of the archive, whose mtime a test changes on host B only
SMALL_FILE = f"/files/{GAME}/{SMALL}"
# Fixed mtimes (ns, not whole seconds: copy2 must carry the nanoseconds over), an hour apart.
MTIME_NS = 1_700_000_000_123_456_789
# Tables of the database store (zipmiddleware/crcdatabase.py).
FILE_TABLE = "zipmiddleware_file_crc"
PREFIX_TABLE = "zipmiddleware_prefix_crc"
DATABASES = ("zm_many_hosts_shared", "zm_many_hosts_empty")


def random_bytes(seed: int, size: int) -> bytes:
    """Incompressible bytes that are the same on every run."""
    return random.Random(seed).randbytes(size)


def game_files() -> dict[str, bytes]:
    """The folder zipped: one large file (about 48 MiB, under the default cold_range_limit of
    64 MiB with everything else) and small ones in subfolders."""
    return {
        "README.TXT": b"Doom, as every host has it.\n" * 40,
        LARGE: random_bytes(1, 48 * MIB + 12_345),
        SMALL: random_bytes(2, 200_003),
        "maps/e1m2.lmp": random_bytes(3, 150_001),
        "music/d_e1m1.mus": random_bytes(4, 300_007),
        "empty.cfg": b"",
        "Ünïcödé.txt": "Ünïcödé names travel too.\n".encode(),
    }


@dataclass(frozen=True)
class Tree:
    """The two hosts' copies of the folder ``ROOT`` and what it holds."""

    a: Path  # host A's root folder: .../hostA/games
    b: Path  # host B's: .../hostB/games
    files: dict[str, bytes]  # below the game's folder


# -- the database store ------------------------------------------------------------------------------


def conninfo(url: str) -> str:
    """A libpq URI for psycopg from an SQLAlchemy URL."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def connect(url: str) -> Any:
    import psycopg

    return psycopg.connect(conninfo(url), autocommit=True, connect_timeout=5)


class Store:
    """A CRC-32 store's database, as the tests look into it."""

    def __init__(self, url: str) -> None:
        self.url = url

    def empty(self) -> None:
        with connect(self.url) as connection:
            for table in (FILE_TABLE, PREFIX_TABLE):
                connection.execute(f"DELETE FROM {table}")

    def names(self) -> list[str]:
        """The file names (keys) it holds whole-file CRC-32s for."""
        with connect(self.url) as connection:
            return sorted(row[0] for row in connection.execute(f"SELECT name FROM {FILE_TABLE}"))


# -- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Tree:
    """Host A's copy written once, host B's copied from it with shutil.copy2."""
    top = tmp_path_factory.mktemp("hosts")
    a, b = top / "hostA" / ROOT, top / "hostB" / ROOT
    files = game_files()
    for number, (rel, data) in enumerate(files.items()):
        path = a / GAME / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        stamp = MTIME_NS - number * 3_600_000_000_000
        os.utime(path, ns=(stamp, stamp))
    for rel in files:
        target = b / GAME / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(a / GAME / rel, target)
    for rel in files:
        st_a, st_b = os.stat(a / GAME / rel), os.stat(b / GAME / rel)
        assert (st_b.st_size, st_b.st_mtime_ns) == (st_a.st_size, st_a.st_mtime_ns), rel
        assert st_b.st_ino != st_a.st_ino, rel
    return Tree(a, b, files)


@pytest.fixture(scope="module")
def databases(postgresql_url: str) -> Iterator[tuple[str, str]]:
    """Two fresh databases on the session's PostgreSQL server: the store the hosts share, and
    one that stays empty until a host with nothing learnt uses it."""
    server = postgresql_url.rsplit("/", 1)[0]
    with connect(f"{server}/postgres") as connection:
        for name in DATABASES:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}"')
            connection.execute(f'CREATE DATABASE "{name}"')
    try:
        yield (f"{server}/{DATABASES[0]}", f"{server}/{DATABASES[1]}")
    finally:
        with connect(f"{server}/postgres") as connection:
            for name in DATABASES:
                connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def store(databases: tuple[str, str]) -> Store:
    return Store(databases[0])


def host(name: str, root: Path, crc_cache: str) -> GunicornServer:
    env = {"ZM_HOST_NAME": name, "ZM_HOST_ROOT": str(root), "ZM_HOST_CRC_CACHE": crc_cache}
    return GunicornServer(APP, pythonpath=[PROJECT], env=env, threads=8)


@pytest.fixture(scope="module")
def host_a(tree: Tree, store: Store) -> Iterator[GunicornServer]:
    with host("A", tree.a, store.url) as server:
        yield server


@pytest.fixture(scope="module")
def host_b(tree: Tree, store: Store) -> Iterator[GunicornServer]:
    with host("B", tree.b, store.url) as server:
        yield server


NGINX_CONFIG = """\
{user}
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
worker_shutdown_timeout 3s;
events {{ worker_connections 256; }}
http {{
    log_format hosts '$request_uri $status $upstream_addr $upstream_status $upstream_http_x_host';
    access_log {prefix}/access.log hosts;
    client_body_temp_path {prefix}/client_body_temp;
    proxy_temp_path {prefix}/proxy_temp;
    fastcgi_temp_path {prefix}/fastcgi_temp;
    uwsgi_temp_path {prefix}/uwsgi_temp;
    scgi_temp_path {prefix}/scgi_temp;

    proxy_http_version 1.1;
    proxy_read_timeout 60s;
    proxy_set_header Host $host;
    # A request that fails on one host is not tried again on the other behind the client's back.
    proxy_next_upstream off;

    upstream hosts {{
        server {a};
        server {b};
    }}
    server {{
        listen 127.0.0.1:{port};
        location = /nginx-ready {{ return 200 "nginx\\n"; }}
        location / {{ proxy_pass http://hosts; }}
        location /a/ {{ proxy_pass http://{a}/; }}
        location /b/ {{ proxy_pass http://{b}/; }}
    }}
}}
"""


@pytest.fixture(scope="module")
def nginx(
    host_a: GunicornServer, host_b: GunicornServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Nginx]:
    executable = nginx_executable()
    a, b = (f"{server.host}:{server.port}" for server in (host_a, host_b))

    def render(prefix: Path, port: int) -> str:
        # Workers of a root master would run as nobody, who cannot enter pytest's private folders.
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else ""
        return NGINX_CONFIG.format(user=user, prefix=prefix, port=port, a=a, b=b)

    server = Nginx(executable, tmp_path_factory.mktemp("hosts-nginx"), render)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def full(host_a: GunicornServer, tree: Tree, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Download]:
    """The archive and the large file, each downloaded in one go from host A and checked."""
    folder = tmp_path_factory.mktemp("hosts-full")
    archive = curl_download(host_a.url + ZIP, folder, "a.zip")
    assert_good_zip(archive.path, tree.files)
    large = curl_download(host_a.url + LARGE_FILE, folder, "a.wad")
    assert large.sha256 == sha256(tree.files[LARGE])
    for download in (archive, large):
        assert download.headers["x-host"] == ["A"]
        assert download.headers["accept-ranges"] == ["bytes"]
    return {ZIP: archive, LARGE_FILE: large}


def header(response: Any, name: str) -> str | None:
    value = response.getheader(name)
    return None if value is None else str(value)


# -- 1. the same download from every host --------------------------------------------------------------

COMPARED = ("content-length", "etag", "last-modified", "content-disposition", "content-type", "accept-ranges")


@pytest.mark.parametrize("path", [ZIP, LARGE_FILE], ids=["zip", "file"])
def test_both_hosts_give_the_same_download(
    host_b: GunicornServer, full: dict[str, Download], tree: Tree, tmp_path: Path, path: str
) -> None:
    from_a = full[path]
    from_b = curl_download(host_b.url + path, tmp_path, "from-b")
    assert from_b.headers["x-host"] == ["B"]
    assert from_b.sha256 == from_a.sha256
    assert from_b.size == from_a.size
    for name in COMPARED:
        assert from_b.headers[name] == from_a.headers[name], name
    if path == ZIP:
        assert_good_zip(from_b.path, tree.files)
    else:
        # A file's ETag says its mtime (ns) and size, nothing of where or on which disk it lies.
        st = os.stat(tree.a / GAME / LARGE)
        assert from_a.headers["etag"] == [f'"{st.st_mtime_ns:x}-{st.st_size:x}"']


# -- 2. curl resumes on the other host ------------------------------------------------------------------


def assert_resumed(header_file: Path, partial: int, total: int, etag: str) -> dict[str, list[str]]:
    """The resume's answer was a 206 for everything from ``partial`` on, of the same version."""
    status, headers = read_headers(header_file)
    assert status == 206, headers
    assert headers["content-range"] == [f"bytes {partial}-{total - 1}/{total}"]
    assert headers["content-length"] == [str(total - partial)]
    assert headers["etag"] == [etag]
    return headers


def cut_with_curl(url: str, tmp_path: Path, total: int) -> tuple[Path, int, dict[str, list[str]]]:
    """Start a rate-limited curl download of ``url`` and kill it part-way: the partial file, its
    size and the headers of the first answer (a 200 of ``total`` bytes)."""
    output, first_headers = tmp_path / "download.out", tmp_path / "first.headers"
    command = ["curl", "-sS", "--limit-rate", "8M", "-D", first_headers, "-o", output, url]
    partial = kill_part_way(command, output, 4 * MIB, tmp_path / "curl.log")
    assert 0 < partial < total
    status, headers = read_headers(first_headers)
    assert (status, headers["content-length"]) == (200, [str(total)])
    return output, partial, headers


def curl_resume(url: str, output: Path, header_file: Path, etag: str) -> None:
    """``curl -C -`` with the ETag of the first answer as ``If-Range`` (curl sends none itself)."""
    command = ["curl", "-sS", "--fail", "--max-time", "30", "-C", "-", "-H", f"If-Range: {etag}"]
    result = run([*command, "-D", header_file, "-o", output, url])
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("path", [ZIP, LARGE_FILE], ids=["zip", "file"])
def test_curl_resumes_on_the_other_host_with_if_range(
    host_a: GunicornServer,
    host_b: GunicornServer,
    full: dict[str, Download],
    tree: Tree,
    tmp_path: Path,
    path: str,
) -> None:
    expected = full[path]
    output, partial, first = cut_with_curl(host_a.url + path, tmp_path, expected.size)
    assert first["x-host"] == ["A"]
    etag = first["etag"][0]
    assert first["etag"] == expected.headers["etag"]

    resume_headers = tmp_path / "resume.headers"
    curl_resume(host_b.url + path, output, resume_headers, etag)
    headers = assert_resumed(resume_headers, partial, expected.size, etag)
    assert headers["x-host"] == ["B"]
    assert size_of(output) == expected.size
    assert sha256_file(output) == expected.sha256
    if path == ZIP:
        assert_good_zip(output, tree.files)


def test_nginx_sends_requests_to_both_hosts_in_turn(nginx: Nginx, full: dict[str, Download]) -> None:
    seen = []
    for _ in range(6):
        response, body = request(nginx, "HEAD", ZIP)  # type: ignore[arg-type]
        assert (response.status, body) == (200, b"")
        assert header(response, "ETag") == full[ZIP].headers["etag"][0]
        assert header(response, "Content-Length") == str(full[ZIP].size)
        seen.append(header(response, "X-Host"))
    assert set(seen) == {"A", "B"}, seen
    assert all(first != second for first, second in zip(seen, seen[1:], strict=False)), seen


def test_curl_resume_through_nginx_lands_on_the_other_host(
    nginx: Nginx, full: dict[str, Download], tree: Tree, tmp_path: Path
) -> None:
    expected = full[ZIP]
    url = nginx.url + ZIP
    output, partial, first = cut_with_curl(url, tmp_path, expected.size)
    etag = first["etag"][0]
    assert first["etag"] == expected.headers["etag"]

    resume_headers = tmp_path / "resume.headers"
    curl_resume(url, output, resume_headers, etag)
    headers = assert_resumed(resume_headers, partial, expected.size, etag)
    # Round robin: the resume went to the host that did not start the download.
    assert {first["x-host"][0], headers["x-host"][0]} == {"A", "B"}, (first["x-host"], headers["x-host"])
    assert sha256_file(output) == expected.sha256
    assert_good_zip(output, tree.files)


# -- 3. wget -c resumes on the other host ----------------------------------------------------------------


def test_wget_resumes_on_the_other_host(
    nginx: Nginx, full: dict[str, Download], tree: Tree, tmp_path: Path
) -> None:
    """Started at nginx's /a/ (host A), resumed at /b/ (host B): wget sends a Range without If-Range."""
    expected = full[ZIP]
    output = tmp_path / "doom.zip"
    command = ["wget", "-q", "--tries=1", "--timeout=20", "--limit-rate=8m", "-O", output]
    partial = kill_part_way([*command, f"{nginx.url}/a{ZIP}"], output, 4 * MIB, tmp_path / "wget.log")
    assert 0 < partial < expected.size

    result = run(["wget", "-c", "-S", "--tries=1", "--timeout=20", "-O", output, f"{nginx.url}/b{ZIP}"])
    assert result.returncode == 0, result.stderr
    log = result.stderr.decode("latin-1")  # -S: the server's answer goes to stderr
    assert re.findall(r"^\s*HTTP/1\.[01] (\d{3})", log, re.MULTILINE) == ["206"], log
    assert re.findall(r"^\s*X-Host: (\S+)", log, re.MULTILINE | re.IGNORECASE) == ["B"], log
    assert f"Content-Range: bytes {partial}-{expected.size - 1}/{expected.size}" in log, log
    assert size_of(output) == expected.size
    assert sha256_file(output) == expected.sha256
    assert_good_zip(output, tree.files)


# -- 4. Chromium resumes on the other host --------------------------------------------------------------


@dataclass
class Relayed:
    """One request that went through a :class:`SwitchingProxy`."""

    head: list[str]  # the request line and header lines, as the client sent them
    upstream: str  # the host's name
    status: int = 0  # of the host's answer
    sent: int = 0  # bytes of the answer (head and body) passed on to the client


class SwitchingProxy:
    """A TCP proxy on 127.0.0.1 that sends the first request to one host and cuts its answer after
    ``cut_at`` bytes (a clean close: to the client, the connection ended early), and every later
    request to another host, whole. One request per connection (``Connection: close`` upstream).

    What a browser does about a download cut short is up to it; this proxy only relays bytes
    and records each request's head and the status that answered it.
    """

    def __init__(self, first: GunicornServer, then: GunicornServer, cut_at: int) -> None:
        self.hosts = (first, then)
        self.cut_at = cut_at
        self.relayed: list[Relayed] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._clients: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        """Stop accepting, end the connections still open (a browser keeps spare ones open, unused),
        and wait for every relay to end."""
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() below: it fails
        self._listener.close()
        self._accepting.join(timeout=10)
        with self._lock:
            for client in self._clients:
                with contextlib.suppress(OSError):
                    client.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(timeout=30)

    def __enter__(self) -> SwitchingProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._clients.append(client)
            thread = threading.Thread(target=self._relay, args=(client,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _relay(self, client: socket.socket) -> None:
        with client:
            client.settimeout(30)
            data = b""
            while b"\r\n\r\n" not in data:
                try:
                    chunk = client.recv(65536)
                except OSError:
                    chunk = b""
                if not chunk:  # a connection opened ahead and never used
                    return
                data += chunk
            head, _, rest = data.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            with self._lock:
                first = not self.relayed
                server = self.hosts[0 if first else 1]
                record = Relayed(lines, server.env["ZM_HOST_NAME"])
                self.relayed.append(record)
            limit = self.cut_at if first else None
            kept = [line for line in lines if not line.lower().startswith("connection:")]
            forwarded = "\r\n".join([*kept, "Connection: close", "", ""]).encode("latin-1") + rest
            # A failure here (a client that left) shows in the record: a status or a size the test checks.
            with (
                contextlib.suppress(OSError),
                socket.create_connection((server.host, server.port), timeout=30) as upstream,
            ):
                upstream.sendall(forwarded)
                while chunk := upstream.recv(65536):
                    if not record.sent:
                        record.status = int(chunk.split(b" ", 2)[1])
                    if limit is not None and record.sent + len(chunk) >= limit:
                        client.sendall(chunk[: limit - record.sent])
                        record.sent = limit
                        client.shutdown(socket.SHUT_WR)
                        return
                    client.sendall(chunk)
                    record.sent += len(chunk)

    def header(self, record: Relayed, name: str) -> str | None:
        found = [
            line.split(":", 1)[1].strip() for line in record.head[1:] if line.lower().startswith(f"{name}:")
        ]
        return found[0] if found else None


def test_chromium_resumes_a_cut_download_on_the_other_host(
    host_a: GunicornServer,
    host_b: GunicornServer,
    full: dict[str, Download],
    tree: Tree,
    request: pytest.FixtureRequest,
) -> None:
    """Chromium downloads the archive from host A; the connection ends after 8 MiB. Chromium
    resumes by itself (an answer shorter than its Content-Length, with a strong validator) with
    ``Range`` and ``If-Range``; that request goes to host B, which must answer 206 with the rest."""
    driver, downloads = request.getfixturevalue("browser")
    expected = full[ZIP]
    with SwitchingProxy(host_a, host_b, cut_at=8 * MIB) as proxy:
        driver.get(proxy.url + ZIP)
        target = downloads / f"{GAME}.zip"
        done = wait_for(lambda: size_of(target) == expected.size and len(list(downloads.iterdir())) == 1, 30)
        assert done, (downloaded_files(downloads), proxy.relayed)
    first, resumed = proxy.relayed  # no other request
    assert (first.upstream, first.status, first.sent) == ("A", 200, 8 * MIB)
    assert proxy.header(first, "range") is None
    assert (resumed.upstream, resumed.status) == ("B", 206)
    offset = re.fullmatch(r"bytes=(\d+)-", proxy.header(resumed, "range") or "")
    assert offset is not None, resumed.head
    assert 0 < int(offset.group(1)) < 8 * MIB
    assert proxy.header(resumed, "if-range") == expected.headers["etag"][0]
    assert sha256_file(target) == expected.sha256
    assert_good_zip(target, tree.files)


def downloaded_files(folder: Path) -> list[tuple[str, int]]:
    return sorted((path.name, size_of(path)) for path in folder.iterdir())


# -- 5. a cold range on host B reads no file data once host A filled the store ------------------------------


def warm_up(server: GunicornServer) -> None:
    """Requests that load what a worker loads lazily (modules, the store's connection) without
    reading much file data: a HEAD of the archive, its first bytes, a small file."""
    response, _ = request(server, "HEAD", ZIP)
    assert response.status == 200
    response, _ = request(server, "GET", ZIP, {"Range": "bytes=0-99"})
    assert response.status == 206
    response, _ = request(server, "GET", SMALL_FILE, {"Range": "bytes=0-99"})
    assert response.status == 206


def measured_range(server: GunicornServer, etag: str, length: int) -> tuple[bytes, int]:
    """The last ``length`` bytes of the archive (with ``If-Range``, as a resume asks for them) and
    what the server's worker read meanwhile."""
    worker = server.worker_pid
    before = read_bytes(worker)
    response, body = request(server, "GET", ZIP, {"Range": f"bytes=-{length}", "If-Range": etag})
    read = read_bytes(worker) - before
    assert response.status == 206, (response.status, response.getheaders())
    assert header(response, "X-Host") == server.env["ZM_HOST_NAME"]
    return body, read


def test_a_cold_range_on_host_b_reads_no_file_data_once_host_a_filled_the_store(
    tree: Tree, databases: tuple[str, str], store: Store, full: dict[str, Download]
) -> None:
    """Fresh processes, so that nothing is known but what the store holds: A2 and B2 share the
    store, C serves host B's copy with a store of its own that is empty."""
    shared, empty = databases
    expected = full[ZIP]
    body = expected.path.read_bytes()
    etag = expected.headers["etag"][0]
    large = len(tree.files[LARGE])
    with (
        host("A2", tree.a, shared) as a,
        host("B2", tree.b, shared) as b,
        host("C", tree.b, empty) as c,
    ):
        for server in (a, b, c):
            warm_up(server)
        store.empty()
        assert store.names() == []

        # Host A's full download fills the shared store with every file's CRC-32 ...
        response, got = request(a, "GET", ZIP)
        assert (response.status, header(response, "ETag")) == (200, etag)
        assert got == body
        names = [f"{ROOT}/{GAME}/{rel}" for rel, data in tree.files.items() if data]
        assert wait_for(lambda: set(names) <= set(store.names()), 10), store.names()

        # ... so host B answers the archive's end (every entry's central record) from it.
        got, read_by_b = measured_range(b, etag, 1000)
        assert got == body[-1000:]
        assert read_by_b < MIB, f"host B read {read_by_b} bytes for a range of a warm store"

        # The control: the same request to a host whose store is empty reads the files.
        got, read_by_c = measured_range(c, etag, 1000)
        assert got == body[-1000:]
        assert read_by_c > large, f"host C read only {read_by_c} bytes with an empty store"
        # Every host used its database all along (a store that fails is logged, and memory used).
        for server in (a, b, c):
            assert "CRC-32 store" not in server.log(), server.log()


# -- 6. validators across hosts -------------------------------------------------------------------------


@pytest.mark.parametrize("path", [ZIP, LARGE_FILE], ids=["zip", "file"])
def test_an_etag_from_host_a_is_a_validator_on_host_b(
    host_b: GunicornServer, full: dict[str, Download], path: str
) -> None:
    expected = full[path]
    etag = expected.headers["etag"][0]
    response, body = request(host_b, "GET", path, {"If-None-Match": etag})
    assert (response.status, body) == (304, b"")
    assert header(response, "ETag") == etag
    assert header(response, "X-Host") == "B"

    start, stop = 3 * MIB + 7, 4 * MIB + 11
    response, body = request(host_b, "GET", path, {"Range": f"bytes={start}-{stop}", "If-Range": etag})
    assert response.status == 206
    assert header(response, "Content-Range") == f"bytes {start}-{stop}/{expected.size}"
    assert body == expected.path.read_bytes()[start : stop + 1]


def test_a_changed_mtime_on_host_b_makes_the_etag_of_host_a_stale(
    host_a: GunicornServer, host_b: GunicornServer, full: dict[str, Download], tree: Tree
) -> None:
    """The small file's mtime moved on host B only: host A's ETags of it and of the archive no
    longer match there, so If-Range gets the whole body and If-None-Match no 304."""
    touched = tree.b / GAME / SMALL
    st = os.stat(touched)
    small_etag = header(request(host_a, "HEAD", SMALL_FILE)[0], "ETag")
    assert small_etag is not None
    etags = {ZIP: full[ZIP].headers["etag"][0], SMALL_FILE: small_etag}
    try:
        os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
        for path, etag in etags.items():
            response, body = request(host_b, "GET", path, {"Range": "bytes=100-199", "If-Range": etag})
            assert response.status == 200, path
            assert header(response, "ETag") not in (None, etag), path
            assert header(response, "Content-Length") == str(len(body)), path
            if path == ZIP:
                assert len(body) == full[ZIP].size  # the same sizes: only a date differs
                with zipfile.ZipFile(io.BytesIO(body)) as archive:
                    assert archive.testzip() is None
                    assert {info.filename: archive.read(info) for info in archive.infolist()} == tree.files
            else:
                assert body == tree.files[SMALL]
            response, body = request(host_b, "GET", path, {"If-None-Match": etag})
            assert (response.status, len(body) > 0) == (200, True), path
            # Host A's copy did not change: its ETag still holds there.
            response, body = request(host_a, "GET", path, {"If-None-Match": etag})
            assert (response.status, body) == (304, b""), path
    finally:
        os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns))
    # The mtime set back (the ctime cannot be): host B's ETags are host A's again.
    for path, etag in etags.items():
        response, _ = request(host_b, "HEAD", path)
        assert header(response, "ETag") == etag, path
