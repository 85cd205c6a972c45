"""zipmiddleware as bench/engine_speed.py serves it: every setting from the TOML file named by
``ZM_BENCH_CONFIG`` (``ZipMiddleware.from_config``), whose routes use the built-in
``directory`` resolver, so no resolver code is involved. Paths no route matches answer
``200 ok`` (the readiness check).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from zipmiddleware import ZipMiddleware


def plain_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3")])
    return [b"ok\n"]


app = ZipMiddleware.from_config(plain_app, os.environ["ZM_BENCH_CONFIG"])
