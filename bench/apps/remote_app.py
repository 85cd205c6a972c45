"""zipmiddleware with remote entries, as bench/remote_sources.py serves it: ``/remote.zip`` is
every file of a manifest, each a ``UrlSource`` with its size (so the archive has an exact
Content-Length). Paths no route matches answer ``200 ok`` (the readiness check).

Environment:

``ZM_BENCH_ORIGIN``
    The base URL the files are fetched from (the benchmark's delaying proxy). Required.
``ZM_BENCH_MANIFEST``
    A JSON file ``{"name": size, ...}``: the files, in archive order. Required.
``ZM_BENCH_SETTINGS``
    Optional JSON object of more settings (``prefetch``, ``retries``, ``chunk_size`` ...).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any

from zipmiddleware import ZipEntry, ZipMiddleware, ZipTarget
from zipmiddleware.sources import UrlSource

ORIGIN = os.environ["ZM_BENCH_ORIGIN"].rstrip("/")
with open(os.environ["ZM_BENCH_MANIFEST"], encoding="utf-8") as manifest:
    FILES: dict[str, int] = json.load(manifest)


def plain_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3")])
    return [b"ok\n"]


def resolve(request: object) -> ZipTarget:
    entries = [
        ZipEntry(name, source=UrlSource(f"{ORIGIN}/{name}", size=size)) for name, size in FILES.items()
    ]
    return ZipTarget(entries, "remote.zip")


app = ZipMiddleware(
    plain_app,
    routes={"/remote.zip": resolve},
    **json.loads(os.environ.get("ZM_BENCH_SETTINGS") or "{}"),
)
