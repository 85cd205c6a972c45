"""A WSGI application for the real-server tests: ZipMiddleware over a plain app.

Served by gunicorn as ``tests.server_app:app`` (``--pythonpath`` = the project
folder) or ``server_app:app`` (``--pythonpath`` = this folder).

Environment:

``ZM_TEST_DATA``
    The data folder; the middleware's only root. Required.
``ZM_TEST_MARKERS``
    Optional folder where :class:`MarkedSource` records its life: a file
    ``<METHOD>-<id>.opened`` when created and one line appended to
    ``<METHOD>-<id>.closed`` each time ``close()`` is called.
``ZM_TEST_CHUNK_SIZE``
    Optional ``chunk_size`` for the middleware (default 65536).
``ZM_TEST_CRC_CACHE``
    Optional ``crc_cache`` path (an SQLite file), or ``:memory:``; default: the per-user file.
``ZM_TEST_COLD_RANGE_LIMIT``
    Optional ``cold_range_limit`` (bytes, or with a unit: ``"64 MiB"``). Passed only when
    set and when the middleware has the setting, so that this app also runs on an older
    commit (where a test shows the defect the setting fixed).
``ZM_TEST_ZERO_COPY``
    Optional ``zero_copy`` (``"false"`` sends file data through the server), given likewise.
``ZM_TEST_STALL_TIMEOUT``
    Optional ``stall_timeout`` in seconds (default 60; 0 turns it off).
``ZM_TEST_LOG_LEVEL``
    Optional level (``INFO``, ``DEBUG`` ...) from which the middleware's messages reach
    gunicorn's log; unset, only warnings and errors do (Python's last-resort handler).

Routes (every ``<path:...>`` is relative to ``ZM_TEST_DATA``):

``/folder/<path:name>``
    The folder as a ZIP (``ZipTarget.from_directory``); folders named
    ``updates`` are excluded and ``*.nfo`` files ignored.
``/file/<path:name>[?name=DOWNLOAD_NAME]``
    The file itself (``FileTarget``), sendfile-able.
``/path?p=ANY_PATH``
    ``FileTarget(ANY_PATH)``: a path the resolver did not confine (outside the roots: 404).
``/broken/<int:megabytes>``
    A ZIP whose second entry is a source that yields ``megabytes`` MiB and
    then raises, after the 200 and those bytes went out.
``/pair/<path:name>``
    A ZIP of a small text entry and the file ``name`` (for tests that change
    the file while it is streamed).
``/marked/<path:name>``
    A ZIP of every file under the folder ``name`` (path entries) plus a
    :class:`MarkedSource` entry of ``?source_kib=`` KiB (default 256), whose size the
    archive knows unless ``?unsized=1``.
``/pending``, ``/failed``, ``/none``
    ``Pending(retry_after=7)``, ``Failed(..., status=410)`` and ``None``.

Anything else reaches the plain app, which answers ``200 plain app``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from zipmiddleware import Failed, FileTarget, Pending, ZipEntry, ZipMiddleware, ZipTarget
from zipmiddleware.config import Settings

DATA = os.environ["ZM_TEST_DATA"]
MARKERS = os.environ.get("ZM_TEST_MARKERS") or None
MIB = 1024 * 1024
BROKEN_MESSAGE = "the test source failed on purpose"


def plain_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "10")])
    return [b"plain app\n"]


def data_path(name: str) -> str:
    return os.path.join(DATA, name)


class MarkedSource:
    """A byte source that records on disk that it was created and closed."""

    def __init__(self, method: str, size: int) -> None:
        self.name = f"{method}-{uuid.uuid4().hex}"
        self.size = size
        self._mark("opened")

    def _mark(self, state: str) -> None:
        if MARKERS:
            with open(os.path.join(MARKERS, f"{self.name}.{state}"), "a") as file:
                file.write(f"{state}\n")

    def __iter__(self) -> Iterator[bytes]:
        block = bytes(range(256)) * 256
        remaining = self.size
        while remaining:
            piece = block[: min(len(block), remaining)]
            remaining -= len(piece)
            yield piece

    def close(self) -> None:
        self._mark("closed")


def failing_source(megabytes: int) -> Iterator[bytes]:
    block = os.urandom(MIB)  # incompressible, so every byte reaches the client
    for _ in range(megabytes):
        yield block
    raise RuntimeError(BROKEN_MESSAGE)


def folder(request: Any, name: str) -> ZipTarget:
    return ZipTarget.from_directory(data_path(name))


def file(request: Any, name: str) -> FileTarget:
    return FileTarget(data_path(name), download_name=request.args.get("name"))


def any_path(request: Any) -> FileTarget:
    return FileTarget(request.args["p"])


def broken(request: Any, megabytes: int) -> ZipTarget:
    return ZipTarget(
        [
            ZipEntry("intro.txt", source=b"this archive breaks half-way\n"),
            ZipEntry("stream.bin", source=failing_source(megabytes)),
        ],
        download_name="broken.zip",
    )


def pair(request: Any, name: str) -> ZipTarget:
    return ZipTarget(
        [
            ZipEntry("readme.txt", source=b"the next entry is read from disk while it streams\n"),
            ZipEntry(os.path.basename(name), path=data_path(name)),
        ],
        download_name="pair.zip",
    )


def marked(request: Any, name: str) -> ZipTarget:
    top = data_path(name)
    entries = []
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames.sort()
        for filename in sorted(filenames):
            path = os.path.join(dirpath, filename)
            entries.append(ZipEntry(os.path.relpath(path, top), path=path))
    size = int(request.args.get("source_kib", "256")) * 1024
    known = None if request.args.get("unsized") else size  # ?unsized=1: a source of unknown size
    entries.append(ZipEntry("generated.bin", source=MarkedSource(request.method, size), size=known))
    return ZipTarget(entries, download_name="marked.zip")


def optional_settings() -> dict[str, str]:
    """Settings given only when their variable is set and this version of the middleware
    knows them (see ``ZM_TEST_COLD_RANGE_LIMIT``)."""
    known = {setting.name for setting in dataclasses.fields(Settings)}
    names = {
        "ZM_TEST_COLD_RANGE_LIMIT": "cold_range_limit",
        "ZM_TEST_ZERO_COPY": "zero_copy",
        "ZM_TEST_DATA_DESCRIPTORS": "data_descriptors",
    }
    return {key: os.environ[name] for name, key in names.items() if os.environ.get(name) and key in known}


app = ZipMiddleware(
    plain_app,
    routes={
        "/folder/<path:name>": folder,
        "/file/<path:name>": file,
        "/path": any_path,
        "/broken/<int:megabytes>": broken,
        "/pair/<path:name>": pair,
        "/marked/<path:name>": marked,
        "/pending": lambda request: Pending(retry_after=7),
        "/failed": lambda request: Failed("Gone for good.", status=410),
        "/none": lambda request: None,
    },
    roots=[DATA],
    exclude=["updates"],
    ignore=["*.nfo"],
    chunk_size=int(os.environ.get("ZM_TEST_CHUNK_SIZE", "65536")),
    crc_cache=os.environ.get("ZM_TEST_CRC_CACHE") or None,
    **optional_settings(),
    stall_timeout=os.environ.get("ZM_TEST_STALL_TIMEOUT", "60"),
)


def warm_up() -> None:
    """Run every kind of download once in this process, so that all lazily imported
    modules are loaded now. With ``gunicorn --preload --user nobody`` the worker
    drops privileges before its first request and may not be able to read the
    Python installation any more (it may live under a private home directory).
    """
    import contextlib
    import shutil
    import tempfile

    from werkzeug.test import Client

    top = tempfile.mkdtemp(prefix="zm-warm-up-")
    try:
        os.makedirs(os.path.join(top, "d", "sub"))
        for rel in ("d/a.txt", "d/sub/é.bin", "single.bin"):
            with open(os.path.join(top, rel), "wb") as out:
                out.write(b"warm-up data\n" * 100)
        routes: dict[str, Callable[..., Any]] = {
            "/f/<path:name>": lambda request, name: FileTarget(os.path.join(top, name)),
            "/z/<path:name>": lambda request, name: ZipTarget.from_directory(os.path.join(top, name)),
            "/b/<int:megabytes>": broken,
        }
        client = Client(ZipMiddleware(plain_app, routes=routes, roots=[top]))
        for method, path, headers in [
            ("GET", "/f/single.bin", {}),
            ("GET", "/f/single.bin", {"Range": "bytes=0-9"}),
            ("GET", "/f/single.bin", {"If-None-Match": "*"}),
            ("HEAD", "/f/single.bin", {}),
            ("GET", "/f/missing.bin", {}),
            ("GET", "/f/../outside", {}),
            ("GET", "/z/d", {}),
            ("HEAD", "/z/d", {}),
            ("GET", "/b/0", {}),
            ("POST", "/z/d", {}),
            ("GET", "/elsewhere", {}),
        ]:
            with contextlib.suppress(Exception):  # only the imports matter here
                client.open(path, method=method, headers=headers).close()
        "localhost".encode("idna")
    finally:
        shutil.rmtree(top, ignore_errors=True)


if os.environ.get("ZM_TEST_WARMUP"):
    warm_up()


if os.environ.get("ZM_TEST_LOG_LEVEL"):
    # A handler of its own: the middleware's info messages (e.g. what a folder's walk skipped)
    # then reach gunicorn's log too, which is this process's stderr.
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("zipmiddleware %(levelname)s: %(message)s"))
    logging.getLogger("zipmiddleware").addHandler(_handler)
    logging.getLogger("zipmiddleware").setLevel(os.environ["ZM_TEST_LOG_LEVEL"])
