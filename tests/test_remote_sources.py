"""Remote sources: UrlSource entries fetched from a real nginx through a fault-injecting proxy.

The middleware runs in process (werkzeug's test client) where the test looks at the archive and
the events, and under a real gunicorn where a real client goes away or memory is measured. The
origin counts every request: how many were open at once, their Range and If-Match headers, and
the bytes it sent.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import logging
import os
import socket
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from werkzeug.test import Client

from zipmiddleware import ZipEntry, ZipMiddleware, ZipTarget
from zipmiddleware.errors import StreamError
from zipmiddleware.events import DownloadEvent, EntryEvent
from zipmiddleware.fetching import PREFETCH_BUFFER, EntryFailed, Fetcher, Policy
from zipmiddleware.planning import PlannedEntry
from zipmiddleware.sources import SourceError, UrlSource

from .clients import assert_good_zip, connect, free_port, read_head, run, send_get, wait_for
from .origin import Fault, FaultProxy, start_nginx_origin, write_files
from .servers import GunicornServer, peak_memory, reset_peak_memory

MIB = 1024 * 1024
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def origin_files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, dict[str, bytes]]]:
    """A real nginx serving 12 files of 300 kB and 6 of 3 MiB; yields its URL, root and files."""
    root = tmp_path_factory.mktemp("origin")
    small = write_files(root, 12, 300_000, seed=1)
    big = {f"big{index}.bin": os.urandom(3 * MIB) for index in range(6)}
    for name, data in big.items():
        (root / name).write_bytes(data)
    nginx = start_nginx_origin(root, tmp_path_factory.mktemp("nginx"))
    try:
        yield nginx.url, root, {**small, **big}
    finally:
        nginx.stop()


@pytest.fixture
def proxy(origin_files: tuple[str, Path, dict[str, bytes]]) -> Iterator[FaultProxy]:
    with FaultProxy(origin_files[0]) as proxy:
        yield proxy


@pytest.fixture
def files(origin_files: tuple[str, Path, dict[str, bytes]]) -> dict[str, bytes]:
    return origin_files[2]


def small(files: dict[str, bytes]) -> dict[str, bytes]:
    return {name: data for name, data in files.items() if name.startswith("f")}


def big(files: dict[str, bytes]) -> dict[str, bytes]:
    return {name: data for name, data in files.items() if name.startswith("big")}


class Recorder:
    """on_entry and on_download: every event, in order."""

    def __init__(self) -> None:
        self.events: list[Any] = []

    def __call__(self, event: object) -> None:
        self.events.append(event)

    @property
    def entries(self) -> list[EntryEvent]:
        return [event for event in self.events if isinstance(event, EntryEvent)]

    @property
    def downloads(self) -> list[DownloadEvent]:
        return [event for event in self.events if isinstance(event, DownloadEvent)]


def middleware(
    proxy: FaultProxy, files: dict[str, bytes], recorder: Recorder, sized: bool = True, **settings: Any
) -> ZipMiddleware:
    def resolve(request: object) -> ZipTarget:
        entries = [
            ZipEntry(name, source=UrlSource(f"{proxy.url}/{name}", size=len(data) if sized else None))
            for name, data in files.items()
        ]
        return ZipTarget(entries, "remote.zip")

    settings.setdefault("retry_backoff", 0.05)
    return ZipMiddleware(
        lambda environ, start_response: [],
        routes={"/remote.zip": resolve},
        on_entry=recorder,
        on_download=recorder,
        **settings,
    )


def download(app: ZipMiddleware) -> tuple[Any, bytes]:
    return download_path(app, "/remote.zip")


def download_path(app: ZipMiddleware, path: str) -> tuple[Any, bytes]:
    response = Client(app).get(path)
    try:
        return response, response.get_data()
    finally:
        response.close()


def aborted_download(app: ZipMiddleware) -> None:
    """The download fails with StreamError (the server would abort the connection), before or
    after its first chunk."""
    with pytest.raises(StreamError):
        response = Client(app).get("/remote.zip")
        try:
            response.get_data()
        finally:
            response.close()


def contents(body: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        assert archive.testzip() is None
        return {name: archive.read(name) for name in archive.namelist()}


# -- whole archives --------------------------------------------------------------------------


@pytest.mark.parametrize("sized", [True, False], ids=["sized", "unsized"])
def test_archive_of_url_sources_is_the_origins_files(
    proxy: FaultProxy, files: dict[str, bytes], sized: bool, tmp_path: Path
) -> None:
    recorder = Recorder()
    response, body = download(middleware(proxy, files, recorder, sized=sized))
    assert response.status_code == 200
    if sized:  # sizes known before the first byte: an exact Content-Length
        assert response.content_length == len(body)
    else:
        assert response.content_length is None
    assert contents(body) == files
    path = tmp_path / "remote.zip"
    path.write_bytes(body)
    assert_good_zip(path, files)  # unzip -t, then every entry compared
    seven = run(["7z", "t", path])
    assert seven.returncode == 0 and b"Everything is Ok" in seven.stdout, seven.stdout
    assert [event.arcname for event in recorder.entries] == list(files)  # in entry order
    assert all(event.status == "done" and event.attempts == 1 for event in recorder.entries)
    [finished] = recorder.downloads
    assert (finished.status, finished.bytes_sent, finished.entries) == ("complete", len(body), len(files))
    assert finished.route == "/remote.zip" and finished.download_name == "remote.zip"


def test_head_fetches_nothing(proxy: FaultProxy, files: dict[str, bytes]) -> None:
    """A sized archive's length comes from the sizes given: HEAD asks the origin for nothing."""
    chosen = big(files)
    recorder = Recorder()
    response = Client(middleware(proxy, chosen, recorder, prefetch=4)).head("/remote.zip")
    response.close()
    assert response.status_code == 200 and response.content_length > sum(map(len, chosen.values()))
    time.sleep(0.2)
    assert proxy.requests == [] and recorder.events == []


def test_sources_of_every_kind_keep_their_order(proxy: FaultProxy, files: dict[str, bytes]) -> None:
    """Remote entries (prefetched) between bytes, a generator and a file: output in entry order."""
    remote = list(small(files).items())[:4]

    def generated() -> Iterator[bytes]:
        yield b"made "
        yield b"here"

    def resolve(request: object) -> ZipTarget:
        return ZipTarget(
            [
                ZipEntry("a.txt", source=b"first"),
                *(ZipEntry(name, source=UrlSource(f"{proxy.url}/{name}")) for name, _ in remote[:2]),
                ZipEntry("b.txt", source=generated(), size=9),
                *(ZipEntry(name, source=UrlSource(f"{proxy.url}/{name}")) for name, _ in remote[2:]),
            ],
            "mixed.zip",
        )

    recorder = Recorder()
    app = ZipMiddleware(
        lambda environ, start_response: [], routes={"/remote.zip": resolve}, on_entry=recorder, prefetch=3
    )
    _, body = download(app)
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        names = archive.namelist()
        assert archive.read("b.txt") == b"made here"
        assert all(archive.read(name) == data for name, data in remote)
    assert names == ["a.txt", remote[0][0], remote[1][0], "b.txt", remote[2][0], remote[3][0]]
    assert [event.arcname for event in recorder.entries] == names


def test_unsized_source_learns_its_size_before_its_header(proxy: FaultProxy, files: dict[str, bytes]) -> None:
    """Written in one pass, an entry's local header comes after its source answered: its size
    (Content-Length) is in the header, so streaming readers find where the data ends."""
    chosen = dict(list(small(files).items())[:2])
    _, body = download(middleware(proxy, chosen, Recorder(), sized=False))
    first = next(iter(chosen.values()))
    assert int.from_bytes(body[22:26], "little") == len(first)  # uncompressed size in the local header
    assert contents(body) == chosen


# -- prefetch --------------------------------------------------------------------------------


@pytest.mark.parametrize("prefetch", [0, 1, 2, 4])
def test_prefetch_keeps_at_most_prefetch_plus_one_requests_open(
    proxy: FaultProxy, files: dict[str, bytes], prefetch: int
) -> None:
    """Files larger than the prefetch buffer keep their connection open until their turn: the
    origin sees the entry being sent plus ``prefetch`` ahead, never more, and reaches that."""
    proxy.default_fault = Fault(first_byte_delay=0.05)
    chosen = big(files)
    recorder = Recorder()
    _, body = download(middleware(proxy, chosen, recorder, prefetch=prefetch))
    assert contents(body) == chosen
    assert proxy.max_in_flight == prefetch + 1
    assert [event.arcname for event in recorder.entries] == list(chosen)
    # Every file was asked for once, whole.
    assert sorted(record.path for record in proxy.requests) == sorted(f"/{name}" for name in chosen)


def test_prefetch_hides_the_origins_first_byte_delay(proxy: FaultProxy, files: dict[str, bytes]) -> None:
    chosen = small(files)
    proxy.default_fault = Fault(first_byte_delay=0.2)
    timings = {}
    for prefetch in (0, 4):
        started = time.monotonic()
        _, body = download(middleware(proxy, chosen, Recorder(), prefetch=prefetch))
        timings[prefetch] = time.monotonic() - started
        assert contents(body) == chosen
    # 12 entries x 0.2 s in a row, against about a quarter of that.
    assert timings[0] >= 12 * 0.2
    assert timings[4] < timings[0] / 2.5, timings


# -- retries ---------------------------------------------------------------------------------


def test_dropped_connections_resume_at_the_byte_they_reached(
    proxy: FaultProxy, files: dict[str, bytes]
) -> None:
    chosen = big(files)
    for name in list(chosen)[1::2]:  # every other file is cut twice, a third and two thirds in
        proxy.faults[f"/{name}"] = Fault(drop_after=MIB, drop_times=2)
    recorder = Recorder()
    _, body = download(middleware(proxy, chosen, recorder, prefetch=2))
    assert contents(body) == chosen
    for name in list(chosen)[1::2]:
        first, second, third = proxy.requests_for(f"/{name}")
        assert first.dropped and second.dropped and not third.dropped
        assert "range" not in first.headers
        # Each restart asks for the rest only, of the same version.
        assert second.headers["range"] == f"bytes={MIB}-"
        assert third.headers["range"] == f"bytes={2 * MIB}-"
        assert second.headers["if-match"] == third.headers["if-match"] != ""
        assert second.status == third.status == 206
    attempts = {event.arcname: event.attempts for event in recorder.entries}
    assert attempts == {name: 3 if index % 2 else 1 for index, name in enumerate(chosen)}
    # A dropped transfer costs what was left of it, not the file: 3 MiB and the two re-asks' rest.
    fetched = sum(record.bytes_sent for record in proxy.requests)
    assert fetched == sum(map(len, chosen.values()))


def test_transient_statuses_are_retried_with_backoff(proxy: FaultProxy, files: dict[str, bytes]) -> None:
    name, data = next(iter(small(files).items()))
    proxy.faults[f"/{name}"] = Fault(fail_first=3)
    recorder = Recorder()
    _, body = download(middleware(proxy, {name: data}, recorder, retry_backoff=0.2))
    assert contents(body) == {name: data}
    requests = proxy.requests_for(f"/{name}")
    assert [record.status for record in requests] == [503, 503, 503, 200]
    gaps = [later.started - earlier.started for earlier, later in itertools.pairwise(requests)]
    # 0.2 s x attempt: 0.2, 0.4, 0.6 (and less than a second more each).
    for gap, backoff in zip(gaps, (0.2, 0.4, 0.6), strict=True):
        assert backoff <= gap < backoff + 0.5, gaps
    assert recorder.entries[0].attempts == 4


def test_an_entry_that_keeps_failing_aborts_the_download(proxy: FaultProxy, files: dict[str, bytes]) -> None:
    chosen = dict(list(small(files).items())[:3])
    failing = list(chosen)[1]
    proxy.faults[f"/{failing}"] = Fault(fail_first=10)
    recorder = Recorder()
    aborted_download(middleware(proxy, chosen, recorder, retries=2))
    assert len(proxy.requests_for(f"/{failing}")) == 3  # the first try and two retries
    done, failed = recorder.entries
    assert (done.status, failed.status, failed.arcname, failed.attempts) == ("done", "failed", failing, 3)
    assert failed.error == "its origin is unavailable (HTTP 503)"
    assert recorder.downloads[0].status == "aborted"


def test_refusals_are_not_retried(proxy: FaultProxy, files: dict[str, bytes]) -> None:
    chosen = dict(list(small(files).items())[:2])
    name = list(chosen)[1]
    proxy.faults[f"/{name}"] = Fault(fail_first=5, status=404)
    recorder = Recorder()
    aborted_download(middleware(proxy, chosen, recorder))
    assert len(proxy.requests_for(f"/{name}")) == 1
    assert recorder.entries[-1].error == "not found at its origin (HTTP 404)"


def test_a_first_entry_that_fails_gets_a_502(proxy: FaultProxy, files: dict[str, bytes]) -> None:
    """Nothing went out yet: a short text error instead of an aborted 200."""
    chosen = dict(list(small(files).items())[:2])
    name = list(chosen)[0]
    proxy.faults[f"/{name}"] = Fault(fail_first=5, status=404)
    recorder = Recorder()
    response, body = download(middleware(proxy, chosen, recorder))
    assert response.status_code == 502 and response.mimetype == "text/plain"
    assert body == b"Bad Gateway: a file of this download could not be fetched from where it is kept.\n"
    assert b"127.0.0.1" not in body and "Content-Disposition" not in response.headers
    [finished] = recorder.downloads
    assert (finished.status, finished.http_status, finished.bytes_sent) == ("aborted", 502, 0)


def test_a_file_changed_at_the_origin_is_never_spliced(
    proxy: FaultProxy, origin_files: tuple[str, Path, dict[str, bytes]]
) -> None:
    """Cut part-way, then changed before the restart: the origin answers the restart's If-Match
    with 412, and the download aborts rather than join two versions."""
    _, root, files = origin_files
    name = "changing.bin"
    old = os.urandom(3 * MIB)
    (root / name).write_bytes(old)
    proxy.faults[f"/{name}"] = Fault(drop_after=MIB)

    def change() -> None:
        wait_for(lambda: any(record.dropped for record in proxy.requests_for(f"/{name}")), 10, 0.01)
        (root / name).write_bytes(os.urandom(3 * MIB))
        os.utime(root / name, (time.time() + 5, time.time() + 5))  # a new ETag for nginx

    changer = threading.Thread(target=change)
    changer.start()
    recorder = Recorder()
    aborted_download(middleware(proxy, {name: old}, recorder, retry_backoff=0.5))
    changer.join()
    first, second = proxy.requests_for(f"/{name}")
    assert second.headers["if-match"] and second.status == 412
    assert recorder.entries[-1].status == "failed"
    assert recorder.downloads[0].status == "aborted"


# -- skipping --------------------------------------------------------------------------------


def test_skip_leaves_out_what_fails_and_lists_it(proxy: FaultProxy, files: dict[str, bytes]) -> None:
    chosen = dict(list(small(files).items())[:4])
    gone, busy = list(chosen)[1], list(chosen)[2]
    proxy.faults[f"/{gone}"] = Fault(fail_first=10, status=404)
    proxy.faults[f"/{busy}"] = Fault(fail_first=10)
    recorder = Recorder()
    response, body = download(middleware(proxy, chosen, recorder, on_error="skip", retries=1))
    assert response.status_code == 200
    assert response.content_length is None  # a promised length could not have been kept
    found = contents(body)
    listing = found.pop("SKIPPED FILES.txt").decode("utf-8")
    assert found == {name: data for name, data in chosen.items() if name not in (gone, busy)}
    assert f"{gone}: not found at its origin (HTTP 404)" in listing
    assert f"{busy}: its origin is unavailable (HTTP 503)" in listing
    assert "127.0.0.1" not in listing and "http" not in listing  # nothing internal
    statuses = {event.arcname: event.status for event in recorder.entries}
    assert statuses == {
        **{name: "done" for name in chosen},
        gone: "skipped",
        busy: "skipped",
        "SKIPPED FILES.txt": "done",
    }
    assert recorder.downloads[0].status == "complete"


# -- the client going away ----------------------------------------------------------------------


@pytest.fixture
def remote_server(
    proxy: FaultProxy, files: dict[str, bytes], tmp_path: Path
) -> Callable[..., GunicornServer]:
    def start(chosen: dict[str, bytes], **settings: Any) -> GunicornServer:
        manifest = tmp_path / "manifest.json"
        manifest.write_text(json.dumps({name: len(data) for name, data in chosen.items()}))
        env = {
            "ZM_TEST_ORIGIN": proxy.url,
            "ZM_TEST_MANIFEST": str(manifest),
            "ZM_TEST_EVENTS": str(tmp_path / "events.jsonl"),
            "ZM_TEST_SETTINGS": json.dumps(settings),
        }
        return GunicornServer("tests.remote_app:app", pythonpath=[ROOT], env=env, threads=4)

    return start


def read_events(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.server
def test_client_gone_stops_every_fetch_within_a_second(
    proxy: FaultProxy, files: dict[str, bytes], remote_server: Callable[..., GunicornServer], tmp_path: Path
) -> None:
    chosen = big(files)
    proxy.default_fault = Fault(rate=4 * MIB)  # slow enough that every fetch is still running
    with remote_server(chosen, prefetch=4) as server:
        sock = connect(server.host, server.port)
        send_get(sock, "/remote.zip")
        head = read_head(sock)
        assert head.status == 200
        wait_for(lambda: proxy.in_flight == 5, 10)
        assert proxy.in_flight == 5
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()  # an RST: the next send to it fails at once
        gone = time.monotonic()
        assert wait_for(lambda: proxy.in_flight == 0, 5)
        assert time.monotonic() - gone < 1.0
        settled = proxy.bytes_sent
        time.sleep(0.5)
        assert proxy.bytes_sent == settled
        assert all(record.client_gone or record.ended for record in proxy.requests)
        assert wait_for(lambda: any(e["kind"] == "DownloadEvent" for e in read_events(tmp_path)), 5)
    [finished] = [event for event in read_events(tmp_path) if event["kind"] == "DownloadEvent"]
    assert finished["status"] == "client_gone"


def begin_in_thread(fetcher: Fetcher) -> tuple[threading.Thread, list[BaseException]]:
    """The download's thread, beginning the first entry; what it raised goes to the list."""
    failures: list[BaseException] = []

    def first_entry() -> None:
        try:
            fetcher.begin(0)
        except Exception as exc:
            failures.append(exc)

    reader = threading.Thread(target=first_entry)
    reader.start()
    return reader, failures


def test_close_stops_requests_still_waiting_for_their_answer(
    proxy: FaultProxy, files: dict[str, bytes]
) -> None:
    """The download ends while the entry being sent and four prefetched ones wait for their
    origin's first byte: every wait ends at once, and nothing is fetched after."""
    proxy.default_fault = Fault(first_byte_delay=2.0)
    entries = tuple(
        PlannedEntry(name, 0, source=UrlSource(f"{proxy.url}/{name}", size=len(data)), size=len(data))
        for name, data in big(files).items()
    )
    fetcher = Fetcher(entries, Policy(prefetch=4))
    reader, failures = begin_in_thread(fetcher)
    assert wait_for(lambda: proxy.in_flight == 5, 5)
    closed = time.monotonic()
    fetcher.close()
    reader.join(2)
    assert not reader.is_alive() and time.monotonic() - closed < 1
    assert isinstance(failures[0], EntryFailed)
    # Once its delay is over, the proxy finds every client gone.
    assert wait_for(lambda: proxy.in_flight == 0, 5)
    assert proxy.bytes_sent == 0
    assert all(record.client_gone for record in proxy.requests)


def test_close_ends_a_blocked_read_of_an_answer_that_closes_its_connection() -> None:
    """An origin answering "Connection: close" (http.client then hands the socket over to the
    answer): a read blocked in its body still ends at once when the download ends."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def serve() -> None:
        connection, _ = listener.accept()
        accepted.append(connection)
        connection.recv(65536)
        head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\nConnection: close\r\n\r\n"
        connection.sendall(head + b"x" * 1000)  # then nothing more: the read blocks

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        source = UrlSource(f"http://127.0.0.1:{listener.getsockname()[1]}/f", size=1_000_000, timeout=30)
        stream = source.open(0)
        failures: list[BaseException] = []

        def read() -> None:
            try:
                for _ in stream:
                    pass
            except Exception as exc:
                failures.append(exc)

        reader = threading.Thread(target=read)
        reader.start()
        time.sleep(0.3)
        closed = time.monotonic()
        source.close()
        reader.join(2)
        assert not reader.is_alive() and time.monotonic() - closed < 1
        assert isinstance(failures[0], SourceError)
    finally:
        listener.close()
        for connection in accepted:
            connection.close()


@pytest.mark.server
def test_a_first_entry_that_fails_gets_a_502_from_gunicorn(
    proxy: FaultProxy, files: dict[str, bytes], remote_server: Callable[..., GunicornServer], tmp_path: Path
) -> None:
    chosen = {"missing.bin": 1000, **{name: len(data) for name, data in small(files).items()}}
    with remote_server({name: b"x" * size for name, size in chosen.items()}) as server:
        result = run(["curl", "-sS", "-D", "-", "-o", tmp_path / "body", server.url + "/remote.zip"])
        assert wait_for(lambda: any(e["kind"] == "DownloadEvent" for e in read_events(tmp_path)), 5)
    head = result.stdout.decode()
    assert head.startswith("HTTP/1.1 502") and "text/plain" in head, head
    assert (tmp_path / "body").read_bytes().startswith(b"Bad Gateway:")
    [finished] = [event for event in read_events(tmp_path) if event["kind"] == "DownloadEvent"]
    assert (finished["status"], finished["http_status"], finished["bytes_sent"]) == ("aborted", 502, 0)


@pytest.mark.server
def test_curl_download_through_gunicorn_survives_drops(
    proxy: FaultProxy, files: dict[str, bytes], remote_server: Callable[..., GunicornServer], tmp_path: Path
) -> None:
    chosen = {**small(files), **big(files)}
    for name in list(chosen)[::3]:
        proxy.faults[f"/{name}"] = Fault(drop_after=100_000)
    with remote_server(chosen, prefetch=4, retry_backoff=0.05) as server:
        output = tmp_path / "remote.zip"
        result = run(["curl", "-sS", "--fail", "-o", output, server.url + "/remote.zip"], timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
    assert_good_zip(output, chosen)
    seven = run(["7z", "t", output])
    assert seven.returncode == 0 and b"Everything is Ok" in seven.stdout, seven.stdout
    digests = {name: hashlib.sha256(data).hexdigest() for name, data in chosen.items()}
    assert {
        name: hashlib.sha256(data).hexdigest() for name, data in contents(output.read_bytes()).items()
    } == digests
    events = read_events(tmp_path)
    retried = {e["arcname"] for e in events if e["kind"] == "EntryEvent" and e["attempts"] > 1}
    assert retried == set(list(chosen)[::3])


@pytest.mark.server
@pytest.mark.slow
def test_memory_stays_bounded_with_prefetch(
    proxy: FaultProxy,
    origin_files: tuple[str, Path, dict[str, bytes]],
    remote_server: Callable[..., GunicornServer],
    tmp_path: Path,
) -> None:
    """200 remote entries of 5 MB with prefetch 4: the worker grows by less than the documented
    bound (prefetch x 1 MiB per download, plus the socket buffers and the body's chunk)."""
    _, root, _ = origin_files
    chosen = {}
    block = os.urandom(5 * 10**6)
    for index in range(200):
        name = f"m{index:03}.bin"
        data = block[index:] + block[:index]
        (root / name).write_bytes(data)
        chosen[name] = data
    with remote_server(chosen, prefetch=4) as server:
        warm = run(["curl", "-sS", "--fail", "-o", "/dev/null", server.url + "/remote.zip"], timeout=120)
        assert warm.returncode == 0
        pid = server.worker_pid
        reset_peak_memory(pid)
        before = peak_memory(pid)
        output = tmp_path / "remote.zip"
        result = run(["curl", "-sS", "--fail", "-o", output, server.url + "/remote.zip"], timeout=120)
        assert result.returncode == 0
        growth = peak_memory(pid) - before
    assert growth < 4 * PREFETCH_BUFFER + 16 * MIB, growth
    with zipfile.ZipFile(output) as archive:
        assert len(archive.namelist()) == 200
        assert archive.read("m007.bin") == chosen["m007.bin"]


# -- UrlSource itself ----------------------------------------------------------------------------


def test_url_source_learns_size_and_validators(proxy: FaultProxy, files: dict[str, bytes]) -> None:
    name, data = next(iter(small(files).items()))
    source = UrlSource(f"{proxy.url}/{name}")
    stream = source.open(0)
    assert b"".join(stream) == data
    assert source.size == len(data) and source.etag and source.last_modified and source.mtime
    tail = source.open(1000)
    assert b"".join(tail) == data[1000:]
    assert proxy.requests_for(f"/{name}")[-1].headers["if-match"] == source.etag


def test_url_source_refuses_a_wrong_size(proxy: FaultProxy, files: dict[str, bytes]) -> None:
    name, data = next(iter(small(files).items()))
    with pytest.raises(SourceError) as info:
        UrlSource(f"{proxy.url}/{name}", size=len(data) + 1).open(0)
    assert not info.value.transient and "size" in info.value.reason


def test_url_source_without_validators_is_not_resumed(tmp_path: Path) -> None:
    """An origin with no ETag and no Last-Modified: read from the start only."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Plain(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "5")
            self.end_headers()
            self.wfile.write(b"hello")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Plain)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        source = UrlSource(f"http://127.0.0.1:{server.server_port}/x")
        assert b"".join(source.open(0)) == b"hello"
        with pytest.raises(SourceError) as info:
            source.open(2)
        assert not info.value.transient
    finally:
        server.shutdown()
        server.server_close()


def test_url_source_needs_http() -> None:
    with pytest.raises(ValueError, match="http"):
        UrlSource("file:///etc/passwd")


class Zeros:
    """A restartable source of ``size`` zero bytes that, like UrlSource, learns its size only
    when it is opened."""

    def __init__(self, size: int) -> None:
        self.real_size = size
        self.size: int | None = None

    def open(self, offset: int) -> Iterator[bytes]:
        self.size = self.real_size
        block = bytes(MIB)
        remaining = self.real_size - offset
        while remaining:
            piece = block[: min(MIB, remaining)]
            remaining -= len(piece)
            yield piece


@pytest.mark.slow
def test_unsized_restartable_source_may_pass_four_gib(tmp_path: Path) -> None:
    """Its size is learnt before its header is written: ZIP64 fields, not a 2 GiB limit."""
    size = 4_500_000_000
    app = ZipMiddleware(
        lambda environ, start_response: [],
        routes={
            "/big.zip": lambda request: ZipTarget([ZipEntry("zeros.bin", source=Zeros(size))], "big.zip")
        },
    )
    response = Client(app).get("/big.zip")
    assert response.content_length is None  # sized only once it was opened
    path = tmp_path / "big.zip"
    total = 0
    with path.open("wb") as sparse:
        for chunk in response.iter_encoded():
            if chunk.count(0) == len(chunk):
                sparse.seek(len(chunk), 1)
            else:
                sparse.write(chunk)
            total += len(chunk)
        sparse.truncate(total)
    response.close()
    with zipfile.ZipFile(path) as archive:
        [info] = archive.infolist()
        assert info.file_size == size
        expected = zeros_crc(size)
        assert expected == info.CRC
    with path.open("rb") as file:
        head = file.read(30)
    assert head[18:26] == b"\xff" * 8  # ZIP64 sizes in the local header
    result = run(["unzip", "-t", path], timeout=120)
    assert result.returncode == 0 and b"No errors detected" in result.stdout, result.stdout


def zeros_crc(size: int) -> int:
    from zipmiddleware import compression

    block, crc = bytes(MIB), 0
    for _ in range(size // MIB):
        crc = compression.crc32(block, crc)
    return compression.crc32(bytes(size % MIB), crc)


def test_a_request_still_connecting_when_the_download_ends_is_never_sent() -> None:
    """A connection cannot be cancelled while it is being made; once made, it is shut down
    before the request goes out, so the origin sees a connection closed and no request."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):  # a full accept queue: the next connection waits in SYN_SENT
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    time.sleep(0.2)
    source = UrlSource(f"http://127.0.0.1:{port}/x", size=10, timeout=8)
    fetcher = Fetcher((PlannedEntry("x.bin", 0, source=source, size=10),), Policy())
    try:
        reader, failures = begin_in_thread(fetcher)
        time.sleep(0.5)
        fetcher.close()
        # Make room: the waiting connection is made when its SYN is sent again (1 s, then 3 s).
        listener.settimeout(10)
        received = []
        for _ in range(8):
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                break
            connection.settimeout(2)
            with connection, contextlib.suppress(OSError):
                received.append(connection.recv(1024))
            if not reader.is_alive():
                break
        reader.join(10)
        assert not reader.is_alive()
        assert isinstance(failures[0], EntryFailed)
        assert not any(data.startswith(b"GET") for data in received), received
    finally:
        listener.close()
        for filler in fillers:
            filler.close()


# -- origins that break the rules ------------------------------------------------------------------


class Scripted:
    """An origin of one resource whose every answer is scripted: ``answers`` holds, per request in
    turn, (status, headers, body, bytes to send before closing the connection or None for all)."""

    def __init__(self, answers: list[tuple[int, dict[str, str], bytes, int | None]]) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.answers = answers
        self.requests: list[dict[str, str]] = []
        scripted = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                scripted.requests.append({name.lower(): value for name, value in self.headers.items()})
                status, headers, body, cut = scripted.answers.pop(0)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                if "Transfer-Encoding" not in headers:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body if cut is None else body[:cut])
                self.wfile.flush()
                if cut is not None:
                    self.close_connection = True

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/r.bin"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# Bigger than what is read ahead (1 MiB), so that a cut at CUT comes after some of the entry
# went out: it can then only be resumed (else it would be read again from its start).
V1, V2 = os.urandom(3_000_000), os.urandom(3_000_000)
CUT = RESUME = 2_000_000


def part(data: bytes, start: int) -> tuple[bytes, dict[str, str]]:
    return data[start:], {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}


def fetch_one(
    answers: list[tuple[int, dict[str, str], bytes, int | None]], size: int | None = len(V1), **settings: Any
) -> tuple[Recorder, bytes | None, Scripted]:
    """The archive of a resource whose origin gives ``answers`` (see Scripted), or None if the
    download was aborted; and the origin, stopped, with the requests it got."""
    origin = Scripted(answers)
    try:
        return (*fetch_from(origin, size, **settings), origin)
    finally:
        origin.close()


def fetch_from(origin: Scripted, size: int | None, **settings: Any) -> tuple[Recorder, bytes | None]:
    recorder = Recorder()

    def resolve(request: object) -> ZipTarget:
        return ZipTarget([ZipEntry("r.bin", source=UrlSource(origin.url, size=size))], "r.zip")

    app = ZipMiddleware(
        lambda environ, start_response: [],
        routes={"/remote.zip": resolve},
        on_entry=recorder,
        on_download=recorder,
        retry_backoff=0,
        **settings,
    )
    response = Client(app).get("/remote.zip")
    try:
        return recorder, response.get_data()
    except StreamError:
        return recorder, None
    finally:
        response.close()


LM1, LM2 = "Mon, 30 Nov 2026 06:00:00 GMT", "Mon, 30 Nov 2026 06:00:01 GMT"


@pytest.mark.parametrize(
    ("first", "resumed"),
    [
        # Last-Modified only, the origin ignoring If-Unmodified-Since: the answer's date differs.
        ({"Last-Modified": LM1}, {"Last-Modified": LM2}),
        # A strong ETag the resume's answer no longer carries (a server that ignores If-Match).
        ({"ETag": '"a"'}, {}),
        # A weak ETag that changed, with the same Last-Modified.
        ({"ETag": 'W/"1"', "Last-Modified": LM1}, {"ETag": 'W/"2"', "Last-Modified": LM1}),
    ],
    ids=["last-modified", "etag-missing", "weak-etag"],
)
def test_a_resume_answered_by_another_version_is_refused(
    first: dict[str, str], resumed: dict[str, str]
) -> None:
    body, span = part(V2, RESUME)
    recorder, archive, origin = fetch_one([(200, first, V1, CUT), (206, {**resumed, **span}, body, None)])
    assert archive is None  # aborted: never V1's head with V2's tail
    assert origin.requests[1]["range"] == f"bytes={RESUME}-"
    assert recorder.entries[-1].error == "it changed at its origin while it was read"


def test_an_encoded_answer_is_refused() -> None:
    recorder, archive, origin = fetch_one(
        [(200, {"Content-Encoding": "gzip", "ETag": '"a"'}, V1[:1000], None)], size=None, on_error="skip"
    )
    assert archive is not None
    assert contents(archive) == {
        "SKIPPED FILES.txt": b"These files could not be included in this download:"
        b"\r\n\r\nr.bin: its origin sent it encoded\r\n"
    }
    assert origin.requests[0]["accept-encoding"] == "identity"


@pytest.mark.parametrize("total", [str(len(V1)), "*"], ids=["known-total", "unknown-total"])
def test_a_range_that_stops_short_of_the_end_is_refused(total: str) -> None:
    """A 206 whose range ends before the resource's end (its total, or the size known when it
    says ``*``)."""
    short = {"Content-Range": f"bytes {RESUME}-{RESUME + 99_999}/{total}", "ETag": '"a"'}
    _, archive, _ = fetch_one(
        [(200, {"ETag": '"a"'}, V1, CUT), (206, short, V1[RESUME : RESUME + 100_000], None)]
    )
    assert archive is None


def test_a_body_cut_after_its_last_byte_is_complete() -> None:
    """Every byte came, then the connection failed (a chunked body without its last chunk)."""
    data = V1[: 2 * 262_144]  # two whole reads
    chunked = b"%x\r\n" % len(data) + data + b"\r\n"  # no terminating 0-size chunk
    recorder, archive, origin = fetch_one(
        [(200, {"Transfer-Encoding": "chunked", "ETag": '"a"'}, chunked, len(chunked))], size=len(data)
    )
    assert archive is not None and contents(archive) == {"r.bin": data}
    assert len(origin.requests) == 1 and recorder.entries[0].attempts == 1


def test_an_entry_cut_before_any_of_it_went_out_is_read_again_without_validators() -> None:
    """No ETag, no Last-Modified: nothing can be resumed; but an entry opened ahead and cut
    before any of it went out is read again from its start."""
    first = Scripted([(200, {}, V1, None)])
    # Cut while read ahead, then read whole ahead; and, as such an origin cannot be resumed,
    # that connection (which could have been cut while it waited) is read again at its turn.
    second = Scripted([(200, {}, V2, 500_000), (200, {}, V2, None), (200, {}, V2, None)])
    recorder = Recorder()

    def resolve(request: object) -> ZipTarget:
        entries = [
            ZipEntry(name, source=UrlSource(origin.url, size=len(V1)))
            for name, origin in (("one.bin", first), ("two.bin", second))
        ]
        return ZipTarget(entries, "r.zip")

    app = ZipMiddleware(
        lambda environ, start_response: [], routes={"/r.zip": resolve}, on_entry=recorder, retry_backoff=0
    )
    try:
        _, archive = download_path(app, "/r.zip")
    finally:
        first.close()
        second.close()
    assert contents(archive) == {"one.bin": V1, "two.bin": V2}
    assert len(second.requests) == 3 and not any("range" in request for request in second.requests)
    assert [event.attempts for event in recorder.entries] == [1, 3]


def test_without_validators_a_cut_after_the_first_byte_aborts() -> None:
    recorder, archive, origin = fetch_one([(200, {}, V1, CUT), (200, {}, V1, None)])
    assert archive is None and len(origin.requests) == 1
    assert (
        recorder.entries[-1].error
        == "its origin gives no ETag or Last-Modified, so it cannot be resumed safely"
    )


def test_a_redirect_to_another_host_carries_none_of_the_sources_headers() -> None:
    """urllib3 drops Authorization and cookies on a cross-host redirect; every header given to
    the source is dropped too (an API key must not reach whatever the redirect names)."""
    target = Scripted([(200, {"ETag": '"a"'}, V1[:1000], None)])
    # "localhost" and 127.0.0.1 are different hosts to a client, but the same server here.
    moved = target.url.replace("127.0.0.1", "localhost")
    redirecting = Scripted([(302, {"Location": moved}, b"", None)])
    try:
        source = UrlSource(redirecting.url, headers={"X-Api-Key": "secret", "Authorization": "Bearer t"})
        assert b"".join(source.open(0)) == V1[:1000]
        assert redirecting.requests[0]["x-api-key"] == "secret"
        assert "x-api-key" not in target.requests[0] and "authorization" not in target.requests[0]
        with pytest.raises(SourceError):  # redirects=0: the 302 is an answer of its own
            UrlSource(redirecting.url, redirects=0).open(0)
    finally:
        target.close()
        redirecting.close()


def test_the_log_names_no_query_string(proxy: FaultProxy, caplog: pytest.LogCaptureFixture) -> None:
    """A presigned URL's query is a credential: it never reaches the log."""
    proxy.default_fault = Fault(fail_first=10)
    recorder = Recorder()

    def resolve(request: object) -> ZipTarget:
        url = f"{proxy.url}/x.bin?X-Amz-Signature=topsecret"
        return ZipTarget([ZipEntry("a.txt", source=b"a"), ZipEntry("x.bin", source=UrlSource(url))], "x.zip")

    app = ZipMiddleware(
        lambda environ, start_response: [],
        routes={"/x.zip": resolve},
        retries=1,
        retry_backoff=0,
        on_entry=recorder,
    )
    with caplog.at_level(logging.INFO, logger="zipmiddleware"):
        response, _ = download_path(app, "/x.zip")
    assert response.status_code == 502
    assert "/x.bin" in caplog.text and "topsecret" not in caplog.text
    assert recorder.entries[-1].error == "its origin is unavailable (HTTP 503)"


class Endless:
    """A restartable source of the user's: an endless run of 64 KiB pieces, counted."""

    def __init__(self) -> None:
        self.pieces = 0

    def open(self, offset: int) -> Iterator[bytes]:
        while True:
            self.pieces += 1
            yield b"x" * 65536


def test_a_download_that_ends_stops_reading_a_users_source() -> None:
    sources = [Endless() for _ in range(4)]
    entries = tuple(PlannedEntry(f"e{index}", 0, source=source) for index, source in enumerate(sources))
    fetcher = Fetcher(entries, Policy(prefetch=3))
    pieces = fetcher.begin(0)
    next(pieces)
    assert wait_for(lambda: all(source.pieces for source in sources[1:]), 5)
    fetcher.close()
    time.sleep(0.2)
    counts = [source.pieces for source in sources]
    time.sleep(0.5)
    assert [source.pieces for source in sources] == counts
    # Read ahead: at most the buffer (1 MiB) and one piece more each.
    assert all(source.pieces <= PREFETCH_BUFFER // 65536 + 1 for source in sources[1:])


def test_a_refused_connection_is_told_as_such() -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(SourceError) as info:
        UrlSource(f"http://127.0.0.1:{port}/x").open(0)
    assert info.value.reason == "the connection to its origin failed"
    assert info.value.transient


def test_a_chunked_body_cut_after_its_last_byte_is_complete_without_a_size() -> None:
    """Unsized: the resume's 416 ``bytes */N`` (N = the bytes read) says nothing was left; it is
    believed because the request carried the version's strong ETag as If-Match."""
    data = V1[: 2 * 262_144]
    chunked = b"%x\r\n" % len(data) + data + b"\r\n"  # no terminating 0-size chunk
    recorder, archive, origin = fetch_one(
        [
            (200, {"Transfer-Encoding": "chunked", "ETag": '"a"'}, chunked, len(chunked)),
            (416, {"Content-Range": f"bytes */{len(data)}", "ETag": '"a"'}, b"", None),
        ],
        size=None,
    )
    assert archive is not None and contents(archive) == {"r.bin": data}
    assert origin.requests[1]["if-match"] == '"a"' and origin.requests[1]["range"] == f"bytes={len(data)}-"


def test_a_source_failing_part_way_through_the_first_chunk_gets_a_502() -> None:
    """Cut, then refused on its resume, all before the archive's first chunk went out."""
    small_v1 = V1[:100_000]  # within the first chunk (256 KiB)
    recorder, archive, origin = fetch_one(
        [(200, {"ETag": '"a"'}, small_v1, 50_000), (404, {}, b"gone", None)], size=len(small_v1), prefetch=0
    )
    assert archive is not None and archive.startswith(b"Bad Gateway")
    [finished] = recorder.downloads
    assert (finished.status, finished.http_status, finished.entries) == ("aborted", 502, 0)
