"""A WSGI application for the real-server tests of the built-in resolvers.

Served by gunicorn as ``tests.directory_app:app`` (``--pythonpath`` = the project
folder). Its routes come from the environment only, as a PasteDeploy section
gives them, so no resolver code of its own is involved:

``ZM_TEST_ROUTES``
    Lines of ``RULE = { resolver = "directory", root = "/srv" }`` or
    ``RULE = { resolver = "sql", url = "...", query = "...", root = "..." }``. Required.
``ZM_TEST_WARM_UP``
    Optional path requested once, in process, when this module is imported.
    Under ``gunicorn --preload`` that happens in the master before it forks its
    workers, so a resolver that keeps state (the ``sql`` resolver's connection
    pool) has it already when the workers inherit it.

Requests that match no route get ``404 not a download`` from the plain app
(with ``X-Worker-Pid``), so a test can tell the middleware's answers from it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from zipmiddleware import ZipMiddleware

APP_NOT_FOUND = b"not a download\n"


def plain_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response(
        "404 Not Found",
        [
            ("Content-Type", "text/plain"),
            ("Content-Length", str(len(APP_NOT_FOUND))),
            ("X-Worker-Pid", str(os.getpid())),
        ],
    )
    return [APP_NOT_FOUND]


app = ZipMiddleware(plain_app, routes=os.environ["ZM_TEST_ROUTES"], exclude=["updates"], ignore=["*.nfo"])


def warm_up(path: str) -> None:
    from werkzeug.test import Client

    response = Client(app).get(path)
    try:
        if response.status_code != 200:
            raise RuntimeError(f"warm-up request {path!r} answered {response.status}")
        response.get_data()
    finally:
        response.close()


if os.environ.get("ZM_TEST_WARM_UP"):
    warm_up(os.environ["ZM_TEST_WARM_UP"])
