"""An ASGI app (Starlette) with zipmiddleware in front, for tests/test_asgi.py and bench/asgi_speed.py.

Environment: ``ZM_ASGI_ROOT`` (the served folder), ``ZM_ASGI_CRC`` (the CRC-32 store),
``ZM_ASGI_STALL`` (stall_timeout, seconds). :func:`settings` gives the settings the WSGI
twin of a test uses too, so that both serve the same files with the same settings.

Routes:

* ``/files/<path:subpath>``: the built-in ``directory`` resolver;
* ``/async/<path:subpath>``: the same through a coroutine resolver;
* ``/who/<name>``: a plain resolver that answers with the request's fields (as a 418);
* ``/broken/<name>``: a ZIP whose second entry fails after 4 MiB;
* ``/api/ping``: the app's own JSON; ``/starlette/<path>``: Starlette's own FileResponse (and
  ``/starlette-256k/<path>``: with 256 KiB reads);
* ``/slow-resolver``: a plain resolver that sleeps 1 s (in its worker thread).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.authentication import AuthCredentials, AuthenticationBackend, SimpleUser
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from zipmiddleware import Failed, FileTarget, ZipEntry, ZipTarget
from zipmiddleware.asgi import ZipMiddleware

ROOT = Path(os.environ.get("ZM_ASGI_ROOT", "/nonexistent"))

# What zipmiddleware logs (a stalled client dropped, ...) goes to the server's log.
logging.getLogger("zipmiddleware").addHandler(logging.StreamHandler())
logging.getLogger("zipmiddleware").setLevel(logging.INFO)
BROKEN_AFTER = 4 << 20


def settings(root: Path, crc_cache: str, stall_timeout: float = 60.0) -> dict[str, Any]:
    """The settings of the download routes, the same for the ASGI app and its WSGI twin."""
    return {
        "routes": {
            "/files/<path:subpath>": {"resolver": "directory", "root": str(root)},
            "/async/<path:subpath>": resolve_async,
            "/who/<name>": who,
            "/broken/<name>": broken,
            "/slow-resolver": slow,
        },
        "roots": [str(root)],
        "crc_cache": crc_cache,
        "stall_timeout": stall_timeout,
    }


async def resolve_async(request: Any, subpath: str) -> FileTarget | ZipTarget | None:
    await anyio.sleep(0.01)  # it really awaits (anyio: asyncio or trio, as the server runs)
    path = ROOT / subpath
    if path.is_dir():
        return ZipTarget.from_directory(path)
    return FileTarget(path) if path.is_file() else None


def who(request: Any, name: str) -> Failed:
    fields = [name, request.remote_user, request.args.get("q"), request.headers.get("X-Test"), request.path]
    return Failed("|".join(str(field) for field in fields), 418)


def failing_data() -> Iterator[bytes]:
    yield bytes(BROKEN_AFTER)
    raise OSError("the disk went away")


def broken(request: Any, name: str) -> ZipTarget:
    entries = [ZipEntry("first.bin", source=bytes(1 << 20)), ZipEntry("second.bin", source=failing_data())]
    return ZipTarget(entries, f"{name}.zip")


def slow(request: Any) -> Failed:
    time.sleep(1)  # blocking: fine in a worker thread, fatal on the event loop
    return Failed("slow", 418)


class HeaderUser(AuthenticationBackend):
    """The user named by an X-User header (stands for any authentication middleware)."""

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, SimpleUser] | None:
        name = conn.headers.get("x-user")
        return (AuthCredentials(["authenticated"]), SimpleUser(name)) if name else None


async def ping(request: Request) -> Response:
    return JSONResponse({"ok": True, "time": time.time()})


async def starlette_file(request: Request) -> Response:
    return FileResponse(ROOT / request.path_params["path"])


class BigChunkFileResponse(FileResponse):
    chunk_size = 256 * 1024  # zipmiddleware's default (Starlette's: 64 KiB)


async def starlette_file_256k(request: Request) -> Response:
    return BigChunkFileResponse(ROOT / request.path_params["path"])


def record(event: Any) -> None:
    """on_download: one JSON line per download in ZM_ASGI_EVENTS, when it is set."""
    path = os.environ.get("ZM_ASGI_EVENTS")
    if path:
        with open(path, "a", encoding="utf-8") as file:
            fields = {"status": event.status, "sent": event.bytes_sent, "http_status": event.http_status}
            file.write(json.dumps({**fields, "name": event.download_name}) + "\n")


app = Starlette(
    routes=[
        Route("/api/ping", ping),
        Route("/starlette/{path:path}", starlette_file),
        Route("/starlette-256k/{path:path}", starlette_file_256k),
    ],
    middleware=[
        Middleware(AuthenticationMiddleware, backend=HeaderUser()),
        Middleware(
            ZipMiddleware,
            **settings(
                ROOT, os.environ.get("ZM_ASGI_CRC", ":memory:"), float(os.environ.get("ZM_ASGI_STALL", 60))
            ),
            on_download=record,
        ),
    ],
)
