"""ZipMiddleware: match a route, call its resolver, answer with the target; else pass through."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

from werkzeug.http import parse_options_header
from werkzeug.wrappers import Request, Response

from .checksums import ClientGoneError, ColdCrcWork
from .config import Settings, build_settings, read_toml
from .connection import limit_stalls
from .crccache import CrcCache, SQLiteCrcCache
from .deployment import (
    SYNC_WORKER_WARNING,
    check_metrics_at_startup,
    check_server_at_startup,
    is_sync_worker_request,
)
from .errors import RefusedError, StreamError, UpstreamError
from .events import ABORTED, CLIENT_GONE, COMPLETE, DownloadEvent, Report, Watched
from .metrics import get_metrics
from .planning import NOT_FOUND, SERVER_ERROR, UPSTREAM_FAILED, FilePlan, Planner, SourcePlan, close_sources
from .responses import (
    ALLOWED_METHODS,
    file_response,
    method_not_allowed,
    pending_response,
    source_response,
    text_response,
    zip_response,
)
from .routing import Match, Resolver, RouteTable
from .targets import Failed, Pending, interpret
from .types import StartResponse, WSGIApplication, WSGIEnvironment
from .zerocopy import ZeroCopy
from .zipengine import Body

logger = logging.getLogger("zipmiddleware")

# What a download whose client went away before its first byte is logged with (nginx's 499).
CLIENT_CLOSED = 499


class ZipMiddleware:
    """Serve configured download routes as a direct file or a streamed ZIP.

    Requests that match no route go to ``app`` untouched.

    >>> application = ZipMiddleware(
    ...     app,
    ...     routes={"/download/<int:game_id>": "myapp.downloads:resolve"},
    ...     roots=["/srv/games"],
    ... )
    """

    def __init__(
        self,
        app: WSGIApplication,
        *,
        routes: Mapping[str, Resolver | str | Mapping[str, Any]] | str | None = None,
        roots: Iterable[str] | str = (),
        exclude: Iterable[str] | str = (),
        ignore: Iterable[str] | str = (),
        chunk_size: int | str = Settings.chunk_size,
        compression_level: int | str = Settings.compression_level,
        zip64: bool | str = Settings.zip64,
        crc_cache: CrcCache | str | os.PathLike[str] | None = None,
        stall_timeout: float | str = Settings.stall_timeout,
        cold_range_limit: int | str = Settings.cold_range_limit,
        **unknown: Any,
    ) -> None:
        options = {
            "routes": routes or {},
            "roots": roots,
            "exclude": exclude,
            "ignore": ignore,
            "chunk_size": chunk_size,
            "compression_level": compression_level,
            "zip64": zip64,
            "crc_cache": crc_cache,
            "stall_timeout": stall_timeout,
            "cold_range_limit": cold_range_limit,
        }
        self._setup(app, build_settings({**options, **unknown}))

    def _setup(self, app: WSGIApplication, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.routes = RouteTable(settings.routes)
        self.planner = Planner(settings)
        # Without a configured store: one file per user in the temporary folder, shared by
        # every worker (a resume that lands on another worker finds what was learnt).
        self.crc_cache = SQLiteCrcCache.per_user() if settings.crc_cache is None else settings.crc_cache
        # Cold CRC-32 work of ranges: shared by requests, one at a time per process.
        self.cold_work = ColdCrcWork(self.crc_cache)
        # Warned once per process about gunicorn's sync worker: when it loads the app, else at
        # the first download it serves (see deployment.py).
        self._warned_about_server = check_server_at_startup()
        self.metrics = get_metrics(settings.metrics)
        if settings.metrics:
            check_metrics_at_startup()
        # Whether any download's end is reported (callbacks or metrics): else bodies go unwrapped.
        self.reporting = bool(settings.on_download or settings.on_entry or settings.metrics)

    @classmethod
    def from_settings(cls, app: WSGIApplication, settings: Settings) -> ZipMiddleware:
        """Wrap ``app`` with settings already built by one of the doors in :mod:`zipmiddleware.config`."""
        middleware = cls.__new__(cls)
        middleware._setup(app, settings)
        return middleware

    @classmethod
    def from_config(
        cls, app: WSGIApplication, path: str | os.PathLike[str], **overrides: Any
    ) -> ZipMiddleware:
        """Read the ``[zipmiddleware]`` table of a TOML file; keyword arguments win."""
        return cls.from_settings(app, build_settings({**read_toml(path), **overrides}))

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        match = self.routes.match(environ)
        if match is None:
            return self.app(environ, start_response)
        if not self._warned_about_server and is_sync_worker_request(environ):
            self._warned_about_server = True
            logger.warning(SYNC_WORKER_WARNING, "30 s by default")
        started = time.monotonic()
        zero_copy = ZeroCopy.offered(environ, start_response) if self.settings.zero_copy else None
        report = Report(self.settings.on_entry, self.settings.on_download, self.metrics)
        response = self.respond(environ, match, zero_copy, report)
        download = response.status_code in (200, 206) and environ.get("REQUEST_METHOD") != "HEAD"
        if download and isinstance(response.response, Body):
            failed = self._first_chunk(response.response)
            if failed is not None:  # nothing went out yet: an error response instead
                if self.reporting:
                    watched = self._watched((), environ, match, response, report, started, None)
                    gone = failed.status_code == CLIENT_CLOSED
                    watched.refused(failed.status_code, CLIENT_GONE if gone else ABORTED)
                    watched.close()
                return failed(environ, start_response)
        body: Iterable[bytes] = response(environ, start_response)
        if self.reporting and download:
            body = self._watched(body, environ, match, response, report, started, zero_copy)
        # A client that stops reading must not hold this thread for ever (see connection.py).
        return limit_stalls(environ, body, self.settings.stall_timeout)

    @staticmethod
    def _first_chunk(archive: Body) -> Response | None:
        """Have ``archive`` make its first chunk now, before the status line goes out; if that
        fails, the response to send instead.

        An archive that fails before anything of it could go out (its first entry is a source
        that cannot be fetched, or a file that vanished) then gets an error response with a
        short text, 502 for a source, rather than a 200 whose connection is aborted. It costs
        nothing: the server waits for the first chunk to send the status line anyway. (Made
        before the server has the status, the first chunk's file data goes through it, not
        around it: see zerocopy.py; later chunks go around it as ever.)
        """
        try:
            archive.prime()
        except Exception as exc:
            archive.close()  # the server never sees this body: closed here
            if isinstance(exc, ClientGoneError):  # while it waited for cold CRC-32 work
                gone = text_response(CLIENT_CLOSED, "Client Closed Request.")
                gone.status = f"{CLIENT_CLOSED} Client Closed Request"
                return gone
            if isinstance(exc, UpstreamError):
                return text_response(502, UPSTREAM_FAILED)
            if not isinstance(exc, StreamError):  # else logged where it was raised
                logger.exception("download failed before its first byte")
            return text_response(500, SERVER_ERROR)
        return None

    def _watched(
        self,
        body: Iterable[bytes],
        environ: WSGIEnvironment,
        match: Match,
        response: Response,
        report: Report,
        started: float,
        zero_copy: ZeroCopy | None,
    ) -> Watched:
        """``body``, telling ``on_download`` and the metrics how it ended."""
        is_zip = response.mimetype == "application/zip"
        # The name the client saves it under (werkzeug decodes filename*=UTF-8''...).
        name = parse_options_header(response.headers.get("Content-Disposition", ""))[1].get("filename", "")
        span = response.content_range
        where = (span.start, span.stop) if span is not None and span.start is not None else None
        total = span.length if span is not None else response.content_length

        def describe(status: str, sent: int, duration: float, http_status: int) -> DownloadEvent:
            entries = report.entries_done if is_zip else int(status == COMPLETE)
            return DownloadEvent(
                status,
                sent,
                entries,
                duration,
                match.rule,
                environ.get("REMOTE_USER"),
                name,
                http_status,
                where if http_status == 206 else None,  # type: ignore[arg-type]
                total,
                dict(match.args),
                report.entries_skipped,
            )

        # gunicorn's own count of what it wrote, with what went around it (see zerocopy.py).
        sent = (lambda: zero_copy.sent) if zero_copy is not None else None
        return Watched(body, report, describe, started, response.status_code, sent)

    def respond(
        self,
        environ: WSGIEnvironment,
        match: Match,
        zero_copy: ZeroCopy | None = None,
        report: Report | None = None,
    ) -> Response:
        if environ.get("REQUEST_METHOD", "GET").upper() not in ALLOWED_METHODS:
            return method_not_allowed()
        try:
            target = interpret(match.resolver(Request(environ), **match.args))
        except Exception:
            logger.exception("resolver for %s failed on %r", match.rule, environ.get("PATH_INFO"))
            return text_response(500, SERVER_ERROR)
        if target is None:
            return text_response(404, NOT_FOUND)
        if isinstance(target, Pending):
            return pending_response(target.retry_after, target.message)
        if isinstance(target, Failed):
            return text_response(target.status, target.message)
        try:
            plan = self.planner.plan(target, getattr(match.resolver, "confine_to", None))
            if isinstance(plan, FilePlan):
                return file_response(plan, environ, self.settings.chunk_size, zero_copy)
            if isinstance(plan, SourcePlan):
                return source_response(plan, environ, self.settings)
            return zip_response(
                plan, environ, self.settings, self.crc_cache, self.cold_work, zero_copy, report
            )
        except RefusedError as exc:
            close_sources(target)
            level = logging.ERROR if exc.status >= 500 else logging.INFO
            logger.log(level, "%s %s refused (%d): %s", match.rule, match.args, exc.status, exc)
            return text_response(exc.status, exc.public)
        except Exception:
            close_sources(target)
            logger.exception("planning %s %s failed", match.rule, match.args)
            return text_response(500, SERVER_ERROR)
