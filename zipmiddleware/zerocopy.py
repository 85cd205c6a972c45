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

import concurrent.futures
import errno
import os
import select
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

from .checksums import RunningCrc
from .connection import client_socket
from .errors import StreamError
from .perprocess import PerProcess
from .planning import FileSnapshot
from .types import WSGIEnvironment

# One sendfile() call sends at most this much: a stall or a client gone is noticed between
# calls, and a file that changed, between blocks.
SEND_BLOCK = 8 * 1024 * 1024
# A file whose CRC-32 is needed is read this much at a time into one buffer (small enough to
# stay in the CPU's cache for the CRC-32), then that block is sent from the page cache.
CRC_BLOCK = 1024 * 1024
# How far a reader thread may read a file for its CRC-32 ahead of what was sent of it.
READ_AHEAD = 2 * SEND_BLOCK


class ZeroCopy:
    """Sends parts of open files to one response's client, while the server's count agrees."""

    __slots__ = ("sock", "response", "length", "produced")

    def __init__(self, sock: socket.socket, response: Any) -> None:
        self.sock = sock
        self.response = response  # gunicorn.http.wsgi.Response
        self.length: int | None = None  # the length of the body being iterated (see counted)
        self.produced = 0  # what the body produced so far: yielded, or sent here

    @property
    def sent(self) -> int:
        """Body bytes the server and this sender have written to the client so far."""
        return int(self.response.sent)

    def counted(self, pieces: Iterator[bytes | int], length: int) -> Iterator[bytes | int]:
        """``pieces`` of a body of ``length`` bytes (before they are merged into chunks),
        counted as produced: the body this sender serves is the one iterated."""
        self.length = length
        for piece in pieces:
            self.produced += piece if isinstance(piece, int) else len(piece)
            yield piece

    @classmethod
    def offered(cls, environ: WSGIEnvironment, start_response: Callable[..., Any]) -> ZeroCopy | None:
        """A sender for this request if the server is one whose writes we can follow, else None."""
        if not hasattr(os, "sendfile"):
            return None
        sock = client_socket(environ)
        response = getattr(start_response, "__self__", None)
        # Exact types: a subclass (an SSL socket, a green socket, another response class)
        # may write differently; and the socket must be the one the server writes to.
        if sock is None or type(sock) is not socket.socket:
            return None
        client: socket.socket = sock
        if getattr(response, "sock", None) is not client:
            return None
        if (type(response).__module__, type(response).__name__) != ("gunicorn.http.wsgi", "Response"):
            return None
        cfg = getattr(response, "cfg", None)
        if cfg is None or getattr(cfg, "is_ssl", True) or getattr(cfg, "sendfile", None) is False:
            return None
        if not str(environ.get("SERVER_PROTOCOL", "")).startswith("HTTP/1."):
            return None
        return cls(client, response)

    def ready(self) -> bool:
        """Whether the server has written exactly the bytes this body produced so far, so
        that what is sent now comes right after them.

        Before the body's first byte the server has not sent the headers yet (it sends them
        with the first chunk): then they are sent now, through the server's own method, so
        that even a body's first byte can go out directly.
        """
        response = self.response
        if self.produced == 0 and not response.headers_sent and response.response_length == self.length:
            response.send_headers()
        return bool(
            self.length is not None
            and response.headers_sent
            and not response.chunked
            and not getattr(response, "_omits_body", False)
            and response.response_length == self.length
            and response.sent == self.produced
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


def send_part(
    sender: ZeroCopy,
    fd: int,
    name: str,
    file: FileSnapshot,
    start: int,
    stop: int,
    running: RunningCrc | None,
    chunk_size: int,
    ahead: bool = False,
) -> Iterator[bytes | int]:
    """Bytes ``[start, stop)`` of the open, checked ``file``, sent with sendfile by ``sender``.

    Yields ints for what it sent itself (``0`` before each block, so that everything the
    body produced before is out first: see :func:`.zipengine.merged`), and bytes
    (``chunk_size`` at a time, the ordinary way) for any part it could not send directly.

    With ``running`` the data's CRC-32 is computed too: the file is read one block at a time
    into one buffer, and each block is then sent from the page cache (one copy, not two).
    With ``ahead`` as well, that reading and CRC-32 run in a reader thread of the process
    (see :func:`crc_readers`) while this thread sends, and the result is awaited at the end.

    Exactly the checked file's bytes, or :class:`StreamError`: a file that is shorter,
    longer, or modified (size, mtime, ctime: :meth:`FileSnapshot.unchanged`) is noticed
    after the block it happened in, before anything that follows the data goes out.
    """
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, start, stop - start, os.POSIX_FADV_SEQUENTIAL)
    reader: CrcReader | None = None
    if running is not None and ahead and stop - start >= READ_AHEAD:  # else not worth a thread
        reader = CrcReader(fd, name, file, start, stop, running)
        running = None  # the reader computes it
    buffer = memoryview(bytearray(CRC_BLOCK)) if running is not None else None
    offset = start
    try:
        while offset < stop:
            yield 0
            if sender.ready():
                count = min(SEND_BLOCK if buffer is None else CRC_BLOCK, stop - offset)
                if buffer is not None and running is not None:
                    if os.preadv(fd, [buffer[:count]], offset) != count:
                        raise StreamError(f"{name!r}: shorter than its {file.size} bytes")
                    running.update(buffer[:count])
                if sender.send(fd, offset, count) != count:
                    raise StreamError(f"{name!r}: shorter than its {file.size} bytes")
                yield count
            else:
                count = min(chunk_size, stop - offset)
                data = os.pread(fd, count, offset)
                if len(data) != count:
                    raise StreamError(f"{name!r}: shorter than its {file.size} bytes")
                if running is not None:
                    running.update(data)
                yield data
            offset += count
            if reader is not None:
                reader.advance(offset)
            if offset == stop == file.size and os.pread(fd, 1, stop):
                raise StreamError(f"{name!r}: longer than its {file.size} bytes")
            if not file.unchanged(os.fstat(fd)):
                raise StreamError(f"{name!r}: modified while being read")
        if reader is not None:
            reader.result()
    finally:
        if reader is not None:
            reader.stop()  # before the caller closes fd: its number must not be reused meanwhile


class CrcReader:
    """Reads ``[start, stop)`` of an open file for its CRC-32 (into ``running``), in one of
    the process's reader threads, while the download's own thread sends the same bytes."""

    def __init__(
        self, fd: int, name: str, file: FileSnapshot, start: int, stop: int, running: RunningCrc
    ) -> None:
        self.fd, self.name, self.file = fd, name, file
        self.start, self.stop_at, self.running = start, stop, running
        self.cancelled = threading.Event()
        self.sent = start  # how far the download's thread has sent
        self.progress = threading.Condition()
        self.future = crc_readers().submit(self._read)

    def _read(self) -> None:
        buffer = memoryview(bytearray(CRC_BLOCK))
        offset, stop = self.start, self.stop_at
        while offset < stop and not self.cancelled.is_set():
            with self.progress:  # never far ahead of what was sent: a client may leave
                while offset - self.sent >= READ_AHEAD and not self.cancelled.is_set():
                    self.progress.wait()
            count = min(CRC_BLOCK, stop - offset)
            if os.preadv(self.fd, [buffer[:count]], offset) != count:
                raise StreamError(f"{self.name!r}: shorter than its {self.file.size} bytes")
            self.running.update(buffer[:count])
            offset += count

    def advance(self, sent: int) -> None:
        """The download's thread has sent up to ``sent``."""
        with self.progress:
            self.sent = sent
            self.progress.notify()

    def result(self) -> None:
        """Wait until the CRC-32 of every byte is in ``running``; the reader's error, if any."""
        self.future.result()

    def stop(self) -> None:
        """Stop reading (at the next block) and wait until the thread has let go of the file."""
        self.cancelled.set()
        with self.progress:
            self.progress.notify()
        if not self.future.cancel():
            concurrent.futures.wait([self.future])


# This process's reader threads, one per CPU.
crc_readers = PerProcess(
    lambda: concurrent.futures.ThreadPoolExecutor(max(2, os.cpu_count() or 2), "zipmiddleware-crc")
)
