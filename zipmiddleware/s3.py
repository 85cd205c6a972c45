"""Objects in S3 (or a store that speaks its API): a versioned source per object, and the
built-in ``s3`` resolver that serves an object as it is and a "folder" of keys as a ZIP.

    "/games/<path:subpath>" = { resolver = "s3", bucket = "my-games", prefix = "games/" }

:class:`S3Object` is one object as it was when it was listed: its ETag is its version, and
every request for its bytes carries that ETag as ``If-Match`` (S3 checks it before ``Range``),
so a resumed or ranged read can only ever get bytes of that very version; each answer's ETag
and length are checked too. A changed object fails with :class:`~.sources.SourceError`
("changed at its origin"), never spliced.

Clients: one boto3 client per process and per ``(endpoint_url, region_name)`` (see
:func:`s3_client`), thread-safe, made on first use and again after a fork. Credentials come
from boto3's usual chain (environment, shared files, instance or task roles). The client
makes one attempt per call: the fetcher retries a read, resuming where it broke, which
botocore cannot; timeouts: :data:`CONNECT_TIMEOUT` to connect, :data:`READ_TIMEOUT` for each
read. With an ``endpoint_url`` (MinIO, Ceph, R2, a test server) requests use path-style
addresses (``http://host/bucket/key``), which every such store serves; without one, botocore
talks to AWS its own way.

Stopping: :meth:`S3Stream.close` may be called from any thread. It shuts the stream's socket
down, so a read blocked on it, or a request waiting for its answer, ends at once; the
connection is then dropped, never put back in the pool half-read.
"""

from __future__ import annotations

import contextlib
import logging
import posixpath
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Collection, Iterator, Mapping
from datetime import datetime
from typing import Any

import boto3  # type: ignore[import-untyped]
import urllib3
from botocore.awsrequest import (  # type: ignore[import-untyped]
    AWSHTTPConnection,
    AWSHTTPConnectionPool,
    AWSHTTPSConnection,
    AWSHTTPSConnectionPool,
)
from botocore.config import Config  # type: ignore[import-untyped]
from botocore.exceptions import (  # type: ignore[import-untyped]
    BotoCoreError,
    ClientError,
    IncompleteReadError,
    NoCredentialsError,
    ResponseStreamingError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from werkzeug.wrappers import Request

from .errors import ConfigError
from .perprocess import PerProcess
from .planning import FORBIDDEN, SERVER_ERROR, Rules, SharedWork
from .resolvers import PathResolver
from .sources import (
    READ_SIZE,
    TRANSIENT_STATUSES,
    Interruptible,
    SourceError,
    Tracked,
    connection_failure,
    requesting,
)
from .targets import Failed, SourceTarget, ZipEntry, ZipTarget

logger = logging.getLogger("zipmiddleware")

CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 30.0
# Connections kept per client: more than the fetch threads (see fetching.py).
MAX_POOL_CONNECTIONS = 32
# The most objects one folder may be listed with; a larger one is refused (500, logged):
# its listing alone takes a hundred requests, and its archive would hold more entries than
# anyone downloads at once.
MAX_OBJECTS = 100_000
# How long a folder's listing is used again: a burst of requests (a download manager's several
# connections, HEAD then GET, a resume) lists it once. An object replaced meanwhile is found out
# when it is read (If-Match): that download fails, and the next one, a moment later, lists anew.
LISTING_SECONDS = 2.0
# Attempts of each metadata call of the resolver (HeadObject, a ListObjectsV2 page) that the
# store answered with a transient status (503 SlowDown...): a moment later it may not.
RESOLVE_ATTEMPTS = 3
RESOLVE_BACKOFF = 0.2

UNAVAILABLE = "Service Unavailable: the storage holding this download cannot be reached; try again later."
BAD_GATEWAY = "Bad Gateway: the storage holding this download gave an answer that cannot be used."
TOO_MANY = "Internal Server Error: this folder holds too many files to be served as one archive."

# Error codes S3 gives with the statuses that say what happened.
NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "404"})
DENIED_CODES = frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"})
TRANSIENT_CODES = frozenset(
    {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "ThrottlingException"}
)
# What a store says of an object with no type given when it was stored: better guessed from its name.
# type/subtype, of RFC 9110's token characters, without parameters.
MEDIA_TYPE = re.compile(r"[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+")
GENERIC_TYPES = frozenset({"binary/octet-stream", "application/octet-stream"})

# Bucket names: 3 to 63 lowercase letters, digits, dots and hyphens today; buckets made in
# us-east-1 before 2018 may also hold capitals and underscores, up to 255 characters.
BUCKET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,253}[A-Za-z0-9]")


# -- clients ------------------------------------------------------------------------------------


class _HTTPConnection(Tracked, AWSHTTPConnection):  # type: ignore[misc]
    pass


class _HTTPSConnection(Tracked, AWSHTTPSConnection):  # type: ignore[misc]
    pass


class _HTTPPool(AWSHTTPConnectionPool):  # type: ignore[misc]
    ConnectionCls = _HTTPConnection


class _HTTPSPool(AWSHTTPSConnectionPool):  # type: ignore[misc]
    ConnectionCls = _HTTPSConnection


def _track_connections(client: Any) -> None:
    """Have ``client``'s connections tell the stream being opened about themselves. botocore
    keeps its pool classes in one dict shared by its pool managers; were it ever laid out
    otherwise, a stream still finds its socket through the answer once the answer came."""
    session = getattr(getattr(client, "_endpoint", None), "http_session", None)
    classes = getattr(session, "_pool_classes_by_scheme", None)
    if isinstance(classes, dict):
        classes.update({"http": _HTTPPool, "https": _HTTPSPool})


def _make_client(endpoint_url: str | None, region_name: str | None) -> Any:
    config = Config(
        connect_timeout=CONNECT_TIMEOUT,
        read_timeout=READ_TIMEOUT,
        retries={"total_max_attempts": 1, "mode": "standard"},
        max_pool_connections=MAX_POOL_CONNECTIONS,
        s3={"addressing_style": "path"} if endpoint_url else None,
        user_agent_extra="zipmiddleware",
    )
    # A session of its own: boto3's default session may not be used from several threads.
    session = boto3.session.Session()
    client = session.client("s3", endpoint_url=endpoint_url, region_name=region_name, config=config)
    _track_connections(client)
    return client


_clients: PerProcess[tuple[threading.Lock, dict[tuple[str | None, str | None], Any]]] = PerProcess(
    lambda: (threading.Lock(), {})
)


def s3_client(endpoint_url: str | None = None, region_name: str | None = None) -> Any:
    """This process's boto3 S3 client for ``endpoint_url`` and ``region_name`` (see the module
    doc), for a resolver of one's own that makes :class:`S3Object` entries."""
    lock, clients = _clients()
    key = (endpoint_url, region_name)
    with lock:
        client = clients.get(key)
        if client is None:
            client = clients[key] = _make_client(endpoint_url, region_name)
        return client


# -- errors -------------------------------------------------------------------------------------


def _status_and_code(exc: BaseException) -> tuple[int | None, str]:
    """The HTTP status and S3 error code of a refusal (None and "" for anything else)."""
    if not isinstance(exc, ClientError):
        return None, ""
    response = getattr(exc, "response", None) or {}
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    code = response.get("Error", {}).get("Code", "")
    return (status if isinstance(status, int) else None), str(code)


def _is_connection_error(exc: BaseException) -> bool:
    """A failure of the network (or of the connection's end), not an answer."""
    if isinstance(exc, BotoCoreError):
        # botocore's ConnectionError covers EndpointConnectionError, ConnectTimeoutError,
        # ReadTimeoutError, ConnectionClosedError, ProxyConnectionError and SSLError; the other
        # two are a body cut short or broken while it was read.
        return isinstance(exc, (BotoConnectionError, IncompleteReadError, ResponseStreamingError))
    return isinstance(exc, (OSError, urllib3.exceptions.HTTPError))


def _source_error(exc: BaseException, detail: str) -> SourceError:
    """``exc`` of a request for an object's bytes, as a :class:`SourceError` whose reason names
    no bucket, key or endpoint (``detail`` does, for the log)."""
    detail = f"{detail}: {type(exc).__name__}: {exc}"
    status, code = _status_and_code(exc)
    if isinstance(exc, ClientError):
        if status == 412 or code == "PreconditionFailed":
            return SourceError("it changed at its origin", transient=False, detail=detail)
        if status == 404 or code in NOT_FOUND_CODES:
            return SourceError("not found at its origin", transient=False, detail=detail)
        if code == "InvalidObjectState":  # in an archive storage class, not restored
            return SourceError(
                "it is archived at its origin and cannot be read now", transient=False, detail=detail
            )
        if status in (401, 403) or code in DENIED_CODES:
            return SourceError("access denied by its origin", transient=False, detail=detail)
        if status == 416 or code == "InvalidRange":
            return SourceError(
                "its size at its origin is not the one expected", transient=False, detail=detail
            )
        if status in TRANSIENT_STATUSES or code in TRANSIENT_CODES:
            return SourceError(f"its origin is unavailable (HTTP {status})", detail=detail)
        return SourceError(f"its origin answered HTTP {status}", transient=False, detail=detail)
    if _is_connection_error(exc):
        return SourceError(connection_failure(exc), detail=detail)
    # No credentials, a checksum that does not match, a parameter botocore refuses...
    return SourceError("it could not be read from its origin", transient=False, detail=detail)


def _same_etag(answer: object, version: str) -> bool:
    """Whether an answer's ETag is ``version`` (quotes aside: some stores list ETags without)."""
    return isinstance(answer, str) and answer.strip('"') == version.strip('"')


# -- objects ------------------------------------------------------------------------------------

_live_lock = threading.Lock()  # guards every S3Object's _live (held for a moment only)


class S3Object:
    """One object as listed: a :class:`~.sources.VersionedSource` whose version is its ETag.

    >>> ZipEntry("maps/e1m1.bsp", source=S3Object.head(s3_client(), "my-games", "doom/e1m1.bsp"))

    ``client`` is a boto3 S3 client (:func:`s3_client` gives this process's). ``version`` is
    the ETag as S3 gives it, quotes included; ``mtime`` is LastModified in POSIX seconds.
    ``open(offset, stop)`` reads bytes ``[offset, stop)`` of that version (see the module
    doc); ``close()`` stops every read of it now, from any thread. An S3Object holds the
    reads of the download it is in: make new ones for each request.
    """

    __slots__ = ("client", "bucket", "key", "name", "version", "size", "mtime", "content_type", "_live")

    def __init__(
        self,
        client: Any,
        bucket: str,
        key: str,
        version: str,
        size: int,
        mtime: float,
        content_type: str | None = None,
    ) -> None:
        if size < 0:
            raise ValueError("S3Object size must be >= 0")
        self.client = client
        self.bucket = bucket
        self.key = key
        self.name = f"s3://{bucket}/{key}"
        self.version = version
        self.size = size
        self.mtime = mtime
        self.content_type = content_type
        self._live: set[S3Stream] | None = None  # reads open now, or being sent

    @classmethod
    def head(cls, client: Any, bucket: str, key: str) -> S3Object:
        """The object ``key`` as it is now (HeadObject); botocore's ClientError if it is not there."""
        answer = client.head_object(Bucket=bucket, Key=key)
        return cls.from_head(client, bucket, key, answer)

    @classmethod
    def from_head(cls, client: Any, bucket: str, key: str, answer: Mapping[str, Any]) -> S3Object:
        """From HeadObject's answer."""
        return cls(
            client,
            bucket,
            key,
            str(answer["ETag"]),
            int(answer["ContentLength"]),
            _timestamp(answer.get("LastModified")),
            answer.get("ContentType") or None,
        )

    def __repr__(self) -> str:
        return f"S3Object({self.name!r}, size={self.size}, version={self.version!r})"

    def open(self, offset: int = 0, stop: int | None = None) -> S3Stream:
        """Bytes ``[offset, stop)`` of this version (``stop`` None: to the end): GetObject with
        ``If-Match`` always, and ``Range`` unless it is the whole object."""
        stop = self.size if stop is None else stop
        if not 0 <= offset <= stop <= self.size:
            raise ValueError(f"{self.name}: cannot read [{offset}, {stop}) of {self.size} bytes")
        stream = S3Stream(self, offset, stop)
        if offset == stop and (offset, stop) != (0, self.size):  # nothing to ask for
            stream.empty()
            return stream
        with _live_lock:
            if self._live is None:
                self._live = set()
            self._live.add(stream)
        stream.start()
        return stream

    def close(self) -> None:
        """Stop every read of this object now, also one still waiting for its answer."""
        with _live_lock:
            live, self._live = list(self._live or ()), None
        for stream in live:
            stream.close()

    def _done(self, stream: S3Stream) -> None:
        with _live_lock:
            if self._live is not None:
                self._live.discard(stream)


def _media_type(value: str | None) -> str | None:
    """An object's Content-Type, if it is a plain media type worth sending: whoever uploaded
    the object chose it, so anything else (parameters, odd characters, a generic type, a very
    long one) is left out and the type is guessed from the name instead."""
    if value is None or len(value) > 100 or not MEDIA_TYPE.fullmatch(value):
        return None
    return None if value.lower() in GENERIC_TYPES else value


def _timestamp(value: object) -> float:
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, (int, float)):
        return float(value)
    return 0.0


class S3Stream(Interruptible):
    """One GetObject of an :class:`S3Object`: iterate for its bytes; ``close()`` from any thread
    shuts its connection down at once, also while the request still waits for its answer."""

    def __init__(self, source: S3Object, offset: int, stop: int) -> None:
        super().__init__(source)
        self.offset = offset
        self.stop = stop
        self._nothing = False  # nothing to read: no request was made

    @property
    def _where(self) -> str:
        return f"{self.source.name} [{self.offset}, {self.stop})"

    def empty(self) -> None:
        self._nothing = True

    def start(self) -> None:
        source = self.source
        ranged = (self.offset, self.stop) != (0, source.size)
        params: dict[str, Any] = {"Bucket": source.bucket, "Key": source.key, "IfMatch": source.version}
        if ranged:
            params["Range"] = f"bytes={self.offset}-{self.stop - 1}"
        requesting.stream = self
        try:
            if self._closed:
                raise OSError("closed before it was sent")
            answer = source.client.get_object(**params)
        except Exception as exc:
            source._done(self)
            if self._closed:
                raise SourceError("the download ended", transient=False) from None
            raise _source_error(exc, self._where) from None
        finally:
            requesting.stream = None
        body = answer.get("Body")
        with self._lock:
            self._answer = body
            closed = self._closed
        if closed:  # closed while the answer was awaited, before close() could see the body
            with contextlib.suppress(Exception):
                self._drop(body)
            raise SourceError("the download ended", transient=False)
        try:
            self._check(answer, ranged)
        except SourceError:
            self.close()
            raise

    def _check(self, answer: Mapping[str, Any], ranged: bool) -> None:
        """The answer must be the bytes asked for, of the version listed."""
        source = self.source
        etag = answer.get("ETag")
        if not _same_etag(etag, source.version):
            raise SourceError(
                "it changed at its origin", transient=False, detail=f"{self._where}: ETag {etag!r}"
            )
        status = answer.get("ResponseMetadata", {}).get("HTTPStatusCode")
        length = answer.get("ContentLength")
        content_range = answer.get("ContentRange")
        expected = f"bytes {self.offset}-{self.stop - 1}/{source.size}"
        if (
            status != (206 if ranged else 200)
            or length != self.stop - self.offset
            or (ranged and content_range != expected)
        ):
            raise SourceError(
                "its origin answered another part of it",
                transient=False,
                detail=f"{self._where}: HTTP {status}, {length} bytes, Content-Range {content_range!r}",
            )

    def __iter__(self) -> Iterator[bytes]:
        if self._nothing:
            return
        body = self._answer
        assert body is not None
        wanted = self.stop - self.offset
        got = 0
        complete = False  # read to its end: its connection may serve another request
        try:
            while got < wanted:
                data = body.read(min(READ_SIZE, wanted - got))
                if not data:
                    raise SourceError(
                        "the connection to its origin failed",
                        detail=f"{self._where}: the answer ended after {got} of {wanted} bytes",
                    )
                got += len(data)
                yield data
            # The end: botocore checks the length (and a checksum S3 sent) as it reaches it,
            # and urllib3 puts the connection back in the pool.
            if body.read(1):
                raise SourceError("its origin sent more than asked", transient=False, detail=self._where)
            complete = True
        except SourceError:
            if self._closed:
                raise SourceError("the download ended", transient=False) from None
            raise
        except Exception as exc:
            if self._closed:
                raise SourceError("the download ended", transient=False) from None
            raise _source_error(exc, self._where) from None
        finally:
            self._finish(complete)

    def _release(self, answer: Any) -> None:
        """Read to its end, its connection is back in the pool already (urllib3 does that)."""

    def _drop(self, answer: Any) -> None:
        """Close an answer and its connection; the pool gets the (closed) connection back, so
        that its slot is not lost, and makes a new one when it next needs it."""
        raw = getattr(answer, "_raw_stream", None)
        if raw is None:
            answer.close()
            return
        raw.close()
        raw.release_conn()

    def _socket_of(self, answer: Any) -> socket.socket | None:
        return _socket_of(answer)


def _socket_of(body: Any) -> socket.socket | None:
    """The socket an answer is read from: urllib3's response over http.client's, whose file
    holds the socket also after its connection gave it up (an answer with ``Connection:
    close``)."""
    raw = getattr(body, "_raw_stream", None)
    connection = getattr(raw, "_connection", None)
    sock = getattr(connection, "sock", None)
    if sock is None:
        fp = getattr(getattr(raw, "_fp", None), "fp", None)
        sock = getattr(getattr(fp, "raw", None), "_sock", None)
    return sock if isinstance(sock, socket.socket) else None


# An object as listed: (its path below the folder, key, ETag, size, mtime).
Listed = tuple[str, str, str, int, float]


# -- the resolver -------------------------------------------------------------------------------


def _check_bucket(bucket: Any) -> str:
    if not isinstance(bucket, str) or not BUCKET_NAME.fullmatch(bucket) or ".." in bucket:
        raise ConfigError(
            "bucket", f"expected an S3 bucket name (3 to 63 letters, digits, '.' and '-'), got {bucket!r}"
        )
    return bucket


def _check_prefix(prefix: Any) -> str:
    if not isinstance(prefix, str):
        raise ConfigError("prefix", f"expected a folder of keys such as 'games/', got {prefix!r}")
    if prefix.startswith("/") or "\0" in prefix or "\\" in prefix:
        raise ConfigError(
            "prefix", f"expected a folder of keys such as 'games/' (no leading '/'), got {prefix!r}"
        )
    return prefix if not prefix or prefix.endswith("/") else prefix + "/"


def _check_endpoint(endpoint_url: Any) -> str | None:
    if endpoint_url is None:
        return None
    problem = (
        f"expected an http:// or https:// URL such as 'https://minio.example:9000', got {endpoint_url!r}"
    )
    if not isinstance(endpoint_url, str):
        raise ConfigError("endpoint_url", problem)
    try:
        parts = urllib.parse.urlsplit(endpoint_url)
        parts.port  # noqa: B018  (raises ValueError for a port that is not one)
    except ValueError:
        raise ConfigError("endpoint_url", problem) from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ConfigError("endpoint_url", problem)
    return endpoint_url


def _check_region(region_name: Any) -> str | None:
    if region_name is None:
        return None
    if not isinstance(region_name, str) or not re.fullmatch(r"[a-z0-9][a-z0-9-]*", region_name):
        raise ConfigError("region_name", f"expected a region such as 'eu-west-1', got {region_name!r}")
    return region_name


def _safe_path(path: str) -> str | None:
    """The captured path as a relative key (a trailing '/' dropped), or None if it is not one:
    absolute, with '..', '.', empty segments, NUL bytes or backslashes."""
    if "\0" in path or "\\" in path or path.startswith("/"):
        return None
    path = path[:-1] if path.endswith("/") else path
    if path and any(part in ("", ".", "..") for part in path.split("/")):
        return None
    return path


class _TooMany(Exception):
    pass


class S3Resolver(PathResolver):
    """Serve the objects of ``bucket`` below ``prefix``: the captured path names a key; an
    object is sent as it is, a "folder" (the keys below ``key/``) as a ZIP of its objects.

    A folder is zipped with the middleware's ``exclude`` (folder names, at any depth) and
    ``ignore`` (file-name globs) rules, and a folder left with one object is sent as that
    object, as the directory resolver does. Folder markers (keys ending in '/') are not
    files. A path with '..', '.', empty segments, a leading '/', a NUL byte or a backslash,
    a key that is neither an object nor a folder, and a bucket that does not exist are 404s.
    A store that refuses (403) gets a 403, one that cannot be reached or fails (5xx) a 503;
    what happened is logged, never shown. A folder of more than :data:`MAX_OBJECTS` objects
    is refused with a 500.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region_name: str | None = None,
        argument: str | None = None,
    ) -> None:
        self.bucket = _check_bucket(bucket)
        self.prefix = _check_prefix(prefix)
        self.endpoint_url = _check_endpoint(endpoint_url)
        self.region_name = _check_region(region_name)
        super().__init__(argument)
        self.rules = Rules((), ())
        # Requests for the same folder at the same moment share one listing, and a listing is
        # used again for LISTING_SECONDS (a burst of requests, a download and its resumes).
        self._listings: SharedWork[list[Listed]] = SharedWork()
        self._recent: dict[str, tuple[float, list[Listed]]] = {}
        self._recent_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"s3(bucket={self.bucket!r}, prefix={self.prefix!r})"

    def use_rules(self, exclude: Collection[str], ignore: Collection[str]) -> None:
        """The middleware's ``exclude`` and ``ignore`` settings (config.build_settings calls it)."""
        self.rules = Rules(exclude, ignore)

    def client(self) -> Any:
        return s3_client(self.endpoint_url, self.region_name)

    def __call__(self, request: Request, **args: Any) -> SourceTarget | ZipTarget | Failed | None:
        asked = self.subpath(args)
        path = _safe_path(asked)
        if path is None:
            return None
        key = self.prefix + path
        client = self.client()
        what = f"s3://{self.bucket}/{key}"
        try:
            if path and not asked.endswith("/"):
                try:
                    answer = self._call(client.head_object, Bucket=self.bucket, Key=key)
                except ClientError as exc:
                    if _status_and_code(exc)[0] != 404:  # a bucket that is not there is found out by listing
                        raise
                else:
                    found = S3Object.from_head(client, self.bucket, key, answer)
                    return self._single(found)
            folder = key + "/" if path else self.prefix
            objects = [  # every download its own objects (see S3Object)
                (relative, S3Object(client, self.bucket, listed_key, etag, size, mtime))
                for relative, listed_key, etag, size, mtime in self._listing(client, folder)
            ]
        except _TooMany:
            logger.warning("s3 folder %s holds more than %d objects: refused", what, MAX_OBJECTS)
            return Failed(TOO_MANY, 500)
        except Exception as exc:
            return self._failed(exc, what)
        if not objects:
            return None
        if len(objects) == 1:
            return self._single(objects[0][1])
        base = posixpath.basename(folder.rstrip("/")) or self.bucket
        return ZipTarget(
            [
                ZipEntry(arcname, source=found, size=found.size, mtime=found.mtime)
                for arcname, found in objects
            ],
            download_name=base + ".zip",
        )

    @staticmethod
    def _single(found: S3Object) -> SourceTarget:
        mimetype = _media_type(found.content_type)
        return SourceTarget(found, download_name=posixpath.basename(found.key), mimetype=mimetype)

    def _listing(self, client: Any, folder: str) -> list[Listed]:
        """:meth:`_list`, shared by concurrent requests and kept for :data:`LISTING_SECONDS`."""
        now = time.monotonic()
        with self._recent_lock:
            for stale in [name for name, (when, _) in self._recent.items() if now - when > LISTING_SECONDS]:
                del self._recent[stale]
            recent = self._recent.get(folder)
        if recent is not None:
            return recent[1]
        listing = self._listings.run(folder, lambda: self._list(client, folder))
        with self._recent_lock:
            self._recent[folder] = (time.monotonic(), listing)
        return listing

    def _list(self, client: Any, folder: str) -> list[Listed]:
        """Every object below ``folder`` the rules keep, by arcname."""
        found: list[Listed] = []
        listed = 0
        params: dict[str, Any] = {"Bucket": self.bucket, "Prefix": folder}
        while True:
            page = self._call(client.list_objects_v2, **params)
            for item in page.get("Contents", ()):
                listed += 1
                if listed > MAX_OBJECTS:
                    raise _TooMany()
                key = str(item["Key"])
                relative = key[len(folder) :]
                if not relative or relative.endswith("/"):  # a folder marker
                    continue
                *folders, name = relative.split("/")
                if any(self.rules.excluded(part) for part in folders) or self.rules.ignored(name):
                    continue
                found.append(
                    (
                        relative,
                        key,
                        str(item["ETag"]),
                        int(item["Size"]),
                        _timestamp(item.get("LastModified")),
                    )
                )
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                break
            params["ContinuationToken"] = token
        found.sort(key=lambda pair: pair[0])
        return found

    @staticmethod
    def _call(operation: Callable[..., Any], **params: Any) -> Any:
        """``operation(**params)``, again after a transient status (not after a network error:
        a store that cannot be reached is not waited for)."""
        for attempt in range(1, RESOLVE_ATTEMPTS + 1):
            try:
                return operation(**params)
            except ClientError as exc:
                status, code = _status_and_code(exc)
                if attempt == RESOLVE_ATTEMPTS or not (
                    status in TRANSIENT_STATUSES or code in TRANSIENT_CODES
                ):
                    raise
            time.sleep(RESOLVE_BACKOFF * attempt)
        raise AssertionError("unreachable")

    def _failed(self, exc: Exception, what: str) -> Failed | None:
        """The answer to a failed HeadObject or ListObjectsV2; the log says what happened."""
        status, code = _status_and_code(exc)
        described = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, ClientError):
            if code == "NoSuchBucket":  # every request of the route will fail: say so louder
                logger.warning("s3 %s: the bucket does not exist (%s)", what, described)
                return None
            if status == 404 or code in NOT_FOUND_CODES:
                logger.info("s3 %s: not found (%s)", what, described)
                return None
            if status in (401, 403) or code in DENIED_CODES:
                logger.warning("s3 %s: access denied (%s)", what, described)
                return Failed(FORBIDDEN, 403)
            if status in TRANSIENT_STATUSES or code in TRANSIENT_CODES:
                logger.warning("s3 %s: the store is unavailable (%s)", what, described)
                return Failed(UNAVAILABLE, 503)
            logger.warning("s3 %s: unexpected answer (%s)", what, described)
            return Failed(BAD_GATEWAY, 502)
        if _is_connection_error(exc):
            logger.warning("s3 %s: the store cannot be reached (%s)", what, described)
            return Failed(UNAVAILABLE, 503)
        if isinstance(exc, NoCredentialsError):
            logger.error(
                "s3 %s: no credentials found (boto3 looks in the environment, ~/.aws, instance and"
                " task roles)",
                what,
            )
            return Failed(SERVER_ERROR, 500)
        raise exc  # a bug: the middleware logs it and answers 500
