"""A real gunicorn (gthread) on 127.0.0.1, talked to with curl, wget, unzip, 7z, bsdtar and sockets.

The application is ``tests/server_app.py``; ``tests/servers.py`` starts and stops gunicorn.
"""

from __future__ import annotations

import http.client
import io
import os
import re
import shutil
import socket
import tempfile
import time
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import pytest

from .clients import read_headers, request, run, sha256, unavailable, wait_for
from .conftest import User
from .servers import PROJECT, GunicornServer, open_fds

pytestmark = pytest.mark.server

MIB = 1024 * 1024
# Clients print UTF-8 names only under a UTF-8 locale.
APP = "tests.server_app:app"
BROKEN_MESSAGE = "the test source failed on purpose"  # as in server_app

GAME = "Spiel Ü"  # a folder name that is not ASCII: it becomes the download name
GAME_FILES = {
    "readme.txt": b"A game folder with nested folders, names that are not ASCII and an empty file.\n",
    "empty.dat": b"",
    "café.bin": os.urandom(200_000),
    "data/random-3mb.bin": os.urandom(3 * MIB),
    "data/more/deep/nested.bin": os.urandom(MIB + 12345),
    "Ünïcödé/日本語 ファイル.txt": "こんにちは\n".encode() * 100,
}
GAME_SKIPPED = {"updates/patch.exe": b"excluded folder", "info.nfo": b"ignored file"}
SINGLE = "single/Doom.wad"
SINGLE_DATA = os.urandom(2 * MIB + 4321)
# The ZIP that the fd test cuts off: large enough that it cannot fit in the socket buffers.
MARKED_FILES = {"small.bin": os.urandom(100_000)}
MARKED_SPARSE = ("big.bin", 16 * MIB)
SPARSE = ("sparse/big.bin", 64 * MIB)  # a large file that costs no disk


def write_files(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path; asserts that there is nothing else but folders."""
    found = {}
    for path in root.rglob("*"):
        if path.is_file():
            found[path.relative_to(root).as_posix()] = path.read_bytes()
        else:
            assert path.is_dir(), path
    return found


def small_buffer_connection(server: GunicornServer) -> http.client.HTTPConnection:
    """A connection with a small, fixed receive buffer, so the server soon blocks on writing."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # set before connect: no autotuning
    sock.settimeout(15)
    sock.connect((server.host, server.port))
    connection = http.client.HTTPConnection(server.host, server.port, timeout=15)
    connection.sock = sock
    return connection


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("server-data")
    write_files(root / GAME, {**GAME_FILES, **GAME_SKIPPED})
    write_files(root, {SINGLE: SINGLE_DATA})
    write_files(root / "marked", MARKED_FILES)
    name, size = MARKED_SPARSE
    with open(root / "marked" / name, "wb") as file:
        file.truncate(size)  # sparse: costs no disk, reads as zeros
    (root / "shrink").mkdir()
    name, size = SPARSE
    (root / name).parent.mkdir()
    with open(root / name, "wb") as file:
        file.truncate(size)
    return root


@pytest.fixture(scope="module")
def markers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("server-markers")


@pytest.fixture(scope="module")
def server(data: Path, markers: Path) -> Iterator[GunicornServer]:
    env = {"ZM_TEST_DATA": str(data), "ZM_TEST_MARKERS": str(markers)}
    with GunicornServer(APP, pythonpath=[PROJECT], env=env, threads=4) as running:
        yield running


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("server-outside") / "secret.txt"
    path.write_bytes(b"outside every root\n")
    return path


def game_url(server: GunicornServer) -> str:
    return f"{server.url}/folder/{quote(GAME)}"


# -- 1. a multi-file ZIP, read by every archive reader ----------------------------------------


def test_folder_zip_is_read_by_every_reader(server: GunicornServer, tmp_path: Path) -> None:
    archive = tmp_path / "game.zip"
    header_file = tmp_path / "headers.txt"
    result = run(
        ["curl", "-sS", "--fail", "--max-time", "20", "-D", header_file, "-o", archive, game_url(server)]
    )
    assert result.returncode == 0, result.stderr

    status, headers = read_headers(header_file)
    assert status == 200
    assert headers["content-type"] == ["application/zip"]
    disposition = headers["content-disposition"][0]
    assert disposition.startswith("attachment;")
    assert "filename*=UTF-8''Spiel%20%C3%9C.zip" in disposition
    assert headers["x-accel-buffering"] == ["no"]
    # A stored archive of files is sized in advance, so it is not chunked.
    assert headers["content-length"] == [str(archive.stat().st_size)]
    assert "transfer-encoding" not in headers
    assert headers["accept-ranges"] == ["bytes"]

    # Python's zipfile: every CRC, every name, every byte; no directory entries.
    with zipfile.ZipFile(archive) as opened:
        assert opened.testzip() is None
        assert all(not info.is_dir() for info in opened.infolist())
        assert {info.filename: opened.read(info) for info in opened.infolist()} == GAME_FILES

    result = run(["unzip", "-t", archive])
    assert result.returncode == 0, result.stdout + result.stderr
    assert b"No errors detected" in result.stdout

    result = run(["7z", "t", archive])
    assert result.returncode == 0, result.stdout + result.stderr
    assert b"Everything is Ok" in result.stdout

    # bsdtar reads the archive as a stream, from a pipe: local headers and data descriptors only.
    url = game_url(server)
    result = run(
        ["bash", "-o", "pipefail", "-c", 'curl -sS --fail --max-time 20 "$1" | bsdtar -tvf -', "-", url]
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert len(lines) == len(GAME_FILES)
    for name in GAME_FILES:
        assert any(line.endswith(" " + name) for line in lines), (name, lines)

    extracted = tmp_path / "extracted"
    extracted.mkdir()
    result = run(
        [
            "bash",
            "-o",
            "pipefail",
            "-c",
            'curl -sS --fail --max-time 20 "$1" | bsdtar -xf - -C "$2"',
            "-",
            url,
            extracted,
        ]
    )
    assert result.returncode == 0, result.stderr
    assert tree(extracted) == GAME_FILES


def test_head_on_zip_route_sends_no_body(server: GunicornServer) -> None:
    connection = http.client.HTTPConnection(server.host, server.port, timeout=15)
    try:
        connection.request("GET", f"/folder/{quote(GAME)}")
        full = connection.getresponse()
        body = full.read()
        connection.request("HEAD", f"/folder/{quote(GAME)}")
        response = connection.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Type") == "application/zip"
        # HEAD promises what GET sends.
        assert response.getheader("Content-Length") == str(len(body)) == full.getheader("Content-Length")
        assert response.getheader("ETag") == full.getheader("ETag") is not None
        assert response.getheader("Last-Modified") == full.getheader("Last-Modified") is not None
        assert response.getheader("Content-Disposition", "").startswith("attachment;")
        assert response.read() == b""
        # The connection is still in step: had any body byte been sent, this would break.
        connection.request("GET", f"/file/{SINGLE}")
        response = connection.getresponse()
        assert response.status == 200
        assert response.read() == SINGLE_DATA
    finally:
        connection.close()


# -- 2. a single file: curl, wget, curl -OJ ----------------------------------------------------


def test_single_file_with_curl_and_wget(server: GunicornServer, tmp_path: Path) -> None:
    url = f"{server.url}/file/{SINGLE}"
    header_file = tmp_path / "headers.txt"
    result = run(
        ["curl", "-sS", "--fail", "--max-time", "20", "-D", header_file, "-o", tmp_path / "curl.bin", url]
    )
    assert result.returncode == 0, result.stderr
    result = run(["wget", "-q", "--timeout=20", "--tries=1", "-O", tmp_path / "wget.bin", url])
    assert result.returncode == 0, result.stderr
    expected = sha256(SINGLE_DATA)
    assert sha256((tmp_path / "curl.bin").read_bytes()) == expected
    assert sha256((tmp_path / "wget.bin").read_bytes()) == expected

    status, headers = read_headers(header_file)
    assert status == 200
    assert headers["content-length"] == [str(len(SINGLE_DATA))]
    assert headers["accept-ranges"] == ["bytes"]
    assert "transfer-encoding" not in headers
    assert headers["content-disposition"][0].startswith("attachment;")

    # Browser-style: the file is saved under the name the server gives.
    saved = tmp_path / "saved"
    saved.mkdir()
    result = run(
        ["curl", "-sS", "--fail", "--max-time", "20", "-O", "-J", f"{url}?name={quote('Doom (1993).wad')}"],
        cwd=saved,
    )
    assert result.returncode == 0, result.stderr
    assert [p.name for p in saved.iterdir()] == ["Doom (1993).wad"]
    assert sha256((saved / "Doom (1993).wad").read_bytes()) == expected


# -- 3. failures after the first byte abort the connection ------------------------------------


def test_source_failing_mid_stream_makes_curl_fail(server: GunicornServer, tmp_path: Path) -> None:
    archive = tmp_path / "broken.zip"
    header_file = tmp_path / "headers.txt"
    result = run(
        ["curl", "-sS", "--max-time", "20", "-D", header_file, "-o", archive, f"{server.url}/broken/6"]
    )
    # 18: transfer closed with outstanding read data remaining; 56: failure receiving data.
    assert result.returncode in (18, 56), (result.returncode, result.stderr)
    status, headers = read_headers(header_file)
    assert status == 200  # the headers had gone out
    assert headers["transfer-encoding"] == ["chunked"]
    assert archive.stat().st_size >= 6 * MIB  # and so had the first megabytes
    assert not zipfile.is_zipfile(archive)
    assert run(["unzip", "-t", archive]).returncode != 0
    assert wait_for(lambda: BROKEN_MESSAGE in server.log(), timeout=5)


def test_file_shrinking_mid_stream_aborts_the_connection(server: GunicornServer, data: Path) -> None:
    name = f"shrink/{os.urandom(4).hex()}.bin"
    path = data / name
    with open(path, "wb") as file:
        file.write(os.urandom(64 * 1024))
        file.truncate(48 * MIB)
    connection = small_buffer_connection(server)
    try:
        connection.request("GET", f"/pair/{name}")
        response = connection.getresponse()
        assert response.status == 200
        received = response.read(MIB)  # well into the big entry; the server is now blocked writing
        assert len(received) == MIB
        os.truncate(path, 0)
        with pytest.raises((http.client.IncompleteRead, ConnectionError)):
            received += response.read()
    finally:
        connection.close()
    assert wait_for(lambda: "shorter than its" in server.log(), timeout=5), server.log()[-3000:]


# -- 4. errors found before the first byte -------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", f"/file/{SINGLE}.missing", 404),
        ("GET", "/folder/no-such-folder", 404),
        ("GET", "/path?p={outside}", 404),  # a file outside the roots: as if it did not exist
        ("GET", "/none", 404),
        ("GET", "/pending", 202),
        ("GET", "/failed", 410),
        ("POST", f"/file/{SINGLE}", 405),
    ],
)
def test_errors_before_the_first_byte(
    server: GunicornServer, outside: Path, method: str, path: str, status: int
) -> None:
    path = path.format(outside=quote(str(outside)))
    response, body = request(server, method, path)
    assert response.status == status
    assert response.getheader("Content-Type", "").startswith("text/plain")
    assert response.getheader("Cache-Control") == "no-store"
    assert response.getheader("Content-Length") == str(len(body))
    assert response.getheader("Transfer-Encoding") is None
    assert b"/" not in body  # no path leaks into the text
    if status == 202:
        assert response.getheader("Retry-After") == "7"
    if status == 405:
        assert response.getheader("Allow") == "GET, HEAD"
    # The app behind the middleware still answers everything else.
    response, body = request(server, "GET", "/somewhere/else")
    assert (response.status, body) == (200, b"plain app\n")


@pytest.fixture
def nobody_data() -> Iterator[Path]:
    """A data folder that the user ``nobody`` can read, except where a test says otherwise."""
    top = Path(tempfile.mkdtemp(prefix="zm-nobody-"))  # not under pytest's 0700 base folder
    try:
        os.chmod(top, 0o755)
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_unreadable_file_is_403(nobody_data: Path, outside: Path, nobody: User) -> None:
    write_files(
        nobody_data,
        {
            "open.bin": b"readable\n",
            "locked.bin": b"secret\n",
            "game/a.txt": b"a\n",
            "game/locked.bin": b"b\n",
        },
    )
    for path in nobody_data.rglob("*"):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    os.chmod(nobody_data / "locked.bin", 0)
    os.chmod(nobody_data / "game" / "locked.bin", 0)
    with GunicornServer(
        APP,
        pythonpath=[PROJECT],
        # --preload + warm-up: the worker may not be able to read the Python installation once it is 'nobody'.
        env={"ZM_TEST_DATA": str(nobody_data), "ZM_TEST_WARMUP": "1"},
        args=["--user", "nobody", "--group", nobody.group, "--preload"],
    ) as running:
        with open(f"/proc/{running.worker_pid}/status") as file:
            uids = next(line for line in file if line.startswith("Uid:")).split()[1:]
        assert {int(uid) for uid in uids} == {nobody.uid}
        assert request(running, "GET", "/file/open.bin")[1] == b"readable\n"
        assert request(running, "GET", "/file/locked.bin")[0].status == 403
        assert request(running, "GET", "/folder/game")[0].status == 403
        assert request(running, "GET", "/file/missing.bin")[0].status == 404
        # Outside the roots, in a folder 'nobody' may not even look into: not readable, 403
        # (whether the file is there or not: no existence is told).
        assert request(running, "GET", f"/path?p={quote(str(outside))}")[0].status == 403
        response, body = request(running, "GET", "/file/locked.bin")
        assert b"secret" not in body and b"locked" not in body
        assert "Traceback" not in running.log()


# -- 5. no file descriptor survives a download, however it ends ----------------------------------


def partial_download(server: GunicornServer, path: str, keep: int = 64 * 1024) -> int:
    """Send a GET, read ``keep`` bytes of the answer and hang up."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.settimeout(15)
        sock.connect((server.host, server.port))
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        received = 0
        while received < keep:
            piece = sock.recv(65536)
            if not piece:
                break
            received += len(piece)
        return received
    finally:
        sock.close()


def full_download(server: GunicornServer, path: str) -> int:
    response, body = request(server, "GET", path)
    assert response.status == 200
    with zipfile.ZipFile(io.BytesIO(body)) as opened:
        assert opened.testzip() is None
    return len(body)


def settled_fd_count(pid: int, timeout: float = 5.0) -> int:
    """The fd count once it has stayed the same for half a second."""
    deadline = time.monotonic() + timeout
    last, since = open_fds(pid), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = open_fds(pid)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= 0.5:
            break
    return last


def marker_names(markers: Path, method: str, state: str) -> set[str]:
    return {p.name.removesuffix("." + state) for p in markers.glob(f"{method}-*.{state}")}


def test_no_fd_leak_after_disconnects_downloads_and_heads(server: GunicornServer, markers: Path) -> None:
    path = "/marked/marked"
    pid = server.worker_pid
    # Warm-up: every code path once, so lazily opened things (imports, mime table) are loaded.
    full_download(server, path)
    partial_download(server, path)
    assert request(server, "HEAD", path)[0].status == 200
    assert request(server, "GET", f"/file/{SINGLE}")[0].status == 200
    baseline = settled_fd_count(pid)
    before = marker_names(markers, "GET", "opened")
    heads_before = marker_names(markers, "HEAD", "opened")

    kinds = ["partial"] * 30 + ["full"] * 5 + ["head"] * 5 + ["file-partial"] * 5

    def job(kind: str) -> int:
        if kind == "partial":
            return partial_download(server, path)
        if kind == "file-partial":
            return partial_download(server, f"/file/{SINGLE}")
        if kind == "full":
            return full_download(server, path)
        response, body = request(server, "HEAD", path)
        assert (response.status, body) == (200, b"")
        return 0

    # Sample the count while the downloads run: it must rise, or the count would prove nothing.
    peak = baseline
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(job, kind) for kind in kinds]
        deadline = time.monotonic() + 60
        while not all(future.done() for future in futures) and time.monotonic() < deadline:
            peak = max(peak, open_fds(pid))
            time.sleep(0.005)
        sizes = [future.result(timeout=1) for future in futures]
    assert peak > baseline
    assert all(size >= 64 * 1024 for size in sizes[:30])  # each one really got into the stream

    assert wait_for(lambda: open_fds(pid) <= baseline, timeout=10), (
        f"worker holds {open_fds(pid)} fds, {baseline} before: {sorted(os.listdir(f'/proc/{pid}/fd'))}"
    )
    assert server.worker_pid == pid  # the same worker did it all: nothing crashed

    # Every source of a GET was closed, whether the download finished or was cut off.
    opened = marker_names(markers, "GET", "opened") - before
    assert len(opened) == 35
    assert wait_for(lambda: opened <= marker_names(markers, "GET", "closed"), timeout=5), sorted(
        opened - marker_names(markers, "GET", "closed")
    )
    for name in opened:  # once each
        assert (markers / f"{name}.closed").read_text() == "closed\n"
    # A HEAD answer sends no body, but its sources are closed all the same.
    heads = marker_names(markers, "HEAD", "opened") - heads_before
    assert len(heads) == 5
    assert heads <= marker_names(markers, "HEAD", "closed"), sorted(
        heads - marker_names(markers, "HEAD", "closed")
    )


# -- 6. a whole file goes out through sendfile(2) -------------------------------------------------

SENDFILE_RESULT = re.compile(r"sendfile(?:\(| resumed>).*\)\s+=\s+(\d+)")


def test_direct_file_uses_sendfile(data: Path, tmp_path: Path) -> None:
    strace = shutil.which("strace")
    if strace is None:
        unavailable("strace is not installed: cannot observe sendfile(2)")
    log = tmp_path / "strace.log"
    wrapper = [strace, "-f", "-qq", "-e", "trace=sendfile", "-e", "signal=none", "-o", str(log)]
    probe = run([strace, "-f", "-qq", "-o", os.devnull, "true"])
    if probe.returncode != 0:
        pytest.skip(f"strace cannot trace here (ptrace not permitted?): {probe.stderr[:300]!r}")
    with GunicornServer(
        APP, pythonpath=[PROJECT], env={"ZM_TEST_DATA": str(data)}, wrapper=wrapper, start_timeout=40
    ) as running:
        response, body = request(running, "GET", f"/file/{SINGLE}")
        assert response.status == 200
        assert sha256(body) == sha256(SINGLE_DATA)

        response, body = request(running, "GET", f"/file/{SINGLE}", {"Range": "bytes=1000-1999"})
        assert response.status == 206
        assert response.getheader("Content-Range") == f"bytes 1000-1999/{len(SINGLE_DATA)}"
        assert body == SINGLE_DATA[1000:2000]

        tail = len(SINGLE_DATA) - 100_000
        response, body = request(running, "GET", f"/file/{SINGLE}", {"Range": f"bytes={tail}-"})
        assert response.status == 206
        assert body == SINGLE_DATA[tail:]
    # strace has exited with gunicorn, so its log is complete.
    text = log.read_text(errors="replace")
    sent = sum(int(match.group(1)) for match in SENDFILE_RESULT.finditer(text))
    assert sent >= len(SINGLE_DATA), text[-3000:]


def read_bytes_of(pid: int) -> int:
    """Bytes process ``pid`` has read so far (``rchar``: read(2), sendfile(2) ...)."""
    with open(f"/proc/{pid}/io") as file:
        return int(next(line for line in file if line.startswith("rchar:")).split()[1])


def test_range_near_the_end_does_not_read_the_whole_file(server: GunicornServer) -> None:
    pid = server.worker_pid
    if not os.path.exists(f"/proc/{pid}/io"):
        pytest.skip("no /proc/PID/io (task I/O accounting) on this kernel")
    name, size = SPARSE
    before = read_bytes_of(pid)
    response, body = request(server, "GET", f"/file/{name}", {"Range": f"bytes={size - 1000}-"})
    if (response.status, body) != (206, bytes(1000)):  # wrong answer, not a read-count problem
        raise RuntimeError(f"wrong range answer: {response.status}, {len(body)} bytes")
    read = read_bytes_of(pid) - before
    assert read < 4 * MIB, f"the worker read {read} bytes to send the last 1000 of {size}"
