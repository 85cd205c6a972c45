"""Drop a client that stops reading, so that it cannot hold a server thread for ever.

Why: under gunicorn's sync and gthread workers a download holds one thread for as long as its
body is being sent, and the thread sends with blocking calls. A client that stops reading (a
stalled tab, a phone that went away, an attacker) leaves the thread blocked in ``send()`` with
nothing to end it: gunicorn's ``timeout`` only watches the worker's heartbeat (which a gthread
worker keeps beating), and TCP keeps a zero window open for as long as the peer answers probes.
A few dozen such clients take every thread, and every other request waits.

How: a timeout on the client's own socket, which the server hands to the app in the environ
(``gunicorn.socket``; ``werkzeug.socket`` under werkzeug's development server), so that a send
that makes no progress for ``stall_timeout`` seconds fails, the server aborts the connection and
the thread is free again. A slow client that keeps taking bytes is not cut: the timeout counts
from the last progress, never the whole download. Two mechanisms, because one does not cover
every way the body is sent:

* ``SO_SNDTIMEO``, the kernel's send timeout, for bodies the server writes with
  ``socket.sendall`` (ZIPs, ranges, everything but a full direct file): each ``send()`` gives up
  with ``EAGAIN`` once it could hand no byte to the kernel for that long, and a partial send
  starts the count again. The socket stays blocking, so the server sees no other change.
* The socket's own timeout (``socket.settimeout``) for a body that is the server's
  ``wsgi.file_wrapper`` (gunicorn sends it with ``socket.sendfile``) and for TLS sockets: on a
  blocking socket, Python's ``socket.sendfile`` answers ``EAGAIN`` by waiting for the socket to
  become writable without a limit, and ``ssl.SSLSocket`` retries the write, so ``SO_SNDTIMEO``
  alone would never end them. With a timeout, each wait for writability is limited instead.
  The kernel reports a TCP socket writable only once a third of its send buffer is free, so on
  this path a client must take that much per ``stall_timeout`` (the rule nginx's
  ``send_timeout`` follows too).

Left alone: servers that expose no client socket (waitress, ASGI servers running WSGI apps),
green sockets of async workers (gevent, eventlet; not ``socket.socket``), HTTP/2 (the socket
is shared by every stream; gunicorn limits a stream's flow-control waits by its ``timeout``)
and platforms other than POSIX ones. There the server's own timeouts are all there is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import struct
from collections.abc import Callable, Iterable, Iterator

from .types import WSGIEnvironment

logger = logging.getLogger("zipmiddleware")

# Where WSGI servers put the client's socket: gunicorn (sync and gthread workers) and
# werkzeug's development server.
SOCKET_KEYS = ("gunicorn.socket", "werkzeug.socket")

# struct timeval {time_t tv_sec; suseconds_t tv_usec;}: two C longs on Linux and 64-bit BSDs.
TIMEVAL = "@ll"


def client_socket(environ: WSGIEnvironment) -> socket.socket | None:
    """The client's socket if the server exposes a real one (gunicorn, werkzeug), else None."""
    for key in SOCKET_KEYS:
        sock = environ.get(key)
        if isinstance(sock, socket.socket):
            return sock
    return None


def limit_stalls(environ: WSGIEnvironment, body: Iterable[bytes], seconds: float) -> Iterable[bytes]:
    """Make every send of ``body`` to this client fail after ``seconds`` without progress.

    Call it with the body a download response returns, before the server sends anything
    (servers send the headers with the first body chunk). Returns ``body`` itself, or a wrapper
    whose ``close()`` puts the socket's previous timeout back, so that a kept-alive connection
    reaches the next request (which may be the wrapped app's) as it was. A body that is the
    server's ``wsgi.file_wrapper`` is returned as it is, since wrapping it would cost gunicorn's
    sendfile; its socket timeout is cleared by gunicorn itself, which sets every kept-alive
    socket blocking again before it reads the next request (the sync worker closes them).
    ``seconds`` 0 turns it off.
    """
    if seconds <= 0 or os.name != "posix":
        return body
    sock = client_socket(environ)
    if sock is None or str(environ.get("SERVER_PROTOCOL", "")).startswith("HTTP/2"):
        return body
    try:
        previous = sock.gettimeout()
        if previous == 0:  # a non-blocking socket is a server design we do not know: leave it
            return body
        file_wrapper = environ.get("wsgi.file_wrapper")
        sent_by_sendfile = isinstance(file_wrapper, type) and isinstance(body, file_wrapper)
        if sent_by_sendfile or isinstance(sock, ssl.SSLSocket) or previous is not None:
            sock.settimeout(seconds if previous is None else min(previous, seconds))
            if sent_by_sendfile:
                return body
            return RestoreOnClose(body, lambda: sock.settimeout(previous))
        before = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.calcsize(TIMEVAL))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval(seconds))
    except OSError:  # the client is already gone, or the socket refuses: nothing to protect
        logger.debug("could not set a send timeout on the client socket", exc_info=True)
        return body
    return RestoreOnClose(body, lambda: sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, before))


def timeval(seconds: float) -> bytes:
    """``seconds`` as a ``struct timeval`` for ``SO_SNDTIMEO``."""
    whole = int(seconds)
    return struct.pack(TIMEVAL, whole, round((seconds - whole) * 1_000_000))


class RestoreOnClose:
    """``body``, whose ``close()`` also runs ``restore`` (after ``body.close()``, whatever it raises).

    Iterating hands out ``body``'s own iterator, so the server's loop costs nothing more.
    """

    __slots__ = ("body", "restore")

    def __init__(self, body: Iterable[bytes], restore: Callable[[], None]) -> None:
        self.body = body
        self.restore = restore

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.body)

    def close(self) -> None:
        try:
            close = getattr(self.body, "close", None)
            if close is not None:
                close()
        finally:
            # The socket may be closed by now (an aborted download): nothing left to restore.
            with contextlib.suppress(OSError):
                self.restore()
