"""What a Range request makes the server read, under a real gunicorn.

A range of a stored ZIP needs the CRC-32 of every entry whose data descriptor or central
record it holds; what the cache lacks is learnt by reading files without sending them
(*cold* work). Left unbounded, that lets anyone make the server read a whole archive for
100 bytes, many times over, also after hanging up. These tests run one gthread worker and
measure its work as the worker's ``rchar`` (/proc/<pid>/io: every byte read(2) returned,
from disk, page cache or a sparse file's holes alike), its CPU time and its peak memory:

1. suffix ranges on a cold cache read at most ``cold_range_limit`` beyond what they send;
   one that would need more gets the whole archive (200);
2. eight concurrent cold ranges that need the same CRC-32s read the files once (a request
   beyond the few a worker lets take part in cold work gets the whole archive instead);
3. cold work stops soon after its clients hang up, keeps what it learnt (checkpoints), and
   leaves the worker free to answer other requests meanwhile;
4. an honest resume (``curl -C -``) of a cut download re-reads at most one checkpoint's
   worth of the file it was cut in, also after a second cut;
5. a CRC-32 cache that cannot be used at run time does not make every range re-read the
   files: the worker keeps what it learnt in memory;
6. sixteen concurrent HEAD, 304 and one-byte requests for a folder of 50,000 files walk it
   about once and hold one plan.

Each server has a cold cache of its own (``crc_cache = ":memory:"``) unless a test says
otherwise, and sends file data through the server (``zero_copy = false``): ``rchar`` counts
what sendfile(2) carries as read too, which would hide the reads these tests count. The cold
work is the same on both paths; tests/test_zero_copy.py counts the zero-copy path's reads. The worker must import the zipmiddleware beside these tests (tests/gunicorn_hooks.py
reports it), so that this file also runs, and shows the defects, on an older checkout; for
the same reason the app passes ``cold_range_limit`` only to a middleware that has it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.client
import os
import shutil
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from .clients import assert_good_zip, kill_part_way, read_headers, run, sha256_file, size_of
from .gunicorn_hooks import this_checkout_runs
from .servers import (
    PROJECT,
    TESTS,
    GunicornServer,
    cpu_seconds,
    peak_memory,
    read_bytes,
    reset_peak_memory,
)

pytestmark = pytest.mark.server

MIB = 1 << 20
GIB = 1 << 30
APP = "tests.server_app:app"
MEMORY = ":memory:"
DEFAULT_LIMIT = 64 * MIB  # cold_range_limit when the app does not set it
CHUNK = 65536  # the app's chunk_size: the most a reader reads at once
CHECKPOINT = 16 * MIB  # how far apart the cache keeps checkpoints of a file's CRC-32
# What a measured request may read besides file data (a module imported at first use, SQLite).
SLACK = 4 * MIB
# Requests of one worker that may take part in cold work at once; a range needing more than a
# checkpoint interval of it while that many do gets the whole archive (checksums.MAX_TAKING_PART).
TAKING_PART = 4
RECEIVE_BUFFER = 65536  # of a client that asks and never reads

SMALL = "small.txt"  # for requests that must not wait behind cold work
WARM = "warm"  # a small folder whose download, range and 304 load every lazily imported module

# A 520 MiB archive of sparse files. The last entry's central record and the end record
# together are longer than 100 bytes, so "bytes=-100" needs only the last file's CRC-32
# (40 MiB, under the default limit) and "bytes=-1000" every file's (520 MiB, over it).
DISCS = "discs"
LAST = "the-last-and-smallest-file-of-this-archive.bin"
DISC_SIZES = {"disc-1.bin": 160 * MIB, "disc-2.bin": 160 * MIB, "disc-3.bin": 160 * MIB, LAST: 40 * MIB}
SUFFIX_NEEDS = {100: DISC_SIZES[LAST], 1000: sum(DISC_SIZES.values())}

# 2 GiB of sparse files: more than a worker reads in the half second its clients stay.
HUGE = "huge"
HUGE_FILE = 512 * MIB
HUGE_SIZES = {f"part-{n}.bin": HUGE_FILE for n in range(1, 5)}

# Random data for curl: a first file long enough to be cut twice past several checkpoints.
RESUME = "resume"
RESUME_SIZES = {"a-first.bin": 96 * MIB, "b-second.bin": 8 * MIB}

MANY_FILES = 50_000


def sparse(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as file:
        file.truncate(size)


def write_common(root: Path) -> None:
    """What every server's warm-up and small requests need."""
    (root / WARM / "sub").mkdir(parents=True)
    (root / WARM / "a.txt").write_bytes(b"warm-up\n" * 1000)
    (root / WARM / "sub" / "b.bin").write_bytes(os.urandom(100_000))
    (root / SMALL).write_bytes(b"a small file\n" * 100)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The served folder. Sparse files cost no disk and read as fast as the page cache, and
    rchar counts them like any other; the resumed download is random data, checked by unzip."""
    root = tmp_path_factory.mktemp("cold-ranges")
    write_common(root)
    for name, size in DISC_SIZES.items():
        sparse(root / DISCS / name, size)
    for name, size in HUGE_SIZES.items():
        sparse(root / HUGE / name, size)
    (root / RESUME).mkdir()
    for name, size in RESUME_SIZES.items():
        (root / RESUME / name).write_bytes(os.urandom(size))
    return root


# -- bodies too large to keep: hashed as they arrive ----------------------------------------------


@dataclass(frozen=True)
class Digest:
    """A response whose body was hashed as it arrived instead of kept."""

    status: int
    headers: dict[str, str]  # lower-case names
    length: int
    sha256: str
    tail: bytes  # the body's last bytes (as many as were asked for)
    seconds: float  # from sending the request to the body's end


def request_digest(
    server: GunicornServer,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    keep: int = 65536,
    timeout: float = 60,
) -> Digest:
    """One request on a fresh connection, its body read to the end and hashed.

    The whole archive a server may answer a range with can be gigabytes: its hash and
    its last ``keep`` bytes are enough to compare it with another download.
    """
    began = time.monotonic()
    connection = http.client.HTTPConnection(server.host, server.port, timeout=timeout)
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        digest = hashlib.sha256()
        tail = bytearray()
        length = 0
        while block := response.read(MIB):
            digest.update(block)
            length += len(block)
            tail += block
            del tail[: max(len(tail) - keep, 0)]
        found = {name.lower(): value for name, value in response.getheaders()}
        seconds = time.monotonic() - began
        return Digest(response.status, found, length, digest.hexdigest(), bytes(tail), seconds)
    finally:
        connection.close()


# -- the server and its worker ---------------------------------------------------------------------


def server_for(
    root: Path,
    *,
    limit: str | None = None,
    cache: str = MEMORY,
    threads: int = 8,
    args: Sequence[str] = (),
) -> GunicornServer:
    """The test app over ``root``; ``limit`` is ``cold_range_limit`` (unset: the default)."""
    env = {"ZM_TEST_DATA": str(root), "ZM_TEST_CRC_CACHE": cache, "ZM_TEST_ZERO_COPY": "false"}
    if limit is not None:
        env["ZM_TEST_COLD_RANGE_LIMIT"] = limit
    return GunicornServer(
        APP,
        pythonpath=[str(PROJECT)],  # gunicorn keeps only its last --pythonpath
        env=env,
        threads=threads,
        args=["-c", str(TESTS / "gunicorn_hooks.py"), *args],
    )


@dataclass
class Served:
    """A running server and what its (only) worker has done so far."""

    server: GunicornServer
    pid: int

    def read(self) -> int:
        return read_bytes(self.pid)

    def settled(self, quiet: float = 0.3, timeout: float = 30) -> int:
        """The worker's rchar once it has stopped growing for ``quiet`` seconds."""
        deadline = time.monotonic() + timeout
        last, since = self.read(), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.05)
            now = self.read()
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return now
        raise AssertionError(f"the worker kept reading for {timeout} s")

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def peak(self) -> int:
        return peak_memory(self.pid)

    def get(self, path: str, headers: dict[str, str] | None = None, method: str = "GET") -> Digest:
        return request_digest(self.server, method, path, headers, timeout=180)


@contextlib.contextmanager
def running(server: GunicornServer, *, touch_cache: bool = True) -> Iterator[Served]:
    """Start ``server``, check that its worker runs the zipmiddleware beside these tests, and
    make one request of every kind, so that what is measured later is not module imports.
    Without ``touch_cache`` the warm-up leaves the CRC-32 cache alone (no ZIP body is sent)."""
    with server:
        this_checkout_runs(server.log)
        served = Served(server, server.worker_pid)
        kinds: list[tuple[str, dict[str, str]]] = [("HEAD", {}), ("GET", {"If-None-Match": "*"})]
        if touch_cache:
            kinds += [("GET", {}), ("GET", {"Range": "bytes=-100"}), ("GET", {"Range": "bytes=10-20000"})]
        assert served.get(f"/file/{SMALL}").status == 200
        for method, headers in kinds:
            assert served.get(f"/folder/{WARM}", headers, method).status in (200, 206, 304)
        yield served


@pytest.fixture(scope="module")
def reference(data: Path) -> Digest:
    """The discs archive, downloaded whole: what every 200 and 206 is compared with."""
    with running(server_for(data)) as served:
        full = served.get(f"/folder/{DISCS}")
    assert full.status == 200
    assert full.length == int(full.headers["content-length"]) > sum(DISC_SIZES.values())
    return full


def check_suffix(answer: Digest, suffix: int, reference: Digest) -> str | None:
    """What is wrong with the answer to ``Range: bytes=-<suffix>``: a 206 must be that slice,
    a 200 the whole archive."""
    total = reference.length
    if answer.status == 206:
        if answer.headers.get("content-range") != f"bytes {total - suffix}-{total - 1}/{total}":
            return f"206 with Content-Range {answer.headers.get('content-range')}"
        if answer.tail != reference.tail[-suffix:]:
            return "206 whose bytes are not the archive's last ones"
    elif answer.status == 200:
        if (answer.length, answer.sha256) != (total, reference.sha256):
            return f"200 of {answer.length} bytes that are not the archive"
    else:
        return f"status {answer.status}"
    return None


def at_once(count: int, call: Callable[[], Digest]) -> tuple[list[Digest], float]:
    """``count`` calls released together; their answers and the seconds until the last one."""
    start = threading.Barrier(count)

    def one(_: int) -> Digest:
        start.wait()
        return call()

    began = time.monotonic()
    with ThreadPoolExecutor(count) as pool:
        answers = list(pool.map(one, range(count)))
    return answers, time.monotonic() - began


# -- 1. suffix ranges on a cold cache -------------------------------------------------------------


@pytest.mark.parametrize(
    ("limit", "limit_bytes", "suffixes"),
    [("1 MiB", MIB, (100,)), (None, DEFAULT_LIMIT, (100, 1000)), ("1 GiB", GIB, (100, 1000))],
    ids=["small-limit", "default-limit", "big-limit"],
)
def test_suffix_ranges_read_at_most_the_cold_range_limit(
    data: Path, reference: Digest, limit: str | None, limit_bytes: int, suffixes: tuple[int, ...]
) -> None:
    """``bytes=-100`` and ``bytes=-1000`` of a 520 MiB archive, each on a cold cache: the worker
    reads at most the limit beyond what it sends. Within the limit the answer is the 206; over
    it, the whole archive (200), so that every byte read is a byte sent. The small limit shows
    the 200 (even the last file's CRC-32 is too much), the big one the 206 that reads every file."""
    problems = []
    print(f"\ncold_range_limit {limit or 'default'} ({limit_bytes} bytes):")
    for suffix in suffixes:
        needs = SUFFIX_NEEDS[suffix]
        with running(server_for(data, limit=limit)) as served:  # a cold cache for each range
            before = served.settled()
            answer = served.get(f"/folder/{DISCS}", {"Range": f"bytes=-{suffix}"})
            read = served.settled() - before
        print(
            f"  bytes=-{suffix}: {answer.status}, {answer.length} bytes sent, {read} read "
            f"({read / suffix:,.0f} read per byte asked for, {(read - answer.length) / MIB:.1f} MiB unsent) "
            f"in {answer.seconds:.2f} s"
        )
        wrong = check_suffix(answer, suffix, reference)
        if wrong:
            problems.append(f"bytes=-{suffix}: {wrong}")
        expected = 206 if needs <= limit_bytes else 200
        if answer.status != expected:
            problems.append(
                f"bytes=-{suffix} needs {needs} cold bytes: expected {expected}, got {answer.status}"
            )
        if read - answer.length > limit_bytes + SLACK:
            problems.append(f"bytes=-{suffix} read {read - answer.length} bytes it did not send")
    assert not problems, problems


# -- 2. concurrent cold ranges share the work --------------------------------------------------------


def test_concurrent_cold_ranges_read_the_files_once(data: Path, reference: Digest) -> None:
    """Eight clients ask at once for the same 1,000 bytes, which need every file's CRC-32. The
    requests that take part in cold work (at least four) wait for one computation of each; a
    request beyond those gets the whole archive (200), reading only what it sends. So the bytes
    read and not sent are about the files' size once (the old code read it eight times)."""
    needed = SUFFIX_NEEDS[1000]
    with running(server_for(data, limit="1 GiB", threads=8)) as served:
        before, cpu = served.settled(), served.cpu()
        answers, seconds = at_once(8, lambda: served.get(f"/folder/{DISCS}", {"Range": "bytes=-1000"}))
        read, cpu = served.settled() - before, served.cpu() - cpu
    unsent = read - sum(answer.length for answer in answers)
    print(
        f"\n8 concurrent bytes=-1000: statuses {sorted(answer.status for answer in answers)}; "
        f"{read / MIB:.0f} MiB read, {unsent / MIB:.0f} MiB of it not sent = {unsent / needed:.2f} x "
        f"the {needed / MIB:.0f} MiB of files; {cpu:.2f} s CPU, {seconds:.2f} s"
    )
    assert [check_suffix(answer, 1000, reference) for answer in answers] == [None] * 8
    assert sum(answer.status == 206 for answer in answers) >= TAKING_PART
    assert unsent <= 1.5 * needed + SLACK


# -- 3. clients that hang up ------------------------------------------------------------------------


def ask_and_stay(served: Served, path: str, headers: dict[str, str]) -> socket.socket:
    """Send a GET and read nothing: the connection stays open until the caller closes it. A small
    receive buffer keeps what a server can push into it (answering with a whole archive) small."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
    sock.settimeout(10)
    sock.connect((served.server.host, served.server.port))
    lines = [f"GET {path} HTTP/1.1", "Host: localhost", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    return sock


def answered(sock: socket.socket) -> bool:
    """Whether the server has started an answer on ``sock`` (looked at without reading it)."""
    sock.setblocking(False)  # with a timeout set, Python would wait for data before recv(2)
    try:
        return sock.recv(16, socket.MSG_PEEK).startswith(b"HTTP/1.1 ")
    except BlockingIOError:
        return False


def send_buffer_limit() -> int:
    """The most the kernel lets a TCP socket buffer for sending (tcp_wmem's maximum)."""
    try:
        return int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, IndexError, ValueError):
        return 4 * MIB


def central_crcs(tail: bytes) -> list[int]:
    """The CRC-32 of every central directory record found in ``tail``."""
    crcs = []
    position = tail.find(b"PK\x01\x02")
    while position >= 0:
        crcs.append(struct.unpack_from("<I", tail, position + 16)[0])
        position = tail.find(b"PK\x01\x02", position + 4)
    return crcs


def zeros_crc(size: int) -> int:
    crc, block = 0, bytes(MIB)
    for _ in range(size // MIB):
        crc = zlib.crc32(block, crc)
    return zlib.crc32(bytes(size % MIB), crc)


def test_cold_work_stops_soon_after_its_clients_hang_up(data: Path) -> None:
    """Sixteen clients ask for the last 1,000 bytes of a 2 GiB archive (cold, no limit in the
    way) and hang up after half a second. The worker must stop reading and burning CPU within
    about a second, having read less than the archive once (not sixteen times), and keep what
    it learnt, so that a client that stays afterwards costs only the rest. Meanwhile, a small
    unrelated request is answered at once: one cold computation at a time, the others wait.

    Requests beyond the few that take part in cold work get the whole archive (200) at once;
    those read what the kernel lets them push towards their silent client, and no more."""
    needed = sum(HUGE_SIZES.values())
    path = f"/folder/{HUGE}"
    with running(server_for(data, limit="8 GiB", threads=20)) as served:
        before, cpu_before = served.settled(), served.cpu()
        clients = [ask_and_stay(served, path, {"Range": "bytes=-1000"}) for _ in range(16)]
        began = time.monotonic()
        small: list[float] = []
        while time.monotonic() - began < 0.5:
            time.sleep(0.05)
            answer = served.get(f"/file/{SMALL}")
            assert answer.status == 200
            small.append(answer.seconds)
        # A 206 goes out only once its CRC-32s are known: an answer begun now is a 200.
        whole = sum(answered(client) for client in clients)
        for client in clients:
            client.close()
        closed = time.monotonic()
        time.sleep(max(0.0, closed + 1.0 - time.monotonic()))
        read_1s, cpu_1s = served.read() - before, served.cpu() - cpu_before
        time.sleep(max(0.0, closed + 3.0 - time.monotonic()))
        read_3s, cpu_3s = served.read() - before, served.cpu() - cpu_before
        print(
            f"\n16 clients ({16 - whole} waiting for cold work, {whole} answered with the whole archive) "
            f"hung up after {closed - began:.2f} s: read {read_1s / MIB:.0f} MiB "
            f"({read_1s / needed:.2f} x the archive's files) and used {cpu_1s:.2f} s CPU by 1 s later, "
            f"{read_3s / MIB:.0f} MiB and {cpu_3s:.2f} s by 3 s later; "
            f"{len(small)} small requests meanwhile took at most {max(small):.3f} s"
        )
        # Then a client that stays: it needs only what the abandoned work had not learnt.
        answer = served.get(path, {"Range": "bytes=-1000"})
        total = served.settled() - before
        print(
            f"then a client that stays: {answer.status} in {answer.seconds:.2f} s; "
            f"{total / MIB:.0f} MiB read in all for {needed / MIB:.0f} MiB of files"
        )
    assert max(small) < 0.25
    assert read_3s - read_1s <= MIB, "the worker kept reading after its clients had gone"
    assert cpu_3s - cpu_1s <= 0.1, "the worker kept computing after its clients had gone"
    assert read_3s < needed, "all the work was done before the clients hung up: use more data"
    assert answer.status == 206
    assert central_crcs(answer.tail) == [zeros_crc(HUGE_FILE)] * len(HUGE_SIZES)
    # What the abandoned computation learnt was kept: at most one checkpoint's worth is read
    # again, besides what the 200s read into the buffers of clients that never read.
    pushed = whole * (send_buffer_limit() + 2 * RECEIVE_BUFFER + CHUNK)
    assert total <= needed + CHECKPOINT + pushed + SLACK


# -- 4. honest resumes ------------------------------------------------------------------------------


def test_resume_rereads_at_most_a_checkpoint_of_the_file_it_was_cut_in(data: Path, tmp_path: Path) -> None:
    """curl downloads a ZIP whose first file is 96 MiB, is killed about 40 MiB in, resumes with
    ``curl -C -``, is killed again about 24 MiB later, and resumes to the end. Each resume reads
    what it sends plus at most one checkpoint's worth (16 MiB) of the head of the file it starts
    in, never that whole head (the old code read the whole head again)."""
    files = {name: (data / RESUME / name).read_bytes() for name in RESUME_SIZES}
    output, log = tmp_path / "resumed.zip", tmp_path / "curl.log"
    headers = [tmp_path / f"{n}.headers" for n in range(3)]
    with running(server_for(data, threads=4)) as served:
        url = f"{served.server.url}/folder/{RESUME}"
        start = served.settled()
        command = ["curl", "-sS", "--limit-rate", "32M", "-D", headers[0], "-o", output, url]
        first = kill_part_way(command, output, 40 * MIB, log)
        before_resume = served.settled()
        command = ["curl", "-sS", "--limit-rate", "32M", "-C", "-", "-D", headers[1], "-o", output, url]
        second = kill_part_way(command, output, first + 24 * MIB, log)
        before_last = served.settled()
        result = run(
            ["curl", "-sS", "--fail", "--max-time", "60", "-C", "-", "-D", headers[2], "-o", output, url]
        )
        end = served.settled()
        whole = served.get(f"/folder/{RESUME}")  # last: it fills the cache
    assert result.returncode == 0, result.stderr
    total = whole.length
    in_flight = (before_resume - start) - first  # what the cut download read that curl never kept
    cut_resume = (before_last - before_resume) - (second - first)
    last_resume = (end - before_last) - (total - second)
    print(
        f"\ncut at {first / MIB:.1f} MiB (the server had read {in_flight / MIB:.1f} MiB more), "
        f"resumed and cut at {second / MIB:.1f} MiB: read {cut_resume / MIB:.1f} MiB beyond what curl kept; "
        f"resumed to the end ({(total - second) / MIB:.1f} MiB sent): read {last_resume / MIB:.1f} MiB beyond it"
    )
    assert read_headers(headers[0])[0] == 200
    for partial, header_file in ((first, headers[1]), (second, headers[2])):
        status, found = read_headers(header_file)
        assert (status, found["content-range"]) == (206, [f"bytes {partial}-{total - 1}/{total}"])
    assert 40 * MIB <= first < second < RESUME_SIZES["a-first.bin"], "both cuts must be inside the first file"
    assert size_of(output) == total
    assert sha256_file(output) == whole.sha256
    assert_good_zip(output, files)
    # The cut resume also read what was in flight when curl was killed (socket buffers).
    assert cut_resume <= CHECKPOINT + CHUNK + max(in_flight, 0) + SLACK
    assert last_resume <= CHECKPOINT + CHUNK + MIB


# -- 5. a cache that cannot be used ------------------------------------------------------------------


def test_an_unusable_cache_does_not_make_every_range_read_the_files(
    data: Path, reference: Digest, tmp_path: Path
) -> None:
    """The cache file's folder is deleted after start-up, before the worker first uses the file
    (a temporary-files cleaner, a volume gone). The same cold range three times: after the
    first, no file data may be read, because the worker keeps CRC-32s in memory when its cache
    fails (the old code learnt nothing and re-read the last file for every request).

    ``--preload``: the master builds the middleware and each worker opens the file at its first
    lookup, in this version and in the old one alike (without it, the old code opened the file
    while the worker booted, and writes to an open, deleted SQLite file still succeed)."""
    folder = tmp_path / "cache"
    folder.mkdir()
    server = server_for(data, limit="1 GiB", cache=str(folder / "crc32.sqlite"), args=["--preload"])
    with running(server, touch_cache=False) as served:
        shutil.rmtree(folder)
        reads, answers = [], []
        for _ in range(3):
            before = served.settled()
            answers.append(served.get(f"/folder/{DISCS}", {"Range": "bytes=-100"}))
            reads.append(served.settled() - before)
        log = server.log()
    print(f"\nthe same cold bytes=-100 three times with the cache's folder gone: read {reads} bytes")
    print("".join(line + "\n" for line in log.splitlines() if "CRC-32 cache" in line)[:2000])
    assert [check_suffix(answer, 100, reference) for answer in answers] == [None] * 3
    assert {answer.status for answer in answers} == {206}
    assert reads[0] >= DISC_SIZES[LAST]  # the first had to learn the last file's CRC-32
    assert max(reads[1:]) <= MIB


# -- 6. one walk for concurrent requests of a big folder ------------------------------------------------


def test_concurrent_requests_for_a_big_folder_share_one_walk(tmp_path: Path) -> None:
    """A folder of 50,000 empty files: sixteen HEAD requests at once, then sixteen conditional
    GETs (304) and sixteen one-byte ranges, cost about what one request costs (one walk, one
    plan, one layout), in CPU time, wall time and peak memory, not sixteen times that.

    Peak memory is the worker's VmHWM, started again before each batch and compared with the
    worker's size before its first request (memory a request freed may stay with the process)."""
    root = tmp_path / "root"
    write_common(root)
    many = root / "many"
    many.mkdir()
    for number in range(MANY_FILES):
        os.close(os.open(many / f"file-{number:05d}.dat", os.O_CREAT | os.O_WRONLY, 0o644))
    path = "/folder/many"
    figures: dict[str, tuple[float, float, int]] = {}  # seconds, CPU seconds, peak memory increase
    with running(server_for(root, threads=16)) as served:
        fresh, cpu = served.peak(), served.cpu()
        one = served.get(path, method="HEAD")
        assert one.status == 200
        figures["one HEAD"] = (one.seconds, served.cpu() - cpu, served.peak() - fresh)
        batches: dict[str, tuple[str, dict[str, str], int]] = {
            "16 HEAD at once": ("HEAD", {}, 200),
            "16 GET with If-None-Match (304) at once": ("GET", {"If-None-Match": one.headers["etag"]}, 304),
            "16 GET of bytes=0-0 at once": ("GET", {"Range": "bytes=0-0"}, 206),
        }
        for kind, (method, headers, status) in batches.items():
            reset_peak_memory(served.pid)
            cpu = served.cpu()
            answers, seconds = at_once(16, functools.partial(served.get, path, headers, method))
            figures[kind] = (seconds, served.cpu() - cpu, served.peak() - fresh)
            assert [answer.status for answer in answers] == [status] * 16, kind
    one_seconds, one_cpu, one_memory = figures["one HEAD"]
    print(f"\n{MANY_FILES} files; the worker held {fresh / MIB:.0f} MiB before the first request")
    for kind, (seconds, cpu_used, memory_used) in figures.items():
        print(
            f"{kind}: {seconds:.2f} s ({seconds / one_seconds:.1f} x one), {cpu_used:.2f} s CPU "
            f"({cpu_used / one_cpu:.1f} x one), peak memory +{memory_used / MIB:.0f} MiB "
            f"({memory_used / one_memory:.1f} x one)"
        )
    for kind, (seconds, cpu_used, memory_used) in figures.items():
        assert cpu_used <= 3 * one_cpu, kind
        assert seconds <= 3 * one_seconds + 0.5, kind
        assert memory_used <= 3 * one_memory, kind
