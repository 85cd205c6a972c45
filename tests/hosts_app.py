"""One of several hosts serving copies of the same folder, for tests/test_many_hosts.py.

Served by gunicorn as ``tests.hosts_app:app`` (``--pythonpath`` = the project folder). The
middleware is configured as a deployment would configure it, with the built-in ``directory``
resolver and a ``crc_cache`` setting, both from the environment:

``ZM_HOST_NAME``
    What this host calls itself: every answer carries it as ``X-Host``, so a test behind a
    load balancer can tell which host answered. Required.
``ZM_HOST_ROOT``
    The folder served at ``/files/<path:subpath>``. Required.
``ZM_HOST_CRC_CACHE``
    The ``crc_cache`` setting: a database URL (``postgresql+psycopg://...``), an SQLite file
    or ``:memory:``. Required.

Anything but ``/files/...`` gets ``404 not a download`` from the plain app.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from zipmiddleware import ZipMiddleware

HOST = os.environ["ZM_HOST_NAME"]
NOT_A_DOWNLOAD = b"not a download\n"


def plain_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response(
        "404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", str(len(NOT_A_DOWNLOAD)))]
    )
    return [NOT_A_DOWNLOAD]


middleware = ZipMiddleware(
    plain_app,
    routes={"/files/<path:subpath>": {"resolver": "directory", "root": os.environ["ZM_HOST_ROOT"]}},
    crc_cache=os.environ["ZM_HOST_CRC_CACHE"],
)


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """The middleware, its every answer marked with ``X-Host`` (the body passes through as it is,
    so the server's sendfile path and the body's ``close()`` are untouched)."""

    def marked(status: str, headers: list[tuple[str, str]], *exc_info: Any) -> Any:
        return start_response(status, [*headers, ("X-Host", HOST)], *exc_info)

    return middleware(environ, marked)
