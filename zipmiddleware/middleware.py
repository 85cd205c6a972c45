"""ZipMiddleware for WSGI: match a route, call its resolver, answer with the target; else pass through."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from .config import Settings
from .connection import limit_stalls
from .core import CLIENT_CLOSED, Downloads, is_coroutine_function
from .deployment import SYNC_WORKER_WARNING, check_server_at_startup, is_sync_worker_request
from .errors import ConfigError
from .events import Report
from .types import StartResponse, WSGIEnvironment
from .zerocopy import ZeroCopy

__all__ = ["CLIENT_CLOSED", "ZipMiddleware"]

logger = logging.getLogger("zipmiddleware")


class ZipMiddleware(Downloads):
    """Serve configured download routes as a direct file or a streamed ZIP.

    Requests that match no route go to ``app`` untouched.

    >>> application = ZipMiddleware(
    ...     app,
    ...     routes={"/download/<int:game_id>": "myapp.downloads:resolve"},
    ...     roots=["/srv/games"],
    ... )
    """

    def _setup(self, app: Any, settings: Settings) -> None:
        if is_coroutine_function(app):  # Starlette's add_middleware(ZipMiddleware) with this class
            raise ConfigError("app", "an ASGI app (async): wrap it with zipmiddleware.asgi.ZipMiddleware")
        super()._setup(app, settings)
        # Warned once per process about gunicorn's sync worker: when it loads the app, else at
        # the first download it serves (see deployment.py).
        self._warned_about_server = check_server_at_startup()

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        match = self.routes.match(environ)
        if match is None:
            return self.app(environ, start_response)  # type: ignore[no-any-return]
        if not self._warned_about_server and is_sync_worker_request(environ):
            self._warned_about_server = True
            logger.warning(SYNC_WORKER_WARNING, "30 s by default")
        started = time.monotonic()
        zero_copy = ZeroCopy.offered(environ, start_response) if self.settings.zero_copy else None
        report = Report(self.settings.on_entry, self.settings.on_download, self.metrics)
        response = self.respond(environ, match, zero_copy, report)
        # gunicorn's own count of what it wrote, with what went around it (see zerocopy.py).
        produced = (lambda: zero_copy.sent) if zero_copy is not None else None
        body, status, headers = self.ready(response, environ, match, report, started, produced)
        start_response(status, headers)
        # A client that stops reading must not hold this thread for ever (see connection.py).
        return limit_stalls(environ, body, self.settings.stall_timeout)
