"""The test kit of tests/origin.py: nginx serving a folder, and the fault proxy in front of it.

Tests of remote sources trust this kit to inject exactly the faults they ask for and to count
what passed; these tests check that it does, with real clients (urllib3, raw sockets) against a
real nginx.
"""

from __future__ import annotations

import http.client
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import urllib3

from .clients import connect, read_head, read_to_end, send_get, sha256, wait_for
from .nginx import Nginx
from .origin import Fault, FaultProxy, start_nginx_origin, write_files

pytestmark = pytest.mark.server

SIZE = 256 * 1024
BIG = 32 * 1024 * 1024  # more than loopback socket buffers hold, so the proxy is still writing it


@dataclass
class Origin:
    root: Path
    files: dict[str, bytes]
    nginx: Nginx
    proxy: FaultProxy
    http: urllib3.PoolManager

    def get(
        self, path: str, headers: dict[str, str] | None = None, method: str = "GET", preload: bool = True
    ) -> urllib3.BaseHTTPResponse:
        """A request through the proxy, without urllib3's retries (each request must be seen)."""
        url = self.proxy.url + path
        return self.http.request(method, url, headers=headers, retries=False, preload_content=preload)


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[Origin]:
    root = tmp_path / "root"
    files = write_files(root, count=4, size=SIZE)
    nginx = start_nginx_origin(root, tmp_path / "nginx")
    http = urllib3.PoolManager(maxsize=40, timeout=urllib3.Timeout(connect=5, read=15))
    try:
        with FaultProxy(nginx.url) as proxy:
            yield Origin(root, files, nginx, proxy, http)
    finally:
        http.clear()
        nginx.stop()


def test_write_files_is_reproducible(tmp_path: Path) -> None:
    first = write_files(tmp_path / "a", count=3, size=1000, seed=7)
    assert sorted(first) == ["f000.bin", "f001.bin", "f002.bin"]
    assert first == write_files(tmp_path / "b", count=3, size=1000, seed=7)
    assert len(set(first.values())) == 3
    assert (tmp_path / "a" / "f002.bin").read_bytes() == first["f002.bin"]


# -- passing requests on ------------------------------------------------------------------------


def test_get_through_the_proxy_is_the_file(origin: Origin) -> None:
    direct = origin.http.request("GET", origin.nginx.url + "/f000.bin")
    response = origin.get("/f000.bin")
    assert response.status == 200
    assert sha256(response.data) == sha256(origin.files["f000.bin"])
    for name in ("Content-Length", "ETag", "Last-Modified", "Accept-Ranges", "Content-Type"):
        assert response.headers[name] == direct.headers[name], name
    [record] = origin.proxy.requests_for("/f000.bin")
    assert (record.method, record.status, record.bytes_sent) == ("GET", 200, SIZE)
    assert not record.dropped and not record.client_gone
    assert origin.proxy.bytes_sent == SIZE
    # The client may have the last byte a moment before the proxy's thread is done with it.
    assert wait_for(lambda: origin.proxy.in_flight == 0, 1)
    assert record.duration is not None and record.duration >= 0

    head = origin.get("/f001.bin", method="HEAD")
    assert (head.status, head.data, head.headers["Content-Length"]) == (200, b"", str(SIZE))
    assert origin.proxy.requests_for("/f001.bin")[0].bytes_sent == 0
    # One keep-alive connection carried both requests.
    assert len({record.client_port for record in origin.proxy.requests}) == 1

    assert wait_for(lambda: origin.proxy.in_flight == 0, 1)
    origin.proxy.reset_counters()
    assert (origin.proxy.requests, origin.proxy.bytes_sent, origin.proxy.max_in_flight) == ([], 0, 0)


def test_range_comes_back_as_206(origin: Origin) -> None:
    data = origin.files["f001.bin"]
    response = origin.get("/f001.bin", {"Range": "bytes=1000-"})
    assert response.status == 206
    assert response.headers["Content-Range"] == f"bytes 1000-{SIZE - 1}/{SIZE}"
    assert response.data == data[1000:]
    middle = origin.get("/f001.bin", {"Range": "bytes=10-19"})
    assert (middle.status, middle.data) == (206, data[10:20])
    [first, second] = origin.proxy.requests_for("/f001.bin")
    assert first.headers["range"] == "bytes=1000-"
    assert (first.bytes_sent, second.bytes_sent) == (SIZE - 1000, 10)


def test_if_match_and_if_range_reach_nginx(origin: Origin) -> None:
    etag = origin.get("/f002.bin", method="HEAD").headers["ETag"]
    wrong = origin.get("/f002.bin", {"If-Match": '"wrong"', "Range": "bytes=5-"})
    assert wrong.status == 412
    right = origin.get("/f002.bin", {"If-Match": etag, "Range": "bytes=5-"})
    assert (right.status, right.data) == (206, origin.files["f002.bin"][5:])
    stale_range = origin.get("/f002.bin", {"If-Range": '"wrong"', "Range": "bytes=5-"})
    assert (stale_range.status, len(stale_range.data)) == (200, SIZE)
    assert [record.status for record in origin.proxy.requests_for("/f002.bin")] == [200, 412, 206, 200]
    assert origin.proxy.requests_for("/f002.bin")[1].headers["if-match"] == '"wrong"'


def test_a_changed_mtime_is_a_new_etag(origin: Origin) -> None:
    path = origin.root / "f003.bin"
    before = origin.get("/f003.bin", method="HEAD").headers["ETag"]
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # nginx's ETag has whole seconds
    after = origin.get("/f003.bin", method="HEAD").headers["ETag"]
    assert after != before
    assert origin.get("/f003.bin", {"If-Match": before}).status == 412
    assert origin.get("/f003.bin", {"If-Match": after}).status == 200


# -- faults ---------------------------------------------------------------------------------------


def test_fail_first_then_the_file(origin: Origin) -> None:
    origin.proxy.faults["/f000.bin"] = Fault(fail_first=2)
    answers = [origin.get("/f000.bin") for _ in range(3)]
    assert [answer.status for answer in answers] == [503, 503, 200]
    assert answers[0].headers["Retry-After"] == "0"
    assert answers[2].data == origin.files["f000.bin"]
    # Other paths are untouched; another status can be injected; nginx saw only what passed.
    assert origin.get("/f001.bin").status == 200
    origin.proxy.faults["/f001.bin"] = Fault(fail_first=1, status=404)
    assert [origin.get("/f001.bin").status for _ in range(2)] == [404, 200]
    assert wait_for(lambda: origin_sent(origin.nginx, "/f000.bin") == [(200, SIZE)], 2)


def test_default_fault_counts_per_path(origin: Origin) -> None:
    origin.proxy.default_fault = Fault(fail_first=1, status=403)
    assert [origin.get(path).status for path in ("/f000.bin", "/f001.bin", "/f000.bin")] == [403, 403, 200]
    origin.proxy.faults["/f000.bin"] = Fault()  # a rule of its own wins over the default
    assert origin.get("/f000.bin").status == 200


def test_drop_after_cuts_the_body_once(origin: Origin) -> None:
    origin.proxy.faults["/f000.bin"] = Fault(drop_after=1000)
    with pytest.raises(urllib3.exceptions.ProtocolError):
        origin.get("/f000.bin")
    again = origin.get("/f000.bin")
    assert (again.status, again.data) == (200, origin.files["f000.bin"])
    cut, whole = origin.proxy.requests_for("/f000.bin")
    assert (cut.status, cut.bytes_sent, cut.dropped, cut.client_gone) == (200, 1000, True, False)
    assert (whole.bytes_sent, whole.dropped) == (SIZE, False)


@pytest.mark.parametrize(("reset", "ending"), [(True, "reset"), (False, "eof")])
def test_a_dropped_client_has_exactly_drop_after_bytes(origin: Origin, reset: bool, ending: str) -> None:
    origin.proxy.faults["/f002.bin"] = Fault(drop_after=5000, drop_times=2, reset=reset)
    for _ in range(2):
        with connect(origin.proxy.host, origin.proxy.port) as sock:
            send_get(sock, "/f002.bin", {"Range": "bytes=100-"})
            head = read_head(sock)
            rest, how = read_to_end(sock, timeout=5)
        assert (head.status, head.length) == (206, SIZE - 100)
        assert head.body + rest == origin.files["f002.bin"][100:5100]
        assert how == ending
    assert origin.get("/f002.bin").data == origin.files["f002.bin"]  # the third passes whole


def test_first_byte_delay(origin: Origin) -> None:
    origin.proxy.faults["/f000.bin"] = Fault(first_byte_delay=0.5)
    began = time.monotonic()
    response = origin.get("/f000.bin", preload=False)
    waited = time.monotonic() - began
    assert response.status == 200
    assert response.read() == origin.files["f000.bin"]
    assert 0.5 <= waited < 1.5
    [record] = origin.proxy.requests_for("/f000.bin")
    assert wait_for(lambda: record.duration is not None, 1)
    assert 0.5 <= record.duration < 1.5  # type: ignore[operator]


def test_rate_paces_the_body(origin: Origin) -> None:
    origin.proxy.faults["/f001.bin"] = Fault(rate=SIZE / 0.5)
    began = time.monotonic()
    assert origin.get("/f001.bin").data == origin.files["f001.bin"]
    assert 0.45 <= time.monotonic() - began < 1.5


@pytest.mark.parametrize("clients", [5, 32])
def test_concurrent_requests_are_counted(origin: Origin, clients: int) -> None:
    origin.proxy.default_fault = Fault(first_byte_delay=0.3, rate=SIZE / 0.3)
    paths = [f"/f{index % 4:03d}.bin" for index in range(clients)]
    results: dict[int, bytes] = {}
    barrier = threading.Barrier(clients)

    def fetch(index: int) -> None:
        barrier.wait()
        results[index] = origin.get(paths[index]).data

    threads = [threading.Thread(target=fetch, args=(index,)) for index in range(clients)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    elapsed = time.monotonic() - began
    assert all(results[index] == origin.files[path[1:]] for index, path in enumerate(paths))
    assert origin.proxy.max_in_flight == clients
    assert wait_for(lambda: origin.proxy.in_flight == 0, 1)
    assert elapsed < 3  # in parallel: one request takes 0.6 s
    assert origin.proxy.bytes_sent == clients * SIZE


@pytest.mark.parametrize("rate", [None, 8 * 1024 * 1024])
def test_a_client_gone_mid_body_stops_the_transfer(origin: Origin, rate: float | None) -> None:
    (origin.root / "big.bin").write_bytes(os.urandom(BIG))
    origin.proxy.faults["/big.bin"] = Fault(rate=rate)
    with connect(origin.proxy.host, origin.proxy.port) as sock:
        send_get(sock, "/big.bin")
        head = read_head(sock)
        assert head.length == BIG
        received = len(head.body)
        while received < 1024 * 1024:
            received += len(sock.recv(65536))
    [record] = origin.proxy.requests_for("/big.bin")
    assert wait_for(lambda: record.ended is not None, 1), "the proxy did not notice the client leaving"
    assert record.client_gone and not record.dropped
    first = origin.proxy.bytes_sent
    time.sleep(0.5)
    assert origin.proxy.bytes_sent == first == record.bytes_sent < BIG
    assert origin.proxy.in_flight == 0
    # The proxy let go of the origin's response too: nginx ended it short.
    assert wait_for(lambda: len(origin_sent(origin.nginx, "/big.bin")) == 1, 2)
    [(status, sent)] = origin_sent(origin.nginx, "/big.bin")
    assert status == 200 and sent < BIG
    # The proxy still serves, and its origin too.
    assert origin.get("/f000.bin").data == origin.files["f000.bin"]


def test_upstream_down_is_a_502() -> None:
    with FaultProxy("http://127.0.0.1:9") as proxy:
        connection = http.client.HTTPConnection(proxy.host, proxy.port, timeout=5)
        connection.request("GET", "/f000.bin")
        response = connection.getresponse()
        assert response.status == 502
        response.read()
        connection.close()
        [record] = proxy.requests
        assert record.upstream_error is not None


def origin_sent(nginx: Nginx, path: str) -> list[tuple[int, int]]:
    """Status and body bytes sent of each GET of ``path`` in nginx's access log (combined format,
    a line written as each request ends)."""
    found = []
    for line in (nginx.prefix / "access.log").read_text(errors="replace").splitlines():
        request, _, rest = line.partition(f'"GET {path} HTTP/1.1" ')
        if rest:
            status, sent = rest.split()[:2]
            found.append((int(status), int(sent)))
    return found
