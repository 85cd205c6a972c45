"""What both doors share: settings, routes, resolvers' answers turned into responses.

:class:`Downloads` holds everything a download needs (the routes, the planner, the CRC-32
store, the reporting) and turns a resolver's answer into a werkzeug ``Response`` whose
first chunk is already made. The WSGI middleware (:mod:`.middleware`) and the ASGI one
(:mod:`.asgi`) only differ in how they call the resolver and hand the result to the server.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Self

from werkzeug.http import parse_options_header
from werkzeug.wrappers import Request, Response

from .checksums import ClientGoneError, ColdCrcWork
from .config import Settings, build_settings, read_toml
from .crccache import CrcCache, SQLiteCrcCache
from .deployment import check_metrics_at_startup
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
from .types import WSGIEnvironment
from .zerocopy import ZeroCopy
from .zipengine import Body

logger = logging.getLogger("zipmiddleware")

# What a download whose client went away before its first byte is logged with (nginx's 499).
CLIENT_CLOSED = 499

# A response ready to go out: its body, status line and headers, as WSGI has them.
Ready = tuple[Iterable[bytes], str, list[tuple[str, str]]]


class Downloads:
    """The download routes of one app, and everything that serves them (see the module)."""

    def __init__(
        self,
        app: Any,
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

    def _setup(self, app: Any, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.routes = RouteTable(settings.routes)
        self.planner = Planner(settings)
        # Without a configured store: one file per user in the temporary folder, shared by
        # every worker (a resume that lands on another worker finds what was learnt).
        self.crc_cache = SQLiteCrcCache.per_user() if settings.crc_cache is None else settings.crc_cache
        # Cold CRC-32 work of ranges: shared by requests, one at a time per process.
        self.cold_work = ColdCrcWork(self.crc_cache)
        self.metrics = get_metrics(settings.metrics)
        if settings.metrics:
            check_metrics_at_startup()
        # Whether any download's end is reported (callbacks or metrics): else bodies go unwrapped.
        self.reporting = bool(settings.on_download or settings.on_entry or settings.metrics)

    @classmethod
    def from_settings(cls, app: Any, settings: Settings) -> Self:
        """Wrap ``app`` with settings already built by one of the doors in :mod:`zipmiddleware.config`."""
        middleware = cls.__new__(cls)
        middleware._setup(app, settings)
        return middleware

    @classmethod
    def from_config(cls, app: Any, path: str | os.PathLike[str], **overrides: Any) -> Self:
        """Read the ``[zipmiddleware]`` table of a TOML file; keyword arguments win."""
        return cls.from_settings(app, build_settings({**read_toml(path), **overrides}))

    # -- from a request to a response ---------------------------------------------------

    def respond(
        self,
        environ: WSGIEnvironment,
        match: Match,
        zero_copy: ZeroCopy | None = None,
        report: Report | None = None,
    ) -> Response:
        """Call the route's resolver here and now, and answer with what it gives."""
        refused = self.refuse_method(environ)
        if refused is not None:
            return refused
        try:
            answer = match.resolver(Request(environ), **match.args)
        except Exception:
            return self.resolver_failed(environ, match)
        return self.answer(answer, environ, match, zero_copy, report)

    @staticmethod
    def refuse_method(environ: WSGIEnvironment) -> Response | None:
        """A 405 for anything but GET and HEAD, before the resolver is asked."""
        if environ.get("REQUEST_METHOD", "GET").upper() not in ALLOWED_METHODS:
            return method_not_allowed()
        return None

    @staticmethod
    def resolver_failed(environ: WSGIEnvironment, match: Match) -> Response:
        """The 500 for a resolver that raised (call it in the ``except`` block: it logs the traceback)."""
        logger.exception("resolver for %s failed on %r", match.rule, environ.get("PATH_INFO"))
        return text_response(500, SERVER_ERROR)

    def answer(
        self,
        answer: object,
        environ: WSGIEnvironment,
        match: Match,
        zero_copy: ZeroCopy | None = None,
        report: Report | None = None,
    ) -> Response:
        """The response to what the resolver returned: plans it (this reads the file system)."""
        try:
            target = interpret(answer)
        except Exception:
            return self.resolver_failed(environ, match)
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

    def ready(
        self,
        response: Response,
        environ: WSGIEnvironment,
        match: Match,
        report: Report,
        started: float,
        produced: Callable[[], int] | None = None,
    ) -> Ready:
        """``response`` as it goes out: an archive's first chunk made (or the error response
        that replaces it), the body reporting how it ends; ``produced``: the server's own
        count of what it sent, where the body's chunks are not all there is."""
        download = response.status_code in (200, 206) and environ.get("REQUEST_METHOD") != "HEAD"
        if download and isinstance(response.response, Body):
            failed = self._first_chunk(response.response)
            if failed is not None:  # nothing went out yet: an error response instead
                if self.reporting:
                    watched = self._watched((), environ, match, response, report, started, None)
                    gone = failed.status_code == CLIENT_CLOSED
                    watched.refused(failed.status_code, CLIENT_GONE if gone else ABORTED)
                    watched.close()
                return failed.get_wsgi_response(environ)
        body, status, headers = response.get_wsgi_response(environ)
        if self.reporting and download:
            body = self._watched(body, environ, match, response, report, started, produced)
        return body, status, headers

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
        produced: Callable[[], int] | None,
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

        return Watched(body, report, describe, started, response.status_code, produced)


def is_coroutine_function(function: object) -> bool:
    """Whether calling ``function`` gives a coroutine (an ``async def`` function or ``__call__``):
    an asynchronous resolver, or an ASGI app."""
    if inspect.iscoroutinefunction(function):
        return True
    call = getattr(function, "__call__", None)  # noqa: B004
    return inspect.iscoroutinefunction(call)
