"""The zero-copy path: stored file data goes out with sendfile(2), between the server's writes.

Under real gunicorn (gthread and sync workers), with strace where it counts bytes:

1. sendfile carries at least 95% of a large stored archive's bytes, CRC-32 cache cold and warm;
   cold, each file is read once (for its CRC-32) and sent from the page cache; warm, not read.
2. Ordering: every response is byte for byte the one the ordinary path gives, for full downloads
   and for ranges that start and end in headers, data and descriptors (a range that starts
   inside file data has no headers out yet: its first bytes go through the server).
3. Fallbacks: ``zero_copy = false``, TLS in the worker, deflate, entries of unknown size, a
   server that is not gunicorn, and a middleware outside ours that re-chunks the body (the
   count of bytes written does not match what the body produced) all send no file data with
   sendfile, and still the right bytes.
4. A file that shrinks, grows or is rewritten in place while it is sent aborts the connection;
   a client that goes away releases every file.
"""

from __future__ import annotations

import hashlib
import http.client
import importlib.util
import io
import os
import re
import shutil
import socket
import ssl
import subprocess
import threading
import zipfile
from pathlib import Path

import pytest

from .clients import connect, read_head, read_to_end, request, run, send_get, unavailable, wait_for
from .servers import PROJECT, TESTS, GunicornServer, open_fds

APP = "tests.server_app:app"
MIB = 1024 * 1024
# A finished call, whole ("123 sendfile(5, 7, [0] => [8388608], 8388608) = 8388608") or resumed after
# another thread's line ("123 <... sendfile resumed>, 8388608) = 8388608").
NAMES = "sendfile|sendto|write|writev|sendmsg|pread64|preadv2|read"
SYSCALL = re.compile(rf"^\d+\s+(?:({NAMES})\(|<\.\.\. ({NAMES}) resumed>).*\)\s+=\s+(\d+)$")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("zero-copy")
    big = root / "big"
    big.mkdir()
    for index in range(6):  # 6 x 20 MiB, and a few small files between them
        (big / f"part{index}.bin").write_bytes(os.urandom(20 * MIB))
        (big / f"note{index}.txt").write_bytes(b"notes %d\n" % index * 300)
    (root / "small").mkdir()
    for index in range(5):
        (root / "small" / f"f{index}.bin").write_bytes(os.urandom(300_000 + index))
    (root / "changing").mkdir()
    return root


def server(
    data: Path,
    *,
    zero_copy: bool = True,
    descriptors: bool = True,
    args: tuple[str, ...] = (),
    trace: Path | None = None,
    tls: bool = False,
    app: str = APP,
) -> GunicornServer:
    """The test app over ``data`` (CRC-32s in memory: cold when it starts); ``trace``: an strace log."""
    environment = {"ZM_TEST_DATA": str(data), "ZM_TEST_CRC_CACHE": ":memory:"}
    if not zero_copy:
        environment["ZM_TEST_ZERO_COPY"] = "false"
    if not descriptors:
        environment["ZM_TEST_DATA_DESCRIPTORS"] = "false"
    return GunicornServer(
        app,
        pythonpath=[f"{TESTS},{PROJECT}"],  # gunicorn keeps only its last --pythonpath
        env=environment,
        args=list(args),
        wrapper=strace_wrapper(trace) if trace is not None else (),
        tls=tls,
        start_timeout=40,
    )


def strace_wrapper(log: Path) -> list[str]:
    strace = shutil.which("strace")
    if strace is None:
        unavailable("strace is not installed: cannot count what sendfile(2) carries")
    probe = run([strace, "-f", "-qq", "-o", os.devnull, "true"])
    if probe.returncode != 0:
        pytest.skip(f"strace cannot trace here (ptrace not permitted?): {probe.stderr[:300]!r}")
    calls = "trace=" + NAMES.replace("|", ",")
    return [strace, "-f", "-qq", "-e", calls, "-e", "signal=none", "-o", str(log)]


def byte_counts(log: Path, data_files: set[int] | None = None) -> dict[str, int]:
    """Bytes per system call in an strace log (complete once gunicorn has exited)."""
    totals: dict[str, int] = {}
    for line in log.read_text(errors="replace").splitlines():
        match = SYSCALL.match(line)
        if match:
            name = match.group(1) or match.group(2)
            totals[name] = totals.get(name, 0) + int(match.group(3))
    return totals


def get(
    srv: GunicornServer, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    response, body = request(srv, "GET", path, headers)
    return response.status, {k.lower(): v for k, v in response.getheaders()}, body


# -- 1. sendfile carries the data ----------------------------------------------------------------


def test_sendfile_carries_at_least_95_percent_of_a_large_stored_archive(data: Path, tmp_path: Path) -> None:
    log = tmp_path / "strace.log"
    with server(data, trace=log) as srv:
        cold = get(srv, "/folder/big")
        warm = get(srv, "/folder/big")
    assert cold[0] == warm[0] == 200
    assert cold[2] == warm[2]
    length = len(cold[2])
    assert int(cold[1]["content-length"]) == length
    assert zipfile.ZipFile(io.BytesIO(cold[2])).testzip() is None
    counts = byte_counts(log)
    sent = counts.get("sendfile", 0)
    print(f"\n2 downloads of {length:,} bytes: {counts}")
    assert sent >= 0.95 * 2 * length, counts
    # Cold, each big file is read once (into one buffer) for its CRC-32; warm, not at all (the
    # cache's). Files under a chunk (the notes) go the ordinary way, read(2) and merged.
    big = sum(path.stat().st_size for path in (data / "big").glob("part*.bin"))
    assert counts.get("preadv2", 0) == big, counts


def test_without_descriptors_a_cold_file_is_read_once_then_sent_from_the_page_cache(
    data: Path, tmp_path: Path
) -> None:
    """data_descriptors = false: a file's CRC-32 goes in its local header, so a cold file is read
    (for its CRC-32) before its header, then sent with sendfile without being read again; warm,
    nothing is read. The bytes are those of the ordinary path."""
    log = tmp_path / "strace.log"
    with server(data, zero_copy=False, descriptors=False) as plain:
        reference = get(plain, "/folder/big")
    with server(data, trace=log, descriptors=False) as srv:
        cold = get(srv, "/folder/big")
        warm = get(srv, "/folder/big")
    assert cold[0] == warm[0] == reference[0] == 200
    assert cold[2] == warm[2] == reference[2]
    assert zipfile.ZipFile(io.BytesIO(cold[2])).testzip() is None
    counts = byte_counts(log)
    print(f"\n2 downloads of {len(cold[2]):,} bytes: {counts}")
    assert counts.get("sendfile", 0) >= 0.95 * 2 * len(cold[2]), counts
    big = sum(path.stat().st_size for path in (data / "big").glob("part*.bin"))
    # Once for the cold download; the rest of read(2) is gunicorn's start (imports), requests, notes.
    assert big <= counts.get("read", 0) + counts.get("preadv2", 0) <= big + 16 * MIB, counts


# -- 2. ordering: the same bytes as the ordinary path ----------------------------------------------


RANGES = [
    None,
    "bytes=0-0",
    "bytes=0-99",  # inside the first local header
    "bytes=10-50000",  # from a header into file data
    "bytes=1000000-30000000",  # from inside data, across a descriptor and headers
    "bytes=20971600-20971700",  # around the first descriptor
    "bytes=-100",  # the end record
    "bytes=-70000000",  # from inside data to the end
]


@pytest.mark.parametrize("worker", ["gthread", "sync"])
def test_every_range_is_byte_identical_to_the_ordinary_path(data: Path, worker: str) -> None:
    args = ("-k", worker) if worker == "sync" else ()
    with server(data, zero_copy=False) as plain:
        reference = {spec: get(plain, "/folder/big", {"Range": spec} if spec else None) for spec in RANGES}
    with server(data, args=args) as fast:
        for _ in range(2):  # cold, then warm
            for spec, (status, headers, body) in reference.items():
                got = get(fast, "/folder/big", {"Range": spec} if spec else None)
                assert got[0] == status, spec
                assert got[1].get("content-range") == headers.get("content-range"), spec
                assert hashlib.sha256(got[2]).hexdigest() == hashlib.sha256(body).hexdigest(), spec


# -- 3. fallbacks ---------------------------------------------------------------------------------


def sendfile_bytes_for(srv: GunicornServer, log: Path, path: str, check: bool = True) -> int:
    with srv:
        status, _headers, body = get(srv, path)
        assert status == 200
        if check:
            assert zipfile.ZipFile(io.BytesIO(body)).testzip() is None
    return byte_counts(log).get("sendfile", 0)


def test_zero_copy_false_sends_through_the_server(data: Path, tmp_path: Path) -> None:
    log = tmp_path / "s.log"
    assert sendfile_bytes_for(server(data, zero_copy=False, trace=log), log, "/folder/big") == 0


def test_entries_of_unknown_size_go_through_the_server(data: Path, tmp_path: Path) -> None:
    """A folder plus a generated entry (a source) of unknown size: written in one pass.
    Of known size, the same archive is laid out, and its files' data go out with sendfile."""
    log = tmp_path / "s.log"
    assert sendfile_bytes_for(server(data, trace=log), log, "/marked/small?unsized=1") == 0
    log = tmp_path / "sized.log"
    assert sendfile_bytes_for(server(data, trace=log), log, "/marked/small") >= 1_500_000


def test_a_middleware_that_holds_chunks_back_gets_the_ordinary_path(data: Path, tmp_path: Path) -> None:
    """An outer middleware passes gunicorn's start_response through but holds each chunk back
    until the next one is produced: the body's proof (bytes written == bytes produced) never
    holds, so nothing is sent directly, and the bytes are right."""
    log = tmp_path / "s.log"
    with server(data, zero_copy=False) as plain:
        reference = get(plain, "/folder/big")[2]
    with server(data, trace=log, app="rechunking_app:app") as srv:
        status, _headers, body = get(srv, "/folder/big")
    assert status == 200
    assert body == reference
    assert byte_counts(log).get("sendfile", 0) == 0


def test_tls_in_the_worker_sends_through_the_server(data: Path, tmp_path: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        unavailable("openssl is not installed: cannot make a certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
         "-days", "1", "-subj", "/CN=127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    log = tmp_path / "s.log"
    with server(data, zero_copy=False) as plain:
        reference = get(plain, "/folder/small")[2]
    tls = ("--certfile", str(cert), "--keyfile", str(key))
    with server(data, args=tls, trace=log, tls=True) as srv:
        context = ssl._create_unverified_context()  # a self-made certificate
        connection = http.client.HTTPSConnection("127.0.0.1", srv.port, context=context, timeout=30)
        connection.request("GET", "/folder/small")
        response = connection.getresponse()
        body = response.read()
        connection.close()
    assert response.status == 200
    assert body == reference
    assert byte_counts(log).get("sendfile", 0) == 0


def test_a_server_that_is_not_gunicorn_gets_the_ordinary_path(
    data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """werkzeug's development server also hands out the client's socket (``werkzeug.socket``),
    but its writes cannot be followed: the right bytes, all through the server."""
    from werkzeug.serving import make_server

    with server(data, zero_copy=False) as plain:
        reference = get(plain, "/folder/big")[2]
    # A copy of the test app of its own, which reads ZM_TEST_DATA when it is loaded.
    monkeypatch.setenv("ZM_TEST_DATA", str(data))
    monkeypatch.setenv("ZM_TEST_CRC_CACHE", ":memory:")
    spec = importlib.util.spec_from_file_location("server_app_under_werkzeug", TESTS / "server_app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    httpd = make_server("127.0.0.1", 0, module.app, threaded=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        connection = http.client.HTTPConnection("127.0.0.1", httpd.server_port, timeout=60)
        connection.request("GET", "/folder/big")
        response = connection.getresponse()
        body = response.read()
        connection.close()
    finally:
        httpd.shutdown()
    assert response.status == 200
    assert body == reference


# -- 4. files that change, clients that leave ---------------------------------------------------------


def changing_file(data: Path, size: int, kind: str = "zip") -> tuple[str, Path]:
    folder = data / "changing" / os.urandom(4).hex()
    folder.mkdir()
    (folder / "small.txt").write_bytes(b"a second entry, so that the folder is zipped\n")
    path = folder / "big.bin"
    with open(path, "wb") as file:
        file.write(os.urandom(size))
    if kind == "file":
        return f"/file/changing/{folder.name}/big.bin", path
    return f"/folder/changing/{folder.name}", path


def truncate(path: Path) -> None:
    os.truncate(path, 0)


def grow(path: Path) -> None:
    with open(path, "ab") as file:
        file.write(b"more")


def rewrite_in_place(path: Path) -> None:
    """The same size, mtime set back: only the ctime tells. (The ETag stays the same, by design:
    it covers the mtime and size only; the check while sending still looks at the ctime.)"""
    before = path.stat()
    with open(path, "r+b") as file:
        file.seek(before.st_size - MIB)
        file.write(os.urandom(MIB))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


@pytest.mark.parametrize("change", [truncate, grow, rewrite_in_place], ids=["shrinks", "grows", "rewritten"])
@pytest.mark.parametrize("kind", ["zip-cold", "zip-warm", "file"])
def test_a_file_that_changes_while_it_is_sent_aborts_the_connection(
    data: Path, change: object, kind: str
) -> None:
    """The connection ends short of its Content-Length, for an archive (its file's CRC-32 being
    computed on the way, or cached) and for a direct file; a direct file rewritten in place with
    the same size used to arrive whole, mixing two versions (gunicorn's one sendfile call for the
    whole file could not look at it before the end)."""
    url, path = changing_file(data, 40 * MIB, kind.split("-")[0])
    with server(data, trace=None) as srv:
        if kind == "zip-warm":
            assert get(srv, url)[0] == 200  # its CRC-32 is now cached: sent without reading it
        sock = connect(srv.host, srv.port, receive_buffer=64 * 1024)
        try:
            send_get(sock, url)
            head = read_head(sock)
            assert head.status == 200
            got = head.body + sock.recv(MIB)
            while len(got) < MIB:
                got += sock.recv(MIB)
            change(path)  # type: ignore[operator]
            rest, ending = read_to_end(sock, timeout=30)
        finally:
            sock.close()
        assert len(got) + len(rest) < head.length, ending  # never the whole promised body
        assert wait_for(lambda: "aborted" in srv.log() or "Error handling request" in srv.log(), 5), (
            srv.log()[-2000:]
        )


def test_clients_that_leave_mid_file_release_every_file(data: Path, tmp_path: Path) -> None:
    log = tmp_path / "s.log"
    with server(data, trace=log) as srv:
        pid = srv.worker_pid
        assert get(srv, "/folder/big")[0] == 200  # warm: lazily opened things are open now
        baseline = open_fds(pid)

        def leave_after(nbytes: int) -> int:
            sock = connect(srv.host, srv.port, receive_buffer=64 * 1024)
            try:
                send_get(sock, "/folder/big")
                got = len(read_head(sock).body)
                while got < nbytes:
                    piece = sock.recv(1 << 20)
                    if not piece:
                        break
                    got += len(piece)
                return got
            finally:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                sock.close()  # a reset: the server's next send fails at once

        threads = [threading.Thread(target=leave_after, args=((index + 1) * 3 * MIB,)) for index in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert wait_for(lambda: open_fds(pid) <= baseline, timeout=10), (
            f"worker holds {open_fds(pid)} fds, {baseline} before: {sorted(os.listdir(f'/proc/{pid}/fd'))}"
        )
        assert srv.worker_pid == pid  # nothing crashed
        assert get(srv, "/folder/small")[0] == 200  # and it still serves
    assert byte_counts(log).get("sendfile", 0) > 0  # the path under test was the zero-copy one


def test_no_sendfile_option_of_gunicorn_is_respected(data: Path, tmp_path: Path) -> None:
    log = tmp_path / "s.log"
    srv = server(data, trace=log, args=("--no-sendfile",))
    assert sendfile_bytes_for(srv, log, "/folder/small") == 0


def test_responses_sent_directly_keep_the_connection_alive_and_exact(data: Path) -> None:
    """gunicorn's count of what it sent includes what went out directly, so a kept-alive
    connection carries the next responses intact, and its access log has the real sizes."""
    with server(data, zero_copy=False) as plain:
        expected = [
            get(plain, "/folder/small")[2],
            get(plain, "/folder/small", {"Range": "bytes=1000-700000"})[2],
            get(plain, "/file/small/f1.bin")[2],
        ]
    with server(data, args=("--access-logfile", "-")) as srv:
        connection = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
        try:
            for _ in range(2):
                got = []
                for path, headers in [
                    ("/folder/small", {}),
                    ("/folder/small", {"Range": "bytes=1000-700000"}),
                    ("/file/small/f1.bin", {}),
                ]:
                    connection.request("GET", path, headers=headers)
                    response = connection.getresponse()
                    got.append(response.read())
                    assert not response.will_close
                assert got == expected
        finally:
            connection.close()
        log = srv.log()
    sizes = re.findall(r'"GET /folder/small HTTP/1.1" 200 (\d+)', log)
    assert sizes and all(int(size) == len(expected[0]) for size in sizes), log[-2000:]
