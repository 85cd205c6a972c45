"""A WSGI application for the real-server tests of remote sources, served by gunicorn as
``tests.remote_app:app``: ZipMiddleware whose archives are made of ``UrlSource`` entries.

Environment:

``ZM_TEST_ORIGIN``
    The base URL the files are fetched from (the tests' fault-injecting proxy). Required.
``ZM_TEST_MANIFEST``
    A JSON file ``{"name": size, ...}``: the files the origin serves, in archive order. Required.
``ZM_TEST_EVENTS``
    Optional file where every ``on_entry`` and ``on_download`` event is appended as a JSON line.
``ZM_TEST_SETTINGS``
    Optional JSON object of more settings (``prefetch``, ``retries``, ``retry_backoff``,
    ``on_error``, ``chunk_size`` ...).

Routes: ``/remote.zip`` (every file of the manifest, with its size: an exact Content-Length),
``/remote-unsized.zip`` (the same without sizes: written in one pass).
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from collections.abc import Callable
from typing import Any

from zipmiddleware import ZipEntry, ZipMiddleware, ZipTarget
from zipmiddleware.sources import UrlSource

ORIGIN = os.environ["ZM_TEST_ORIGIN"]
with open(os.environ["ZM_TEST_MANIFEST"], encoding="utf-8") as manifest:
    FILES: dict[str, int] = json.load(manifest)
EVENTS = os.environ.get("ZM_TEST_EVENTS") or None
_events_lock = threading.Lock()


def record(event: object) -> None:
    if EVENTS is not None:
        line = json.dumps({"kind": type(event).__name__, **dataclasses.asdict(event)})  # type: ignore[call-overload]
        with _events_lock, open(EVENTS, "a", encoding="utf-8") as file:
            file.write(line + "\n")


def plain_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "10")])
    return [b"plain app\n"]


def archive(sized: bool) -> Callable[..., ZipTarget]:
    def resolve(request: object) -> ZipTarget:
        return ZipTarget(
            [
                ZipEntry(name, source=UrlSource(f"{ORIGIN}/{name}", size=size if sized else None))
                for name, size in FILES.items()
            ],
            "remote.zip",
        )

    return resolve


app = ZipMiddleware(
    plain_app,
    routes={"/remote.zip": archive(True), "/remote-unsized.zip": archive(False)},
    on_entry=record,
    on_download=record,
    **json.loads(os.environ.get("ZM_TEST_SETTINGS") or "{}"),
)
