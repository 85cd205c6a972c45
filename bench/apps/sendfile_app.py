"""The baseline of bench/engine_speed.py: a plain WSGI app that sends one file with
gunicorn's sendfile (``environ["wsgi.file_wrapper"]`` returned as it is, with Content-Length).

Environment: ``ZM_BENCH_FILE``, the file sent for ``GET /file``. Any other path answers
``200 ok`` (the readiness check).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

FILE = os.environ["ZM_BENCH_FILE"]


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    if environ.get("PATH_INFO") != "/file":
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3")])
        return [b"ok\n"]
    file = open(FILE, "rb")  # noqa: SIM115 - the server closes it through the file wrapper
    size = os.fstat(file.fileno()).st_size
    start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(size))])
    return environ["wsgi.file_wrapper"](file)
