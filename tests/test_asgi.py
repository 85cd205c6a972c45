"""The ASGI middleware under real uvicorn (and hypercorn) processes: the same bytes and headers
as the WSGI middleware for the same files and settings, conditional requests, ranges, resumes
with curl and wget, archive readers, disconnects that release every file, a stalled client
dropped, a failing body aborted, and an event loop that is never blocked."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import threading
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from zipmiddleware import ZipMiddleware as WsgiZipMiddleware
from zipmiddleware.asgi import ZipMiddleware, remote_user, wsgi_environ

from . import asgi_app
from .clients import (
    assert_good_zip,
    kill_part_way,
    read_headers,
    require_module,
    run,
    sha256_file,
    size_of,
    unavailable,
    wait_for,
    wsgi_get,
)
from .servers import AsgiServer, open_fds

COMPARED = ("content-length", "content-type", "content-disposition", "etag", "last-modified", "accept-ranges")


def make_files(root: Path) -> dict[str, dict[str, bytes]]:
    """Two games: a small one with a nested folder and a UTF-8 name, and a big one (40 MB)."""
    games = {
        "small": {"readme.txt": b"hello\n", "maps/e1m1.map": os.urandom(70_000), "caf\u00e9.txt": b"cafe\n"},
        "big": {f"part{n}.bin": os.urandom(10_000_000) for n in range(4)},
    }
    for game, files in games.items():
        for name, data in files.items():
            path = root / "games" / game / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    return games


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, dict[str, bytes]]]]:
    root = tmp_path_factory.mktemp("asgi") / "library"
    games = make_files(root)
    yield root, games
    shutil.rmtree(root, ignore_errors=True)


def start(server: str, root: Path, crc: Path, args: list[str] | None = None, **env: str) -> AsgiServer:
    require_module(server)
    variables = {"ZM_ASGI_ROOT": str(root), "ZM_ASGI_CRC": str(crc), **env}
    return AsgiServer(
        "tests.asgi_app:app", server=server, env=variables, args=args or (), ready_path="/api/ping"
    ).start()


@pytest.fixture(scope="module")
def uvicorn(library: tuple[Path, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[AsgiServer]:
    root, _ = library
    crc, events = tmp_path_factory.mktemp("crc") / "crc.sqlite", tmp_path_factory.mktemp("events") / "events"
    server = start("uvicorn", root, crc, ZM_ASGI_STALL="3", ZM_ASGI_EVENTS=str(events))
    yield server
    server.stop()
    server.cleanup()


@pytest.fixture(scope="module")
def hypercorn(library: tuple[Path, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[AsgiServer]:
    root, _ = library
    server = start("hypercorn", root, tmp_path_factory.mktemp("crc") / "crc.sqlite")
    yield server
    server.stop()
    server.cleanup()


@pytest.fixture(scope="module")
def hypercorn_trio(
    library: tuple[Path, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AsgiServer]:
    """hypercorn on trio's event loop rather than asyncio's."""
    root, _ = library
    require_module("trio")
    server = start("hypercorn", root, tmp_path_factory.mktemp("crc") / "crc.sqlite", args=["-k", "trio"])
    yield server
    server.stop()
    server.cleanup()


@pytest.fixture(scope="module")
def wsgi(library: tuple[Path, Any], tmp_path_factory: pytest.TempPathFactory) -> WsgiZipMiddleware:
    """The WSGI middleware with the ASGI app's settings, serving the same files."""
    root, _ = library

    def plain(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not a download"]

    crc = str(tmp_path_factory.mktemp("crc") / "crc.sqlite")
    return WsgiZipMiddleware(plain, **asgi_app.settings(root, crc))


def get(
    server: AsgiServer, path: str, method: str = "GET", **headers: str
) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        connection.request(method, urllib.request.quote(path, safe="/?=&%"), headers=headers)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def twin(
    wsgi: WsgiZipMiddleware, path: str, method: str = "GET", **headers: str
) -> tuple[int, dict[str, str], bytes]:
    response, body = wsgi_get(wsgi, urllib.request.quote(path), method, **headers)
    return response.status_code, {k.lower(): v for k, v in response.headers.items()}, body


# -- the same as WSGI ----------------------------------------------------------------------------


@pytest.mark.parametrize("server_name", ["uvicorn", "hypercorn", "hypercorn_trio"])
@pytest.mark.parametrize(
    "path", ["/files/games/small", "/files/games/big", "/files/games/small/readme.txt", "/async/games/small"]
)
def test_byte_identical_to_wsgi(
    server_name: str, path: str, request: pytest.FixtureRequest, wsgi: Any
) -> None:
    server = request.getfixturevalue(server_name)
    status, headers, body = get(server, path)
    # The WSGI twin has no coroutine resolvers: the directory resolver serves the same folder.
    expected_status, expected_headers, expected = twin(wsgi, path.replace("/async/", "/files/"))
    assert status == expected_status == 200
    assert body == expected
    for name in COMPARED:
        assert headers.get(name) == expected_headers.get(name), name
    if path.endswith("readme.txt"):
        assert body == b"hello\n"
    else:
        with zipfile.ZipFile(__import__("io").BytesIO(body)) as archive:
            assert archive.testzip() is None


@pytest.mark.parametrize("server_name", ["uvicorn", "hypercorn"])
def test_head_conditional_and_ranges_match_wsgi(
    server_name: str, request: pytest.FixtureRequest, wsgi: Any
) -> None:
    server = request.getfixturevalue(server_name)
    path = "/files/games/small"
    _, full_headers, full = get(server, path)
    etag, modified = full_headers["etag"], full_headers["last-modified"]
    cases: list[tuple[str, dict[str, str], int]] = [
        ("HEAD", {}, 200),
        ("GET", {"If-None-Match": etag}, 304),
        ("GET", {"If-Modified-Since": modified}, 200),  # a ZIP's date is no validator
        ("GET", {"If-Match": '"other"'}, 412),
        ("GET", {"Range": "bytes=100-2000"}, 206),
        ("GET", {"Range": "bytes=-1000"}, 206),
        ("GET", {"Range": "bytes=100-2000", "If-Range": etag}, 206),
        ("GET", {"Range": "bytes=100-2000", "If-Range": '"stale"'}, 200),
        ("GET", {"Range": f"bytes={len(full)}-"}, 416),
        ("POST", {}, 405),
    ]
    for method, headers, expected_status in cases:
        status, got_headers, body = get(server, path, method, **headers)
        wsgi_status, wsgi_headers, wsgi_body = twin(
            wsgi, path, method, **{k.replace("-", "_"): v for k, v in headers.items()}
        )
        label = f"{method} {headers}"
        assert status == wsgi_status == expected_status, label
        assert body == wsgi_body, label
        for name in (*COMPARED, "content-range", "allow"):
            assert got_headers.get(name) == wsgi_headers.get(name), (label, name)
        if status == 206 and "bytes=100-2000" in headers.get("Range", ""):
            assert body == full[100:2001]
        if method == "HEAD":
            assert body == b"" and got_headers["content-length"] == str(len(full))


def test_resolver_requests_carry_the_scope(uvicorn: AsgiServer) -> None:
    """A plain resolver gets the request's path, query, headers and the scope's user."""
    status, _, body = get(uvicorn, "/who/ann?q=caf%C3%A9", **{"X-Test": "yes", "X-User": "ann@example.org"})
    assert status == 418
    assert body.decode().strip() == "ann|ann@example.org|caf\u00e9|yes|/who/ann"
    status, _, body = get(uvicorn, "/who/nobody")
    assert body.decode().strip() == "nobody|None|None|None|/who/nobody"


def test_other_routes_and_missing_files(uvicorn: AsgiServer) -> None:
    assert get(uvicorn, "/api/ping")[0] == 200
    status, headers, body = get(uvicorn, "/files/games/nothing-here")
    assert status == 404 and b"/" not in body.split(b"\n", 1)[0][-20:]
    assert get(uvicorn, "/files/../../etc/passwd")[0] == 404
    assert get(uvicorn, "/async/games/missing")[0] == 404


# -- real clients --------------------------------------------------------------------------------


def test_curl_and_wget_resume(uvicorn: AsgiServer, library: tuple[Path, Any], tmp_path: Path) -> None:
    _, games = library
    url = uvicorn.url + "/files/games/big"
    whole = tmp_path / "whole.zip"
    assert run(["curl", "-sS", "--fail", "-o", whole, url]).returncode == 0
    expected = sha256_file(whole)
    for client in ("curl", "wget"):
        if shutil.which(client) is None:
            unavailable(f"{client} is not installed")
        output, log = tmp_path / f"{client}.zip", tmp_path / f"{client}.log"
        if client == "curl":
            first = ["curl", "-sS", "--fail", "--limit-rate", "4M", "-o", output, url]
            resume = [
                "curl",
                "-sS",
                "--fail",
                "-C",
                "-",
                "-D",
                tmp_path / "resume.headers",
                "-o",
                output,
                url,
            ]
        else:
            first = ["wget", "-q", "--limit-rate=4m", "-O", output, url]
            resume = ["wget", "-q", "-c", "-O", output, url]
        got = kill_part_way(first, output, 3_000_000, log)
        assert 0 < got < size_of(whole)
        result = run(resume, timeout=60)
        assert result.returncode == 0, result.stderr
        assert sha256_file(output) == expected, client
        if client == "curl":
            assert read_headers(tmp_path / "resume.headers")[0] == 206
        assert_good_zip(output, {name: data for name, data in games["big"].items()})


def test_archive_readers(uvicorn: AsgiServer, library: tuple[Path, Any], tmp_path: Path) -> None:
    _, games = library
    path = tmp_path / "small.zip"
    assert run(["curl", "-sS", "--fail", "-o", path, uvicorn.url + "/files/games/small"]).returncode == 0
    assert_good_zip(path, games["small"])
    for command, expected in (
        (["7z", "t", path], b"Everything is Ok"),
        (["bsdtar", "-tf", path], "caf\u00e9.txt".encode()),
    ):
        if shutil.which(str(command[0])) is None:
            unavailable(f"{command[0]} is not installed")
        result = run(command)
        assert result.returncode == 0, result.stdout + result.stderr
        assert expected in result.stdout


# -- disconnects, stalls, failures -----------------------------------------------------------------


def fds_settle(pid: int, baseline: int, timeout: float = 10) -> int:
    wait_for(lambda: open_fds(pid) <= baseline, timeout, 0.1)
    return open_fds(pid)


def start_reading(server: AsgiServer, path: str, *, read: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    received = 0
    while received < read:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection early"
        received += len(chunk)
    return sock


@pytest.mark.parametrize("server_name", ["uvicorn", "hypercorn", "hypercorn_trio"])
def test_disconnects_release_every_file(server_name: str, request: pytest.FixtureRequest) -> None:
    server = request.getfixturevalue(server_name)
    get(server, "/api/ping")
    baseline = open_fds(server.pid)
    for round_ in range(3):
        clients = [start_reading(server, path, read=1_000_000) for path in ("/files/games/big",) * 4]
        clients.append(start_reading(server, "/files/games/big/part1.bin", read=1_000_000))
        clients.append(start_reading(server, "/async/games/big", read=1_000_000))
        assert open_fds(server.pid) > baseline  # the downloads hold their files now
        for sock in clients:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            sock.close()  # a reset, as a browser's cancel often is
        assert fds_settle(server.pid, baseline) <= baseline, (
            f"round {round_}: {os.listdir(f'/proc/{server.pid}/fd')}"
        )
    threads = len(os.listdir(f"/proc/{server.pid}/task"))
    assert threads < 80  # the pool is bounded; the threads it has are idle ones
    assert get(server, "/files/games/small/readme.txt")[2] == b"hello\n"


def library_files_held(pid: int, root: Path) -> list[str]:
    """The files under ``root`` process ``pid`` holds open."""
    held = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith(str(root)):
                held.append(target)
    return held


def test_a_stalled_client_is_dropped(uvicorn: AsgiServer, library: tuple[Path, Any]) -> None:
    """stall_timeout (3 s here): a client that stops reading loses its download and its files.
    (uvicorn itself keeps the connection until the client goes: it has no send timeout, and
    an ASGI app cannot reach the socket.)"""
    root, _ = library
    sock = socket.create_connection(("127.0.0.1", uvicorn.port), timeout=30)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    sock.sendall(b"GET /files/games/big HTTP/1.1\r\nHost: x\r\n\r\n")
    sock.recv(1000)
    assert library_files_held(uvicorn.pid, root)
    started = time.monotonic()
    assert wait_for(lambda: not library_files_held(uvicorn.pid, root), 20, 0.1)
    assert 2.5 < time.monotonic() - started < 15
    sock.close()
    assert "took nothing for 3.0 s" in uvicorn.log(), uvicorn.log()[-3000:]


def test_a_slow_client_that_keeps_reading_is_never_dropped(uvicorn: AsgiServer) -> None:
    """stall_timeout counts from the last progress the server can see: a send of a piece of
    64 KiB, which returns once the kernel has room again (a third of its send buffer free, up
    to about 1.3 MB on Linux). A client that takes 64 KiB every 50 ms (1.3 MB/s) through a
    small buffer for 8 s, with stall_timeout 3 s, is still downloading at the end."""
    dropped_before = uvicorn.log().count("took nothing")
    sock = socket.create_connection(("127.0.0.1", uvicorn.port), timeout=10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    sock.sendall(b"GET /files/games/big HTTP/1.1\r\nHost: x\r\n\r\n")
    received, ended = 0, time.monotonic() + 8
    try:
        while time.monotonic() < ended:
            data = sock.recv(65536)
            assert data, f"the server closed the download after {received} bytes"
            received += len(data)
            time.sleep(0.05)
    finally:
        sock.close()
    assert uvicorn.log().count("took nothing") == dropped_before, uvicorn.log()[-2000:]
    assert 3_000_000 < received < 30_000_000


@pytest.mark.parametrize("server_name", ["uvicorn", "hypercorn", "hypercorn_trio"])
def test_a_body_failing_part_way_aborts_the_connection(
    server_name: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    server = request.getfixturevalue(server_name)
    output = tmp_path / "broken.zip"
    result = run(["curl", "-sS", "-o", output, server.url + "/broken/case"])
    assert result.returncode != 0, "a failed body must not look like a complete download"
    assert 1 << 20 < size_of(output) < (1 << 20) + asgi_app.BROKEN_AFTER + 10_000


def events_of(server: AsgiServer) -> list[dict[str, Any]]:
    """What on_download reported so far (tests/asgi_app.py writes one JSON line per download)."""
    path = Path(server.env["ZM_ASGI_EVENTS"])
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines]


def test_on_download_reports_how_each_download_ended(uvicorn: AsgiServer) -> None:
    """The WSGI door's reporting, unchanged: complete, a range, a client gone, a failure."""

    def next_event(before: int) -> dict[str, Any]:
        assert wait_for(lambda: len(events_of(uvicorn)) > before, 10), events_of(uvicorn)
        return events_of(uvicorn)[before]

    count = len(events_of(uvicorn))
    _, _, body = get(uvicorn, "/files/games/small")
    assert next_event(count) == {
        "status": "complete",
        "sent": len(body),
        "http_status": 200,
        "name": "small.zip",
    }
    _, _, part = get(uvicorn, "/files/games/small", Range="bytes=10-1009")
    assert next_event(count + 1) == {
        "status": "complete",
        "sent": 1000,
        "http_status": 206,
        "name": "small.zip",
    }
    sock = start_reading(uvicorn, "/files/games/big", read=1_000_000)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()
    gone = next_event(count + 2)
    assert gone["status"] == "client_gone" and 1_000_000 <= gone["sent"] < 40_000_000, gone
    run(["curl", "-sS", "-o", "/dev/null", uvicorn.url + "/broken/case"])
    failed = next_event(count + 3)
    assert failed["status"] == "aborted" and failed["sent"] >= 1 << 20, failed


# -- the event loop is never blocked ------------------------------------------------------------


class SlowReader(threading.Thread):
    """A client that takes 64 KiB every 20 ms (about 3 MB/s) until told to stop."""

    def __init__(self, server: AsgiServer, path: str) -> None:
        super().__init__(daemon=True)
        self.sock = start_reading(server, path, read=1)
        self.stop = threading.Event()
        self.ended = False

    def run(self) -> None:
        while not self.stop.is_set():
            if not self.sock.recv(65536):
                self.ended = True
                return
            time.sleep(0.02)

    def close(self) -> None:
        self.stop.set()
        self.join(5)
        self.sock.close()


def test_the_app_answers_at_once_while_8_downloads_stream(uvicorn: AsgiServer) -> None:
    """8 downloads stream (4 at full speed, one after another, keeping both cores busy; 3 slow
    ones; a plain resolver that sleeps 1 s in its thread): the app's own JSON endpoint still
    answers within 100 ms every time."""
    fast = ["/files/games/big", "/async/games/big", "/files/games/big/part2.bin", "/files/games/big"]
    commands = [["curl", "-sS", *(["-o", "/dev/null", uvicorn.url + path] * 400)] for path in fast]
    commands.append(["curl", "-sS", "-o", "/dev/null", uvicorn.url + "/slow-resolver"])
    clients = [
        subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for command in commands
    ]
    readers = [
        SlowReader(uvicorn, path) for path in ("/files/games/big", "/async/games/big", "/files/games/big")
    ]
    for reader in readers:
        reader.start()
    try:
        time.sleep(0.5)
        latencies = []
        for _ in range(40):
            began = time.monotonic()
            status, _, body = get(uvicorn, "/api/ping")
            latencies.append(time.monotonic() - began)
            assert status == 200 and b'"ok":true' in body
            time.sleep(0.05)
        ended = [n for n, client in enumerate(clients[:4]) if client.poll() is not None]
        ended += [n + 4 for n, reader in enumerate(readers) if reader.ended]
        assert not ended, f"the downloads must still be streaming: {ended}"
    finally:
        for client in clients:
            client.kill()
            client.wait()
        for reader in readers:
            reader.close()
    median, worst = statistics.median(latencies) * 1000, max(latencies) * 1000
    print(f"JSON endpoint while 8 downloads stream: median {median:.1f} ms, max {worst:.1f} ms")
    assert worst < 100, f"median {median:.1f} ms, max {worst:.1f} ms"


# -- the environ a resolver sees --------------------------------------------------------------------


def test_wsgi_environ_from_a_scope() -> None:
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/app/files/caf\u00e9 x",
        "raw_path": b"/app/files/caf%C3%A9%20x",
        "root_path": "/app",
        "query_string": b"a=1&b=%C3%A9",
        "headers": [(b"host", b"example.org"), (b"x-a", b"1"), (b"x-a", b"2"), (b"x_a", b"smuggled")],
        "server": ("127.0.0.1", 8000),
        "client": ("10.0.0.1", 5555),
        "scheme": "https",
        "http_version": "1.1",
    }
    environ = wsgi_environ(scope)
    assert environ["SCRIPT_NAME"] == "/app"
    assert environ["PATH_INFO"] == "/files/caf\u00e9 x".encode().decode("latin-1")
    assert environ["QUERY_STRING"] == "a=1&b=%C3%A9"
    assert environ["HTTP_X_A"] == "1,2"  # the underscored one is dropped, not merged
    assert environ["wsgi.url_scheme"] == "https" and environ["REMOTE_ADDR"] == "10.0.0.1"
    assert "REMOTE_USER" not in environ


def test_remote_user_from_the_scope() -> None:
    class User:
        is_authenticated = True
        username = "ann"

    class Anonymous:
        is_authenticated = False
        username = "ann"

    assert remote_user(User()) == "ann"
    assert remote_user(Anonymous()) is None
    assert remote_user("bob") == "bob"
    assert remote_user(None) is None


def test_settings_are_checked_as_for_wsgi(tmp_path: Path) -> None:
    from zipmiddleware import ConfigError

    with pytest.raises(ConfigError, match="chunk_sise"):
        ZipMiddleware(None, routes={}, chunk_sise=1)

    async def asgi_app(scope: Any, receive: Any, send: Any) -> None:
        pass

    with pytest.raises(ConfigError, match="^app: an ASGI app"):  # the WSGI class, by mistake
        WsgiZipMiddleware(asgi_app, routes={})
    config = tmp_path / "zm.toml"
    config.write_text(f'[zipmiddleware]\nroots = ["{tmp_path}"]\nchunk_size = 131072\n')
    middleware = ZipMiddleware.from_config(None, config)
    assert isinstance(middleware, ZipMiddleware) and middleware.settings.chunk_size == 131072


def test_lifespan_and_other_scopes_reach_the_app(uvicorn: AsgiServer) -> None:
    """uvicorn's lifespan went through to Starlette (it started); plain routes answer."""
    assert "Application startup complete" in uvicorn.log()
    assert threading.active_count() >= 1
