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
import socket
import threading
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Protocol, TypeGuard

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.util.retry import Retry

from .perprocess import PerProcess

logger = logging.getLogger("zipmiddleware")

# Bytes per read from an HTTP response: the pieces an entry is made of.
READ_SIZE = 256 * 1024

# The longest wait for a connection to be made (a connection being made cannot be cancelled;
# a download that ends meanwhile holds its fetch thread at most this long).
CONNECT_TIMEOUT = 10.0

# Statuses worth another try: the origin may answer later (RFC 9110 15.5.9, 6585 4, 15.6).
TRANSIENT_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


class RestartableSource(Protocol):
    """What a restartable source offers; ``size``, ``mtime`` and ``close()`` are optional."""

    def open(self, offset: int) -> Iterable[bytes]:
        """The source's bytes from ``offset`` to its end."""
        ...


def is_restartable(source: object) -> TypeGuard[RestartableSource]:
    """Whether ``source`` is restartable (a lookup: ``isinstance`` with a protocol costs ~20 us,
    which an archive of 65,000 sources would pay many times)."""
    return callable(getattr(source, "open", None))


class VersionedSource(Protocol):
    """A restartable source whose version is known before it is read, such as an S3 object
    listed with its ETag: archives of files and such sources have an exact size, validators
    and ranges, since their bytes are decided before any of them is read.

    ``name`` and ``version`` identify its bytes on every host ("s3://bucket/key" and the
    object's ETag): they key its CRC-32 in the cache and go into the archive's ETag.
    ``open(offset, stop)`` gives bytes ``[offset, stop)`` (``stop`` None: to the end) of that
    very version, or raises :class:`SourceError` (a changed source is never read).
    """

    name: str
    version: str
    size: int
    mtime: float

    def open(self, offset: int, stop: int | None = None) -> Iterable[bytes]:
        """Bytes ``[offset, stop)`` of the version ``version``."""
        ...


def is_versioned(source: object) -> TypeGuard[VersionedSource]:
    """Whether ``source`` is a :class:`VersionedSource` (its version and size known now)."""
    return (
        is_restartable(source)
        and isinstance(getattr(source, "version", None), str)
        and isinstance(getattr(source, "name", None), str)
        and isinstance(getattr(source, "size", None), int)
    )


class SourceError(Exception):
    """Reading a source failed. ``reason`` is safe to show to the downloader (no URL, host or
    path); ``transient`` says whether trying again may help."""

    def __init__(self, reason: str, *, transient: bool = True, detail: str = "") -> None:
        super().__init__(f"{reason} ({detail})" if detail else reason)
        self.reason = reason
        self.transient = transient
        self.detail = detail


def public_reason(exc: BaseException) -> str:
    """What a downloader may be told about ``exc``."""
    if isinstance(exc, SourceError):
        return exc.reason
    if isinstance(exc, (OSError, urllib3.exceptions.HTTPError)):
        return connection_failure(exc)
    return "it could not be read"


def connection_failure(exc: BaseException) -> str:
    """A network error, in words that name no host."""
    if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
        exc = exc.reason
    # urllib3 makes a refused connection (and an unknown host) a kind of connect timeout.
    refused = isinstance(exc, urllib3.exceptions.NewConnectionError)
    if not refused and isinstance(exc, (TimeoutError, urllib3.exceptions.TimeoutError)):
        return "its origin did not answer in time"
    return "the connection to its origin failed"


def described(exc: BaseException) -> str:
    """``exc`` for the log, without the URL urllib3 puts in some messages (a presigned URL's
    query is a credential)."""
    if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
        exc = exc.reason
    return f"{type(exc).__name__}: {exc}"


def _without_query(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def is_transient(exc: BaseException) -> bool:
    """Whether another attempt may succeed: network errors and the statuses above, not a
    refusal (404, 403), a changed file or a wrong size."""
    if isinstance(exc, SourceError):
        return exc.transient
    return isinstance(exc, (OSError, urllib3.exceptions.HTTPError))


# -- connections that can be shut down from another thread ---------------------------------

# The stream (a UrlStream, an s3.S3Stream) whose request this thread is sending.
requesting = threading.local()


class Tracked:
    """Mixed into urllib3's connections (and botocore's, which are urllib3's): the stream being
    opened learns its connection once it is connected and as the request is sent, so that it
    can shut the socket down while the response is awaited (a stream closed while connecting
    shuts it down as soon as it is)."""

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        _attach(self)

    def request(self, *args: Any, **kwargs: Any) -> Any:
        _attach(self)
        return super().request(*args, **kwargs)  # type: ignore[misc]


def _attach(connection: Any) -> None:
    stream = getattr(requesting, "stream", None)
    if stream is not None:
        stream.attach(connection)


class _HTTPConnection(Tracked, HTTPConnection):
    pass


class _HTTPSConnection(Tracked, HTTPSConnection):
    pass


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


def _pool_manager() -> urllib3.PoolManager:
    # 32 connections kept per host: more than the fetch threads (see fetching.py).
    manager = urllib3.PoolManager(num_pools=64, maxsize=32, block=False)
    manager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}
    return manager


# This process's connection pool (one per process: sockets are not shared across a fork).
pool_manager = PerProcess(_pool_manager)


# -- HTTP(S) --------------------------------------------------------------------------------


class UrlSource:
    """An HTTP(S) resource as a restartable source.

    >>> ZipEntry("maps/e1m1.bsp", source=UrlSource("https://cdn.example.com/e1m1.bsp", size=123456))

    ``size`` and ``mtime`` given here decide the entry's header; with a ``size`` a stored
    archive gets its exact Content-Length. Without one the size is learnt from the first
    response (Content-Length), in time for the entry's local header when the archive is
    written in one pass.

    The first response's ``ETag`` and ``Last-Modified`` are the version read. Every later
    request (a retry, a resume at an offset with ``Range``) asks for that version: with
    ``If-Match`` (a strong ETag), else ``If-Unmodified-Since``; and every later answer must
    carry the same ETag and Last-Modified, else the entry fails rather than splice two
    versions (a 412 ends it the same way). So a resume is only as safe as the origin's
    validators: nginx's ETag, for one, is the mtime in whole seconds and the size, and cannot
    tell apart two versions of the same size written within the same second. An origin that
    gives neither a strong ETag nor a Last-Modified is not resumed part-way (an entry none of
    which was sent yet is read again from its start instead); one that ignores ``Range``
    neither; one that answers with a ``Content-Encoding`` is refused (the bytes would not be
    the resource's).

    ``headers`` go with every request (an ``Authorization``, say); on a redirect to another
    host none of them do (urllib3 already drops ``Authorization`` and cookies; here every
    header given is). ``redirects`` is how many redirects are followed (0: none). ``timeout``
    is the read timeout of each attempt in seconds, and the connect timeout too up to
    :data:`CONNECT_TIMEOUT`.

    A UrlSource holds the state of the download it is in (the version read, the responses
    open): make a new one for each request in the resolver, never share one between requests.
    """

    def __init__(
        self,
        url: str,
        headers: Mapping[str, str] | None = None,
        size: int | None = None,
        mtime: float | None = None,
        *,
        timeout: float = 30.0,
        redirects: int = 5,
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
        self.redirects = redirects
        # The version read, from the first answer (None until then; "" where it had none).
        self.etag: str | None = None
        self.last_modified: str | None = None
        self._lock = threading.Lock()
        self._live: set[UrlStream] = set()  # responses open now, or being waited for

    def __repr__(self) -> str:
        return f"UrlSource({self.url!r}, size={self.size!r})"

    @property
    def strong_etag(self) -> str | None:
        return self.etag if self.etag and not self.etag.startswith("W/") else None

    @property
    def resumable(self) -> bool:
        """Whether a later request can ask for the very version read (see the class doc)."""
        return bool(self.strong_etag or self.last_modified)

    def open(self, offset: int = 0) -> UrlStream:
        """The resource's bytes from ``offset``; :class:`SourceError` for a refusal."""
        headers = {**self.headers, "Accept-Encoding": "identity"}
        if self.strong_etag:
            headers["If-Match"] = self.strong_etag
        elif self.last_modified:
            headers["If-Unmodified-Since"] = self.last_modified
        if offset:
            if not self.resumable:
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

    def learn(self, response: urllib3.BaseHTTPResponse, offset: int) -> bool:
        """Check a response against what is known of the resource; learn what is not. False
        for an answer that says there is nothing left from ``offset`` (see _nothing_left)."""
        status = response.status
        if status == 416 and self._nothing_left(response.headers, offset):
            return False
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
        encoding = headers.get("Content-Encoding", "").strip().lower()
        if encoding not in ("", "identity"):
            raise SourceError("its origin sent it encoded", transient=False, detail=encoding)
        etag, modified = headers.get("ETag", ""), headers.get("Last-Modified", "")
        if self.etag is None or self.last_modified is None:  # the first answer: the version read
            self.etag, self.last_modified = etag, modified
            if self.mtime is None and modified:
                with contextlib.suppress(TypeError, ValueError):
                    self.mtime = email.utils.parsedate_to_datetime(modified).timestamp()
        elif (etag, modified) != (self.etag, self.last_modified):  # also where one went missing
            raise SourceError(
                "it changed at its origin while it was read",
                transient=False,
                detail=f"ETag {etag!r}, Last-Modified {modified!r}",
            )
        total = _total_size(headers, offset, self.size)
        if total is not None:
            if self.size is not None and total != self.size:
                raise SourceError(
                    "its size at its origin is not the one expected",
                    transient=False,
                    detail=f"{total} bytes, not {self.size}",
                )
            self.size = total
        return True

    def _nothing_left(self, headers: Any, offset: int) -> bool:
        """A resume at ``offset`` answered 416 ``bytes */offset``: the previous answer was cut
        after its last byte (a chunked body without its end). Believed only for the version
        read: the request carried its strong ETag as If-Match, which the origin checks first."""
        total = headers.get("Content-Range", "").partition("/")[2]
        return bool(offset and self.strong_etag and total.isdigit() and int(total) == offset)


def _total_size(headers: Any, offset: int, size: int | None) -> int | None:
    """The resource's whole size from a 200's Content-Length or a 206's Content-Range, whose
    range must run from ``offset`` to the end (the size known so far, where it gives none)."""
    if not offset:
        length = headers.get("Content-Length")
        return int(length) if length and length.isdigit() else None
    content_range = headers.get("Content-Range", "")
    unit, _, spec = content_range.partition(" ")
    span, _, total = spec.partition("/")
    first, _, last = span.partition("-")
    end = int(total) if total.isdigit() else size
    if (
        unit.lower() != "bytes"
        or not (first.isdigit() and last.isdigit())
        or int(first) != offset
        or (end is not None and int(last) != end - 1)  # not to the end
    ):
        raise SourceError("its origin answered another range", transient=False, detail=content_range)
    return int(total) if total.isdigit() else None


class Interruptible:
    """One request of a source, whose socket ``close()`` shuts down from any thread: a read
    blocked on it, or a wait for the answer, ends at once, and the connection is dropped (the
    origin sees it closed), never put back in the pool half-read. What :class:`UrlStream` and
    ``s3.S3Stream`` share; they learn their connection through :class:`Tracked`, set
    ``_answer`` once it came, and call :meth:`_finish` when they are done reading."""

    def __init__(self, source: Any) -> None:
        self.source = source  # told with source._done(stream) once this stream is over
        self._lock = threading.Lock()
        self._connection: Any = None  # the socket's owner while this stream uses it
        # Its socket, as it was when the request went out: an answer with "Connection: close"
        # takes the socket from the connection (http.client), which then has none to shut down.
        self._socket: socket.socket | None = None
        self._answer: Any = None
        self._closed = False

    def attach(self, connection: Any) -> None:
        with self._lock:
            self._connection = connection
            self._socket = getattr(connection, "sock", None) or self._socket
            closed = self._closed
        if closed:
            self._shut_down()

    def _finish(self, complete: bool) -> None:
        """Read to its end: the connection goes back to the pool; else it is dropped."""
        answer = self._answer
        with self._lock:
            self._connection = self._socket = None  # no longer this stream's to shut down
            closed = self._closed
            self._closed = True
        self.source._done(self)
        if answer is not None:
            with contextlib.suppress(Exception):
                if complete and not closed:
                    self._release(answer)
                else:
                    self._drop(answer)

    def _shut_down(self) -> None:
        with self._lock:
            connection, sock, answer = self._connection, self._socket, self._answer
        sock = getattr(connection, "sock", None) or sock or self._socket_of(answer)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Stop now (see the class doc)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            answer = self._answer
        self.source._done(self)
        self._shut_down()
        if answer is not None:
            with contextlib.suppress(Exception):
                self._drop(answer)

    def _socket_of(self, answer: Any) -> socket.socket | None:
        """The socket of an answer, where the connection no longer has it."""
        return None

    def _release(self, answer: Any) -> None:
        """Give a connection read to its end back to the pool."""
        answer.release_conn()

    def _drop(self, answer: Any) -> None:
        """Close an answer and its connection."""
        answer.close()


class UrlStream(Interruptible):
    """One response of a :class:`UrlSource`: iterate for its bytes; ``close()`` from any thread
    shuts its connection down at once, also while the request is still waiting for an answer."""

    def __init__(self, source: UrlSource, offset: int) -> None:
        super().__init__(source)
        self.offset = offset
        self._empty = False  # the answer says nothing is left from offset

    def start(self, headers: dict[str, str]) -> None:
        source = self.source
        # Headers of the caller's go to no other host than the URL's (see UrlSource).
        private = Retry.DEFAULT_REMOVE_HEADERS_ON_REDIRECT | {name.lower() for name in source.headers}
        retries = Retry(
            total=None,
            connect=0,
            read=0,
            status=0,
            other=0,
            redirect=source.redirects,
            raise_on_redirect=True,
            remove_headers_on_redirect=private,
        )
        requesting.stream = self
        try:
            if self._closed:
                raise OSError("closed before it was sent")
            response = pool_manager().request(
                "GET",
                source.url,
                headers=headers,
                preload_content=False,
                decode_content=False,
                redirect=source.redirects > 0,
                retries=retries,
                timeout=urllib3.Timeout(connect=min(source.timeout, CONNECT_TIMEOUT), read=source.timeout),
            )
        except (OSError, urllib3.exceptions.HTTPError) as exc:
            source._done(self)
            if self._closed:
                raise SourceError("the download ended", transient=False) from None
            detail = f"{_without_query(source.url)}: {described(exc)}"
            raise SourceError(connection_failure(exc), detail=detail) from None
        finally:
            requesting.stream = None
        with self._lock:
            self._answer = response
            closed = self._closed
        if closed:  # closed while the answer was awaited, before close() could see the response
            with contextlib.suppress(Exception):
                response.close()
            raise SourceError("the download ended", transient=False)
        try:
            self._empty = not self.source.learn(response, self.offset)
        except SourceError as exc:
            self.close()
            where = _without_query(source.url) + (f": {exc.detail}" if exc.detail else "")
            raise SourceError(exc.reason, transient=exc.transient, detail=where) from None

    def __iter__(self) -> Iterator[bytes]:
        response = self._answer
        assert response is not None
        complete = False  # read to its end: its connection may serve another request
        try:
            while not self._empty:  # (a 416's body is not read: its connection is dropped)
                data = response.read(READ_SIZE)
                if not data:
                    complete = True
                    break
                yield data
        except (OSError, urllib3.exceptions.HTTPError) as exc:
            if self._closed:
                raise SourceError("the download ended", transient=False) from None
            detail = f"{_without_query(self.source.url)}: {described(exc)}"
            raise SourceError(connection_failure(exc), detail=detail) from None
        finally:
            self._finish(complete)
