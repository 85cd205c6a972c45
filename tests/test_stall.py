"""``stall_timeout``: a client that stops reading is dropped and its thread freed.

In process: what :func:`zipmiddleware.connection.limit_stalls` does to the client socket of each
kind of response, and that it puts the socket back as it was.

Under a real gunicorn (gthread, **one** thread, so that a held thread shows as a request that
waits): a raw-socket client asks for a large ZIP or a large direct file (gunicorn's sendfile
path), reads a little, then stops reading. With ``stall_timeout`` 2 s the server gives up about
then: gunicorn logs the aborted send, the client finds the body cut short when it drains its
socket, and a small request made at the moment the client stalled is answered a few seconds
later. With ``stall_timeout`` 0 (the defect: nothing times out a blocked send) the same small
request is still waiting well past that, until the stalled client itself goes away. A client
that reads slowly but steadily for several times the timeout is not cut and gets every byte.
"""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from werkzeug.test import create_environ
from werkzeug.wsgi import FileWrapper

from zipmiddleware import FileTarget, ZipMiddleware, ZipTarget
from zipmiddleware.connection import TIMEVAL, RestoreOnClose, limit_stalls

from .clients import connect, read_head, read_paced, read_to_end, send_get, time_request, wait_for
from .conftest import plain_app
from .servers import PROJECT, GunicornServer

MIB = 1024 * 1024
APP = "tests.server_app:app"
STALL = 2.0
# The longest a stalled client may hold the thread with STALL on: the kernel may still take a
# little data after a first timeout (a partial send starts the count again), gunicorn then
# aborts the connection and the waiting request needs its turn. Measured: 4-6 s.
HELD_AT_MOST = 10.0
# Random data, much larger than what the kernel buffers for a client that stopped reading
# (a few MiB for gunicorn's send buffer, plus the client's receive buffer fixed below).
FILES = {"big/part-1.bin": os.urandom(24 * MIB + 7), "big/part-2.bin": os.urandom(24 * MIB + 11)}
ZIP_PATH = "/folder/big"
FILE_PATH = "/file/big/part-1.bin"
RECEIVE_BUFFER = 64 * 1024
ABORT = "Socket error processing request"


def sndtimeo(sock: socket.socket) -> float:
    seconds, micro = struct.unpack(
        TIMEVAL, sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.calcsize(TIMEVAL))
    )
    return float(seconds + micro / 1_000_000)


# -- in process: what is set, and that it is put back --------------------------------------------


@pytest.fixture
def sockets() -> Iterator[tuple[socket.socket, socket.socket]]:
    server, client = socket.socketpair()
    with server, client:
        yield server, client


@pytest.fixture
def middleware(tmp_path: Path) -> ZipMiddleware:
    (tmp_path / "d").mkdir()
    for name in ("a.txt", "b.txt"):
        (tmp_path / "d" / name).write_bytes(name.encode() * 100)
    return ZipMiddleware(
        plain_app,
        routes={
            "/zip": lambda request: ZipTarget.from_directory(tmp_path / "d"),
            "/file": lambda request: FileTarget(tmp_path / "d" / "a.txt"),
        },
        roots=[str(tmp_path)],
        stall_timeout=7.5,
    )


def call(app: Callable[..., Any], path: str, **extra: Any) -> Any:
    environ = create_environ(path)
    environ.update(extra)
    return app(environ, lambda status, headers, exc_info=None: lambda data: None)


def test_a_download_sets_the_send_timeout_and_close_puts_it_back(
    middleware: ZipMiddleware, sockets: tuple[socket.socket, socket.socket]
) -> None:
    sock = sockets[0]
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack(TIMEVAL, 3, 0))
    body = call(middleware, "/zip", **{"gunicorn.socket": sock})
    assert isinstance(body, RestoreOnClose)
    assert sndtimeo(sock) == 7.5
    assert sock.gettimeout() is None  # still blocking: the server sees no other change
    assert b"".join(body).startswith(b"PK\x03\x04")
    body.close()
    assert sndtimeo(sock) == 3.0  # the previous value, for the next request on the connection


def test_werkzeug_socket_is_used_too(
    middleware: ZipMiddleware, sockets: tuple[socket.socket, socket.socket]
) -> None:
    body = call(middleware, "/file", **{"werkzeug.socket": sockets[0]})
    assert sndtimeo(sockets[0]) == 7.5
    body.close()
    assert sndtimeo(sockets[0]) == 0.0


def test_the_servers_file_wrapper_gets_the_socket_timeout_and_is_not_wrapped(
    middleware: ZipMiddleware, sockets: tuple[socket.socket, socket.socket]
) -> None:
    """gunicorn sends its own file wrapper with socket.sendfile, which ignores SO_SNDTIMEO."""
    sock = sockets[0]
    body = call(middleware, "/file", **{"gunicorn.socket": sock, "wsgi.file_wrapper": FileWrapper})
    assert type(body) is FileWrapper  # so that gunicorn still takes its sendfile path
    assert sock.gettimeout() == 7.5
    assert sndtimeo(sock) == 0.0
    body.close()


def test_a_tls_socket_gets_the_socket_timeout_and_it_is_put_back(
    middleware: ZipMiddleware, sockets: tuple[socket.socket, socket.socket]
) -> None:
    """ssl.SSLSocket retries a write that SO_SNDTIMEO ended, so only its own timeout works."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    with context.wrap_socket(sockets[0], server_hostname="localhost", do_handshake_on_connect=False) as tls:
        body = call(middleware, "/zip", **{"gunicorn.socket": tls})
        assert tls.gettimeout() == 7.5
        body.close()
        assert tls.gettimeout() is None


@pytest.mark.parametrize(
    "path, settings, extra",
    [
        ("/elsewhere", {}, {}),  # the wrapped app's request
        ("/zip", {"stall_timeout": 0}, {}),
        ("/zip", {}, {"SERVER_PROTOCOL": "HTTP/2.0"}),
    ],
    ids=["app-request", "turned-off", "http2"],
)
def test_the_socket_is_left_alone(
    tmp_path: Path,
    sockets: tuple[socket.socket, socket.socket],
    path: str,
    settings: dict[str, Any],
    extra: dict[str, str],
) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_bytes(b"a")
    app = ZipMiddleware(
        plain_app,
        routes={"/zip": lambda request: ZipTarget.from_directory(tmp_path / "d")},
        roots=[str(tmp_path)],
        **settings,
    )
    body = call(app, path, **{"gunicorn.socket": sockets[0], **extra})
    assert not isinstance(body, RestoreOnClose)
    assert (sndtimeo(sockets[0]), sockets[0].gettimeout()) == (0.0, None)
    getattr(body, "close", lambda: None)()


def test_without_a_socket_the_body_is_untouched() -> None:
    body = [b"x"]
    assert limit_stalls(create_environ("/"), body, 60) is body


def test_restore_runs_even_when_the_body_fails_to_close() -> None:
    restored = []

    class Failing:
        def __iter__(self) -> Iterator[bytes]:
            return iter([b"x"])

        def close(self) -> None:
            raise RuntimeError("close failed")

    wrapped = RestoreOnClose(Failing(), lambda: restored.append(True))
    assert list(wrapped) == [b"x"]
    with pytest.raises(RuntimeError):
        wrapped.close()
    assert restored == [True]


# -- a real gunicorn with one thread -----------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("stall-data")
    for rel, content in FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(content)
    return root


def one_thread(data: Path, stall_timeout: float) -> GunicornServer:
    env = {"ZM_TEST_DATA": str(data), "ZM_TEST_STALL_TIMEOUT": str(stall_timeout)}
    return GunicornServer(APP, pythonpath=[PROJECT], env=env, threads=1)


@pytest.fixture(scope="module")
def guarded(data: Path) -> Iterator[GunicornServer]:
    with one_thread(data, STALL) as server:
        yield server


@pytest.fixture(scope="module")
def unguarded(data: Path) -> Iterator[GunicornServer]:
    with one_thread(data, 0) as server:
        yield server


def stall(server: GunicornServer, path: str) -> tuple[socket.socket, int]:
    """Ask for ``path``, read the head and a little of the body, then stop reading."""
    sock = connect(server.host, server.port, receive_buffer=RECEIVE_BUFFER)
    send_get(sock, path)
    response = read_head(sock)
    assert response.status == 200
    assert response.length > 32 * RECEIVE_BUFFER
    received = len(response.body) + len(read_paced(sock, 4 * MIB, 0.05))
    return sock, response.length - received


@pytest.mark.server
@pytest.mark.parametrize("path", [ZIP_PATH, FILE_PATH], ids=["zip", "direct-file-sendfile"])
def test_a_client_that_stops_reading_is_dropped_and_its_thread_freed(
    guarded: GunicornServer, path: str
) -> None:
    aborts = guarded.log().count(ABORT)
    sock, missing = stall(guarded, path)
    with sock:
        # The only thread is sending to the stalled client: this request waits for it.
        held = time_request(guarded.host, guarded.port, "/", timeout=HELD_AT_MOST + 5)
        print(f"{path}: the stalled client held the thread for {held} s (stall_timeout {STALL} s)")
        assert held is not None, f"the thread was not freed within {HELD_AT_MOST + 5} s"
        # (It stalled a moment before this request began: the kernel's buffers filled at once.)
        assert STALL / 2 <= held <= HELD_AT_MOST
        # gunicorn said why it dropped the connection ...
        assert wait_for(lambda: guarded.log().count(ABORT) > aborts, timeout=5), guarded.log()[-3000:]
        # ... and the client, draining its socket now, finds the body cut short.
        rest, ended = read_to_end(sock, timeout=10)
        assert ended in ("eof", "reset")
        assert len(rest) < missing


@pytest.mark.server
def test_without_stall_timeout_the_stalled_client_keeps_the_thread(unguarded: GunicornServer) -> None:
    """The defect, shown: nothing ends a blocked send, so the waiting request waits on."""
    sock, _ = stall(unguarded, ZIP_PATH)
    with sock:
        assert time_request(unguarded.host, unguarded.port, "/", timeout=HELD_AT_MOST) is None
    # Only the client's going away frees the thread.
    released = time_request(unguarded.host, unguarded.port, "/", timeout=10)
    assert released is not None and released < 5


@pytest.mark.server
def test_a_slow_but_steady_client_is_not_dropped(guarded: GunicornServer) -> None:
    """64 KB/s for three times the timeout, then the rest at full speed: every byte, in order."""
    reference = hashlib.sha256()
    with connect(guarded.host, guarded.port) as sock:
        send_get(sock, ZIP_PATH)
        response = read_head(sock)
        body, ended = read_to_end(sock)
        assert ended == "eof"
        reference.update(response.body + body)
        length = response.length
    aborts = guarded.log().count(ABORT)
    with connect(guarded.host, guarded.port, receive_buffer=RECEIVE_BUFFER) as sock:
        send_get(sock, ZIP_PATH)
        response = read_head(sock)
        slow = read_paced(sock, 64 * 1024, 3 * STALL)
        rest, ended = read_to_end(sock)
    body = response.body + slow + rest
    assert ended == "eof"
    assert len(slow) > 2 * STALL * 64 * 1024  # it did read slowly, for longer than the timeout
    assert len(body) == length
    assert hashlib.sha256(body).hexdigest() == reference.hexdigest()
    assert guarded.log().count(ABORT) == aborts
