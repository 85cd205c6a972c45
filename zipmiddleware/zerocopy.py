"""File data straight from the page cache to the client's socket (``sendfile``), between the
chunks the server writes.

Why: a stored ZIP is mostly file data, and copying it through Python (``read()`` into a
buffer, then ``send()`` out of it) costs two copies per byte and halves the throughput of a
plain ``sendfile`` download. nginx's mod_zip sends entry data with ``sendfile``; so do we,
where the server lets us.

How: gunicorn's sync and gthread workers hand the app the client's socket
(``environ["gunicorn.socket"]``) and write each body chunk with ``sendall`` before they ask
the body for the next one. So while the body is computing its next chunk, everything it
yielded before is on the socket, and the body may put bytes on the socket itself. It does
so only when that can be *shown*, at the moment of sending, from the server's own
response object (the owner of ``start_response``): its headers are out, it is not chunked,
its Content-Length is the body's, and the number of body bytes it has written equals the
number the body has produced (everything yielded, plus everything sent here). Any
middleware between the server and us that buffers, re-chunks or changes the body breaks
that equality, and the data then goes the ordinary way, through the server. The bytes sent
here are added to the server's count, so its access log and Content-Length bookkeeping
stay right.

Not used (the ordinary path instead): other servers, TLS in the worker (the socket is an
``ssl.SSLSocket``), gunicorn's ``--no-sendfile``, HTTP/2, green sockets (gevent,
eventlet: not the standard library's socket class), platforms without ``os.sendfile``, and
``zero_copy = false``.
"""

from __future__ import annotations

import errno
import os
import select
import socket
from collections.abc import Callable
from typing import Any

from .types import WSGIEnvironment

# One sendfile() call sends at most this much: a stall or a client gone is noticed between
# calls, and a file that changed, between blocks (see the engine).
SEND_BLOCK = 8 * 1024 * 1024


class ZeroCopy:
    """Sends parts of open files to one response's client, while the server's count agrees."""

    __slots__ = ("sock", "response", "length")

    def __init__(self, sock: socket.socket, response: Any) -> None:
        self.sock = sock
        self.response = response  # gunicorn.http.wsgi.Response
        self.length: int | None = None  # the body's length, set by the body

    @classmethod
    def offered(cls, environ: WSGIEnvironment, start_response: Callable[..., Any]) -> ZeroCopy | None:
        """A sender for this request if the server is one whose writes we can follow, else None."""
        if not hasattr(os, "sendfile"):
            return None
        sock = environ.get("gunicorn.socket")
        response = getattr(start_response, "__self__", None)
        # Exact types: a subclass (an SSL socket, a green socket, another response class)
        # may write differently.
        if not isinstance(sock, socket.socket) or type(sock) is not socket.socket:  # noqa: E721
            return None
        client: socket.socket = sock
        if type(response).__name__ != "Response":
            return None
        if type(response).__module__ != "gunicorn.http.wsgi" or getattr(response, "sock", None) is not client:
            return None
        cfg = getattr(response, "cfg", None)
        if cfg is None or getattr(cfg, "is_ssl", True) or getattr(cfg, "sendfile", None) is False:
            return None
        if not str(environ.get("SERVER_PROTOCOL", "")).startswith("HTTP/1."):
            return None
        return cls(client, response)

    def ready(self, produced: int) -> bool:
        """Whether the server has written exactly the ``produced`` bytes of this body, so that
        what is sent now comes right after them."""
        response = self.response
        return bool(
            self.length is not None
            and response.headers_sent
            and not response.chunked
            and not getattr(response, "_omits_body", False)
            and response.response_length == self.length
            and response.sent == produced
        )

    def send(self, fd: int, offset: int, count: int) -> int:
        """Send ``count`` bytes of ``fd`` from ``offset``; returns how many the file had (fewer
        only when it ended early). A client that stalls longer than the socket's send timeout
        (see connection.py) raises ``TimeoutError``; one that went away, ``BrokenPipeError``
        or ``ConnectionResetError``, as the server's own writes would."""
        sock_fd = self.sock.fileno()
        timeout = self.sock.gettimeout()  # None: blocking, limited by SO_SNDTIMEO if set
        done = 0
        try:
            while done < count:
                try:
                    sent = os.sendfile(sock_fd, fd, offset + done, min(count - done, SEND_BLOCK))
                except BlockingIOError:
                    if timeout is None or not _writable(sock_fd, timeout):
                        raise TimeoutError(errno.ETIMEDOUT, "the client took no bytes in time") from None
                    continue
                if sent == 0:  # end of file
                    break
                done += sent
        finally:
            self.response.sent += done
        return done


def _writable(fd: int, timeout: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return bool(poller.poll(timeout * 1000))
