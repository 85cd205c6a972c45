"""Versioned sources (an object whose version and size are known before it is read, such as an S3
object): archives of files and such sources get an exact length, a strong ETag and ranges that
fetch only the parts they send; one such source alone is sent as it is, with ranges too.

The source here is a plain implementation of the protocol over bytes held in memory, which
records every part asked of it and can be changed or made to fail: what a user's own versioned
source would be. The S3 one is tested against a real S3 API in test_s3.py.
"""

from __future__ import annotations

import io
import threading
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from werkzeug.test import Client

from zipmiddleware import SourceTarget, ZipEntry, ZipMiddleware, ZipTarget
from zipmiddleware.crccache import Key, SQLiteCrcCache
from zipmiddleware.sources import SourceError, is_versioned

from .clients import wsgi_get as get

MIB = 1024 * 1024


class Stored:
    """A versioned source over bytes: ``open(offset, stop)`` gives that part of the version it
    was listed with, or refuses (like S3's If-Match) once the object was replaced."""

    def __init__(
        self, name: str, data: bytes, mtime: float = 1_700_000_000.0, piece: int = 64 * 1024
    ) -> None:
        self.name = f"mem://{name}"
        self.current = data
        self.size = len(data)
        self.version = self.etag(data)
        self.mtime = mtime
        self.piece = piece
        self.opened: list[tuple[int, int | None]] = []
        self.fail_after: int | None = None  # bytes of the next part before a dropped connection
        self.lock = threading.Lock()

    @staticmethod
    def etag(data: bytes) -> str:
        return f'"{zlib.crc32(data):08x}-{len(data)}"'

    def replace(self, data: bytes) -> None:
        self.current = data

    def open(self, offset: int, stop: int | None = None) -> Iterator[bytes]:
        with self.lock:
            self.opened.append((offset, stop))
            fail_after, self.fail_after = self.fail_after, None
        if self.etag(self.current) != self.version:
            raise SourceError("changed at its origin", transient=False)
        data = self.current[offset : self.size if stop is None else stop]
        return self._pieces(data, fail_after)

    def _pieces(self, data: bytes, fail_after: int | None) -> Iterator[bytes]:
        for start in range(0, len(data), self.piece):
            if fail_after is not None and start >= fail_after:
                raise SourceError("connection failed")
            yield data[start : start + self.piece]


def payload(size: int, seed: int) -> bytes:
    block = bytes((seed * 131 + index * 7) % 251 for index in range(4096))
    return (block * (size // len(block) + 1))[:size]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "games"
    (root / "sub").mkdir(parents=True)
    (root / "readme.txt").write_bytes(b"read me\n" * 100)
    (root / "sub" / "data.bin").write_bytes(payload(300_000, 3))
    return root


def archive_app(tree: Path, sources: list[Stored], cache: Any = ":memory:", **settings: Any) -> ZipMiddleware:
    def resolve(request: Any) -> ZipTarget:
        entries = [ZipEntry("readme.txt", path=tree / "readme.txt")]
        entries += [ZipEntry(f"objects/{index}.bin", source=source) for index, source in enumerate(sources)]
        entries.append(ZipEntry("sub/data.bin", path=tree / "sub" / "data.bin"))
        return ZipTarget(entries, "mixed.zip")

    return ZipMiddleware(
        lambda environ, start_response: [],
        routes={"/zip": resolve},
        roots=[str(tree)],
        crc_cache=cache,
        **settings,
    )


def objects(count: int = 3) -> list[Stored]:
    sizes = [700_000, 2 * MIB + 5, 150_000, 1, 0, 90_000][:count]
    return [Stored(f"bucket/{index}", payload(size, index + 10)) for index, size in enumerate(sizes)]


def test_the_protocol_is_what_is_versioned() -> None:
    assert is_versioned(Stored("a", b"x"))
    assert not is_versioned(b"x") and not is_versioned(iter([b"x"]))


def test_archive_of_files_and_versioned_sources_is_sized_and_has_validators(tree: Path) -> None:
    sources = objects()
    response, body = get(archive_app(tree, sources), "/zip")
    assert response.status_code == 200
    assert int(response.headers["Content-Length"]) == len(body)
    assert response.headers["Accept-Ranges"] == "bytes"
    assert response.headers["ETag"].startswith('"zip-')
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        assert archive.testzip() is None
        for index, source in enumerate(sources):
            assert archive.read(f"objects/{index}.bin") == source.current
    assert all(source.opened == [(0, None)] for source in sources)  # each read once, whole


def test_every_range_equals_the_slice_and_fetches_only_its_parts(tree: Path) -> None:
    sources = objects()
    app = archive_app(tree, sources)
    full = get(app, "/zip")[1]
    for source in sources:
        source.opened.clear()
    # A range inside the second object's data, after the full download taught the cache.
    start, stop = 1_000_000, 1_500_000
    response, body = get(app, "/zip", Range=f"bytes={start}-{stop - 1}")
    assert response.status_code == 206
    assert body == full[start:stop]
    assert sources[0].opened == [] and sources[2].opened == []
    assert len(sources[1].opened) == 1
    offset, end = sources[1].opened[0]
    assert end is not None and 0 < offset < end < sources[1].size
    assert end - offset <= stop - start  # no more of the object than the range sends
    # The end of the archive (the central directory) needs no source at all now.
    for source in sources:
        source.opened.clear()
    tail, body = get(app, "/zip", Range="bytes=-2000")
    assert tail.status_code == 206 and body == full[-2000:]
    assert all(source.opened == [] for source in sources)


def test_a_cold_range_reads_the_source_for_its_crc_and_teaches_the_cache(tree: Path, tmp_path: Path) -> None:
    sources = objects()
    store = SQLiteCrcCache(tmp_path / "crc.sqlite")
    full = get(archive_app(tree, objects()), "/zip")[1]
    app = archive_app(tree, sources, cache=store)
    tail, body = get(app, "/zip", Range="bytes=-1000")  # the whole central directory
    assert tail.status_code == 206 and body == full[-1000:]
    assert all(source.opened == [(0, source.size)] for source in sources)  # read, not sent, for their CRC-32s
    keys = [Key(source.name, source.size, source.version) for source in sources]
    assert store.get_many(keys) == {
        key: zlib.crc32(source.current) for key, source in zip(keys, sources, strict=True)
    }
    for source in sources:
        source.opened.clear()
    assert get(app, "/zip", Range="bytes=-1000")[1] == full[-1000:]
    assert all(source.opened == [] for source in sources)


@pytest.mark.parametrize("start", [0, 5000, 1_200_000, 3_000_000])
def test_resumes_at_any_byte_give_the_same_archive(tree: Path, start: int) -> None:
    full, body = get(archive_app(tree, objects()), "/zip")
    resumed, rest = get(
        archive_app(tree, objects()), "/zip", Range=f"bytes={start}-", If_Range=full.headers["ETag"]
    )
    assert resumed.status_code == 206
    assert body[:start] + rest == body


def test_the_etag_follows_the_sources_versions(tree: Path) -> None:
    first = get(archive_app(tree, objects()), "/zip")[0].headers["ETag"]
    again = get(archive_app(tree, objects()), "/zip")[0].headers["ETag"]
    changed = objects()
    changed[1] = Stored("bucket/1", payload(changed[1].size, 99))
    other = get(archive_app(tree, changed), "/zip")[0].headers["ETag"]
    assert first == again != other


def test_a_source_changed_after_planning_aborts_and_never_splices(tree: Path) -> None:
    sources = objects()
    app = archive_app(tree, sources, prefetch=0)  # nothing opened before its turn
    response = Client(app).get("/zip", buffered=False)
    chunks = iter(response.response)
    received = next(chunks)
    sources[1].replace(payload(sources[1].size, 77))  # same size, another version
    with pytest.raises(Exception, match="changed at its origin"):
        for chunk in chunks:
            received += chunk
    response.close()
    assert len(received) < int(response.headers["Content-Length"])


def test_a_dropped_connection_resumes_inside_the_part(tree: Path) -> None:
    sources = objects()
    app = archive_app(tree, sources, retry_backoff=0)
    full = get(archive_app(tree, objects()), "/zip")[1]
    start, stop = 1_000_000, 2_500_000
    sources[1].fail_after = 128 * 1024
    response, body = get(app, "/zip", Range=f"bytes={start}-{stop - 1}")
    assert response.status_code == 206 and body == full[start:stop]
    parts = [part for part in sources[1].opened if part[1] is not None]
    (first, end), (again, end_again) = parts[:2]
    assert again == first + 128 * 1024 and end_again == end  # resumed where it broke, same end


def test_a_first_source_that_fails_gets_a_502(tree: Path) -> None:
    source = Stored("bucket/x", payload(5000, 1))
    source.replace(b"y" * 5000)

    def resolve(request: Any) -> ZipTarget:
        return ZipTarget([ZipEntry("x.bin", source=source)], "x.zip")

    app = ZipMiddleware(lambda e, s: [], routes={"/zip": resolve}, crc_cache=":memory:")
    response, body = get(app, "/zip")
    assert response.status_code == 502
    assert b"mem://" not in body


# -- one source, as it is ---------------------------------------------------------------------


def source_app(source: Stored, **settings: Any) -> ZipMiddleware:
    def resolve(request: Any) -> SourceTarget:
        return SourceTarget(source, download_name="object.bin")

    return ZipMiddleware(lambda e, s: [], routes={"/object": resolve}, crc_cache=":memory:", **settings)


def test_a_source_target_is_sent_with_its_size_validators_and_ranges() -> None:
    source = Stored("bucket/object", payload(3 * MIB + 17, 5))
    app = source_app(source)
    response, body = get(app, "/object")
    assert response.status_code == 200
    assert body == source.current
    assert int(response.headers["Content-Length"]) == source.size
    assert response.headers["Accept-Ranges"] == "bytes"
    assert response.headers["Last-Modified"] == "Tue, 14 Nov 2023 22:13:20 GMT"
    assert "filename=object.bin" in response.headers["Content-Disposition"]
    etag = response.headers["ETag"]
    assert etag.startswith('"src-')
    source.opened.clear()
    part, body = get(app, "/object", Range="bytes=1000-1999", If_Range=etag)
    assert part.status_code == 206 and body == source.current[1000:2000]
    assert part.headers["Content-Range"] == f"bytes 1000-1999/{source.size}"
    assert source.opened == [(1000, 2000)]
    assert get(app, "/object", If_None_Match=etag)[0].status_code == 304
    stale, body = get(app, "/object", Range="bytes=10-", If_Range='"other"')
    assert stale.status_code == 200 and body == source.current
    # A date tells versions apart only to the second: never enough to resume with.
    dated, body = get(app, "/object", Range="bytes=10-", If_Range=response.headers["Last-Modified"])
    assert dated.status_code == 200 and body == source.current
    assert get(app, "/object", Range=f"bytes={source.size}-")[0].status_code == 416
    source.opened.clear()
    head, _ = get(app, "/object", method="HEAD")
    assert head.status_code == 200 and head.headers["Content-Length"] == str(source.size)
    assert source.opened == []


def test_a_source_target_resumes_a_dropped_connection_and_refuses_a_change() -> None:
    source = Stored("bucket/object", payload(MIB, 6), piece=32 * 1024)
    source.fail_after = 256 * 1024
    response, body = get(source_app(source, retry_backoff=0), "/object")
    assert body == source.current
    assert source.opened == [(0, None), (256 * 1024, None)]
    source.replace(payload(MIB, 8))
    failed, body = get(source_app(source), "/object")
    assert failed.status_code == 502
    assert b"mem://" not in body


def test_an_empty_source_target_fetches_nothing() -> None:
    source = Stored("bucket/empty", b"")
    response, body = get(source_app(source), "/object")
    assert response.status_code == 200 and body == b""
    assert source.opened == []
