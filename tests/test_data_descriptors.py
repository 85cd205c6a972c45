"""``data_descriptors = false``: each stored file entry's CRC-32 and sizes in its local header,
no data descriptors (what Java's ZipInputStream needs: tests/test_readers.py reads these
archives with it). In-process; tests/test_zero_copy.py covers the same through gunicorn."""

from __future__ import annotations

import io
import os
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

import pytest
from werkzeug.test import Client, EnvironBuilder, TestResponse

from zipmiddleware import ZipEntry, ZipMiddleware, ZipTarget
from zipmiddleware.crccache import Key, SQLiteCrcCache
from zipmiddleware.errors import StreamError

from .conftest import plain_app, read_zip, write_tree


def rchar() -> int:
    with open("/proc/self/io") as io_counters:
        return next(int(line.split()[1]) for line in io_counters if line.startswith("rchar:"))


def client_for(root: Path, cache: Path, **options: Any) -> Client:
    middleware = ZipMiddleware(
        plain_app,
        routes={"/d": lambda request: ZipTarget.from_directory(root)},
        roots=[root],
        crc_cache=str(cache),
        zero_copy=False,
        data_descriptors=False,
        **options,
    )
    return Client(middleware)


def get(client: Client, **headers: str) -> TestResponse:
    response = client.get("/d", headers={k.replace("_", "-"): v for k, v in headers.items()}, buffered=True)
    response.get_data()
    return response


def local_headers(body: bytes) -> dict[str, tuple[int, int, int, int]]:
    """Per entry: flags, CRC-32, compressed and uncompressed size as its local header says them."""
    found = {}
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        for info in archive.infolist():
            flags, _, _, _, crc, csize, usize, n = struct.unpack_from(
                "<HHHHLLLH", body, info.header_offset + 6
            )
            found[info.filename] = (flags, crc, csize, usize)
    return found


MB = 1 << 20


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return write_tree(
        tmp_path / "game",
        {
            "a.bin": os.urandom(3 * MB),
            "b/c.bin": os.urandom(2 * MB),
            "b/empty": b"",
            "z.txt": b"last",
        },
    )


def test_headers_hold_crcs_and_sizes_and_no_descriptor_follows(tree: Path, tmp_path: Path) -> None:
    body = get(client_for(tree, tmp_path / "c.sqlite")).data
    files = read_zip(body)
    headers = local_headers(body)
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        for info in archive.infolist():
            assert headers[info.filename] == (0, info.CRC, info.file_size, info.file_size)
            assert files[info.filename] == (tree / info.filename).read_bytes()
    assert b"PK\x07\x08" not in body.replace((tree / "a.bin").read_bytes(), b"").replace(
        (tree / "b/c.bin").read_bytes(), b""
    )


def test_the_setting_changes_the_bytes_and_so_the_etag(tree: Path, tmp_path: Path) -> None:
    without = get(client_for(tree, tmp_path / "c.sqlite"))
    middleware = ZipMiddleware(
        plain_app,
        routes={"/d": lambda request: ZipTarget.from_directory(tree)},
        roots=[tree],
        zero_copy=False,
    )
    with_descriptors = get(Client(middleware))
    assert without.headers["ETag"] != with_descriptors.headers["ETag"]
    # 16 bytes less for each of the three entries that would have a descriptor (not the empty one)
    assert len(without.data) == len(with_descriptors.data) - 3 * 16
    assert read_zip(without.data) == read_zip(with_descriptors.data)


def test_an_uncached_file_is_read_once_before_it_is_sent(tree: Path, tmp_path: Path) -> None:
    """Cold: every file twice (its CRC-32 first, then its data); warm: once (checked on the way)."""
    data = 5 * MB + 4
    client = client_for(tree, tmp_path / "c.sqlite")
    before = rchar()
    stream = client.get("/d", buffered=False)
    first = next(iter(stream.response))
    # The first bytes out wait for the whole first file: its CRC-32 is in the first header.
    assert rchar() - before >= 3 * MB
    assert first.startswith(b"PK\x03\x04")
    b"".join(stream.response)
    stream.close()
    cold = rchar() - before
    before = rchar()
    get(client)
    warm = rchar() - before
    assert 2 * data <= cold < 2 * data + MB
    assert data <= warm < data + MB


def test_resuming_on_a_cold_server_is_a_range_not_the_whole_archive(tree: Path, tmp_path: Path) -> None:
    """A resume sends every file after its start whole: reading each first costs the server
    what it sends again, not more, so cold_range_limit does not turn it into a 200."""
    full = get(client_for(tree, tmp_path / "warm.sqlite")).data
    start = full.index(b"b/c.bin") + 100  # inside the second file's data
    cold = client_for(tree, tmp_path / "cold.sqlite", cold_range_limit=MB)
    for offset in (100, start, len(full) - 1000):
        response = get(cold, Range=f"bytes={offset}-")
        assert response.status_code == 206, offset
        assert response.data == full[offset:]


def test_a_wrong_cached_crc_in_a_header_aborts_and_is_corrected(tree: Path, tmp_path: Path) -> None:
    """A cached CRC-32 goes out in a header before the data is read: the data read after it must
    give the same value, or the download aborts (never a clean end) and the cache is corrected."""
    cache = tmp_path / "c.sqlite"
    good = get(client_for(tree, cache)).data
    st = (tree / "b/c.bin").stat()
    key = Key("game/b/c.bin", st.st_size, str(st.st_mtime_ns))  # from the root's name on: tree is .../game
    store = SQLiteCrcCache(cache)
    right = store.get_many([key])[key]
    assert right == zlib.crc32((tree / "b/c.bin").read_bytes())
    store.put_many({key: right ^ 1})  # with a valid check value: as if someone recomputed it
    response = client_for(tree, cache).get("/d", buffered=False)  # a new middleware: nothing confirmed
    with pytest.raises(StreamError, match="does not give"):
        b"".join(response.response)
    response.close()
    assert store.get_many([key])[key] == right
    assert get(client_for(tree, cache)).data == good


def test_sources_keep_their_descriptor(tree: Path, tmp_path: Path) -> None:
    target = ZipTarget(
        [
            ZipEntry("a.bin", path=tree / "a.bin"),
            ZipEntry("sized.txt", source=[b"abc"], size=3),
            ZipEntry("unsized.txt", source=iter([b"de", b"f"])),
        ],
        "mixed.zip",
    )
    for sized in (True, False):
        entries = target.entries if not sized else target.entries[:2]
        middleware = ZipMiddleware(
            plain_app,
            routes={"/m": lambda request, entries=entries: ZipTarget(list(entries), "m.zip")},
            roots=[tree],
            crc_cache=str(tmp_path / "c.sqlite"),
            zero_copy=False,
            data_descriptors=False,
        )
        body = b"".join(middleware(EnvironBuilder(path="/m").get_environ(), lambda *a: None))  # type: ignore[arg-type]
        flags = {name: fields[0] for name, fields in local_headers(body).items()}
        assert flags["a.bin"] == 0 and flags["sized.txt"] == 8
        assert read_zip(body)["a.bin"] == (tree / "a.bin").read_bytes()
