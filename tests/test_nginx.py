"""nginx in front of gunicorn, as the README's "nginx in front" describes it.

A real nginx (started here in the foreground with its own prefix, temporary folders and logs)
proxies to a real gunicorn running ``tests/server_app.py``; curl talks to nginx. Checked:

* a ZIP and a direct file come through byte for byte, with their Content-Length, ETag,
  Last-Modified, Accept-Ranges and Content-Disposition, and without ``X-Accel-Buffering``
  (nginx reads that header and does not pass it on);
* a download killed part-way resumes through nginx (``curl -C -`` gets a 206), and ``If-Range``,
  ``If-None-Match`` and ``If-Modified-Since`` reach gunicorn;
* with nginx's default ``proxy_buffering on``, a ZIP's ``X-Accel-Buffering: no`` keeps it out of
  nginx's temporary files when the client is slower than gunicorn, while a direct file (which
  has no such header), or the same ZIP where the header is ignored, is spooled to disk.

nginx unlinks a proxy temporary file as soon as it creates it, so ``proxy_temp`` stays empty
even while a response is spooled: spooling is seen instead in the worker's open files
(``/proc/PID/fd``), in the error log's warning "an upstream response is buffered to a temporary
file", and in the access log as how far nginx read from gunicorn ahead of what it sent.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .clients import (
    TOOL_ENV,
    Download,
    assert_good_zip,
    curl_download,
    kill_part_way,
    read_headers,
    run,
    sha256_file,
    size_of,
    wait_for,
)
from .nginx import AccessEntry, Nginx, nginx_executable
from .servers import PROJECT, GunicornServer

pytestmark = pytest.mark.server

MIB = 1024 * 1024
APP = "tests.server_app:app"
SPOOL_WARNING = "an upstream response is buffered to a temporary file"

# About 44 MB of random data. The direct file is large enough that nginx still has much of it
# left to send once a rate-limited curl stalls: curl 7.88 takes about 10 MiB at full speed
# before its --limit-rate holds it back, and the loopback sockets hold several MiB more.
FOLDER = "big"
FILES = {
    "readme.txt": b"Random data behind nginx.\n",
    "a/part-1.bin": os.urandom(7 * MIB + 17),
    "a/part-2.bin": os.urandom(24 * MIB + 4321),
    "b/c/part-3.bin": os.urandom(8 * MIB + 5),
    "empty.dat": b"",
    "Ünïcödé ファイル.bin": os.urandom(3 * MIB),
}
DIRECT = "a/part-2.bin"
ZIP_PATH = f"folder/{FOLDER}"
FILE_PATH = f"file/{FOLDER}/{DIRECT}"
# Passed on unchanged by nginx (besides Content-Length, checked on its own).
KEPT_HEADERS = (
    "etag",
    "last-modified",
    "accept-ranges",
    "content-disposition",
    "content-type",
    "cache-control",
)

# Locations of the nginx configuration (see CONFIG): nginx's defaults (proxy_buffering on, as in
# examples/nginx.conf), proxy_buffering off, and one that ignores X-Accel-Buffering.
BUFFERED = "/"
UNBUFFERED = "/unbuffered/"
IGNORING = "/ignoring-accel/"

CONFIG = """\
{user}
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
worker_shutdown_timeout 3s;
events {{ worker_connections 256; }}
http {{
    log_format probe '$request_uri $status $upstream_status $body_bytes_sent '
                     '$upstream_bytes_received $upstream_http_x_accel_buffering '
                     '$sent_http_x_accel_buffering';
    access_log {prefix}/access.log probe;
    client_body_temp_path {prefix}/client_body_temp;
    proxy_temp_path {prefix}/proxy_temp;
    fastcgi_temp_path {prefix}/fastcgi_temp;
    uwsgi_temp_path {prefix}/uwsgi_temp;
    scgi_temp_path {prefix}/scgi_temp;

    proxy_http_version 1.1;
    proxy_read_timeout 300s;
    send_timeout 300s;
    proxy_set_header Host $host;
    proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;

    server {{
        listen 127.0.0.1:{port};
        location = /nginx-ready {{ return 200 "nginx\\n"; }}
        location / {{
            proxy_pass {upstream};
        }}
        location /unbuffered/ {{
            proxy_pass {upstream}/;
            proxy_buffering off;
        }}
        location /ignoring-accel/ {{
            proxy_pass {upstream}/;
            proxy_ignore_headers X-Accel-Buffering;
        }}
    }}
}}
"""


def render(upstream: str) -> Callable[[Path, int], str]:
    """CONFIG for a server on ``port`` proxying to ``upstream``, everything it writes under ``prefix``."""

    def config(prefix: Path, port: int) -> str:
        # Without "user", workers of a root master run as nobody, who cannot enter pytest's
        # private (0700) temporary folder: spooled responses would fail to be written.
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else ""
        return CONFIG.format(user=user, prefix=prefix, port=port, upstream=upstream)

    return config


def probe_uri(path: str) -> str:
    """``path`` with a query of its own: the app ignores it, and it names the request in nginx's logs."""
    return f"{path}?probe={uuid.uuid4().hex}"


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def executable() -> str:
    return nginx_executable()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("nginx-data")
    for rel, content in FILES.items():
        path = root / FOLDER / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return root


@pytest.fixture(scope="module")
def gunicorn(executable: str, data: Path) -> Iterator[GunicornServer]:
    with GunicornServer(APP, pythonpath=[PROJECT], env={"ZM_TEST_DATA": str(data)}, threads=8) as server:
        yield server


@pytest.fixture(scope="module")
def nginx(
    executable: str, gunicorn: GunicornServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Nginx]:
    server = Nginx(executable, tmp_path_factory.mktemp("nginx"), render(gunicorn.url))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def direct_zip(gunicorn: GunicornServer, tmp_path_factory: pytest.TempPathFactory) -> Download:
    """The folder's archive fetched from gunicorn itself: what nginx must pass on."""
    download = curl_download(
        f"{gunicorn.url}/{ZIP_PATH}", tmp_path_factory.mktemp("nginx-direct"), "direct.zip"
    )
    assert download.headers["x-accel-buffering"] == ["no"]
    assert download.headers["accept-ranges"] == ["bytes"]
    assert_good_zip(download.path, FILES)
    return download


@pytest.fixture(scope="module")
def direct_file(gunicorn: GunicornServer, tmp_path_factory: pytest.TempPathFactory) -> Download:
    download = curl_download(
        f"{gunicorn.url}/{FILE_PATH}", tmp_path_factory.mktemp("nginx-direct"), "direct.bin"
    )
    assert "x-accel-buffering" not in download.headers
    assert download.sha256 == hashlib.sha256(FILES[DIRECT]).hexdigest()
    return download


# -- 1. the same bytes and headers through nginx --------------------------------------------


@pytest.mark.parametrize("location", [BUFFERED, UNBUFFERED])
def test_zip_through_nginx_is_the_same_download(
    nginx: Nginx, direct_zip: Download, tmp_path: Path, location: str
) -> None:
    proxied = curl_download(f"{nginx.url}{location}{ZIP_PATH}", tmp_path, "proxied.zip")
    assert proxied.headers["server"][0].startswith("nginx/")
    assert proxied.sha256 == direct_zip.sha256
    assert proxied.headers["content-length"] == direct_zip.headers["content-length"]
    assert "transfer-encoding" not in proxied.headers
    for name in KEPT_HEADERS:
        assert proxied.headers[name] == direct_zip.headers[name], name
    # nginx acts on X-Accel-Buffering and does not pass it on.
    assert "x-accel-buffering" not in proxied.headers
    assert_good_zip(proxied.path, FILES)


@pytest.mark.parametrize("location", [BUFFERED, UNBUFFERED])
def test_direct_file_through_nginx_is_the_same_download(
    nginx: Nginx, direct_file: Download, tmp_path: Path, location: str
) -> None:
    proxied = curl_download(f"{nginx.url}{location}{FILE_PATH}", tmp_path, "proxied.bin")
    assert proxied.sha256 == direct_file.sha256
    assert proxied.headers["content-length"] == direct_file.headers["content-length"]
    for name in KEPT_HEADERS:
        assert proxied.headers[name] == direct_file.headers[name], name


# -- 2. resuming through nginx --------------------------------------------------------------


@pytest.mark.parametrize("location", [BUFFERED, UNBUFFERED])
def test_curl_resumes_a_killed_zip_download_through_nginx(
    nginx: Nginx, direct_zip: Download, tmp_path: Path, location: str
) -> None:
    uri = probe_uri(f"{location}{ZIP_PATH}")
    url = nginx.url + uri
    output, first_headers = tmp_path / "resumed.zip", tmp_path / "first.headers"
    command = ["curl", "-sS", "--limit-rate", "4M", "-D", first_headers, "-o", output, url]
    partial = kill_part_way(command, output, 2 * MIB, tmp_path / "curl.log")
    assert 0 < partial < direct_zip.size
    status, headers = read_headers(first_headers)
    assert (status, headers["content-length"]) == (200, [str(direct_zip.size)])
    assert headers["etag"] == direct_zip.headers["etag"]

    resume_headers = tmp_path / "resume.headers"
    result = run(
        ["curl", "-sS", "--fail", "--max-time", "20", "-C", "-", "-D", resume_headers, "-o", output, url]
    )
    assert result.returncode == 0, result.stderr
    status, headers = read_headers(resume_headers)
    assert status == 206
    assert headers["content-range"] == [f"bytes {partial}-{direct_zip.size - 1}/{direct_zip.size}"]
    assert headers["content-length"] == [str(direct_zip.size - partial)]
    assert headers["etag"] == direct_zip.headers["etag"]
    assert "x-accel-buffering" not in headers
    assert sha256_file(output) == direct_zip.sha256
    assert_good_zip(output, FILES)
    # The 206 is gunicorn's: nginx passed the Range header on.
    assert wait_for(lambda: len(nginx.access_entries(uri)) == 2, timeout=5), nginx.logs()
    assert sorted(entry.upstream_status for entry in nginx.access_entries(uri)) == ["200", "206"]


def test_conditional_requests_pass_through_nginx(nginx: Nginx, direct_zip: Download, tmp_path: Path) -> None:
    """Range, If-Range, If-None-Match and If-Modified-Since reach gunicorn, which answers them."""
    etag, last_modified = direct_zip.headers["etag"][0], direct_zip.headers["last-modified"][0]
    body = direct_zip.path.read_bytes()
    output, header_file = tmp_path / "out", tmp_path / "out.headers"

    def curl(*options: str) -> tuple[int, dict[str, list[str]], bytes]:
        output.unlink(missing_ok=True)
        uri = probe_uri(f"{BUFFERED}{ZIP_PATH}")
        command = ["curl", "-sS", "--max-time", "20", *options, "-D", header_file, "-o", output]
        result = run([*command, nginx.url + uri])
        assert result.returncode == 0, result.stderr
        status, headers = read_headers(header_file)
        # nginx answered what gunicorn answered: it neither made nor undid the 206 or 304 itself.
        assert wait_for(lambda: bool(nginx.access_entries(uri)), timeout=5), nginx.logs()
        assert nginx.access_entries(uri)[0].upstream_status == str(status)
        return status, headers, output.read_bytes() if output.exists() else b""

    start, stop = 5 * MIB + 3, 6 * MIB + 99
    for if_range, status, expected in (
        (etag, 206, body[start : stop + 1]),
        (last_modified, 200, body),  # an archive's date is not a strong validator: all of it again
        ('"zip-0000000000000000000000000000000000000000"', 200, body),  # a stale ETag: all of it again
    ):
        got_status, headers, got = curl("-r", f"{start}-{stop}", "-H", f"If-Range: {if_range}")
        assert got_status == status, if_range
        assert headers["content-length"] == [str(len(expected))], if_range
        assert ("content-range" in headers) == (status == 206), if_range
        assert got == expected, if_range

    got_status, headers, got = curl("-H", f"If-None-Match: {etag}")
    assert (got_status, got) == (304, b"")
    assert headers["etag"] == [etag]
    got_status, headers, got = curl("-H", f"If-Modified-Since: {last_modified}")  # an archive: ETag only
    assert (got_status, got) == (200, body)


# -- 3. X-Accel-Buffering: no keeps streamed ZIPs out of nginx's temporary files ---------------


@dataclass
class SlowDownload:
    """What was seen while a rate-limited curl downloaded through nginx, until it was killed."""

    received: int = 0  # bytes curl had written when it was killed
    seconds: float = 0.0
    temp_files: dict[str, int] = field(default_factory=dict)  # proxy_temp files nginx held open, max size
    temp_entries: set[str] = field(default_factory=set)  # names ever seen in the proxy_temp folder
    final_entries: set[str] = field(default_factory=set)  # names in it once the request is logged
    headers: dict[str, list[str]] = field(default_factory=dict)
    entry: AccessEntry | None = None
    warnings: list[str] = field(default_factory=list)  # the error log's spooling warnings for it


def slow_download(nginx: Nginx, path: str, tmp_path: Path, watch: float = 1.2) -> SlowDownload:
    """curl ``path`` at 1 MB/s through nginx, watch nginx's temporary files for ``watch`` seconds
    (and until curl has 1 MiB), then kill curl and collect nginx's logs about the request."""
    uri = probe_uri(path)
    output, header_file = tmp_path / "slow.out", tmp_path / "slow.headers"
    seen = SlowDownload()
    command = ["curl", "-sS", "--limit-rate", "1M", "-D", header_file, "-o", output, nginx.url + uri]
    log = tmp_path / "slow.log"
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, env=TOOL_ENV
        )
    began = time.monotonic()
    try:
        while time.monotonic() - began < watch or size_of(output) < MIB:
            assert process.poll() is None, f"curl ended ({process.returncode}): {log.read_bytes()!r}"
            assert time.monotonic() - began < 15, "curl received less than 1 MiB in 15 s"
            for name, size in nginx.open_temp_files().items():
                seen.temp_files[name] = max(size, seen.temp_files.get(name, 0))
            seen.temp_entries.update(nginx.temp_folder_entries())
            time.sleep(0.01)
        seen.seconds = time.monotonic() - began
        seen.received = size_of(output)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    seen.headers = read_headers(header_file)[1]
    assert wait_for(lambda: bool(nginx.access_entries(uri)), timeout=10), nginx.logs()
    seen.entry = nginx.access_entries(uri)[0]
    seen.final_entries = set(nginx.temp_folder_entries())
    seen.temp_entries.update(seen.final_entries)
    seen.warnings = [
        line for line in nginx.error_log().splitlines() if SPOOL_WARNING in line and f'"GET {uri} ' in line
    ]
    return seen


def test_zip_is_streamed_not_spooled_with_buffering_on(
    nginx: Nginx, direct_zip: Download, tmp_path: Path
) -> None:
    seen = slow_download(nginx, f"{BUFFERED}{ZIP_PATH}", tmp_path)
    assert seen.entry is not None
    assert seen.entry.upstream_x_accel_buffering == "no"  # gunicorn sent it
    assert seen.entry.sent_x_accel_buffering == "-"  # nginx kept it to itself
    assert "x-accel-buffering" not in seen.headers
    assert seen.headers["content-length"] == direct_zip.headers["content-length"]
    assert seen.received < direct_zip.size
    # No temporary file: none held open while the client lagged, none in the folder, no warning.
    assert seen.temp_files == {}, nginx.logs()
    assert seen.temp_entries == set()
    assert seen.warnings == []
    # nginx read from gunicorn only as fast as the client took it: a buffer's worth ahead at most.
    assert seen.entry.upstream_bytes_received - seen.entry.body_bytes_sent < 256 * 1024, seen
    assert seen.entry.upstream_bytes_received < direct_zip.size // 2, seen


@pytest.mark.parametrize(
    "location, path",
    [(BUFFERED, FILE_PATH), (IGNORING, ZIP_PATH)],
    ids=["direct-file-has-no-header", "zip-with-header-ignored"],
)
def test_without_the_header_a_slow_download_is_spooled(
    nginx: Nginx, direct_zip: Download, direct_file: Download, tmp_path: Path, location: str, path: str
) -> None:
    """The control: the same slow client, a response nginx buffers. The checks above can fail."""
    full = direct_zip if path == ZIP_PATH else direct_file
    seen = slow_download(nginx, f"{location}{path}", tmp_path)
    assert seen.entry is not None
    assert seen.received < full.size
    assert seen.temp_files, nginx.logs()  # the worker held a file under proxy_temp open ...
    assert all(name.startswith(f"{nginx.proxy_temp}/") for name in seen.temp_files)
    assert max(seen.temp_files.values()) > MIB
    assert len(seen.warnings) == 1, nginx.logs()  # ... and said so in the error log,
    # ... but had unlinked it at once (between its creation and its unlinking a listing may
    # glimpse its name): no file stays in the folder.
    assert seen.final_entries == set()
    # nginx took the whole body from gunicorn while the client lagged behind.
    assert seen.entry.upstream_bytes_received > full.size, seen
    assert seen.entry.body_bytes_sent < full.size - MIB, seen
    assert "x-accel-buffering" not in seen.headers


# -- 4. proxy_buffering off: direct files are streamed too ------------------------------------


def test_unbuffered_location_streams_a_direct_file(
    nginx: Nginx, direct_file: Download, tmp_path: Path
) -> None:
    seen = slow_download(nginx, f"{UNBUFFERED}{FILE_PATH}", tmp_path)
    assert seen.entry is not None
    assert seen.entry.upstream_x_accel_buffering == "-"
    assert seen.received < direct_file.size
    assert seen.temp_files == {}, nginx.logs()
    assert seen.temp_entries == set()
    assert seen.warnings == []
    assert seen.entry.upstream_bytes_received - seen.entry.body_bytes_sent < 256 * 1024, seen
