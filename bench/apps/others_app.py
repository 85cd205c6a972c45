"""Other streaming-ZIP libraries behind plain WSGI apps, for bench/engine_speed.py.

Runs in its own virtualenv (zipstream-ng installs the import name ``zipstream``, as
zipmiddleware's zipstream-new does), with that virtualenv's gunicorn.

Environment: ``ZM_BENCH_FOLDER``, the folder whose regular files (sorted by name) are zipped,
stored (no compression).

Routes:

``/zipstream-ng``
    ``ZipStream.from_path(folder)``: stored, sized; ``len()`` is the Content-Length.
``/stream-zip``
    ``stream_zip`` with ``NO_COMPRESSION_64``: each member is read whole into memory to learn
    its CRC-32 before its local header goes out; no size is known, so gunicorn chunks.
``/stream-zip-known-crc``
    ``stream_zip`` with ``NO_COMPRESSION_64(size, crc_32)``, the CRC-32s computed once when
    this module is imported (a warm cache, as it were): members stream in 64 KiB reads and
    stream-zip still checks each CRC-32 as it goes; chunked.

Any other path answers ``200 ok`` (the readiness check).
"""

from __future__ import annotations

import os
import stat
import zlib
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

import zipstream
from stream_zip import NO_COMPRESSION_64, stream_zip

if not hasattr(zipstream, "ZipStream"):
    raise ImportError(f"{zipstream.__file__} is not zipstream-ng")

FOLDER = os.environ["ZM_BENCH_FOLDER"]
READ_SIZE = 65536
NAMES = sorted(name for name in os.listdir(FOLDER) if os.path.isfile(os.path.join(FOLDER, name)))


def file_crc32(path: str) -> int:
    crc = 0
    with open(path, "rb", buffering=0) as file:
        while data := file.read(1 << 20):
            crc = zlib.crc32(data, crc)
    return crc


KNOWN_CRCS = {name: file_crc32(os.path.join(FOLDER, name)) for name in NAMES}


def read_chunks(path: str) -> Iterator[bytes]:
    with open(path, "rb", buffering=0) as file:
        while data := file.read(READ_SIZE):
            yield data


def members(known_crc: bool) -> Iterator[tuple[str, datetime, int, Any, Iterable[bytes]]]:
    for name in NAMES:
        path = os.path.join(FOLDER, name)
        info = os.stat(path)
        method = NO_COMPRESSION_64(info.st_size, KNOWN_CRCS[name]) if known_crc else NO_COMPRESSION_64
        mtime = datetime.fromtimestamp(info.st_mtime, tz=UTC)
        yield name, mtime, stat.S_IFREG | 0o644, method, read_chunks(path)


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ.get("PATH_INFO")
    if path == "/zipstream-ng":
        archive = zipstream.ZipStream.from_path(FOLDER)
        headers = [("Content-Type", "application/zip"), ("Content-Length", str(len(archive)))]
        start_response("200 OK", headers)
        return iter(archive)
    if path in ("/stream-zip", "/stream-zip-known-crc"):
        start_response("200 OK", [("Content-Type", "application/zip")])
        return stream_zip(members(known_crc=path == "/stream-zip-known-crc"))
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3")])
    return [b"ok\n"]
