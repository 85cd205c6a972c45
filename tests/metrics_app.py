"""A small WSGI app and gunicorn settings file for the multiprocess metrics test.

As the app: ``gunicorn --pythonpath PROJECT tests.metrics_app:app``. As the settings file
(``--config tests/metrics_app.py``) it gives gunicorn the ``child_exit`` hook that calls
:func:`zipmiddleware.metrics.mark_process_dead`; gunicorn ignores its other names.

It does not use the middleware: it calls the metrics API directly, as the middleware does.

Routes:

``/``
    ``ok`` (the readiness check).
``/pid``
    This worker's PID, after ``?delay=`` seconds (default 0.2); no metrics.
``/work``
    One complete download of 1000 bytes with a first byte after 0.01 s; answers this
    worker's PID after ``?delay=`` seconds (default 0.2), so concurrent requests spread
    over the (sync) workers.
``/hang``
    A download that starts and never ends: sends ``pid=<PID>;`` then waits for a minute.
``/metrics``
    :func:`zipmiddleware.metrics.metrics_app`.

With ``ZM_TEST_METRICS_EARLY`` set, the module calls ``get_metrics(True)`` when it is
imported as the app, as the middleware does when it is built: with ``--preload`` that is in
the gunicorn master, before the workers are forked.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qs

from zipmiddleware.metrics import get_metrics, mark_process_dead, metrics_app

if __name__ != "__config__" and os.environ.get("ZM_TEST_METRICS_EARLY"):
    get_metrics(True)


def child_exit(server: Any, worker: Any) -> None:
    mark_process_dead(worker.pid)


@functools.cache
def _metrics() -> Callable[..., Any]:
    return metrics_app()  # built in the worker on first use, not when gunicorn reads its settings


def _text(start_response: Callable[..., Any], text: str) -> list[bytes]:
    body = text.encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def _hang() -> Iterator[bytes]:
    yield f"pid={os.getpid()};\n".encode()
    time.sleep(60)
    yield b"never\n"


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
    path = environ.get("PATH_INFO", "")
    delay = float(parse_qs(environ.get("QUERY_STRING", "")).get("delay", ["0.2"])[0])
    if path == "/metrics":
        return _metrics()(environ, start_response)
    if path == "/pid":
        time.sleep(delay)
        return _text(start_response, str(os.getpid()))
    if path == "/work":
        metrics = get_metrics(True)
        metrics.download_started()
        metrics.first_byte(0.01)
        time.sleep(delay)
        metrics.download_ended("complete", 1000)
        return _text(start_response, str(os.getpid()))
    if path == "/hang":
        get_metrics(True).download_started()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return _hang()
    return _text(start_response, "ok")
