"""An HTTP origin for tests of remote sources: a real nginx serving a folder, and a proxy of our
own in front of it that injects faults and counts what passes.

    files = write_files(root, count=4, size=1 << 20)
    origin = start_nginx_origin(root, prefix)            # static files: Range, If-Match, If-Range, ETag
    try:
        with FaultProxy(origin.url) as proxy:
            proxy.faults["/f001.bin"] = Fault(fail_first=2)     # 503, 503, then the file
            proxy.faults["/f002.bin"] = Fault(drop_after=1000)  # cut once after 1000 body bytes
            proxy.default_fault = Fault(rate=1 << 20)           # every other path at 1 MiB/s
            ...                                                 # the code under test, on proxy.url
            assert proxy.max_in_flight <= 8
            assert [r.status for r in proxy.requests_for("/f001.bin")] == [503, 503, 200]
    finally:
        origin.stop()

nginx answers conditional and range requests the way a real static origin does, so the code under
test meets real validators; the proxy (threads of the test process) stands between them because
nginx cannot fail a request on demand, cut a body part-way or say how many requests were open at
once.

The proxy's counters may be read while requests run: ``bytes_sent`` grows as each piece (64 KiB
at most) is handed to the client's socket, counted just before, so that bytes a client has read
are always counted. A request's end (``ended``, ``in_flight``) is counted by the proxy's thread a
moment after the client has the last byte: wait for it (``clients.wait_for``) rather than assert
it at once.

Seen of nginx 1.22 (static files, ``etag on``), which tests relying on it should keep in mind:

* The ETag is ``"<mtime>-<size>"`` in hexadecimal with whole seconds: rewriting a file with the
  same size within the same second keeps its ETag (and Last-Modified). Change the mtime by at
  least a second (``os.utime``) or the size to get a new one.
* ``If-Match`` is compared strongly and before Range: a wrong one is a 412 (with a small HTML
  body), also for a range request; ``*`` matches.
* ``If-Range`` with an ETag must equal the ETag exactly, and with a date must equal Last-Modified
  exactly (not "not modified since"); otherwise the whole file comes back as a 200.
* A Range starting at or past the end is a 416 with ``Content-Range: bytes */<size>``; a
  several-range request is answered with ``multipart/byteranges``.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import os
import pwd
import random
import socket
import struct
import sys
import termios
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from .nginx import Nginx, nginx_executable

PIECE = 64 * 1024  # the most written to a client at once: a gone client is noticed within one piece
UPSTREAM_TIMEOUT = 30.0
# Hop-by-hop headers (RFC 9110 7.6.1) are the proxy's own business on each side: not passed on.
HOP_BY_HOP = frozenset(
    ("connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade")
)


# -- test data --------------------------------------------------------------------------------


def write_files(root: Path, count: int, size: int, seed: int = 0) -> dict[str, bytes]:
    """Write ``count`` files of ``size`` bytes (``f000.bin``, ``f001.bin``, ...) into ``root``;
    the same ``seed`` gives the same bytes, so a failure can be replayed. Returns name -> bytes."""
    root.mkdir(parents=True, exist_ok=True)
    generator = random.Random(seed)
    files = {}
    for index in range(count):
        name = f"f{index:03d}.bin"
        data = generator.randbytes(size)
        (root / name).write_bytes(data)
        files[name] = data
    return files


# -- nginx as the origin ------------------------------------------------------------------------

ORIGIN_CONFIG = """\
{user}
worker_processes 2;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
worker_shutdown_timeout 3s;
events {{ worker_connections 1024; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/client_body_temp;
    proxy_temp_path {prefix}/proxy_temp;
    fastcgi_temp_path {prefix}/fastcgi_temp;
    uwsgi_temp_path {prefix}/uwsgi_temp;
    scgi_temp_path {prefix}/scgi_temp;

    default_type application/octet-stream;
    sendfile on;
    etag on;
    gzip off;
    keepalive_timeout 300s;
    keepalive_requests 100000;

    server {{
        listen 127.0.0.1:{port};
        root "{root}";
        location = /nginx-ready {{ return 200 "nginx\\n"; }}
        location / {{ }}
    }}
}}
"""


def start_nginx_origin(root: Path, prefix: Path) -> Nginx:
    """A started nginx serving the files under ``root`` as they are on disk (no open-file cache, so
    a changed file is seen at once), its logs and temporary folders under ``prefix``. Skips the
    test when nginx is missing. The caller stops it."""

    def render(prefix: Path, port: int) -> str:
        # Without "user", workers of a root master run as nobody, who cannot enter pytest's
        # private (0700) temporary folders.
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else ""
        return ORIGIN_CONFIG.format(user=user, prefix=prefix, port=port, root=root.resolve())

    prefix.mkdir(parents=True, exist_ok=True)
    return Nginx(nginx_executable(), prefix, render).start()


# -- the fault-injecting proxy -----------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """What the proxy does to the requests of one path (or, as ``default_fault``, of every path
    without a rule of its own).

    Requests are counted per path from the moment this rule (this object: assign a new one to
    start again) applies to it: the first ``fail_first`` get ``status`` without asking the origin;
    of the following ones, the first ``drop_times`` whose body is longer than ``drop_after`` bytes
    are cut after that many body bytes. ``first_byte_delay`` and ``rate`` apply to every request.
    """

    fail_first: int = 0
    status: int = 503
    drop_after: int | None = None
    drop_times: int = 1
    first_byte_delay: float = 0.0  # seconds before the status line (and before asking the origin)
    rate: float | None = None  # bytes per second of body
    reset: bool = True  # cut with a TCP RST (SO_LINGER 0); False: an ordinary close (FIN)


NO_FAULT = Fault()


@dataclass
class RequestRecord:
    """One request the proxy received; its fields change while it runs (``ended`` stays None until
    the response is finished, cut, or the client is gone)."""

    path: str  # the request target without its query: what faults are keyed by
    target: str  # as the client sent it
    method: str
    headers: dict[str, str]  # lower-case names
    started: float  # time.monotonic()
    client_port: int  # the client connection's port: requests on one keep-alive connection share it
    status: int | None = None  # what the client was answered
    bytes_sent: int = 0  # body bytes written to the client
    ended: float | None = None
    dropped: bool = False  # cut on purpose by a Fault
    client_gone: bool = False  # a write to the client failed
    upstream_error: str | None = None  # why the origin could not be asked (then status 502)

    @property
    def duration(self) -> float | None:
        return None if self.ended is None else self.ended - self.started


@dataclass
class _Usage:
    """How far a path is through the rule that applies to it."""

    fault: Fault
    requests: int = 0
    drops: int = 0


@dataclass
class _Plan:
    """What the proxy does to one request, decided as it arrives."""

    fault: Fault
    fail: bool
    may_drop: bool  # among the drop_times after fail_first; dropped if the body is long enough
    usage: _Usage = field(repr=False)


class _UpstreamBroken(Exception):
    """The origin failed part-way through a body (the client's connection must then be closed)."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the listen backlog: many clients may connect at once
    proxy: FaultProxy

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Quiet about a client that reset its connection while idle; anything else is printed."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: every response has a Content-Length, or closes
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.upstream: http.client.HTTPConnection | None = None
        self.server.proxy._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:  # the client is gone, or the connection was cut on purpose
            pass
        finally:
            self.close_upstream()
            self.server.proxy._track(self.connection, False)

    def do_GET(self) -> None:
        self.server.proxy._handle(self)

    do_HEAD = do_GET

    def close_upstream(self) -> None:
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: what happened is in ``FaultProxy.requests``."""


class FaultProxy:
    """An HTTP/1.1 reverse proxy in threads of this process, in front of ``upstream_url``.

    GET and HEAD are forwarded with their headers (Range, If-Match, If-Range...); the answer's
    status and headers come back as they are, its body in pieces of at most 64 KiB, so that a
    client that goes away is noticed at the next write and the origin's response is abandoned.
    Each client connection has a thread and a keep-alive connection to the origin of its own.
    """

    def __init__(self, upstream_url: str) -> None:
        parts = urllib.parse.urlsplit(upstream_url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"not an http:// URL: {upstream_url}")
        self.upstream_host = parts.hostname
        self.upstream_port = parts.port or 80
        self.upstream_prefix = parts.path.rstrip("/")
        self.faults: dict[str, Fault] = {}
        self.default_fault: Fault = NO_FAULT
        self._lock = threading.Lock()
        self._requests: list[RequestRecord] = []
        self._in_flight = 0
        self._max_in_flight = 0
        self._bytes_sent = 0
        self._usage: dict[str, _Usage] = {}
        self._connections: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.host = "127.0.0.1"
        self.port = 0

    # -- life ----------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> Self:
        server = _Server((self.host, 0), _Handler)
        server.proxy = self
        self._server = server
        self.port = server.server_address[1]
        self._stopping.clear()
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="fault-proxy", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, and cut the open client connections so their threads end. Idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- counters --------------------------------------------------------------------------------

    @property
    def requests(self) -> list[RequestRecord]:
        """Every request since the start (or ``reset_counters``), in arrival order, running ones too."""
        with self._lock:
            return list(self._requests)

    def requests_for(self, path: str) -> list[RequestRecord]:
        return [record for record in self.requests if record.path == path]

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    @property
    def max_in_flight(self) -> int:
        """The most requests handled at once: from the request's arrival to its response's end (or
        the client's going away)."""
        with self._lock:
            return self._max_in_flight

    @property
    def bytes_sent(self) -> int:
        """Body bytes written to clients, all requests together (fault bodies included)."""
        with self._lock:
            return self._bytes_sent

    def reset_counters(self) -> None:
        """Forget the requests and totals; ``max_in_flight`` starts again from those in flight now.
        Faults are not rearmed (assign a new ``Fault`` for that)."""
        with self._lock:
            self._requests = []
            self._bytes_sent = 0
            self._max_in_flight = self._in_flight

    # -- handling ----------------------------------------------------------------------------------

    def _track(self, connection: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

    def _plan(self, path: str) -> _Plan:
        with self._lock:
            fault = self.faults.get(path, self.default_fault)
            usage = self._usage.get(path)
            if usage is None or usage.fault is not fault:
                usage = self._usage[path] = _Usage(fault)
            usage.requests += 1
            fail = usage.requests <= fault.fail_first
            return _Plan(fault, fail, not fail and fault.drop_after is not None, usage)

    def _claim_drop(self, plan: _Plan) -> bool:
        with self._lock:
            if plan.usage.drops >= plan.fault.drop_times:
                return False
            plan.usage.drops += 1
            return True

    def _count(self, record: RequestRecord, sent: int) -> None:
        with self._lock:
            record.bytes_sent += sent
            self._bytes_sent += sent

    def _write(self, handler: _Handler, record: RequestRecord, data: bytes) -> None:
        """Write body bytes to the client, counted before the write: a client that has read them can
        count on seeing them counted. A write that fails takes its bytes back (the client is gone)."""
        self._count(record, len(data))
        try:
            handler.wfile.write(data)
        except OSError:
            self._count(record, -len(data))
            raise

    def _handle(self, handler: _Handler) -> None:
        target = handler.path
        record = RequestRecord(
            path=urllib.parse.urlsplit(target).path,
            target=target,
            method=handler.command,
            headers={name.lower(): value for name, value in handler.headers.items()},
            started=time.monotonic(),
            client_port=handler.client_address[1],
        )
        with self._lock:
            self._requests.append(record)
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
        try:
            plan = self._plan(record.path)
            if plan.fault.first_byte_delay and self._stopping.wait(plan.fault.first_byte_delay):
                handler.close_connection = True
                return
            if plan.fail:
                self._answer_fault(handler, record, plan.fault.status)
            else:
                self._forward(handler, record, plan)
        except _UpstreamBroken as error:
            record.upstream_error = repr(error.__cause__)
            handler.close_connection = True  # the client has fewer bytes than announced
            handler.close_upstream()
        except OSError:  # a write to the client failed: it went away (or stop() cut it)
            record.client_gone = True
            handler.close_connection = True
            handler.close_upstream()
        finally:
            with self._lock:
                record.ended = time.monotonic()
                self._in_flight -= 1

    def _answer_fault(self, handler: _Handler, record: RequestRecord, status: int) -> None:
        body = f"fault injected: {status}\n".encode()
        record.status = status
        handler.send_response_only(status)
        handler.send_header("Content-Type", "text/plain")
        handler.send_header("Content-Length", str(len(body)))
        handler.send_header("Retry-After", "0")
        handler.end_headers()
        if handler.command != "HEAD":
            self._write(handler, record, body)

    def _ask_upstream(self, handler: _Handler) -> http.client.HTTPResponse:
        """The origin's answer to this request, on the connection's upstream connection; a kept-alive
        one the origin has meanwhile closed is replaced once (GET and HEAD may be repeated)."""
        headers = {name: value for name, value in handler.headers.items() if name.lower() not in HOP_BY_HOP}
        headers = {name: value for name, value in headers.items() if name.lower() != "host"}
        headers["Host"] = f"{self.upstream_host}:{self.upstream_port}"
        for attempt in range(2):
            reused = handler.upstream is not None
            if handler.upstream is None:
                handler.upstream = http.client.HTTPConnection(
                    self.upstream_host, self.upstream_port, timeout=UPSTREAM_TIMEOUT
                )
            try:
                handler.upstream.request(
                    handler.command, self.upstream_prefix + handler.path, headers=headers
                )
                return handler.upstream.getresponse()
            except (http.client.RemoteDisconnected, ConnectionError, http.client.BadStatusLine):
                handler.close_upstream()
                if not reused or attempt:
                    raise
        raise AssertionError("unreachable")

    def _forward(self, handler: _Handler, record: RequestRecord, plan: _Plan) -> None:
        try:
            response = self._ask_upstream(handler)
        except (OSError, http.client.HTTPException) as error:
            handler.close_upstream()
            record.upstream_error = repr(error)
            self._answer_fault(handler, record, 502)
            return
        headers = [(name, value) for name, value in response.getheaders() if name.lower() not in HOP_BY_HOP]
        length = response.getheader("Content-Length")
        has_body = handler.command != "HEAD" and response.status not in (204, 304) and response.status >= 200
        fault = plan.fault
        drop = (
            has_body
            and plan.may_drop
            and fault.drop_after is not None
            and (length is None or int(length) > fault.drop_after)
            and self._claim_drop(plan)
        )
        if has_body and length is None:  # the origin chunked it: the end is then the connection's
            handler.close_connection = True
            headers.append(("Connection", "close"))
        record.status = response.status
        handler.send_response_only(response.status, response.reason)
        for name, value in headers:
            handler.send_header(name, value)
        handler.end_headers()
        if not has_body:
            self._finish_upstream(handler, response)
            return
        limit = fault.drop_after if drop and fault.drop_after is not None else None
        self._pass_body(handler, record, response, fault.rate, limit)
        if limit is not None:
            record.dropped = True
            handler.close_upstream()
            self._cut(handler, fault.reset)
        else:
            self._finish_upstream(handler, response)

    @staticmethod
    def _finish_upstream(handler: _Handler, response: http.client.HTTPResponse) -> None:
        """Keep the origin connection for the next request if the response was read to its end."""
        # read1() returns the last bytes without marking the response done: read() does.
        if not response.will_close and response.read(1) == b"" and response.isclosed():
            return
        handler.close_upstream()

    def _pass_body(
        self,
        handler: _Handler,
        record: RequestRecord,
        response: http.client.HTTPResponse,
        rate: float | None,
        limit: int | None,
    ) -> None:
        """Copy the origin's body to the client piece by piece, at ``rate``, up to ``limit`` bytes."""
        piece = PIECE if rate is None else max(1, min(PIECE, int(rate / 20)))
        began = time.monotonic()
        sent = 0
        while limit is None or sent < limit:
            want = piece if limit is None else min(piece, limit - sent)
            if rate is not None:
                # Send this piece once the rate allows it: a steady flow, not bursts.
                due = began + (sent + want) / rate
                if (pause := due - time.monotonic()) > 0 and self._stopping.wait(pause):
                    raise ConnectionAbortedError("the proxy is stopping")
            try:
                chunk = response.read1(want)
            except (OSError, http.client.HTTPException) as error:
                raise _UpstreamBroken() from error
            if not chunk:
                break
            self._write(handler, record, chunk)
            sent += len(chunk)

    def _cut(self, handler: _Handler, reset: bool) -> None:
        """End the client's connection mid-body, once what was written has reached it (so that it
        gets exactly ``drop_after`` bytes): by a TCP RST if ``reset``, else by a FIN."""
        connection = handler.connection
        handler.close_connection = True
        deadline = time.monotonic() + 2
        while _unsent(connection) and time.monotonic() < deadline:
            time.sleep(0.005)
        if reset:
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            # close() would wait for rfile and wfile to be closed too (socketserver does that later);
            # the detached socket object is left with no descriptor, so nothing can use it again.
            os.close(connection.detach())
        else:
            connection.shutdown(socket.SHUT_RDWR)


def _unsent(connection: socket.socket) -> int:
    """Bytes written to ``connection`` that its peer has not yet acknowledged (Linux SIOCOUTQ)."""
    try:
        answer = fcntl.ioctl(connection.fileno(), termios.TIOCOUTQ, struct.pack("i", 0))
    except OSError:
        return 0
    return int(struct.unpack("i", answer)[0])
