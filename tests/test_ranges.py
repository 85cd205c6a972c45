"""Sized, cacheable, resumable ZIPs, in-process: Content-Length, validators, ranges, the CRC-32 cache."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from werkzeug.http import http_date
from werkzeug.test import Client, EnvironBuilder, TestResponse

from zipmiddleware import ConfigError, FileTarget, ZipEntry, ZipMiddleware, ZipTarget
from zipmiddleware.config import Settings
from zipmiddleware.crccache import VERSIONS_KEPT, Key, SQLiteCrcCache
from zipmiddleware.errors import StreamError
from zipmiddleware.planning import PlannedEntry, Planner, zip_second
from zipmiddleware.zipengine import Layout, ZipRange, ZipStream, crc32_combine, merged

from .conftest import plain_app, read_zip, write_generated_tree, write_tree
from .test_engine import trees


def client_for(root: Path, target: Callable[[], Any] | None = None, **options: Any) -> Client:
    """A client whose ``/d`` route zips ``root`` (or answers ``target()``)."""
    resolve = target or (lambda: ZipTarget.from_directory(root))
    middleware = ZipMiddleware(plain_app, routes={"/d": lambda request: resolve()}, roots=[root], **options)
    return Client(middleware)


def get(client: Client, path: str = "/d", method: str = "GET", **headers: str) -> TestResponse:
    """One request, its body read to the end (and so its files read) before it returns."""
    headers = {k.replace("_", "-"): v for k, v in headers.items()}
    response = client.open(path, method=method, headers=headers, buffered=True)
    response.get_data()
    return response


def rchar() -> int:
    """Bytes this process has read through read(2) and friends so far."""
    with open("/proc/self/io") as io:
        return next(int(line.split()[1]) for line in io if line.startswith("rchar:"))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return write_tree(
        tmp_path / "game",
        {
            "game.exe": os.urandom(300_000),
            "data/levels.pak": os.urandom(200_000),
            "data/empty.cfg": b"",
            "Dokumentation/Über.txt": "Grüße\n".encode() * 1000,
        },
    )


# -- Content-Length -------------------------------------------------------------------------


def test_stored_archive_has_exact_length_and_validators(folder: Path) -> None:
    response = get(client_for(folder))
    assert response.status_code == 200
    assert response.headers["Content-Length"] == str(len(response.data))
    assert response.headers["Accept-Ranges"] == "bytes"
    assert response.headers["ETag"].startswith('"zip-')
    newest = max(p.stat().st_mtime for p in folder.rglob("*") if p.is_file())
    assert response.headers["Last-Modified"] == http_date(int(newest))
    assert read_zip(response.data)["Dokumentation/Über.txt"] == "Grüße\n".encode() * 1000


def test_head_has_the_same_headers_and_reads_no_file_data(folder: Path) -> None:
    client = client_for(folder)
    full = get(client)
    before = rchar()
    head = get(client, method="HEAD")
    assert rchar() - before < 4096
    assert head.data == b""
    for name in ("Content-Length", "ETag", "Last-Modified", "Accept-Ranges", "Content-Disposition"):
        assert head.headers[name] == full.headers[name]


def test_deflate_has_no_length_and_no_ranges(folder: Path) -> None:
    client = client_for(folder, compression_level=6)
    response = get(client, Range="bytes=0-99")
    assert response.status_code == 200
    assert "Content-Length" not in response.headers
    assert response.headers["Accept-Ranges"] == "none"
    # Deflate is deterministic for one zlib version and level: still a strong validator.
    assert get(client, If_None_Match=response.headers["ETag"]).status_code == 304
    assert response.headers["ETag"] != get(client_for(folder, compression_level=5)).headers["ETag"]


@pytest.mark.parametrize(
    ("entry", "length"),
    [
        (ZipEntry("s.txt", source=[b"abc", b"def"], size=6), True),
        (ZipEntry("s.txt", source=iter([b"abc", b"def"])), False),
    ],
    ids=["sized-source", "unsized-source"],
)
def test_sources_get_a_length_only_when_sized_and_never_ranges(
    folder: Path, entry: ZipEntry, length: bool
) -> None:
    target = ZipTarget([ZipEntry("game.exe", path=folder / "game.exe"), entry], "mixed.zip")
    response = get(client_for(folder, lambda: target), Range="bytes=10-20")
    assert response.status_code == 200
    assert ("Content-Length" in response.headers) is length
    if length:
        assert response.headers["Content-Length"] == str(len(response.data))
    assert response.headers["Accept-Ranges"] == "none"
    assert "ETag" not in response.headers  # a source's content is unknown before it is read
    assert read_zip(response.data)["s.txt"] == b"abcdef"


def test_a_broken_length_promise_aborts() -> None:
    assert list(merged([b"ab", b"cd"], 1024, 4)) == [b"abcd"]
    with pytest.raises(StreamError, match="not its promised 5"):
        list(merged([b"ab", b"cd"], 1024, 5))
    with pytest.raises(StreamError, match="longer than its promised 3"):
        list(merged([b"ab", b"cd"], 2, 3))


def test_file_modified_while_read_aborts(tmp_path: Path) -> None:
    """Same size, new content (so a new mtime): the download must not end cleanly."""
    root = write_tree(tmp_path / "g", {"a.bin": os.urandom(300_000), "b.bin": b"b" * 10})
    middleware = ZipMiddleware(
        plain_app,
        routes={"/d": lambda request: ZipTarget.from_directory(root)},
        roots=[root],
        chunk_size=4096,
    )
    stream = middleware(EnvironBuilder(path="/d").get_environ(), lambda *args: None)
    with pytest.raises(StreamError, match="modified while being read"):
        for index, _chunk in enumerate(stream):
            if index == 1:
                with open(root / "a.bin", "r+b") as file:
                    file.write(b"X" * 10)
                os.utime(root / "a.bin", ns=(1, 10**18))
    stream.close()  # type: ignore[attr-defined]


# -- property: every length and every slice ----------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=trees, data=st.data())
def test_length_and_random_slices_match_the_full_body(tmp_path_factory, files, data) -> None:
    root = tmp_path_factory.mktemp("tree")
    if len(write_generated_tree(root, files)) < 2:
        return
    descriptors = data.draw(st.booleans(), label="data_descriptors")
    cached = client_for(root, data_descriptors=descriptors)
    full = get(cached)
    body = full.data
    assert full.headers["Content-Length"] == str(len(body))
    read_zip(body)
    plan = Planner(cached.application.settings).plan(ZipTarget.from_directory(root))  # type: ignore[attr-defined]
    layout = Layout(plan.entries, data_descriptors=descriptors)  # type: ignore[union-attr]
    assert layout.length == len(body)
    # Offsets inside every kind of record: local headers, data, descriptors, the directory, the end.
    marks = [0, len(body) - 1, layout.directory_offset, len(body) - 22]
    for index in range(len(layout.entries)):
        marks += [layout.offsets[index] + 3, layout.data_offsets[index], layout.entry_end(index) - 5]
        marks += [layout.record_span(index)[0] + 7]
    cold = client_for(root, data_descriptors=descriptors)  # a second middleware: its cache is empty
    for _ in range(6):
        start = data.draw(st.sampled_from(marks) | st.integers(0, len(body) - 1))
        start = min(max(start, 0), len(body) - 1)
        stop = data.draw(
            st.integers(start, min(len(body) - 1, start + data.draw(st.sampled_from([0, 30, 5000]))))
        )
        for client in (cached, cold):
            response = get(client, Range=f"bytes={start}-{stop}")
            assert response.status_code == 206
            assert response.headers["Content-Range"] == f"bytes {start}-{stop}/{len(body)}"
            assert response.headers["Content-Length"] == str(stop - start + 1)
            assert response.data == body[start : stop + 1]
    suffix = data.draw(st.integers(1, len(body)))
    assert get(cold, Range=f"bytes=-{suffix}").data == body[-suffix:]


# -- validators and ranges, for an archive and a file ---------------------------------------------


@pytest.fixture(params=["zip", "file"])
def resource(request: pytest.FixtureRequest, folder: Path) -> tuple[Client, bytes, Path]:
    """A client for ``/d``, the full body, and a file whose change changes the body."""
    if request.param == "zip":
        client = client_for(folder)
    else:
        client = client_for(folder, lambda: FileTarget(folder / "game.exe"))
    return client, get(client).data, folder / "game.exe"


def test_conditional_get(resource: tuple[Client, bytes, Path]) -> None:
    client, body, file = resource
    archive = client.get("/d").headers["Content-Type"] == "application/zip"
    full = get(client)
    etag, date = full.headers["ETag"], full.headers["Last-Modified"]
    assert get(client, If_None_Match=etag).status_code == 304
    assert get(client, If_None_Match=f'"other", W/{etag}').status_code == 304  # weak comparison
    assert get(client, If_None_Match='"other"').status_code == 200
    # An archive's date (its newest file's) does not tell versions apart: only its ETag decides.
    assert get(client, If_Modified_Since=date).status_code == (200 if archive else 304)
    not_modified = get(client, If_None_Match=etag)
    assert not_modified.data == b"" and not_modified.headers["ETag"] == etag
    assert get(client, If_Match=etag).status_code == 200
    assert get(client, If_Match='"other"').status_code == 412
    old = "Thu, 01 Jan 1970 00:00:01 GMT"
    assert get(client, If_Unmodified_Since=old).status_code == (200 if archive else 412)

    os.utime(file, (1_700_000_000, 1_700_000_000))
    changed = get(client)
    assert changed.headers["ETag"] != etag
    assert get(client, If_None_Match=etag).status_code == 200


def test_ranges(resource: tuple[Client, bytes, Path]) -> None:
    client, body, file = resource
    archive = client.get("/d").headers["Content-Type"] == "application/zip"
    n = len(body)
    full = get(client)
    etag, date = full.headers["ETag"], full.headers["Last-Modified"]
    cases: list[tuple[dict[str, str], int, bytes]] = [
        ({"Range": "bytes=0-99"}, 206, body[:100]),
        ({"Range": f"bytes={n - 10}-"}, 206, body[-10:]),
        ({"Range": "bytes=-7"}, 206, body[-7:]),
        ({"Range": f"bytes=5-{n + 1000}"}, 206, body[5:]),
        ({"Range": f"bytes=-{n + 1000}"}, 206, body),  # a suffix longer than the body: all of it
        ({"Range": "bytes=abc"}, 200, body),  # malformed: ignored
        ({"Range": "bytes=9-3"}, 200, body),
        ({"Range": "items=0-3"}, 200, body),
        ({"Range": "bytes=0-1,5-6"}, 200, body),  # several ranges: the whole body
        ({"Range": "bytes=10-19", "If-Range": etag}, 206, body[10:20]),
        # A date in If-Range: exact for a file; for an archive, never enough (the whole body).
        ({"Range": "bytes=10-19", "If-Range": date}, 200 if archive else 206, body if archive else body[10:20]),
        ({"Range": "bytes=10-19", "If-Range": '"stale"'}, 200, body),
        ({"Range": "bytes=10-19", "If-Range": "W/" + etag}, 200, body),
        ({"Range": "bytes=10-19", "If-Range": "Thu, 01 Jan 1970 00:00:01 GMT"}, 200, body),
    ]
    for headers, status, expected in cases:
        response = client.get("/d", headers=headers)
        assert (response.status_code, response.data == expected) == (status, True), headers
        if status == 206:
            assert response.headers["Content-Length"] == str(len(expected))
    unsatisfiable = client.get("/d", headers={"Range": f"bytes={n}-"})
    assert unsatisfiable.status_code == 416
    assert unsatisfiable.headers["Content-Range"] == f"bytes */{n}"
    # HEAD ignores Range; the headers are those of the full body.
    head = client.open("/d", method="HEAD", headers={"Range": "bytes=0-9"})
    assert head.status_code == 200 and head.headers["Content-Length"] == str(n)


def test_an_archive_changed_under_the_same_date_is_never_spliced(tmp_path: Path) -> None:
    """A file replaced by an older one (rsync -a, tar x), or a file removed: the archive's
    newest mtime, its Last-Modified, stays; If-Range with it must give the whole new body,
    and If-Modified-Since must not answer 304."""
    root = write_tree(tmp_path / "g", {"a.bin": os.urandom(150_000), "b.bin": os.urandom(150_000)})
    os.utime(root / "a.bin", (1_600_000_000, 1_600_000_000))
    os.utime(root / "b.bin", (1_700_000_000, 1_700_000_000))
    client = client_for(root)
    before = get(client)
    date = before.headers["Last-Modified"]
    newer_content = root / "a.new"
    newer_content.write_bytes(os.urandom(150_000))
    os.utime(newer_content, (1_500_000_000, 1_500_000_000))  # older than b.bin: the date stays
    newer_content.replace(root / "a.bin")
    after = get(client)
    assert after.headers["Last-Modified"] == date and after.headers["ETag"] != before.headers["ETag"]
    resumed = get(client, Range="bytes=1000-", If_Range=date)
    assert (resumed.status_code, resumed.data) == (200, after.data)
    assert get(client, If_Modified_Since=date).status_code == 200


# -- what a range reads ----------------------------------------------------------------------


@pytest.fixture
def forty(tmp_path: Path) -> Path:
    root = tmp_path / "forty"
    block = os.urandom(1 << 20)
    for index in range(40):
        write_tree(root, {f"part{index:02}.bin": block * 4 + bytes([index])})
    return root


def test_a_range_near_the_end_reads_little_once_the_cache_is_warm(forty: Path) -> None:
    client = client_for(forty)
    full = get(client)
    length = len(full.data)
    assert length > 160 * (1 << 20)
    before = rchar()
    tail = get(client, Range="bytes=-1048576")
    read = rchar() - before
    assert tail.status_code == 206 and tail.data == full.data[-(1 << 20) :]
    assert read < 2 * (1 << 20), f"read {read} bytes for the last MiB"


def test_a_cold_range_reads_only_what_its_crcs_need(forty: Path) -> None:
    client = client_for(forty)
    layout = Layout(Planner(client.application.settings).plan(ZipTarget.from_directory(forty)).entries)  # type: ignore[attr-defined,union-attr]
    # Inside the data of entry 20, ending before its descriptor: no CRC-32 needed.
    start = layout.data_offsets[20] + 1000
    before = rchar()
    inside = get(client, Range=f"bytes={start}-{start + 99_999}")
    assert inside.status_code == 206 and len(inside.data) == 100_000
    assert rchar() - before < 200_000
    # Through entry 20's descriptor: entry 20 is read once, whole, for its CRC-32; nothing else.
    before = rchar()
    across = get(client, Range=f"bytes={start}-{layout.entry_end(20) + 10}")
    assert across.status_code == 206
    assert (4 << 20) < rchar() - before < (4 << 20) + 200_000
    # Only the end record (as a remote ZIP reader asks first): no file data at all.
    before = rchar()
    assert len(get(client, Range="bytes=-22").data) == 22
    assert rchar() - before < 64 * 1024


def test_full_download_and_ranges_fill_the_cache(forty: Path, tmp_path: Path) -> None:
    path = tmp_path / "crc.sqlite"
    client = client_for(forty, crc_cache=str(path))
    get(client, Range="bytes=0-10")  # a range that reads no whole file learns nothing
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM file_crc").fetchone() == (0,)
    body = get(client).data
    rows = sqlite3.connect(path).execute("SELECT name, size, version, crc FROM file_crc").fetchall()
    # Keyed by the path from the root's own name on, the size and the mtime in ns: no device,
    # inode or ctime, so that every host with a copy of the files knows them by the same keys.
    expected = {
        (f"forty/{p.name}", p.stat().st_size, str(p.stat().st_mtime_ns), zlib.crc32(p.read_bytes()))
        for p in forty.iterdir()
    }
    assert set(rows) == expected and len(rows) == 40
    # Another middleware (another worker) on the same file starts warm.
    other = client_for(forty, crc_cache=str(path))
    before = rchar()
    assert get(other, Range="bytes=-100").data == body[-100:]
    assert rchar() - before < 64 * 1024


# -- copies of the same files at other places (other hosts) --------------------------------------------


COPIED = {
    "doom/doom.wad": os.urandom(1_500_000),
    "doom/maps/e1m1.lmp": os.urandom(700_000),
    "doom/Liesmich-Grüße.txt": "Grüße\n".encode() * 500,
    "doom/empty.cfg": b"",
    "doom/run.sh": b"#!/bin/sh\nexec doom\n",
}


@pytest.fixture
def copies(tmp_path: Path) -> tuple[Path, Path]:
    """One folder at two places, as on two hosts: the roots .../a/games and .../mirror/b/games
    (the same folder name at other absolute paths), the second copied with shutil.copy2: the
    same bytes, modes and mtimes (to the ns), other inodes (and ctimes)."""
    first = write_tree(tmp_path / "a" / "games", COPIED)
    (first / "doom" / "run.sh").chmod(0o755)
    for index, rel in enumerate(sorted(COPIED)):
        os.utime(first / rel, ns=(1_700_000_000_123_456_789, 1_690_000_000_000_000_001 + index * 999_999_937))
    second = tmp_path / "mirror" / "b" / "games"
    shutil.copytree(first, second, copy_function=shutil.copy2)
    for rel in COPIED:
        one, other = (first / rel).stat(), (second / rel).stat()
        assert (one.st_mtime_ns, one.st_mode) == (other.st_mtime_ns, other.st_mode), rel
        assert one.st_ino != other.st_ino, rel
    return first, second


def zip_of(root: Path, **options: Any) -> Client:
    """A client whose ``/d`` route zips ``root``/doom, with ``root`` as the only root."""
    return client_for(root, lambda: ZipTarget.from_directory(root / "doom"), **options)


def test_copies_at_other_places_give_the_same_bytes_and_validators(
    copies: tuple[Path, Path], tmp_path: Path
) -> None:
    """Two servers (each with its own CRC-32 store) over copies of one folder give the same
    archive, ETag and Last-Modified, and the same ETag for a single file: a client may resume
    (If-Range) or revalidate (If-None-Match) on either, as with nginx's or Apache's mtime-size
    ETags behind a load balancer."""
    first, second = copies
    a = zip_of(first, crc_cache=str(tmp_path / "a.sqlite"))
    b = zip_of(second, crc_cache=str(tmp_path / "b.sqlite"))
    one, other = get(a), get(b)
    assert (one.status_code, other.status_code) == (200, 200)
    assert one.data == other.data
    assert read_zip(one.data)["Liesmich-Grüße.txt"] == COPIED["doom/Liesmich-Grüße.txt"]
    for name in ("ETag", "Last-Modified", "Content-Length"):
        assert one.headers[name] == other.headers[name], name
    etag = one.headers["ETag"]
    assert get(b, If_None_Match=etag).status_code == 304
    resumed = get(b, Range="bytes=1000000-", If_Range=etag)  # a download begun on A, resumed on B
    assert (resumed.status_code, resumed.data) == (206, one.data[1_000_000:])
    # Both stores learnt the very same rows: the keys hold nothing of the host.
    rows = []
    for store in ("a.sqlite", "b.sqlite"):
        with sqlite3.connect(tmp_path / store) as db:
            rows.append(sorted(db.execute("SELECT name, size, version, crc FROM file_crc")))
    assert rows[0] == rows[1] and len(rows[0]) == 4
    assert ("games/doom/maps/e1m1.lmp", 700_000) in [row[:2] for row in rows[0]]

    files = [client_for(root, lambda root=root: FileTarget(root / "doom" / "doom.wad")) for root in copies]
    one, other = get(files[0]), get(files[1])
    assert one.data == other.data == COPIED["doom/doom.wad"]
    st = (first / "doom" / "doom.wad").stat()
    assert one.headers["ETag"] == other.headers["ETag"] == f'"{st.st_mtime_ns:x}-{st.st_size:x}"'
    assert one.headers["Last-Modified"] == other.headers["Last-Modified"]
    resumed = get(files[1], Range="bytes=1000-", If_Range=one.headers["ETag"])
    assert (resumed.status_code, resumed.data) == (206, COPIED["doom/doom.wad"][1000:])


def test_a_shared_store_serves_what_one_host_learnt_to_another(
    copies: tuple[Path, Path], tmp_path: Path
) -> None:
    """One SQLite store for two servers over copies of a folder: after a full download through
    A, ranges of B's archive that need every CRC-32 (its end) or a big file's (a resume in its
    middle) read no file data on B. With cold_range_limit 0, a range that would read any data it
    does not send gets the whole archive (200) instead: a 206 proves B's cold work was none, and
    the same ranges from B's copy with a store of its own show that they would need some."""
    first, second = copies
    store = tmp_path / "shared.sqlite"
    a = zip_of(first, crc_cache=str(store))
    b = zip_of(second, crc_cache=str(store), cold_range_limit=0)
    body = get(a).data
    with sqlite3.connect(store) as db:
        learnt = sorted(db.execute("SELECT name, size, version, crc FROM file_crc"))
    expected = sorted(
        (f"games/{rel}", len(data), str((first / rel).stat().st_mtime_ns), zlib.crc32(data))
        for rel, data in COPIED.items()
        if data
    )
    assert learnt == expected
    wad = read_zip(body)  # where doom.wad's data lies: its name is followed by its data
    assert wad["doom.wad"] == COPIED["doom/doom.wad"]
    middle = body.index(b"doom.wad") + len("doom.wad") + 750_000
    for index, header in enumerate(("bytes=-100", f"bytes={middle}-")):
        alone = zip_of(second, crc_cache=str(tmp_path / f"alone-{index}.sqlite"), cold_range_limit=0)
        assert get(alone, Range=header).status_code == 200, header  # cold work needed: whole archive
        before = rchar()
        tail = get(b, Range=header)
        read = rchar() - before
        start = len(body) - 100 if header == "bytes=-100" else middle
        assert (tail.status_code, tail.data == body[start:]) == (206, True), header
        assert read < len(body) - start + 64 * 1024, (header, read)  # what it sends, no more
    with sqlite3.connect(store) as db:
        assert sorted(db.execute("SELECT name, size, version, crc FROM file_crc")) == learnt


# -- the cache itself ---------------------------------------------------------------------------


def test_cache_round_trip_and_big_keys(tmp_path: Path) -> None:
    """Keys at the edges of what the store keeps: the largest size SQLite holds, a long name with
    characters outside ASCII (and outside the BMP), a long version; keys that differ in one part
    only are different keys."""
    small = Key("games/doom/x.wad", 3, "4")
    big = Key("spiele/" + "Übersetzung-日本語-🎮/" * 200 + "ß.bin", 2**63 - 1, str(2**64 + 12345))
    near = [small._replace(name="games/doom/X.wad"), small._replace(size=4), small._replace(version="40")]
    for cache in (SQLiteCrcCache(), SQLiteCrcCache(tmp_path / "c.sqlite")):
        cache.put_many({small: 0xDEADBEEF, big: 7})
        assert cache.get_many([small, big, Key("other", 9, "9"), *near]) == {small: 0xDEADBEEF, big: 7}
    reopened = SQLiteCrcCache(tmp_path / "c.sqlite")  # the file keeps them, names and all
    assert reopened.get_many([small, big]) == {small: 0xDEADBEEF, big: 7}
    with sqlite3.connect(tmp_path / "c.sqlite") as db:
        rows = db.execute("SELECT name, size, version, crc FROM file_crc ORDER BY size").fetchall()
    assert rows == [(*small, 0xDEADBEEF), (*big, 7)]


def test_a_name_keeps_rows_of_its_last_versions_only(tmp_path: Path) -> None:
    """Rewriting a file over and over does not grow the SQLite store: a name keeps the rows of
    the VERSIONS_KEPT versions written last (CRC-32s and checkpoints alike), so a few versions
    in use at once (copies with other mtimes) stay warm, and other names keep theirs."""
    cache = SQLiteCrcCache(tmp_path / "c.sqlite")
    versions = [Key("games/doom/doom.wad", 40 << 20, str(1_700_000_000_000_000_000 + n)) for n in range(50)]
    other = Key("games/doom/readme.txt", 3, "1")
    cache.put_many({other: 9})
    for n, key in enumerate(versions):
        cache.put_checkpoints(key, [(16 << 20, n)])
        cache.put_many({key: n})
    kept = versions[-VERSIONS_KEPT:]
    assert cache.get_many([*versions, other]) == {**{key: int(key.version[-2:]) for key in kept}, other: 9}
    for n, key in enumerate(versions):  # cut downloads only: checkpoints of each version
        cache.put_checkpoints(key, [(16 << 20, 100 + n), (32 << 20, 200 + n)])
    assert cache.get_checkpoints(versions) == {
        key: [(16 << 20, 100 + n), (32 << 20, 200 + n)] for n, key in enumerate(versions) if key in kept
    }
    # Two copies whose mtimes differ, used in turns, both stay known.
    a, b = versions[0], versions[1]
    for _ in range(10):
        cache.put_many({a: 1})
        cache.put_many({b: 2})
        assert cache.get_many([a, b]) == {a: 1, b: 2}
    # A write of more versions than are kept at once keeps them all (never rows of the same write).
    sizes = {Key("games/sizes.bin", size, "1"): size for size in range(2 * VERSIONS_KEPT)}
    cache.put_many(sizes)
    assert cache.get_many(sizes) == sizes
    with sqlite3.connect(tmp_path / "c.sqlite") as db:
        counts = dict(db.execute("SELECT name, count(*) FROM file_crc GROUP BY name"))
        versions_with_checkpoints = db.execute("SELECT count(DISTINCT version) FROM prefix_crc").fetchone()[0]
    assert counts == {"games/doom/doom.wad": VERSIONS_KEPT, "games/doom/readme.txt": 1, "games/sizes.bin": 8}
    assert versions_with_checkpoints <= VERSIONS_KEPT


def test_bad_cache_settings_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="crc_cache"):
        ZipMiddleware(plain_app, crc_cache=str(tmp_path / "missing-folder" / "c.sqlite"))
    with pytest.raises(ConfigError, match="crc_cache"):
        ZipMiddleware(plain_app, crc_cache=42)
    with pytest.raises(ConfigError, match="absolute"):
        ZipMiddleware(plain_app, crc_cache="memory")  # a relative path: a slip, not a file here


WRITER = """
import sys
from zipmiddleware.crccache import Key, SQLiteCrcCache
cache = SQLiteCrcCache(sys.argv[1])
worker = int(sys.argv[2])
for batch in range(50):
    cache.put_many({Key(f"w{worker}/b{batch}", n, "0"): worker * 1000 + n for n in range(20)})
    first = Key(f"w{worker}/b{batch}", 0, "0")
    assert cache.get_many([first]) == {first: worker * 1000}
"""


def test_cache_is_safe_with_several_processes_and_threads(tmp_path: Path) -> None:
    import threading

    path = tmp_path / "shared.sqlite"
    SQLiteCrcCache(path)
    processes = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(worker)]) for worker in range(4)
    ]
    cache = SQLiteCrcCache(path)
    errors: list[BaseException] = []

    def write(worker: int) -> None:
        try:
            for batch in range(50):
                cache.put_many({Key(f"w{worker}/b{batch}", n, "0"): worker * 1000 + n for n in range(20)})
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(worker,)) for worker in range(10, 14)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [p.wait(timeout=60) for p in processes] == [0, 0, 0, 0]
    assert not errors
    count = sqlite3.connect(path).execute("SELECT count(*) FROM file_crc").fetchone()[0]
    assert count == 8 * 50 * 20


def test_cache_reconnects_after_fork(tmp_path: Path) -> None:
    cache = SQLiteCrcCache(tmp_path / "c.sqlite")
    one, two = Key("g/one", 1, "1"), Key("g/two", 2, "2")
    cache.put_many({one: 11})
    pid = os.fork()
    if pid == 0:  # the child must not reuse the parent's connection
        code = 0 if cache.get_many([one]) == {one: 11} else 1
        cache.put_many({two: 22})
        os._exit(code)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert cache.get_many([two]) == {two: 22}


# -- the range body on its own ----------------------------------------------------------------------


def entries_of(root: Path) -> tuple[PlannedEntry, ...]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    planner = Planner(Settings(roots=(str(root),)))
    snapshots = [planner.check_file(p) for p in files]
    return tuple(
        PlannedEntry(p.relative_to(root).as_posix(), zip_second(s.mtime), file=s, size=s.size)
        for p, s in zip(files, snapshots, strict=True)
    )


def pieces(body: ZipRange | ZipStream) -> Iterator[bytes]:
    try:
        yield from body
    finally:
        body.close()


def test_every_slice_of_a_small_archive(folder: Path) -> None:
    entries = entries_of(folder)
    layout = Layout(entries)
    body = b"".join(pieces(ZipStream(entries, length=layout.length)))
    assert len(body) == layout.length
    step = max(1, layout.length // 300)
    for start in range(0, layout.length, step):
        for stop in (start + 1, start + 17, start + 70_000, layout.length):
            stop = min(stop, layout.length)
            got = b"".join(pieces(ZipRange(layout, start, stop, chunk_size=4096, crc_cache=None)))
            assert got == body[start:stop], (start, stop)


@given(first=st.binary(max_size=5000), second=st.binary(max_size=5000))
def test_crc32_combine_matches_zlib(first: bytes, second: bytes) -> None:
    combined = crc32_combine(zlib.crc32(first), zlib.crc32(second), len(second))
    assert combined == zlib.crc32(first + second)
