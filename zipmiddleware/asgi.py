"""ZipMiddleware for ASGI apps (Starlette, FastAPI, Quart, Django's ASGI mode): the same
settings, resolvers, archives and promises as the WSGI one, served from an event loop.

::

    from zipmiddleware.asgi import ZipMiddleware

    app = ZipMiddleware(app, routes={"/files/<path:subpath>": {"resolver": "directory",
                                                                "root": "/srv/games"}})
    # Starlette / FastAPI: app.add_middleware(ZipMiddleware, routes=..., roots=...)

Everything between the request and the bytes is the WSGI door's own code (:mod:`.core`):
the request is seen as a WSGI environ built from the ASGI scope, so routes, resolvers'
request objects, planning, layouts, ranges and validators are the same, and so are the
bytes. What this module adds is how the work meets the event loop:

* A resolver that is a coroutine function is awaited; any other is called in a worker
  thread, together with the planning, which reads the file system.
* A download's body is made in a worker thread of its own (file reads, CRC-32s,
  compression), at most :data:`DOWNLOAD_THREADS` at once per process, and handed to the
  loop :data:`BUFFERED_CHUNKS` chunks ahead at most: the thread waits while the client
  is slower, so a download holds a few chunks of memory, never more.
* The client going away (``http.disconnect``, or a send that fails) stops the body at its
  next chunk, and the thread closes it, as a WSGI server would; cold CRC-32 work the
  request waits for stops too. A client that takes nothing for ``stall_timeout`` seconds
  (no piece of :data:`STALL_PIECE` bytes goes out) is dropped.
* A body that fails part-way ends the response without completing it: the server closes
  the connection, and the client sees a failed download, never a short one.

Direct files are sent in chunks from the descriptor the planner checked. The
``http.response.pathsend`` extension is not used: a server opens its path later, after
``send`` returns (granian does), so the file it sends could be another one than the one
checked, a symlink race away from leaving the configured roots.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any
from urllib.parse import unquote_to_bytes

import anyio
import anyio.to_thread
from werkzeug.wrappers import Request, Response

from .checksums import PRESENCE_KEY
from .closing import close_all
from .core import Downloads, Ready, is_coroutine_function
from .errors import StreamError
from .events import CLIENT_GONE, COMPLETE, Report, Watched
from .routing import Match
from .types import WSGIEnvironment

__all__ = ["BUFFERED_CHUNKS", "DOWNLOAD_THREADS", "STALL_PIECE", "ZipMiddleware", "wsgi_environ"]

logger = logging.getLogger("zipmiddleware")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Download bodies made at once by one process; more wait for a free thread.
DOWNLOAD_THREADS = 64
# Chunks a download's thread may make ahead of what the client has taken.
BUFFERED_CHUNKS = 2
# What a client must take per stall_timeout (after what the server and the kernel buffer).
STALL_PIECE = 256 * 1024


class ZipMiddleware(Downloads):
    """Serve configured download routes of an ASGI 3 app as a direct file or a streamed ZIP.

    Requests that match no route, and every other kind of scope (lifespan, websocket), go
    to ``app`` untouched. The settings are the WSGI middleware's: keyword arguments,
    :meth:`from_config` for a TOML file, :meth:`from_settings`.
    """

    _threads: anyio.CapacityLimiter | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        environ = wsgi_environ(scope)
        match = self.routes.match(environ)
        if match is None:
            await self.app(scope, receive, send)
            return
        download = Download(self, environ, match, send)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(download.watch, receive, tasks.cancel_scope)
            await download.run()
            tasks.cancel_scope.cancel()  # the watch on the client is no longer needed

    @property
    def threads(self) -> anyio.CapacityLimiter:
        """The worker threads download bodies are made in (made when first needed, in the loop)."""
        if self._threads is None:
            self._threads = anyio.CapacityLimiter(DOWNLOAD_THREADS)
        return self._threads


class Download:
    """One request to a download route, from the resolver to the body's last byte."""

    def __init__(self, middleware: ZipMiddleware, environ: WSGIEnvironment, match: Match, send: Send) -> None:
        self.middleware = middleware
        self.environ = environ
        self.match = match
        self.send = send
        self.started = time.monotonic()
        settings = middleware.settings
        self.report = Report(settings.on_entry, settings.on_download, middleware.metrics)
        self.gone = threading.Event()  # the client went away, or was dropped
        environ[PRESENCE_KEY] = lambda: not self.gone.is_set()
        self.sent = 0  # body bytes handed to the server

    async def watch(self, receive: Receive, scope: anyio.CancelScope) -> None:
        """Wait for the client to go away; then stop everything this request does."""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.gone.set()
                scope.cancel()
                return

    async def run(self) -> None:
        body, status, headers = await self._ready()
        code = int(status.split(" ", 1)[0])
        streamed = code in (200, 206) and self.environ["REQUEST_METHOD"] != "HEAD"
        if not streamed:  # an answer without a download body: small, and in memory
            try:
                await self._start(code, headers)
                await self.send({"type": "http.response.body", "body": b"".join(body)})
            finally:
                close_all([body], "a response")
            return
        try:
            await self._start(code, headers)
        except BaseException:
            close_all([body])
            raise
        length = next((int(value) for name, value in headers if name.lower() == "content-length"), None)
        if await self._stream(body) and (length is None or self.sent == length):
            await self.send({"type": "http.response.body", "body": b"", "more_body": False})
        # Else the response stays incomplete: the server closes the connection.

    async def _ready(self) -> Ready:
        """The response, its first chunk made: all of it in a worker thread but an
        asynchronous resolver, which is awaited here."""
        middleware, environ, match = self.middleware, self.environ, self.match

        def prepare(response: Response | None, answer: object = None) -> Ready:
            if response is None:
                response = middleware.answer(answer, environ, match, None, self.report)
            produced = lambda: self.sent  # noqa: E731
            return middleware.ready(response, environ, match, self.report, self.started, produced)

        if not is_coroutine_function(match.resolver):  # called in the worker thread with the rest
            return await self._in_thread(
                lambda: prepare(middleware.respond(environ, match, None, self.report))
            )
        refused = middleware.refuse_method(environ)
        if refused is not None:  # a text response: nothing to read
            return prepare(refused)
        try:
            answer = await match.resolver(Request(environ), **match.args)
        except Exception:
            failed = middleware.resolver_failed(environ, match)
            return await self._in_thread(lambda: prepare(failed))
        return await self._in_thread(lambda: prepare(None, answer))

    @staticmethod
    async def _in_thread(make: Callable[[], Ready]) -> Ready:
        """``make()`` in a worker thread; if this request is cancelled meanwhile (the client
        went away), the body it made is closed when it is done."""
        made: list[Ready] = []

        def keep() -> Ready:
            made.append(make())
            return made[0]

        try:
            return await anyio.to_thread.run_sync(keep)
        except BaseException:
            if made:
                close_all([made[0][0]])
            raise

    async def _start(self, code: int, headers: list[tuple[str, str]]) -> None:
        await self.send(
            {
                "type": "http.response.start",
                "status": code,
                "headers": [
                    (name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers
                ],
            }
        )

    async def _stream(self, body: Iterable[bytes]) -> bool:
        """Send ``body``, made in a worker thread a few chunks ahead; whether it all went out."""
        handoff = Handoff(BUFFERED_CHUNKS)
        complete = False
        running = False

        def produce() -> None:
            nonlocal complete, running
            running = True
            try:
                for chunk in body:
                    if self.gone.is_set() or (chunk and not handoff.put(chunk)):
                        return  # the client is gone or was dropped
                complete = True
            except Exception as exc:
                # Bodies log their own failures (StreamError); anything else is logged here.
                if not self.gone.is_set() and not isinstance(exc, StreamError):
                    logger.exception("download of %s %s failed", self.match.rule, self.match.args)
            finally:
                handoff.end()
                # Closed here, in the thread that made its chunks, once the loop has sent them
                # (or given up): what a download reports (on_download, metrics) is what went out.
                handoff.wait_closed()
                if not handoff.drained and isinstance(body, Watched) and body.outcome == COMPLETE:
                    body.outcome = CLIENT_GONE  # all made, not all sent
                close_all([body])

        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(self._run_in_thread, produce)
                try:
                    await self._send_chunks(handoff)
                finally:
                    handoff.close()  # a thread waiting for room stops
        finally:
            if not running:  # cancelled before a thread was free: nothing made, closed here
                close_all([body])
        return complete and handoff.drained

    async def _send_chunks(self, handoff: Handoff) -> None:
        stall = self.middleware.settings.stall_timeout or None
        async for chunk in handoff:
            try:
                # In pieces, each with its own time: the stall timeout counts from the last
                # progress the app can see, whatever chunk_size is.
                for start in range(0, len(chunk), STALL_PIECE):
                    piece = chunk if len(chunk) <= STALL_PIECE else chunk[start : start + STALL_PIECE]
                    with anyio.fail_after(stall):
                        await self.send({"type": "http.response.body", "body": piece, "more_body": True})
            except TimeoutError:
                logger.info(
                    "%s %s: the client took nothing for %s s; dropped",
                    self.match.rule,
                    self.match.args,
                    stall,
                )
                self.gone.set()
                return
            except OSError:  # ASGI 2.4: a send to a client that is gone fails
                self.gone.set()
                return
            self.sent += len(chunk)

    async def _run_in_thread(self, work: Callable[[], None]) -> None:
        await anyio.to_thread.run_sync(work, limiter=self.middleware.threads)


class Handoff:
    """Chunks from a worker thread to the event loop, at most ``depth`` of them waiting.

    The thread hands a chunk over without waiting for the loop (a callback scheduled in
    it), so it reads the next chunk while the loop sends this one; it waits only when
    ``depth`` chunks are already waiting. Works under asyncio and trio.
    """

    def __init__(self, depth: int) -> None:
        self._depth = depth
        self._room = threading.Semaphore(depth)
        self._closed = False
        self.drained = False
        self._done = threading.Event()
        self._chunks: deque[bytes | None] = deque()
        self._ready = anyio.Event()
        self._soon = _call_soon()

    # -- the worker thread ---------------------------------------------------------------

    def put(self, chunk: bytes) -> bool:
        """Hand ``chunk`` over (waiting for room); False once the loop takes no more."""
        self._room.acquire()
        if self._closed:
            return False
        self._soon(self._arrive, chunk)
        return True

    def end(self) -> None:
        """No more chunks (made, or stopped)."""
        with contextlib.suppress(RuntimeError):  # the loop is gone (shutting down)
            self._soon(self._arrive, None)

    # -- the event loop --------------------------------------------------------------------

    def _arrive(self, chunk: bytes | None) -> None:
        self._chunks.append(chunk)
        self._ready.set()

    def __aiter__(self) -> Handoff:
        return self

    async def __anext__(self) -> bytes:
        while not self._chunks:
            await self._ready.wait()
            self._ready = anyio.Event()
        chunk = self._chunks.popleft()
        if chunk is None:
            self.drained = True  # every chunk was taken (and, by the loop taking them, sent)
            raise StopAsyncIteration
        self._room.release()
        return chunk

    def close(self) -> None:
        """Take no more: a thread waiting for room, or coming to wait, stops at once."""
        self._closed = True
        self._room.release(self._depth + 1)
        self._done.set()

    def wait_closed(self) -> None:
        """(The worker thread.) Wait until the loop has taken or dropped every chunk."""
        self._done.wait()


def _call_soon() -> Callable[..., object]:
    """The running event loop's thread-safe "call this soon" (asyncio's or trio's)."""
    try:
        return asyncio.get_running_loop().call_soon_threadsafe
    except RuntimeError:  # not asyncio: trio is the other loop anyio runs on
        import trio

        return trio.lowlevel.current_trio_token().run_sync_soon


def wsgi_environ(scope: Scope) -> WSGIEnvironment:
    """The WSGI environ a WSGI server would give for the request of ``scope``.

    ``PATH_INFO`` is the undecoded path's bytes (``raw_path``, percent-decoded) as
    latin-1, as WSGI servers give it, less ``root_path``, which becomes ``SCRIPT_NAME``.
    Headers become ``HTTP_*`` keys; a name with an underscore is dropped (as gunicorn and
    nginx do: it could pass for a dash). ``REMOTE_USER`` is the scope's ``user`` when it is
    authenticated (Starlette's AuthenticationMiddleware puts one there), and the scope
    itself is under ``asgi.scope`` for resolvers that want more.
    """
    root = scope.get("root_path", "").encode("utf-8", "surrogateescape")
    raw = scope.get("raw_path")
    path = unquote_to_bytes(raw) if raw else scope["path"].encode("utf-8", "surrogateescape")
    if root and path.startswith(root):
        path = path[len(root) :]
    server = scope.get("server") or ("localhost", 80)
    client = scope.get("client")
    environ: WSGIEnvironment = {
        "REQUEST_METHOD": scope.get("method", "GET").upper(),
        "SCRIPT_NAME": root.decode("latin-1"),
        "PATH_INFO": path.decode("latin-1"),
        "QUERY_STRING": scope.get("query_string", b"").decode("latin-1"),
        "SERVER_NAME": str(server[0]),
        "SERVER_PORT": str(server[1] if server[1] is not None else 80),
        "SERVER_PROTOCOL": f"HTTP/{scope.get('http_version', '1.1')}",
        "REMOTE_ADDR": client[0] if client else "",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scope.get("scheme", "http"),
        "wsgi.input": io.BytesIO(),  # downloads read no request body
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        "asgi.scope": scope,
    }
    for raw_name, raw_value in scope.get("headers", ()):
        name = raw_name.decode("latin-1").lower()
        if "_" in name:
            continue
        value = raw_value.decode("latin-1")
        if name == "content-type":
            key = "CONTENT_TYPE"
        elif name == "content-length":
            key = "CONTENT_LENGTH"
        else:
            key = "HTTP_" + name.upper().replace("-", "_")
        environ[key] = f"{environ[key]},{value}" if key in environ else value
    user = remote_user(scope.get("user"))
    if user:
        environ["REMOTE_USER"] = user
    return environ


def remote_user(user: object) -> str | None:
    """The name of the scope's ``user``: a string, or an authenticated user object's
    ``username``, ``display_name`` or ``identity`` (Starlette's ``BaseUser``)."""
    if isinstance(user, str):
        return user or None
    if user is None or not getattr(user, "is_authenticated", False):
        return None
    for field in ("username", "display_name", "identity"):
        value = getattr(user, field, None)
        if isinstance(value, str) and value:
            return value
    return None
