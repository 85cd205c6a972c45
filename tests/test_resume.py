"""Interrupted downloads resumed by real clients, and conditional/range requests on a real gunicorn.

curl and wget are killed (SIGKILL) part-way through a download and then resume it
(``curl -C -``, ``wget -c``): the server must answer with a 206 whose bytes fit onto
the partial file exactly, also when the resume goes to another server process in
another time zone. The application is ``tests/server_app.py``; ``tests/servers.py``
starts and stops gunicorn.
"""

from __future__ import annotations

import http.client
import io
import os
import random
import re
import sqlite3
import subprocess
import uuid
import zipfile
import zlib
from collections.abc import Iterator
from datetime import timedelta
from email.utils import format_datetime, parsedate_to_datetime
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zipmiddleware.crccache import Key
from zipmiddleware.planning import FileSnapshot, key_base

from .clients import (
    Download,
    assert_good_zip,
    curl_download,
    kill_part_way,
    read_headers,
    request,
    run,
    sha256,
    sha256_file,
    size_of,
    unavailable,
    wait_for,
)
from .servers import PROJECT, GunicornServer

pytestmark = pytest.mark.server

MIB = 1024 * 1024
APP = "tests.server_app:app"


def random_bytes(seed: int, size: int) -> bytes:
    """Incompressible bytes that are the same on every run."""
    return random.Random(seed).randbytes(size)


# About 49 MB of random data in several files: large enough that a rate-limited client
# can be killed part-way, small enough that a full download takes a fraction of a second.
BIG = "big"
BIG_FILES = {
    "readme.txt": b"Random data for resumed downloads.\n",
    "a/part-1.bin": random_bytes(1, 7 * MIB + 123),
    "a/part-2.bin": random_bytes(2, 20 * MIB + 4567),
    "b/c/part-3.bin": random_bytes(3, 11 * MIB + 89),
    "empty.dat": b"",
    "part-4.bin": random_bytes(4, 6 * MIB + 1),
    "Ünïcödé ファイル.bin": random_bytes(5, 5 * MIB),
}
# The file that is downloaded directly (not as a ZIP). Large, because curl 7.88 lets the
# first few MiB (up to about 7.5 measured) through before its --limit-rate takes hold.
DIRECT = f"{BIG}/a/part-2.bin"
# A small folder for the conditional and range requests.
SMALL = "small"
SMALL_FILES = {
    "one.txt": b"the first entry\n" * 1000,
    "empty.dat": b"",
    "sub/two.bin": random_bytes(6, 250_000),
    "sub/Ü.bin": random_bytes(7, 100_003),
}
SMALL_FILE = f"{SMALL}/sub/two.bin"
# Fixed mtimes (ns), late in a UTC day: in Tokyo (UTC+9) they fall on the next day.
MTIME_NS = 1_615_766_398_123_456_789  # 2021-03-14 23:59:58.123456789 UTC


def write_files(root: Path, files: dict[str, bytes], mtime_ns: int = MTIME_NS) -> None:
    """Write ``files`` under ``root``, each with its own fixed mtime."""
    for number, (rel, data) in enumerate(files.items()):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        stamp = mtime_ns - number * 3_600_000_000_000  # an hour apart
        os.utime(path, ns=(stamp, stamp))


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("resume-data")
    write_files(root / BIG, BIG_FILES)
    write_files(root / SMALL, SMALL_FILES)
    return root


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of the servers' CRC-32 cache files."""
    return tmp_path_factory.mktemp("resume-caches")


def start_server(data: Path, cache: Path, tz: str) -> GunicornServer:
    env = {"ZM_TEST_DATA": str(data), "ZM_TEST_CRC_CACHE": str(cache), "TZ": tz}
    return GunicornServer(APP, pythonpath=[PROJECT], env=env, threads=4)


@pytest.fixture(scope="module")
def server(data: Path, caches: Path) -> Iterator[GunicornServer]:
    """The main server, in UTC, with an SQLite CRC-32 cache file."""
    with start_server(data, caches / "utc.sqlite", "UTC") as running:
        yield running


@pytest.fixture(scope="module")
def tokyo(data: Path, caches: Path) -> Iterator[GunicornServer]:
    """A second server process over the same folder, in Tokyo's time zone (UTC+9)."""
    if not Path("/usr/share/zoneinfo/Asia/Tokyo").exists():
        unavailable("no time zone data for Asia/Tokyo (Debian: tzdata): TZ would silently mean UTC")
    with start_server(data, caches / "tokyo.sqlite", "Asia/Tokyo") as running:
        yield running


@pytest.fixture(scope="module")
def full(server: GunicornServer, tmp_path_factory: pytest.TempPathFactory) -> Download:
    """The big folder's archive, downloaded in one go from the UTC server and checked."""
    download = curl_download(f"{server.url}/folder/{BIG}", tmp_path_factory.mktemp("resume-full"), "full.zip")
    assert download.size > sum(map(len, BIG_FILES.values()))
    assert download.headers["accept-ranges"] == ["bytes"]
    assert_good_zip(download.path, BIG_FILES)
    return download


def folder_url(server: GunicornServer, name: str = BIG) -> str:
    return f"{server.url}/folder/{quote(name)}"


def curl_resume(url: str, output: Path, header_file: Path) -> subprocess.CompletedProcess[bytes]:
    return run(["curl", "-sS", "--fail", "--max-time", "20", "-C", "-", "-D", header_file, "-o", output, url])


def assert_resumed_at(header_file: Path, partial: int, total: int) -> None:
    """The resume's answer was a 206 for everything from ``partial`` on."""
    status, headers = read_headers(header_file)
    assert status == 206
    assert headers["content-range"] == [f"bytes {partial}-{total - 1}/{total}"]
    assert headers["content-length"] == [str(total - partial)]


# -- 1. curl killed part-way, resumed with curl -C - ------------------------------------------


def test_curl_resumes_a_killed_zip_download(server: GunicornServer, full: Download, tmp_path: Path) -> None:
    url = folder_url(server)
    output, first_headers = tmp_path / "resumed.zip", tmp_path / "first.headers"
    command = ["curl", "-sS", "--limit-rate", "8M", "-D", first_headers, "-o", output, url]
    partial = kill_part_way(command, output, 2 * MIB, tmp_path / "curl.log")
    assert 0 < partial < full.size
    status, headers = read_headers(first_headers)
    assert (status, headers["content-length"]) == (200, [str(full.size)])
    assert headers["etag"] == full.headers["etag"]

    resume_headers = tmp_path / "resume.headers"
    result = curl_resume(url, output, resume_headers)
    assert result.returncode == 0, result.stderr
    assert_resumed_at(resume_headers, partial, full.size)
    _, headers = read_headers(resume_headers)
    assert headers["etag"] == full.headers["etag"]
    assert headers["accept-ranges"] == ["bytes"]
    assert size_of(output) == full.size
    assert sha256_file(output) == full.sha256
    assert_good_zip(output, BIG_FILES)


# -- 2. wget killed part-way, resumed with wget -c --------------------------------------------


def test_wget_resumes_a_killed_zip_download(server: GunicornServer, full: Download, tmp_path: Path) -> None:
    url = folder_url(server)
    output = tmp_path / "resumed.zip"
    command = ["wget", "-q", "--tries=1", "--timeout=20", "--limit-rate=8m", "-O", output, url]
    partial = kill_part_way(command, output, 3 * MIB, tmp_path / "wget.log")
    assert 0 < partial < full.size

    result = run(["wget", "-c", "-S", "--tries=1", "--timeout=20", "-O", output, url])
    assert result.returncode == 0, result.stderr
    log = result.stderr.decode("latin-1")  # -S: the server's answer goes to stderr
    statuses = re.findall(r"^\s*HTTP/1\.[01] (\d{3})", log, re.MULTILINE)
    assert statuses == ["206"], log
    assert re.search(
        rf"^\s*Content-Range: bytes {partial}-{full.size - 1}/{full.size}\s*$", log, re.MULTILINE
    ), log
    assert size_of(output) == full.size
    assert sha256_file(output) == full.sha256
    assert_good_zip(output, BIG_FILES)


# -- 3. two server processes in different time zones serve the same bytes ---------------------


def test_time_zone_does_not_change_the_archive(
    server: GunicornServer, tokyo: GunicornServer, full: Download, tmp_path: Path
) -> None:
    # The second server really runs in another time zone.
    with open(f"/proc/{tokyo.worker_pid}/environ", "rb") as file:
        assert b"TZ=Asia/Tokyo" in file.read().split(b"\0")

    from_tokyo = curl_download(folder_url(tokyo), tmp_path, "tokyo.zip")
    assert from_tokyo.sha256 == full.sha256
    for name in ("etag", "last-modified", "content-length"):
        assert from_tokyo.headers[name] == full.headers[name], name

    # Begun in Tokyo, killed well into the archive, finished in UTC.
    output = tmp_path / "across.zip"
    command = ["curl", "-sS", "--limit-rate", "20M", "-o", output, folder_url(tokyo)]
    partial = kill_part_way(command, output, 12 * MIB, tmp_path / "curl.log")
    assert 0 < partial < full.size
    resume_headers = tmp_path / "resume.headers"
    result = curl_resume(folder_url(server), output, resume_headers)
    assert result.returncode == 0, result.stderr
    assert_resumed_at(resume_headers, partial, full.size)
    assert sha256_file(output) == full.sha256
    assert_good_zip(output, BIG_FILES)

    # And the other way round: begun in UTC, finished in Tokyo.
    output = tmp_path / "back.zip"
    command = ["curl", "-sS", "--limit-rate", "8M", "-o", output, folder_url(server)]
    partial = kill_part_way(command, output, MIB, tmp_path / "curl-back.log")
    assert 0 < partial < full.size
    result = curl_resume(folder_url(tokyo), output, resume_headers)
    assert result.returncode == 0, result.stderr
    assert_resumed_at(resume_headers, partial, full.size)
    assert sha256_file(output) == full.sha256


# -- 4. If-Range, 304, 416 and ranges that are ignored ----------------------------------------


@pytest.fixture(params=["zip", "file"])
def target(request: pytest.FixtureRequest, server: GunicornServer) -> tuple[str, bytes]:
    """A URL path of the small folder as a ZIP, or of one of its files, and its full body."""
    path = f"/folder/{SMALL}" if request.param == "zip" else f"/file/{SMALL_FILE}"
    _, body = request_full(server, path)
    return path, body


def request_full(server: GunicornServer, path: str) -> tuple[http.client.HTTPResponse, bytes]:
    response, body = request(server, "GET", path)
    assert response.status == 200
    assert response.getheader("Content-Length") == str(len(body))
    assert response.getheader("Accept-Ranges") == "bytes"
    assert response.getheader("ETag", "").startswith('"')
    assert response.getheader("Last-Modified")
    return response, body


def range_positions(length: int) -> list[tuple[str, int, int]]:
    """``Range`` headers and the slice ``[start, stop)`` each asks for."""
    half = length // 2
    return [
        ("bytes=0-0", 0, 1),
        ("bytes=0-99", 0, 100),
        ("bytes=20-70000", 20, 70001),  # from inside the first local header into the data
        (f"bytes={half}-", half, length),
        (f"bytes={half}-{half + 99_999}", half, half + 100_000),
        ("bytes=-1", length - 1, length),
        ("bytes=-300", length - 300, length),  # the end of the directory, for a ZIP
        (f"bytes=-{length}", 0, length),  # exactly the body's length
        (f"bytes={length - 10}-{length + 100}", length - 10, length),  # clipped at the end
    ]


def test_single_ranges_are_slices_of_the_full_body(server: GunicornServer, target: tuple[str, bytes]) -> None:
    path, full_body = target
    length = len(full_body)
    for header, start, stop in range_positions(length):
        response, body = request(server, "GET", path, {"Range": header})
        assert response.status == 206, header
        assert response.getheader("Content-Range") == f"bytes {start}-{stop - 1}/{length}", header
        assert response.getheader("Content-Length") == str(stop - start), header
        assert body == full_body[start:stop], header


def test_suffix_range_longer_than_the_body_gets_all_of_it(
    server: GunicornServer, target: tuple[str, bytes]
) -> None:
    """E.g. a remote ZIP reader asking for the last 64 KiB of a smaller archive."""
    path, full_body = target
    length = len(full_body)
    response, body = request(server, "GET", path, {"Range": f"bytes=-{length + 10}"})
    assert response.status == 206
    assert response.getheader("Content-Range") == f"bytes 0-{length - 1}/{length}"
    assert body == full_body


def test_if_range_with_current_validators_gets_the_slice(
    server: GunicornServer, target: tuple[str, bytes]
) -> None:
    path, full_body = target
    response, _ = request_full(server, path)
    etag, last_modified = response.getheader("ETag"), response.getheader("Last-Modified")
    assert etag is not None and last_modified is not None
    # An archive's date is its newest file's, which does not tell versions apart: for an
    # archive only the ETag makes If-Range hold (the date gets the whole body, as in the next test).
    archive = response.getheader("Content-Type") == "application/zip"
    for if_range in (etag,) if archive else (etag, last_modified):
        response, body = request(server, "GET", path, {"Range": "bytes=1000-", "If-Range": if_range})
        assert response.status == 206, if_range
        assert response.getheader("Content-Range") == f"bytes 1000-{len(full_body) - 1}/{len(full_body)}"
        assert body == full_body[1000:]

    # Not an exact match: a weak ETag, a made-up one, a date a second before or after.
    modified = parsedate_to_datetime(last_modified)
    other_dates = [format_datetime(modified + timedelta(seconds=delta), usegmt=True) for delta in (-1, 1)]
    for if_range in [
        "W/" + etag,
        '"zip-0000000000000000000000000000000000000000"',
        '"made-up"',
        *other_dates,
    ]:
        response, body = request(server, "GET", path, {"Range": "bytes=1000-", "If-Range": if_range})
        assert response.status == 200, if_range
        assert response.getheader("Content-Range") is None, if_range
        assert response.getheader("Content-Length") == str(len(full_body)), if_range
        assert body == full_body, if_range


@pytest.mark.parametrize("kind", ["zip", "file"])
def test_if_range_after_a_change_gets_the_new_full_body(
    server: GunicornServer, data: Path, kind: str
) -> None:
    folder = f"touched-{uuid.uuid4().hex[:8]}"
    write_files(data / folder, SMALL_FILES)
    path = f"/folder/{folder}" if kind == "zip" else f"/file/{folder}/sub/two.bin"
    before, old_body = request_full(server, path)
    old_etag, old_date = before.getheader("ETag"), before.getheader("Last-Modified")
    assert old_etag is not None and old_date is not None

    # A new mtime, later than every other one: both the ETag and Last-Modified change.
    stamp = MTIME_NS + 86_400_000_000_000
    os.utime(data / folder / "sub" / "two.bin", ns=(stamp, stamp))
    after, new_body = request_full(server, path)
    assert after.getheader("ETag") != old_etag
    assert after.getheader("Last-Modified") != old_date
    if kind == "zip":
        assert new_body != old_body  # the entry's date is in the archive
        assert zipfile.ZipFile(io.BytesIO(new_body)).testzip() is None

    for if_range in (old_etag, old_date):
        response, body = request(server, "GET", path, {"Range": "bytes=100-199", "If-Range": if_range})
        assert response.status == 200, if_range
        assert response.getheader("Content-Range") is None
        assert response.getheader("ETag") == after.getheader("ETag")
        assert body == new_body, if_range
    for if_range in (after.getheader("ETag"), after.getheader("Last-Modified")):
        assert if_range is not None
        response, body = request(server, "GET", path, {"Range": "bytes=100-199", "If-Range": if_range})
        if kind == "zip" and if_range == after.getheader("Last-Modified"):  # only the ETag decides
            assert (response.status, body) == (200, new_body), if_range
            continue
        assert response.status == 206, if_range
        assert body == new_body[100:200]


def test_not_modified(server: GunicornServer, target: tuple[str, bytes]) -> None:
    path, full_body = target
    response, _ = request_full(server, path)
    etag, last_modified = response.getheader("ETag"), response.getheader("Last-Modified")
    assert etag is not None and last_modified is not None
    archive = response.getheader("Content-Type") == "application/zip"
    if archive:  # its date does not tell versions apart: If-Modified-Since gets the body
        response, body = request(server, "GET", path, {"If-Modified-Since": last_modified})
        assert (response.status, body) == (200, full_body)
    for headers in (
        {"If-None-Match": etag},
        {"If-None-Match": f'"other", {etag}'},
        {"If-None-Match": "W/" + etag},  # If-None-Match compares weakly
        *([] if archive else [{"If-Modified-Since": last_modified}]),
        {"If-None-Match": etag, "Range": "bytes=0-9"},
    ):
        response, body = request(server, "GET", path, headers)
        assert response.status == 304, headers
        assert body == b"", headers
        assert response.getheader("ETag") == etag, headers
        assert response.getheader("Content-Range") is None, headers
    # A different ETag wins over a matching date (If-Modified-Since is then ignored).
    response, body = request(
        server, "GET", path, {"If-None-Match": '"other"', "If-Modified-Since": last_modified}
    )
    assert (response.status, body) == (200, full_body)


def test_range_past_the_end_is_416(server: GunicornServer, target: tuple[str, bytes]) -> None:
    path, full_body = target
    length = len(full_body)
    for header in (f"bytes={length}-", f"bytes={length}-{length + 10}", f"bytes={length + 5000}-"):
        response, body = request(server, "GET", path, {"Range": header})
        assert response.status == 416, header
        assert response.getheader("Content-Range") == f"bytes */{length}", header
        assert full_body[:100] not in body
    # The last byte is still there.
    response, body = request(server, "GET", path, {"Range": f"bytes={length - 1}-"})
    assert (response.status, body) == (206, full_body[-1:])


def test_wget_continue_of_a_complete_download_gets_416(
    server: GunicornServer, target: tuple[str, bytes], tmp_path: Path
) -> None:
    """wget -c on a file that is already whole: the 416 tells it there is nothing left."""
    path, full_body = target
    output = tmp_path / "complete"
    output.write_bytes(full_body)
    result = run(["wget", "-c", "-S", "--tries=1", "--timeout=20", "-O", output, server.url + path])
    assert result.returncode == 0, result.stderr
    log = result.stderr.decode("latin-1")
    assert re.search(r"^\s*HTTP/1\.[01] 416 ", log, re.MULTILINE), log
    assert re.search(rf"^\s*Content-Range: bytes \*/{len(full_body)}\s*$", log, re.MULTILINE), log
    assert "already fully retrieved" in log
    assert output.read_bytes() == full_body


@pytest.mark.parametrize("header", ["bytes=abc", "bytes=0-1,5-6", "bytes=5-1", "bytes=", "pages=0-5"])
def test_malformed_or_multiple_ranges_get_the_full_body(
    server: GunicornServer, target: tuple[str, bytes], header: str
) -> None:
    path, full_body = target
    response, body = request(server, "GET", path, {"Range": header})
    assert response.status == 200
    assert response.getheader("Content-Range") is None
    assert response.getheader("Content-Length") == str(len(full_body))
    assert body == full_body


def test_if_range_with_curl(server: GunicornServer, tmp_path: Path) -> None:
    """curl's own range option with an If-Range header: 206 for the current ETag, 200 for a stale one."""
    url = folder_url(server, SMALL)
    full_small = curl_download(url, tmp_path, "small.zip")
    etag = full_small.headers["etag"][0]
    body = full_small.path.read_bytes()
    for if_range, status, expected in ((etag, 206, body[500:1500]), ('"stale"', 200, body)):
        output, header_file = tmp_path / "part", tmp_path / "part.headers"
        result = run(
            ["curl", "-sS", "--fail", "-r", "500-1499", "-H", f"If-Range: {if_range}"]
            + ["-D", header_file, "-o", output, url]
        )
        assert result.returncode == 0, result.stderr
        assert read_headers(header_file)[0] == status
        assert output.read_bytes() == expected


# -- 5. a direct file, resumed with curl -C - -------------------------------------------------


def test_curl_resumes_a_killed_file_download(server: GunicornServer, tmp_path: Path) -> None:
    url = f"{server.url}/file/{DIRECT}"
    expected = BIG_FILES[DIRECT.removeprefix(BIG + "/")]
    output = tmp_path / "direct.bin"
    command = ["curl", "-sS", "--limit-rate", "4M", "-o", output, url]
    partial = kill_part_way(command, output, MIB, tmp_path / "curl.log")
    assert 0 < partial < len(expected)
    assert output.read_bytes() == expected[:partial]

    resume_headers = tmp_path / "resume.headers"
    result = curl_resume(url, output, resume_headers)
    assert result.returncode == 0, result.stderr
    assert_resumed_at(resume_headers, partial, len(expected))
    assert sha256_file(output) == sha256(expected)


# -- 6. the CRC-32 cache is filled by a full download -----------------------------------------


def cached_crcs(cache: Path) -> dict[Key, int]:
    """Every row of the cache's ``file_crc`` table, keyed as the package keys it."""
    connection = sqlite3.connect(f"file:{cache}?mode=ro", uri=True, timeout=10)
    try:
        rows = connection.execute("SELECT name, size, version, crc FROM file_crc").fetchall()
    finally:
        connection.close()
    return {Key(name, size, version): crc for name, size, version, crc in rows}


def test_crc_cache_is_filled_by_a_full_download(server: GunicornServer, data: Path, caches: Path) -> None:
    folder = f"crc-{uuid.uuid4().hex[:8]}"
    write_files(data / folder, SMALL_FILES)
    # The server's root is ``data``: a file's key is its path from the root's own name on, its
    # size and its mtime in ns (no device, inode or ctime: the same on every host with a copy).
    top = Path(os.path.realpath(data))
    keys: dict[str, Key] = {}
    for rel, content in SMALL_FILES.items():
        real = os.path.realpath(top / folder / rel)
        st = os.stat(real)
        if content:  # an empty file's CRC-32 is 0: nothing to keep
            keys[rel] = Key(f"{top.name}/{folder}/{rel}", st.st_size, str(st.st_mtime_ns))
            # The package's own key for the file, as its planner makes it, is that very one.
            assert FileSnapshot.of(real, st, key_base(real, [str(top)])).key == keys[rel]
    cache = caches / "utc.sqlite"
    assert cache.exists()  # created when the server started
    assert not set(keys.values()) & set(cached_crcs(cache))

    _, body = request_full(server, f"/folder/{folder}")
    with zipfile.ZipFile(io.BytesIO(body)) as opened:
        in_archive = {info.filename: info.CRC for info in opened.infolist()}
    # The cache is written when the server closes the body, just after the last byte went out.
    assert wait_for(lambda: set(keys.values()) <= set(cached_crcs(cache)), timeout=5), cached_crcs(cache)
    rows = cached_crcs(cache)
    for rel, key in keys.items():
        assert rows[key] == zlib.crc32(SMALL_FILES[rel]) == in_archive[rel], rel


@pytest.fixture(scope="module")
def small_zip(server: GunicornServer) -> bytes:
    response, body = request(server, "GET", f"/folder/{SMALL}")
    assert response.status == 200 and response.getheader("Content-Length") == str(len(body))
    return body


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_slices_from_the_real_server(
    server: GunicornServer, small_zip: bytes, data: st.DataObject
) -> None:
    """Random ranges, biased to the records' edges: local headers, data, descriptors, directory, end."""
    body = small_zip
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        infos = archive.infolist()
    directory = int.from_bytes(body[-6:-2], "little")  # the end record's directory offset
    edges = [0, directory, len(body) - 22, len(body) - 1]
    for info in infos:
        data_at = info.header_offset + 30 + len(info.orig_filename.encode()) + len(info.extra)
        edges += [info.header_offset + 1, data_at, data_at + info.compress_size + 3]
    start = data.draw(st.sampled_from(edges) | st.integers(0, len(body) - 1))
    start = min(max(start, 0), len(body) - 1)
    stop = data.draw(
        st.integers(start, min(len(body) - 1, start + data.draw(st.sampled_from([0, 40, 70_000]))))
    )
    response, got = request(server, "GET", f"/folder/{SMALL}", {"Range": f"bytes={start}-{stop}"})
    assert response.status == 206
    assert response.getheader("Content-Range") == f"bytes {start}-{stop}/{len(body)}"
    assert got == body[start : stop + 1]
