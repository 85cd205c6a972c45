"""Responses as values (werkzeug ``Response`` objects); the only place headers are decided."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import mimetypes
import os
import socket
from collections.abc import Iterator
from datetime import UTC, datetime

from werkzeug.wrappers import Response
from werkzeug.wsgi import wrap_file

from .checksums import ColdCrcWork, client_presence
from .closing import close_all
from .conditional import FULL, Outcome, Validators, evaluate
from .config import Settings
from .connection import client_socket
from .crccache import CHECKPOINT_EVERY, CrcCache
from .errors import RefusedError, StreamError, UpstreamError
from .events import Report
from .fetching import EntryFailed, Fetcher, Policy
from .names import content_disposition
from .planning import (
    NOT_FOUND,
    SERVER_ERROR,
    FilePlan,
    FileSnapshot,
    PlannedEntry,
    SourcePlan,
    ZipPlan,
    close_sources,
    reopen,
)
from .types import WSGIEnvironment
from .zerocopy import ZeroCopy, send_part
from .zipengine import Body, Layout, ZipRange, ZipStream, archive_validators, merged, needs_zip64

logger = logging.getLogger("zipmiddleware")

ALLOWED_METHODS = ("GET", "HEAD")


def text_response(status: int, text: str, **headers: str) -> Response:
    response = Response(text + "\n", status=status, mimetype="text/plain")
    # An error or "not yet" must never be cached as if it were the download.
    response.headers["Cache-Control"] = "no-store"
    response.headers.update(headers)
    return response


def method_not_allowed() -> Response:
    return text_response(
        405, "Method Not Allowed: downloads answer GET and HEAD.", Allow=", ".join(ALLOWED_METHODS)
    )


def pending_response(retry_after: int, message: str | None) -> Response:
    text = message or "Accepted: this download is being prepared; try again shortly."
    return text_response(202, text, **{"Retry-After": str(max(0, int(retry_after)))})


def file_response(
    plan: FilePlan, environ: WSGIEnvironment, chunk_size: int, zero_copy: ZeroCopy | None = None
) -> Response:
    """The file itself, with conditional GET and single ranges.

    With ``zero_copy`` (see :mod:`.zerocopy`), a 200 or 206 body sends the file with
    sendfile one block at a time, checking the file after each. Else a full 200 body is
    the server's ``wsgi.file_wrapper`` object, so that a server may use sendfile (checked
    at the end), and a 206 body, or any body where the server has no file wrapper, reads
    the file in chunks, checking it after each.
    """
    checked = plan.file
    fd = plan.opened
    if fd is None:
        try:
            fd = reopen(checked)
        except OSError as exc:
            raise RefusedError(404, NOT_FOUND, f"cannot send {checked.path!r}: {exc}") from None
    size = checked.size
    # Only what every host with a copy of the file agrees on (see FileSnapshot.key).
    etag = f"{checked.mtime_ns:x}-{size:x}"
    validators = Validators(etag, _http_time(checked.mtime), size)
    outcome = evaluate(environ, validators)
    if outcome.status not in (200, 206):
        os.close(fd)
        return _bodiless(outcome, validators)
    # From here the file object owns the descriptor, and the body the file object.
    file = CheckedFile(fd, checked, client_socket(environ))
    mimetype = plan.mimetype or mimetypes.guess_type(plan.download_name)[0] or "application/octet-stream"
    # A server without a file wrapper of its own (the ASGI door, some WSGI servers) gains
    # nothing from werkzeug's plain one: the file is read here, and checked after each read.
    if zero_copy is not None or outcome.status == 206 or "wsgi.file_wrapper" not in environ:
        start, stop = (0, size) if outcome.status == 200 else (outcome.start, outcome.stop)
        body: object = FileRange(file, checked, start, stop, chunk_size, zero_copy)
    else:
        body = wrap_file(environ, file, chunk_size)
    response = Response(body, mimetype=mimetype, direct_passthrough=True)  # type: ignore[arg-type]
    response.headers["Content-Disposition"] = content_disposition(plan.download_name)
    response.headers["Accept-Ranges"] = "bytes"
    response.content_length = size
    _describe(response, outcome, validators)
    return response


class CheckedFile(io.FileIO):
    """The open file of a direct download, which looks at itself once more when it is closed.

    A full 200 goes out with the server's sendfile, where nothing can check the file while
    it is sent. A file truncated meanwhile makes sendfile stop early and quietly: the server
    would keep the connection and put the next response inside this body. So when the
    server closes the body, a file that changed (size, mtime, or ctime with the same link
    count: see :meth:`FileSnapshot.unchanged`) shuts the client's connection down, and the
    client sees a download that failed rather than one that goes on with another response.
    """

    def __init__(self, fd: int, checked: FileSnapshot, sock: socket.socket | None) -> None:
        super().__init__(fd, "rb", closefd=True)
        self.checked, self.sock = checked, sock

    def close(self) -> None:
        if not self.closed:
            try:
                changed = not self.checked.unchanged(os.fstat(self.fileno()))
            except OSError:
                changed = True
            if changed:
                logger.error("download of %r: the file changed while it was sent", self.checked.path)
                if self.sock is not None:
                    with contextlib.suppress(OSError):
                        self.sock.shutdown(socket.SHUT_RDWR)
        super().close()


class FileRange:
    """Bytes ``[start, stop)`` of an open file: a WSGI body that closes the file.

    The file must stay the one that was planned: after every read its size, mtime and
    ctime are checked (see :meth:`FileSnapshot.unchanged`), so a file rewritten in place,
    truncated or grown while the range goes out aborts the connection before the next
    chunk (before the last one too), instead of ending cleanly with a mix of two versions.
    With ``zero_copy`` it is sent with sendfile, checked after every block likewise.
    """

    def __init__(
        self,
        file: io.FileIO,
        checked: FileSnapshot,
        start: int,
        stop: int,
        chunk_size: int,
        zero_copy: ZeroCopy | None = None,
    ) -> None:
        self.file, self.checked = file, checked
        self.start, self.stop, self.chunk_size = start, stop, chunk_size
        self.zero_copy = zero_copy

    def __iter__(self) -> Iterator[bytes]:
        if self.zero_copy is not None:
            sender, fd, checked, length = (
                self.zero_copy,
                self.file.fileno(),
                self.checked,
                self.stop - self.start,
            )
            part = send_part(sender, fd, checked.path, checked, self.start, self.stop, None, self.chunk_size)
            try:
                yield from merged(sender.counted(part, length), self.chunk_size, length)
            except StreamError as exc:
                logger.error("download aborted: %s", exc)
                raise
            return
        self.file.seek(self.start)
        remaining = self.stop - self.start
        fd = self.file.fileno()
        while remaining > 0:
            data = self.file.read(min(self.chunk_size, remaining))
            st = os.fstat(fd)
            if not data or not self.checked.unchanged(st):
                logger.error("download aborted: %r changed while it was sent", self.checked.path)
                raise StreamError(f"{self.checked.path!r} changed while it was sent")
            remaining -= len(data)
            yield data

    def close(self) -> None:
        self.file.close()


def source_response(plan: SourcePlan, environ: WSGIEnvironment, settings: Settings) -> Response:
    """A versioned source (an object kept elsewhere) as it is: its exact size, validators
    from its version, and ranges, which fetch only the bytes they send. Read through a
    :class:`~.fetching.Fetcher`, so a connection that breaks is resumed where it broke
    (``retries``), and a version that changed aborts rather than splices."""
    source = plan.source
    size = source.size
    # The version as the origin gives it may hold anything: the ETag is a digest of it.
    version = hashlib.sha256(repr((source.name, source.version, size)).encode()).hexdigest()[:40]
    # Its date tells versions apart only to the second (S3's LastModified; a multipart upload's
    # may even be its start): only the ETag decides, as for archives.
    validators = Validators("src-" + version, _http_time(source.mtime), size, dated=False)
    outcome = evaluate(environ, validators)
    if outcome.status not in (200, 206):
        close_sources(plan)
        return _bodiless(outcome, validators)
    start, stop = (0, size) if outcome.status == 200 else (outcome.start, outcome.stop)
    policy = Policy(0, settings.retries, settings.retry_backoff)
    body = SourceRange(PlannedEntry(plan.download_name, 0, source=source, size=size), start, stop, policy)
    mimetype = plan.mimetype or mimetypes.guess_type(plan.download_name)[0] or "application/octet-stream"
    response = Response(body, mimetype=mimetype, direct_passthrough=True)
    response.headers["Content-Disposition"] = content_disposition(plan.download_name)
    # The type may come from whoever stored the object: a browser must not guess another.
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Accel-Buffering"] = "no"
    response.headers["Accept-Ranges"] = "bytes"
    response.content_length = size
    _describe(response, outcome, validators)
    return response


class SourceRange(Body):
    """Bytes ``[start, stop)`` of a planned entry's versioned source: a WSGI body."""

    def __init__(self, entry: PlannedEntry, start: int, stop: int, policy: Policy) -> None:
        self.entry, self.start, self.stop = entry, start, stop
        self.fetcher = Fetcher((entry,), policy)
        if (start, stop) != (0, entry.size):
            self.fetcher.limit_to({0: (start, stop)})

    def _chunks(self) -> Iterator[bytes]:
        if self.stop == self.start:  # an empty object: nothing to fetch
            return iter(())
        try:
            return self.fetcher.begin(0)
        except EntryFailed as exc:
            raise UpstreamError(str(exc)) from exc

    def close(self) -> None:
        close_all([self._output, self.fetcher])


def zip_response(
    plan: ZipPlan,
    environ: WSGIEnvironment,
    settings: Settings,
    crc_cache: CrcCache | None,
    cold_work: ColdCrcWork | None = None,
    zero_copy: ZeroCopy | None = None,
    report: Report | None = None,
) -> Response:
    """A streamed archive. Nothing is read until the server iterates the body.

    A stored archive whose sizes are all known is laid out in advance and written from
    that one description (:class:`ZipRange`): it gets an exact Content-Length, and when
    every entry is a file also validators and ranges; its full download is the range
    [0, length). Anything else (deflate, sources of unknown size) is written in one
    pass (:class:`ZipStream`), without ranges. A range whose CRC-32s would
    cost more than ``cold_range_limit`` to learn gets the whole archive (200): the
    client then receives every byte the server reads. Under ``on_error = "skip"`` an archive
    with sources is written in one pass too: an entry left out would break a promised length.
    """
    entries = plan.entries
    report = report or Report()
    has_sources = plan.memo("sources", lambda: any(entry.source is not None for entry in entries))
    skip = settings.skipped_list_name if settings.on_error == "skip" and has_sources else None
    sized = settings.compression_level == 0 and not skip and all(entry.size is not None for entry in entries)
    layout = (
        plan.memo("layout", lambda: Layout(entries, settings.zip64, settings.data_descriptors))
        if sized
        else None
    )
    if not settings.zip64 and (layout.needs_zip64 if layout else needs_zip64(entries)):
        close_sources(plan)
        raise RefusedError(500, SERVER_ERROR, "archive needs ZIP64 but zip64 = false")
    found = plan.memo(
        "validators",
        lambda: archive_validators(
            entries, settings.compression_level, settings.zip64, settings.data_descriptors
        ),
    )
    # Ranges need both the layout (where bytes lie) and validators (that they stay there).
    length = layout.length if layout is not None and found is not None else None
    validators = Validators(
        found[0] if found else None, _http_time(found[1]) if found else None, length, dated=False
    )
    outcome = evaluate(environ, validators)
    if outcome.status not in (200, 206):
        close_sources(plan)
        return _bodiless(outcome, validators)

    policy = Policy(settings.prefetch, settings.retries, settings.retry_backoff, on_retry=report.retried)
    fetcher = Fetcher(entries, policy) if has_sources else None
    body: ZipRange | ZipStream
    if layout is None:  # deflated, a source of unknown size, or skipping: written in one pass
        body = ZipStream(
            entries,
            chunk_size=settings.chunk_size,
            compression_level=settings.compression_level,
            zip64=settings.zip64,
            crc_cache=crc_cache,
            data_descriptors=settings.data_descriptors,
            fetcher=fetcher,
            report=report,
            skip=skip,
        )
    else:
        present = client_presence(environ)

        def archive_range(start: int, stop: int) -> ZipRange:
            return ZipRange(
                layout,
                start,
                stop,
                chunk_size=settings.chunk_size,
                crc_cache=crc_cache,
                cold_work=cold_work,
                present=present,
                zero_copy=zero_copy,
                fetcher=fetcher,
                report=report,
            )

        if outcome.status == 200:
            body = archive_range(0, layout.length)
        else:
            body = archive_range(outcome.start, outcome.stop)
            cold, limit = body.cold_cost(), settings.cold_range_limit
            # Small cold work (an honest resume's head, at most one checkpoint interval) always
            # waits its turn; more waits only while few requests already do (see checksums.py).
            admitted = cold == 0 or (cold <= limit and body.cold_work.reserve(much=cold > CHECKPOINT_EVERY))
            body.reserved = admitted and cold > 0
            if not admitted:
                logger.info(
                    "range %d-%d of %s would read %d bytes it does not send (cold_range_limit %d%s): "
                    "sending the whole archive instead",
                    outcome.start,
                    outcome.stop - 1,
                    plan.download_name,
                    cold,
                    settings.cold_range_limit,
                    "" if cold > settings.cold_range_limit else "; enough requests wait for cold work",
                )
                outcome = FULL
                body = archive_range(0, layout.length)
    response = Response(body, mimetype="application/zip", direct_passthrough=True)
    response.headers["Content-Disposition"] = content_disposition(plan.download_name)
    # Proxies such as nginx buffer responses by default; a download must stream.
    response.headers["X-Accel-Buffering"] = "no"
    response.headers["Accept-Ranges"] = "bytes" if length is not None else "none"
    if layout is not None and outcome.status == 200:
        response.content_length = layout.length
    _describe(response, outcome, validators)
    return response


def _http_time(mtime: float) -> datetime:
    return datetime.fromtimestamp(int(mtime), UTC)


def _describe(response: Response, outcome: Outcome, validators: Validators) -> None:
    """Validators, caching and (for 206) the range, on a response with a body."""
    if validators.etag is not None:
        response.set_etag(validators.etag)
    if validators.last_modified is not None:
        response.last_modified = validators.last_modified
    # Always revalidate: the files behind a download URL can change at any time.
    response.cache_control.no_cache = True
    if outcome.status == 206:
        response.status_code = 206
        response.headers["Content-Range"] = f"bytes {outcome.start}-{outcome.stop - 1}/{validators.length}"
        response.content_length = outcome.stop - outcome.start


def _bodiless(outcome: Outcome, validators: Validators) -> Response:
    if outcome.status == 416:
        unsatisfiable = {"Content-Range": f"bytes */{validators.length}"}
        return text_response(416, "Range Not Satisfiable.", **unsatisfiable)
    if outcome.status == 412:
        return text_response(412, "Precondition Failed: the download has changed.")
    response = Response(status=outcome.status)  # 304
    del response.headers["Content-Type"]
    _describe(response, outcome, validators)
    return response
