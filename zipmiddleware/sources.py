"""Sources that can be read again from any offset: files kept elsewhere, fetched over HTTP(S).

A ZIP entry's ``source`` may be bytes, any iterable of bytes (read once, in order), or a
*restartable* source: an object with ``open(offset)`` that returns an iterable of the bytes
from ``offset`` to the end (closed with its ``close()`` if it has one). A restartable source
lets the archive fetch entries ahead of the one being sent (``prefetch``) and recover from a
failure in the middle of an entry (``retries``) by opening it again where it failed; see
:mod:`.fetching`. Its ``size`` and ``mtime`` (if it has them) stand for the entry's when
the :class:`~zipmiddleware.ZipEntry` gives none.

A restart must never splice two versions of a file: a source that cannot prove that what it
reads from ``offset`` belongs to what it read before raises :class:`SourceError` instead.

:class:`UrlSource` fetches with urllib3: a connection pool per process, thread-safe, that
streams a response in pieces and whose socket can be shut down from another thread (which is
how a download that ends stops every fetch at once). It is the HTTP library most Python
deployments already have (requests and boto3 are built on it).
"""

from __future__ import annotations

import contextlib
import email.utils
import logging
import os
import socket
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Protocol, runtime_checkable

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

logger = logging.getLogger("zipmiddleware")

# Bytes per read from an HTTP response: the pieces an entry is made of.
READ_SIZE = 256 * 1024

# Statuses worth another try: the origin may answer later (RFC 9110 15.5.9, 6585 4, 15.6).
TRANSIENT_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


@runtime_checkable
class RestartableSource(Protocol):
    """What a restartable source offers; ``size``, ``mtime`` and ``close()`` are optional."""

    def open(self, offset: int) -> Iterable[bytes]:
        """The source's bytes from ``offset`` to its end."""
        ...


class SourceError(Exception):
    """Reading a source failed. ``reason`` is safe to show to the downloader (no URL, host or
    path); ``transient`` says whether trying again may help."""

    def __init__(self, reason: str, *, transient: bool = True, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.transient = transient


def public_reason(exc: BaseException) -> str:
    """What a downloader may be told about ``exc``."""
    if isinstance(exc, SourceError):
        return exc.reason
    if isinstance(exc, (OSError, urllib3.exceptions.HTTPError)):
        return "the connection to its origin failed"
    return "it could not be read"


def is_transient(exc: BaseException) -> bool:
    """Whether another attempt may succeed: network errors and the statuses above, not a
    refusal (404, 403), a changed file or a wrong size."""
    if isinstance(exc, SourceError):
        return exc.transient
    return isinstance(exc, (OSError, urllib3.exceptions.HTTPError))


# -- connections that can be shut down from another thread ---------------------------------

_requesting = threading.local()  # the UrlStream whose request this thread is sending


class _Tracked:
    """Mixed into urllib3's connections: the stream being opened learns its connection as the
    request is sent, so that it can shut the socket down while the response is awaited."""

    def request(self, *args: Any, **kwargs: Any) -> Any:
        stream = getattr(_requesting, "stream", None)
        if stream is not None:
            stream.attach(self)
        return super().request(*args, **kwargs)  # type: ignore[misc]


class _HTTPConnection(_Tracked, HTTPConnection):
    pass


class _HTTPSConnection(_Tracked, HTTPSConnection):
    pass


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


_pool_lock = threading.Lock()
_pools: dict[int, urllib3.PoolManager] = {}


def pool_manager() -> urllib3.PoolManager:
    """This process's connection pool (one per process: sockets are not shared across a fork)."""
    pid = os.getpid()
    manager = _pools.get(pid)
    if manager is None:
        with _pool_lock:
            manager = _pools.get(pid)
            if manager is None:
                _pools.clear()
                # 32 connections kept per host: more than the fetch threads (see fetching.py).
                manager = urllib3.PoolManager(num_pools=64, maxsize=32, block=False)
                manager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}
                _pools[pid] = manager
    return manager


# -- HTTP(S) --------------------------------------------------------------------------------


class UrlSource:
    """An HTTP(S) resource as a restartable source.

    >>> ZipEntry("maps/e1m1.bsp", source=UrlSource("https://cdn.example.com/e1m1.bsp", size=123456))

    ``size`` and ``mtime`` given here decide the entry's header; with a ``size`` a stored
    archive gets its exact Content-Length. Without one the size is learnt from the first
    response (Content-Length), in time for the entry's local header when the archive is
    written in one pass. The first response's ``ETag`` (a strong one), else its
    ``Last-Modified``, becomes the validator: every later request (a retry, a resume at an
    offset with ``Range``) sends it as ``If-Match`` (else ``If-Unmodified-Since``), so a
    resource that changed answers 412 and the entry fails rather than splicing two versions.
    An origin that gives no validator cannot be resumed part-way; one that ignores ``Range``
    neither. ``headers`` go with every request (an ``Authorization``, say); ``timeout`` is
    the connect and the read timeout in seconds.
    """

    def __init__(
        self,
        url: str,
        headers: Mapping[str, str] | None = None,
        size: int | None = None,
        mtime: float | None = None,
        *,
        timeout: float = 30.0,
    ) -> None:
        if not url.lower().startswith(("http://", "https://")):
            raise ValueError(f"UrlSource needs an http:// or https:// URL, got {url!r}")
        if size is not None and size < 0:
            raise ValueError("UrlSource size must be >= 0")
        self.url = url
        self.headers = dict(headers or {})
        self.size = size
        self.mtime = mtime
        self.timeout = timeout
        self.etag: str | None = None
        self.last_modified: str | None = None
        self._lock = threading.Lock()
        self._live: set[UrlStream] = set()  # responses open now, or being waited for

    def __repr__(self) -> str:
        return f"UrlSource({self.url!r}, size={self.size!r})"

    @property
    def validator(self) -> str | None:
        """What proves a later response is of the same version: the ETag, else Last-Modified."""
        return self.etag or self.last_modified

    def open(self, offset: int = 0) -> UrlStream:
        """The resource's bytes from ``offset``; :class:`SourceError` for a refusal."""
        headers = {**self.headers, "Accept-Encoding": "identity"}
        if self.etag:
            headers["If-Match"] = self.etag
        elif self.last_modified:
            headers["If-Unmodified-Since"] = self.last_modified
        if offset:
            if self.validator is None:
                raise SourceError(
                    "its origin gives no ETag or Last-Modified, so it cannot be resumed safely",
                    transient=False,
                )
            headers["Range"] = f"bytes={offset}-"
        stream = UrlStream(self, offset)
        with self._lock:
            self._live.add(stream)
        stream.start(headers)
        return stream

    def close(self) -> None:
        """Stop every request of this source now, also one still waiting for its answer (the
        download it belongs to has ended). A UrlSource belongs to one download: make it in the
        resolver."""
        with self._lock:
            live, self._live = list(self._live), set()
        for stream in live:
            stream.close()

    def _done(self, stream: UrlStream) -> None:
        with self._lock:
            self._live.discard(stream)

    def learn(self, response: urllib3.BaseHTTPResponse, offset: int) -> None:
        """Check a response against what is known of the resource; learn what is not."""
        status = response.status
        if status == 412:
            raise SourceError("it changed at its origin while it was read", transient=False)
        if status in (404, 410):
            raise SourceError(f"not found at its origin (HTTP {status})", transient=False)
        if status in (401, 403):
            raise SourceError(f"access denied by its origin (HTTP {status})", transient=False)
        if status in TRANSIENT_STATUSES:
            raise SourceError(f"its origin is unavailable (HTTP {status})")
        if offset and status == 200:
            raise SourceError("its origin does not resume (no Range support)", transient=False)
        if status != (206 if offset else 200):
            raise SourceError(f"its origin answered HTTP {status}", transient=False)
        headers = response.headers
        etag = headers.get("ETag")
        if etag and not etag.startswith("W/"):
            if self.etag is not None and etag != self.etag:
                raise SourceError("it changed at its origin while it was read", transient=False)
            self.etag = etag
        if self.last_modified is None and headers.get("Last-Modified"):
            self.last_modified = headers["Last-Modified"]
            if self.mtime is None:
                with contextlib.suppress(TypeError, ValueError):
                    self.mtime = email.utils.parsedate_to_datetime(self.last_modified).timestamp()
        total = _total_size(headers, offset)
        if total is not None:
            if self.size is not None and total != self.size:
                raise SourceError(
                    "its size at its origin is not the one expected",
                    transient=False,
                    detail=f"{total} bytes, not {self.size}",
                )
            self.size = total


def _total_size(headers: Any, offset: int) -> int | None:
    """The resource's whole size from a 200's Content-Length or a 206's Content-Range."""
    if not offset:
        length = headers.get("Content-Length")
        return int(length) if length and length.isdigit() else None
    content_range = headers.get("Content-Range", "")
    unit, _, spec = content_range.partition(" ")
    span, _, total = spec.partition("/")
    first = span.partition("-")[0]
    if unit.lower() != "bytes" or not first.isdigit() or int(first) != offset:
        raise SourceError("its origin answered another range", transient=False, detail=content_range)
    return int(total) if total.isdigit() else None


class UrlStream:
    """One response of a :class:`UrlSource`: iterate for its bytes; ``close()`` from any thread
    shuts its connection down at once, also while the request is still waiting for an answer."""

    def __init__(self, source: UrlSource, offset: int) -> None:
        self.source = source
        self.offset = offset
        self._lock = threading.Lock()
        self._connection: Any = None  # the socket's owner while this stream uses it
        self._response: urllib3.BaseHTTPResponse | None = None
        self._closed = False

    def attach(self, connection: Any) -> None:
        with self._lock:
            self._connection = connection
            closed = self._closed
        if closed:
            self._shut_down()

    def start(self, headers: dict[str, str]) -> None:
        _requesting.stream = self
        try:
            response = pool_manager().request(
                "GET",
                self.source.url,
                headers=headers,
                preload_content=False,
                decode_content=False,
                redirect=True,
                retries=urllib3.Retry(total=None, connect=0, read=0, status=0, other=0, redirect=5),
                timeout=urllib3.Timeout(connect=self.source.timeout, read=self.source.timeout),
            )
        except (OSError, urllib3.exceptions.HTTPError) as exc:
            self.source._done(self)
            if self._closed:
                raise SourceError("the download ended", transient=False) from None
            raise SourceError("the connection to its origin failed", detail=repr(exc)) from None
        finally:
            _requesting.stream = None
        with self._lock:
            self._response = response
            closed = self._closed
        if closed:  # closed while the answer was awaited, before close() could see the response
            with contextlib.suppress(Exception):
                response.close()
            raise SourceError("the download ended", transient=False)
        try:
            self.source.learn(response, self.offset)
        except SourceError:
            self.close()
            raise

    def __iter__(self) -> Iterator[bytes]:
        response = self._response
        assert response is not None
        complete = False
        try:
            while True:
                data = response.read(READ_SIZE)
                if not data:
                    complete = True
                    break
                yield data
        except (OSError, urllib3.exceptions.HTTPError) as exc:
            if self._closed:
                raise SourceError("the download ended", transient=False) from None
            raise SourceError("the connection to its origin failed", detail=repr(exc)) from None
        finally:
            self._finish(complete)

    def _finish(self, complete: bool) -> None:
        """Read to its end: the connection goes back to the pool; else it is dropped."""
        response = self._response
        with self._lock:
            self._connection = None  # no longer this stream's to shut down
            closed = self._closed
            self._closed = True
        self.source._done(self)
        if response is not None:
            with contextlib.suppress(Exception):
                if complete and not closed:
                    response.release_conn()
                else:
                    response.close()

    def _shut_down(self) -> None:
        with self._lock:
            connection = self._connection
        sock = getattr(connection, "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Stop now: a blocked read or wait for the answer fails at once; the connection is
        dropped (the origin sees it closed), never put back in the pool half-read."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            response = self._response
        self.source._done(self)
        self._shut_down()
        if response is not None:
            with contextlib.suppress(Exception):
                response.close()
