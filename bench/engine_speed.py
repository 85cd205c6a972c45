#!/usr/bin/env python3
"""The engine's speed through a real gunicorn, against plain sendfile and against the targets.

    .venv/bin/python bench/engine_speed.py                 # 10 x 100 MiB, median of 3 (a few minutes)
    .venv/bin/python bench/engine_speed.py --quick         # smoke run: 10 x 16 MiB, one round
    .venv/bin/python bench/engine_speed.py --repeat 5 --only 1,3
    .venv/bin/python bench/engine_speed.py --only concurrent,others

Every figure is a download by curl (to /dev/null; -w '%{size_download} %{time_total}') from
gunicorn (gthread worker, --threads 20; one worker, two for figure 4) on 127.0.0.1, with the
page cache warm, and every figure is a ratio against a baseline measured in the same run.
Each round runs every case once, in alternating order (forward, then backward), each case
right after a run of the baseline; a case's ratio is the median over the rounds of its MB/s
divided by that baseline run's (the load of a shared machine changes within seconds, so
adjacent runs compare better than medians taken minutes apart); its MB/s is the median of its
runs. MB/s counts the bytes received (1 MB = 10**6 bytes). A response with another status, another byte count or another Content-Length than
expected is a failure, not a figure: the script goes on with the other figures, prints the
server's log tail and exits with status 1.

CPU: every timed download also notes the CPU seconds (user + system) it cost the server, the
utime + stime of the gunicorn worker process(es) (the master's children, all their threads) in
/proc/<pid>/stat just before curl starts and just after it ends, in clock ticks
(os.sysconf('SC_CLK_TCK'), 1/100 s on Linux), and the CPU seconds curl itself used
(resource.getrusage(RUSAGE_CHILDREN) before and after: the curls are the only children that
end meanwhile; this includes curl's start-up, a few ms); both per GB received (10**9 bytes),
quoted as medians over the runs (the columns "server CPU s/GB" and "curl CPU s/GB"; one clock
tick is 0.06 s/GB of a --quick download, 0.01 s/GB of a default one). After the targets, a
line per stored ZIP configuration (and one for figure 4) compares the CPU that server and curl
together spend per GB with the baseline's: a download that is CPU-bound on CPUs that server
and client share gets MB/s = CPUs busy / (server + curl CPU s/GB), so, with as many CPUs busy,
its ratio to the baseline is (the baseline's server + curl CPU s/GB) / (its own); from that,
the server CPU per GB that a target leaves, with curl's cost as measured. The CPUs busy
(MB/s x CPU s/GB, median of the runs') are shown too.

The data set: a folder of 10 random files (--file-mib MiB each, 100 by default) and the
same 10 files concatenated into one file; built once and reused from
$TMPDIR/zipmiddleware-bench-engine/, read once (with a CRC-32 of each file) before timing.

Figures:
  1  baseline: a plain WSGI app (bench/apps/sendfile_app.py) that returns
     environ['wsgi.file_wrapper'](open(the concatenated file)) with Content-Length, so gunicorn
     uses sendfile; the denominator of 2, 3 and 5.
  2  zipmiddleware's direct file: the same file through the middleware (directory resolver).
  3  zipmiddleware's stored ZIP of the folder, for zero_copy true and false (false only where
     zipmiddleware.config.Settings has the field) and chunk_size 64 KiB, 256 KiB and 1 MiB:
     cold = the first request of a fresh server whose crc_cache is a new, empty SQLite file
     (one server per round and configuration); warm = the same archive again on that server.
     Targets: cold >= 0.80x, warm >= 0.95x the baseline.
  4  16 concurrent stored ZIP downloads (warm, default settings) against 16 concurrent plain
     sendfile downloads of the concatenated file (the same bytes, but for the ZIP's headers),
     both with -w 2 --threads 20: aggregate MB/s = all bytes / wall time; the ratio pairs the
     two runs of each round. Target >= 0.80x.
  5  other libraries behind plain WSGI apps (bench/apps/others_app.py), on the same gunicorn
     version and the same folder: zipstream-ng (sized ZipStream.from_path) and stream-zip
     (NO_COMPRESSION_64, chunked; and with the CRC-32s given in advance). They run in their
     own virtualenv, $TMPDIR/zipmiddleware-bench-others-venv, created on first use
     (zipstream-ng's import name `zipstream` is zipstream-new's too).

Correctness, before timing (untimed requests read by this script): the baseline and the
direct file have the file's length and CRC-32; the first stored ZIP is saved and read with
zipfile (names, sizes, stored, CRC-32s equal to the files', testzip), and every
configuration's cold and warm archive must equal it (length and CRC-32 of the whole body);
each other library's archive is checked with zipfile the same way. Timed downloads check
status, byte count and Content-Length.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http.client
import json
import os
import platform
import posixpath
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import TracebackType

BENCH = Path(__file__).resolve().parent
PROJECT = BENCH.parent
APPS = BENCH / "apps"
MAIN_GUNICORN = PROJECT / ".venv" / "bin" / "gunicorn"
CACHE = Path(tempfile.gettempdir()) / "zipmiddleware-bench-engine"
OTHERS_VENV = Path(tempfile.gettempdir()) / "zipmiddleware-bench-others-venv"
OTHERS_PACKAGES = ["zipstream-ng", "stream-zip"]

MB = 10**6
GB = 10**9
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")  # the unit of utime and stime in /proc/<pid>/stat
KIB = 1 << 10
MIB = 1 << 20
FILES = 10
THREADS = 20
CONCURRENT = 16
CHUNK_SIZES = (64 * KIB, 256 * KIB, MIB)
TARGET_COLD = 0.80
TARGET_WARM = 0.95
TARGET_CONCURRENT = 0.80
CURL_TIMEOUT = 600
START_TIMEOUT = 60
FIGURE_NAMES = {"baseline": 1, "direct": 2, "zip": 3, "concurrent": 4, "others": 5}
OTHERS = [
    ("/zipstream-ng", "zipstream-ng ZipStream.from_path (sized)", True),
    ("/stream-zip", "stream-zip NO_COMPRESSION_64 (chunked)", False),
    ("/stream-zip-known-crc", "stream-zip NO_COMPRESSION_64(size, crc) (chunked)", False),
]


class BenchFailure(Exception):
    """A response that was not what it had to be, or a server that did not run."""


# -- the data set -----------------------------------------------------------------------------


@dataclass
class DataSet:
    folder: Path  # the 10 files
    big: Path  # the same files concatenated
    sizes: dict[str, int]  # file name -> size
    crcs: dict[str, int]  # file name -> CRC-32
    big_crc: int

    @property
    def total(self) -> int:
        return sum(self.sizes.values())


def write_random(path: Path, size: int) -> None:
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as out:
        remaining = size
        while remaining:
            block = os.urandom(min(remaining, 4 * MIB))
            out.write(block)
            remaining -= len(block)
    partial.replace(path)


def build_data_set(root: Path, file_size: int) -> tuple[DataSet, bool]:
    """The folder of random files and their concatenation; what is in place is reused."""
    folder, big = root / "folder", root / "big.bin"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"data-{index:02d}.bin" for index in range(FILES)]
    stale = [path for path in paths if not (path.is_file() and path.stat().st_size == file_size)]
    extra = [path for path in folder.iterdir() if path not in paths]
    for path in extra:  # leftovers of an interrupted build
        path.unlink()
    if stale:
        big.unlink(missing_ok=True)
    for path in stale:
        write_random(path, file_size)
    built = bool(stale) or not (big.is_file() and big.stat().st_size == file_size * FILES)
    if built:
        partial = big.with_name(big.name + ".partial")
        with open(partial, "wb") as out:
            for path in paths:
                with open(path, "rb") as source:
                    shutil.copyfileobj(source, out, 4 * MIB)
        partial.replace(big)
        os.sync()  # no write-back while timing
    return DataSet(folder, big, {p.name: p.stat().st_size for p in paths}, {}, 0), built


def read_with_crc(path: Path) -> int:
    crc = 0
    with open(path, "rb", buffering=0) as file:
        while data := file.read(4 * MIB):
            crc = zlib.crc32(data, crc)
    return crc


def warm_page_cache(data: DataSet) -> None:
    """Read every byte once (so timing reads from memory), noting each file's CRC-32."""
    data.crcs = {name: read_with_crc(data.folder / name) for name in sorted(data.sizes)}
    data.big_crc = read_with_crc(data.big)


def available_memory() -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


# -- gunicorn ---------------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = Path(f"/proc/{entry}/stat").read_bytes()
                fields = stat[stat.rfind(b")") + 2 :].split()
                if int(fields[1]) == pid and fields[0] not in (b"Z", b"X"):
                    found.append(int(entry))
    return found


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process (all its threads), in clock ticks: fields 14 and 15 of
    /proc/<pid>/stat (proc(5)), counted here from the field after the command's ')'."""
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    fields = stat[stat.rfind(b")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def children_cpu() -> float:
    """User + system seconds of this script's children that have ended and been waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class CpuMeter:
    """The CPU seconds spent from its creation to :meth:`spent` by a server's workers and by the
    children of this script that ended meanwhile (the curls run in between)."""

    def __init__(self, server: Server) -> None:
        self.label = server.label
        self.workers = server.worker_pids()
        if not self.workers:
            raise BenchFailure(f"{server.label}: no gunicorn worker to measure")
        try:
            self.ticks = sum(cpu_ticks(pid) for pid in self.workers)
        except (OSError, ValueError, IndexError) as exc:
            raise BenchFailure(f"{server.label}: cannot read a worker's CPU time: {exc!r}") from None
        self.children = children_cpu()

    def spent(self) -> tuple[float, float]:
        """(the workers' CPU seconds, the ended children's CPU seconds)"""
        children = children_cpu() - self.children
        try:
            ticks = sum(cpu_ticks(pid) for pid in self.workers) - self.ticks
        except (OSError, ValueError, IndexError):
            raise BenchFailure(f"{self.label}: a gunicorn worker exited during the download") from None
        return ticks / CLOCK_TICKS, children


_CONTROL_SOCKET_OPTION: dict[str, bool] = {}


def has_control_socket_option(gunicorn: str) -> bool:
    """gunicorn 24+ opens a control socket unless told not to; older ones lack the option."""
    if gunicorn not in _CONTROL_SOCKET_OPTION:
        result = subprocess.run([gunicorn, "--help"], capture_output=True, text=True)
        _CONTROL_SOCKET_OPTION[gunicorn] = "--no-control-socket" in result.stdout
    return _CONTROL_SOCKET_OPTION[gunicorn]


class Server:
    """One gunicorn (gthread) on a free port of 127.0.0.1, logging to ``logdir``; a ``with``
    block starts it, waits until it answers and always stops it."""

    count = 0

    def __init__(
        self,
        label: str,
        gunicorn: str | Path,
        app: str,
        env: dict[str, str],
        logdir: Path,
        workers: int = 1,
    ) -> None:
        Server.count += 1
        slug = "".join(c if c.isalnum() else "-" for c in label).strip("-")
        self.label = label
        self.gunicorn = str(gunicorn)
        self.app = app
        self.env = env
        self.workers = workers
        self.log_path = logdir / f"{Server.count:03d}-{slug}.log"
        self.logdir = logdir
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.seen_workers: set[int] = set()

    def __enter__(self) -> Server:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def worker_pids(self) -> list[int]:
        """The worker processes now serving: the master's children."""
        if self.process is None:
            return []
        workers = children(self.process.pid)
        self.seen_workers.update(workers)
        return workers

    def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", 0))
            listener.listen(1024)
            self.port = listener.getsockname()[1]
            fd = listener.fileno()
            os.set_inheritable(fd, True)
            command = [
                self.gunicorn,
                "--worker-class", "gthread", "--workers", str(self.workers), "--threads", str(THREADS),
                "--bind", f"fd://{fd}", "--timeout", "300", "--graceful-timeout", "2",
                "--log-level", "warning", "--pythonpath", str(APPS),
            ]  # fmt: skip
            if has_control_socket_option(self.gunicorn):
                command.append("--no-control-socket")
            command.append(self.app)
            with open(self.log_path, "wb") as log:
                self.process = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
                    pass_fds=(fd,),
                    start_new_session=True,  # its own process group, killed as a whole if need be
                    cwd=self.logdir,
                )
        finally:
            listener.close()  # gunicorn holds its own copy
        deadline = time.monotonic() + START_TIMEOUT
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchFailure(
                    f"{self.label}: gunicorn exited with {self.process.returncode} at start-up"
                )
            workers = children(self.process.pid)
            self.seen_workers.update(workers)
            if len(workers) >= self.workers:
                try:
                    connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                    try:
                        connection.request("GET", "/ready")
                        response = connection.getresponse()
                        response.read()
                        if response.status == 200:
                            return
                        last_error = BenchFailure(f"status {response.status}")
                    finally:
                        connection.close()
                except (OSError, http.client.HTTPException) as exc:
                    last_error = exc
            time.sleep(0.05)
        raise BenchFailure(f"{self.label}: gunicorn did not answer within {START_TIMEOUT} s ({last_error!r})")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            self.seen_workers.update(children(process.pid))
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        for pid in self.seen_workers:  # a worker left behind by its master
            with contextlib.suppress(OSError):
                if os.getpgid(pid) == process.pid:
                    os.kill(pid, signal.SIGKILL)
        self.seen_workers.clear()

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        tail = text.splitlines()[-lines:]
        return "\n".join(tail) if tail else "(the log is empty)"


# -- clients ----------------------------------------------------------------------------------


@dataclass
class Download:
    status: int
    size: int
    seconds: float
    content_length: str  # "" when the response had none (chunked)


def curl_version() -> tuple[int, ...]:
    words = subprocess.run(["curl", "--version"], capture_output=True, text=True, check=True).stdout.split()
    return tuple(int(part) for part in words[1].split(".")[:3] if part.isdigit())


def curl_command(url: str, with_header: bool) -> list[str]:
    write_out = "%{http_code} %{size_download} %{time_total}"
    if with_header:  # curl 7.84+
        write_out += " [%header{content-length}]"
    return ["curl", "-sS", "--max-time", str(CURL_TIMEOUT), "-o", "/dev/null", "-w", write_out, url]


def parse_curl(returncode: int, stdout: str, stderr: str, with_header: bool) -> Download:
    if returncode != 0:
        raise BenchFailure(f"curl exited with {returncode}: {stderr.strip()} (wrote {stdout!r})")
    words = stdout.split(" ", 3)
    try:
        length = words[3].strip()[1:-1] if with_header else "?"
        return Download(int(words[0]), int(words[1]), float(words[2]), length)
    except (IndexError, ValueError):
        raise BenchFailure(f"cannot read curl's output {stdout!r}") from None


def check_download(download: Download, expected: int, sized: bool | None) -> None:
    """``sized``: True, a Content-Length of ``expected`` is required; False, none; None, not checked."""
    problems = []
    if download.status != 200:
        problems.append(f"status {download.status}")
    if download.size != expected:
        problems.append(f"{download.size:,} bytes received, expected {expected:,}")
    if sized is True and download.content_length not in ("?", str(expected)):
        problems.append(f"Content-Length {download.content_length!r}, expected {expected}")
    if sized is False and download.content_length not in ("?", ""):
        problems.append(f"Content-Length {download.content_length!r}, expected none (chunked)")
    if problems:
        raise BenchFailure("; ".join(problems))


@dataclass
class Timed:
    """One timed run: MB/s, and the CPU seconds per GB received of the server and of curl."""

    mbps: float
    server_cpu: float
    client_cpu: float
    size: int  # bytes received


@dataclass
class Fetched:
    status: int
    headers: dict[str, str]
    length: int
    crc: int


def fetch(server: Server, path: str, save: Path | None = None) -> Fetched:
    """An untimed GET whose body is counted and CRC-32'd (and saved when asked)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=CURL_TIMEOUT)
    buffer = bytearray(MIB)
    view = memoryview(buffer)
    length = crc = 0
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        headers = {name.lower(): value for name, value in response.getheaders()}
        with open(save, "wb") if save else contextlib.nullcontext() as out:
            while count := response.readinto(buffer):
                crc = zlib.crc32(view[:count], crc)
                length += count
                if out is not None:
                    out.write(view[:count])
        return Fetched(response.status, headers, length, crc)
    except (OSError, http.client.HTTPException) as exc:
        raise BenchFailure(f"GET {path}: {exc!r} after {length:,} bytes") from None
    finally:
        connection.close()


def check_fetched(what: str, got: Fetched, length: int, crc: int, sized: bool) -> None:
    problems = []
    if got.status != 200:
        problems.append(f"status {got.status}")
    if sized and got.headers.get("content-length") != str(length):
        problems.append(f"Content-Length {got.headers.get('content-length')!r}, expected {length}")
    if not sized and "content-length" in got.headers:
        problems.append(f"Content-Length {got.headers['content-length']!r}, expected none")
    if got.length != length or got.crc != crc:
        problems.append(
            f"body of {got.length:,} bytes with CRC-32 {got.crc:08x}, expected {length:,} bytes, {crc:08x}"
        )
    if problems:
        raise BenchFailure(f"{what}: " + "; ".join(problems))


def check_archive(what: str, path: Path, data: DataSet) -> None:
    """The archive holds exactly the folder's files, stored, with their CRC-32s, and reads back."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = [info for info in archive.infolist() if not info.is_dir()]
            got = sorted((posixpath.basename(i.filename), i.file_size, i.CRC, i.compress_type) for i in infos)
            want = sorted(
                (name, data.sizes[name], data.crcs[name], zipfile.ZIP_STORED) for name in data.sizes
            )
            if got != want:
                raise BenchFailure(f"{what}: the archive lists {got[:3]}..., expected {want[:3]}...")
            bad = archive.testzip()
            if bad is not None:
                raise BenchFailure(f"{what}: {bad} fails its CRC-32")
    except (OSError, zipfile.BadZipFile) as exc:
        raise BenchFailure(f"{what}: zipfile cannot read the archive: {exc!r}") from None


# -- figures ----------------------------------------------------------------------------------


@dataclass
class Figure:
    number: int
    label: str
    runs: list[float] = field(default_factory=list)  # MB/s
    ratios: list[float] = field(default_factory=list)  # each run / the baseline run just before it
    server_cpus: list[float] = field(default_factory=list)  # each run's server CPU s/GB
    client_cpus: list[float] = field(default_factory=list)  # each run's curl CPU s/GB
    size: int = 0  # the bytes of a run (all downloads of it): one clock tick is GB / CLOCK_TICKS / size
    failure: str | None = None
    log: str = ""  # the tail of its server's log
    log_path: Path | None = None

    @property
    def value(self) -> float | None:
        return statistics.median(self.runs) if self.runs and self.failure is None else None

    @property
    def ratio(self) -> float | None:
        return statistics.median(self.ratios) if self.ratios and self.failure is None else None

    @property
    def server_cpu(self) -> float | None:
        return statistics.median(self.server_cpus) if self.server_cpus and self.failure is None else None

    @property
    def client_cpu(self) -> float | None:
        return statistics.median(self.client_cpus) if self.client_cpus and self.failure is None else None

    @property
    def total_cpu(self) -> float | None:
        if self.server_cpu is None or self.client_cpu is None:
            return None
        return self.server_cpu + self.client_cpu

    @property
    def busy(self) -> float | None:
        """The CPUs server and curl kept busy (MB/s x their CPU s/GB), the median of the runs'."""
        if not self.server_cpus or self.failure is not None:
            return None
        return statistics.median(
            mbps * MB * (server + client) / GB
            for mbps, server, client in zip(self.runs, self.server_cpus, self.client_cpus, strict=True)
        )

    @property
    def tick(self) -> float:
        """One clock tick of server CPU, in s/GB of a run."""
        return GB / CLOCK_TICKS / self.size if self.size else 0.0

    def add(self, timed: Timed) -> None:
        self.size = timed.size
        self.runs.append(timed.mbps)
        self.server_cpus.append(timed.server_cpu)
        self.client_cpus.append(timed.client_cpu)


@dataclass(frozen=True)
class ZipConfig:
    zero_copy: bool | None  # None: the middleware has no such setting
    chunk_size: int

    @property
    def name(self) -> str:
        zero_copy = "n/a" if self.zero_copy is None else str(self.zero_copy).lower()
        return f"zero_copy={zero_copy}, chunk {human(self.chunk_size)}"


def human(size: int) -> str:
    return f"{size // MIB} MiB" if size % MIB == 0 else f"{size // KIB} KiB"


def toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a TOML basic string


def write_config(path: Path, data: DataSet, config: ZipConfig, crc_cache: Path) -> None:
    lines = [
        "[zipmiddleware]",
        f"chunk_size = {config.chunk_size}",
        f"crc_cache = {toml_string(str(crc_cache))}",
    ]
    if config.zero_copy is not None:
        lines.append(f"zero_copy = {str(config.zero_copy).lower()}")
    lines += [
        "",
        "[zipmiddleware.routes]",
        f'"/files/<path:subpath>" = {{ resolver = "directory", root = {toml_string(str(data.folder.parent))} }}',
    ]
    path.write_text("\n".join(lines) + "\n")


class Bench:
    def __init__(self, args: argparse.Namespace, data: DataSet, logdir: Path) -> None:
        self.args = args
        self.data = data
        self.logdir = logdir
        self.repeat: int = args.repeat
        self.with_header = curl_version() >= (7, 84)
        self.counter = 0
        self.archive: tuple[int, int] | None = None  # the middleware's archive: length, CRC-32
        self.failures: list[Figure] = []
        self.zip_figures: dict[tuple[ZipConfig, str], Figure] = {}
        self.last_baseline: float | None = None  # MB/s of the baseline run just made

    # -- helpers

    def fresh(self, suffix: str) -> Path:
        self.counter += 1
        return self.logdir / f"{self.counter:03d}-{suffix}"

    def middleware(self, label: str, config: ZipConfig, workers: int = 1) -> Server:
        """A server of its own with a new, empty SQLite CRC-32 cache."""
        toml = self.fresh("zipmiddleware.toml")
        write_config(toml, self.data, config, self.fresh("crc32.sqlite"))
        env = {"ZM_BENCH_CONFIG": str(toml)}
        return Server(label, MAIN_GUNICORN, "middleware_app:app", env, self.logdir, workers)

    def sendfile(self, label: str, workers: int = 1) -> Server:
        env = {"ZM_BENCH_FILE": str(self.data.big)}
        return Server(label, MAIN_GUNICORN, "sendfile_app:app", env, self.logdir, workers)

    def curl(self, server: Server, path: str, expected: int, sized: bool) -> Timed:
        command = curl_command(server.url(path), self.with_header)
        meter = CpuMeter(server)
        result = subprocess.run(command, capture_output=True, text=True)
        server_seconds, curl_seconds = meter.spent()
        download = parse_curl(result.returncode, result.stdout, result.stderr, self.with_header)
        check_download(download, expected, sized)
        gigabytes = download.size / GB
        return Timed(
            download.size / MB / download.seconds,
            server_seconds / gigabytes,
            curl_seconds / gigabytes,
            download.size,
        )

    def curl_many(self, server: Server, path: str, count: int, expected: int, sized: bool) -> Timed:
        """``count`` downloads at once; aggregate MB/s over the wall time of all of them, and the
        CPU of all the server's workers and of all the curls per GB received in all."""
        command = curl_command(server.url(path), self.with_header)
        processes = []
        meter = CpuMeter(server)
        started = time.perf_counter()
        try:
            for _ in range(count):
                processes.append(
                    subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                )
            outputs = [process.communicate() for process in processes]
            elapsed = time.perf_counter() - started
            server_seconds, curl_seconds = meter.spent()
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
                    process.wait()
        total = 0
        for process, (stdout, stderr) in zip(processes, outputs, strict=True):
            download = parse_curl(process.returncode, stdout, stderr, self.with_header)
            check_download(download, expected, sized)
            total += download.size
        return Timed(total / MB / elapsed, server_seconds / (total / GB), curl_seconds / (total / GB), total)

    def record(self, figure: Figure, timed: Timed) -> None:
        figure.add(timed)
        if self.last_baseline:
            figure.ratios.append(timed.mbps / self.last_baseline)

    def attempt(self, figure: Figure, server: Server | None, action: Callable[[], None]) -> None:
        """Run one measurement or check of ``figure``; a failure marks the figure failed."""
        if figure.failure is not None:
            return
        try:
            action()
        except BenchFailure as exc:
            figure.failure = str(exc)
            if server is not None:
                figure.log, figure.log_path = server.log_tail(), server.log_path
            self.failures.append(figure)
            print(f"  FAILED: {figure.label}: {exc}", flush=True)

    def check_middleware_archive(self, server: Server) -> None:
        """The first archive is saved and read by zipfile; every later one must equal it."""
        what = "untimed check"
        if self.archive is None:
            saved = self.fresh("archive.zip")
            try:
                got = fetch(server, "/files/folder", saved)
                if got.status != 200:
                    raise BenchFailure(f"{what}: status {got.status}")
                if got.headers.get("content-length") != str(got.length):
                    raise BenchFailure(
                        f"{what}: {got.length:,} bytes for Content-Length {got.headers.get('content-length')}"
                    )
                check_archive(what, saved, self.data)
                self.archive = (got.length, got.crc)
            finally:
                saved.unlink(missing_ok=True)
            return
        length, crc = self.archive
        check_fetched(what, fetch(server, "/files/folder"), length, crc, sized=True)

    # -- figures 1, 2, 3, 5: one download at a time

    def single(self, figures: set[int], configs: list[ZipConfig], default: ZipConfig) -> list[Figure]:
        data = self.data
        big = data.big.stat().st_size
        shown: list[Figure] = []
        baseline = Figure(1, f"plain app, wsgi.file_wrapper (sendfile), {human(big)} file")
        shown.append(baseline)
        direct = Figure(2, "zipmiddleware direct file (the same file)")
        if 2 in figures:
            shown.append(direct)
        zip_figures = self.zip_figures
        if 3 in figures:
            for config in configs:
                mark = " (default)" if config == default else ""
                for cache in ("cold", "warm"):
                    figure = Figure(3, f"stored ZIP, {config.name}{mark}, CRC cache {cache}")
                    zip_figures[(config, cache)] = figure
                    shown.append(figure)
        others: list[Figure] = []
        others_gunicorn: Path | None = None
        if 5 in figures:
            others_gunicorn, note = others_venv()
            print(note, flush=True)
            for _, label, _ in OTHERS:
                figure = Figure(5, label)
                others.append(figure)
                shown.append(figure)
                if others_gunicorn is None:
                    figure.failure = "skipped: " + note
        others_lengths: dict[str, int] = {}

        with contextlib.ExitStack() as stack:
            print("starting servers and checking every response's bytes (untimed) ...", flush=True)
            baseline_server = self.sendfile("baseline")
            try:
                stack.enter_context(baseline_server)
            except BenchFailure as exc:  # no figure without it
                raise SystemExit(f"error: {exc}; server log:\n{baseline_server.log_tail()}") from None
            self.attempt(
                baseline,
                baseline_server,
                lambda: check_fetched(
                    "untimed check", fetch(baseline_server, "/file"), big, data.big_crc, sized=True
                ),
            )
            direct_server = None
            if 2 in figures:
                direct_server = self.middleware("direct file", default)
                self.attempt(direct, direct_server, lambda: stack.enter_context(direct_server))
                self.attempt(
                    direct,
                    direct_server,
                    lambda: check_fetched(
                        "untimed check", fetch(direct_server, "/files/big.bin"), big, data.big_crc, sized=True
                    ),
                )
            for config in configs:
                if 3 not in figures:
                    break
                cold, warm = zip_figures[(config, "cold")], zip_figures[(config, "warm")]
                server = self.middleware(f"check {config.name}", config)

                def check(server: Server = server, cold: Figure = cold, warm: Figure = warm) -> None:
                    with server:
                        self.attempt(cold, server, lambda: self.check_middleware_archive(server))
                        self.attempt(warm, server, lambda: self.check_middleware_archive(server))

                try:
                    check()
                except BenchFailure as exc:  # the server did not start
                    for figure in (cold, warm):
                        self.attempt(figure, server, lambda exc=exc: _raise(exc))
            others_server = None
            if others_gunicorn is not None and others:
                env = {"ZM_BENCH_FOLDER": str(data.folder)}
                others_server = Server("others", others_gunicorn, "others_app:app", env, self.logdir)
                try:
                    stack.enter_context(others_server)
                except BenchFailure as exc:
                    for figure in others:
                        self.attempt(figure, others_server, lambda exc=exc: _raise(exc))
                for (path, _, sized), figure in zip(OTHERS, others, strict=True):

                    def check_other(path: str = path, sized: bool = sized) -> None:
                        assert others_server is not None
                        saved = self.fresh("other.zip")
                        try:
                            got = fetch(others_server, path, saved)
                            check_fetched("untimed check", got, got.length, got.crc, sized)
                            check_archive("untimed check", saved, data)
                            others_lengths[path] = got.length
                        finally:
                            saved.unlink(missing_ok=True)

                    self.attempt(figure, others_server, check_other)

            # -- the timed rounds
            steps: list[Callable[[], None]] = []

            def time_baseline() -> None:
                self.last_baseline = None

                def run() -> None:
                    timed = self.curl(baseline_server, "/file", big, sized=True)
                    self.record(baseline, timed)
                    baseline.ratios.append(1.0)
                    self.last_baseline = timed.mbps

                self.attempt(baseline, baseline_server, run)

            if direct_server is not None:
                server = direct_server
                steps.append(
                    lambda: self.attempt(
                        direct,
                        server,
                        lambda: self.record(direct, self.curl(server, "/files/big.bin", big, sized=True)),
                    )
                )
            for config in configs:
                if 3 not in figures:
                    break
                steps.append(lambda config=config: self.time_zip(config))
            if others_server is not None:
                for (path, _, sized), figure in zip(OTHERS, others, strict=True):

                    def time_other(path: str = path, sized: bool = sized, figure: Figure = figure) -> None:
                        assert others_server is not None
                        length = others_lengths.get(path, -1)
                        self.attempt(
                            figure,
                            others_server,
                            lambda: self.record(figure, self.curl(others_server, path, length, sized)),
                        )

                    steps.append(time_other)

            for round_ in range(self.repeat):
                print(f"round {round_ + 1} of {self.repeat} ...", flush=True)
                for step in (steps if round_ % 2 == 0 else steps[::-1]) or [lambda: None]:
                    time_baseline()  # the baseline just before every case: ratios pair them
                    step()
        return shown

    def time_zip(self, config: ZipConfig) -> None:
        cold, warm = self.zip_figures[(config, "cold")], self.zip_figures[(config, "warm")]
        if cold.failure is not None and warm.failure is not None:
            return
        if self.archive is None:
            return
        length = self.archive[0]
        server = self.middleware(config.name, config)
        try:
            with server:
                self.attempt(
                    cold, server, lambda: self.record(cold, self.curl(server, "/files/folder", length, True))
                )
                self.attempt(
                    warm, server, lambda: self.record(warm, self.curl(server, "/files/folder", length, True))
                )
        except BenchFailure as exc:  # the server did not start
            for figure in (cold, warm):
                self.attempt(figure, server, lambda exc=exc: _raise(exc))

    # -- figure 4: 16 at once, two workers

    def concurrent(self, default: ZipConfig) -> tuple[Figure, Figure]:
        data = self.data
        big = data.big.stat().st_size
        sendfile = Figure(4, f"{CONCURRENT} x plain sendfile, {human(big)} each (-w 2)")
        zipped = Figure(4, f"{CONCURRENT} x stored ZIP warm, {default.name} (-w 2)")
        print(
            f"figure 4: {CONCURRENT} concurrent downloads, gunicorn -w 2 --threads {THREADS} ...", flush=True
        )
        with contextlib.ExitStack() as stack:
            plain_server = self.sendfile("concurrent sendfile", workers=2)
            zip_server = self.middleware("concurrent zip", default, workers=2)
            for figure, server in ((sendfile, plain_server), (zipped, zip_server)):
                self.attempt(figure, server, lambda server=server: stack.enter_context(server))
            self.attempt(
                sendfile,
                plain_server,
                lambda: check_fetched(
                    "untimed check", fetch(plain_server, "/file"), big, data.big_crc, sized=True
                ),
            )
            # Checks the archive and fills the (shared, SQLite) CRC-32 cache: the timed runs are warm.
            self.attempt(zipped, zip_server, lambda: self.check_middleware_archive(zip_server))
            for round_ in range(self.repeat):
                print(f"round {round_ + 1} of {self.repeat} ...", flush=True)
                order = [(sendfile, plain_server, "/file"), (zipped, zip_server, "/files/folder")]
                done: dict[int, float] = {}
                for figure, server, path in order if round_ % 2 == 0 else order[::-1]:
                    if figure is zipped and self.archive is None:
                        continue
                    length = big if figure is sendfile else self.archive[0]  # type: ignore[index]

                    def run(
                        figure: Figure = figure,
                        server: Server = server,
                        path: str = path,
                        length: int = length,
                        done: dict[int, float] = done,
                    ) -> None:
                        timed = self.curl_many(server, path, CONCURRENT, length, sized=True)
                        done[id(figure)] = timed.mbps
                        figure.add(timed)

                    self.attempt(figure, server, run)
                if id(sendfile) in done and id(zipped) in done:  # this round's pair
                    sendfile.ratios.append(1.0)
                    zipped.ratios.append(done[id(zipped)] / done[id(sendfile)])
        return sendfile, zipped


def _raise(exc: BaseException) -> None:
    raise exc


# -- the other libraries' virtualenv -----------------------------------------------------------


def others_venv() -> tuple[Path | None, str]:
    """The virtualenv with gunicorn (the main one's version), zipstream-ng and stream-zip;
    created, or completed, on first use. (gunicorn, a line saying what it holds)."""
    python = OTHERS_VENV / "bin" / "python"
    gunicorn = OTHERS_VENV / "bin" / "gunicorn"
    stamp = OTHERS_VENV / ".zipmiddleware-bench"
    wanted = [f"gunicorn=={metadata.version('gunicorn')}", *OTHERS_PACKAGES]
    action = "reused"
    if not (
        python.exists() and gunicorn.exists() and stamp.exists() and stamp.read_text() == " ".join(wanted)
    ):
        action = "created"
        print(f"setting up {OTHERS_VENV} ({' '.join(wanted)}) ...", flush=True)
        try:
            if not python.exists():
                subprocess.run(
                    [sys.executable, "-m", "venv", str(OTHERS_VENV)], check=True, capture_output=True
                )
            install = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
            result = subprocess.run([*install, *wanted], capture_output=True, text=True)
            if result.returncode != 0:  # that gunicorn version is not on the index: the newest one
                result = subprocess.run(
                    [*install, "gunicorn", *OTHERS_PACKAGES], capture_output=True, text=True
                )
            if result.returncode != 0:
                tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-5:])
                return None, f"figure 5: cannot install {' '.join(wanted)} into {OTHERS_VENV}:\n{tail}"
            stamp.write_text(" ".join(wanted))
        except (OSError, subprocess.CalledProcessError) as exc:
            return None, f"figure 5: cannot create {OTHERS_VENV}: {exc}"
    query = "from importlib.metadata import version as v; print(*(v(p) for p in {!r}))".format(
        ["gunicorn", *OTHERS_PACKAGES]
    )
    versions = subprocess.run([str(python), "-c", query], capture_output=True, text=True).stdout.split()
    described = ", ".join(
        f"{name} {version}" for name, version in zip(["gunicorn", *OTHERS_PACKAGES], versions, strict=False)
    )
    return gunicorn, f"figure 5: {OTHERS_VENV} ({action}): {described}"


# -- report -----------------------------------------------------------------------------------


def print_table(title: str, rows: Sequence[Figure], base_name: str) -> None:
    width = max(len(f"{row.number}  {row.label}") for row in rows)
    print(f"\n{title}")
    print(
        f"{'figure':<{width}}  {'MB/s':>7}  {'x ' + base_name:>10}  {'server CPU s/GB':>15}  "
        f"{'curl CPU s/GB':>13}  runs: MB/s (x {base_name})"
    )
    for row in rows:
        name = f"{row.number}  {row.label}"
        if row.failure is not None:
            print(f"{name:<{width}}  {'FAILED' if not row.failure.startswith('skipped') else 'skipped':>7}")
            continue
        value, ratio = row.value, row.ratio
        if all(r == 1.0 for r in row.ratios) and len(row.runs) > 6:  # the baseline itself
            runs = f"{len(row.runs)} runs from {min(row.runs):,.0f} to {max(row.runs):,.0f}"
        elif all(r == 1.0 for r in row.ratios):
            runs = ", ".join(f"{run:,.0f}" for run in row.runs)
        elif len(row.ratios) == len(row.runs):
            runs = ", ".join(f"{run:,.0f} ({r:.2f})" for run, r in zip(row.runs, row.ratios, strict=True))
        else:
            runs = ", ".join(f"{run:,.0f}" for run in row.runs)
        shown = f"{value:,.0f}" if value is not None else "-"
        print(
            f"{name:<{width}}  {shown:>7}  {f'{ratio:.2f}' if ratio is not None else '-':>10}  "
            f"{cpu_text(row.server_cpu):>15}  {cpu_text(row.client_cpu):>13}  {runs}"
        )


def cpu_text(seconds_per_gb: float | None) -> str:
    return f"{seconds_per_gb:.2f}" if seconds_per_gb is not None else "-"


def usable_cpus() -> int:
    with contextlib.suppress(AttributeError, OSError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_needs(figure: Figure, curl_named: bool) -> str:
    """server + curl = total CPU s/GB, and how many CPUs that kept busy at the figure's MB/s."""
    assert figure.server_cpu is not None and figure.client_cpu is not None and figure.total_cpu is not None
    busy = f" ({figure.busy:.2f} CPUs busy)" if figure.busy is not None else ""
    return (
        f"{figure.server_cpu:.2f} + {figure.client_cpu:.2f}{' (curl)' if curl_named else ''} = "
        f"{figure.total_cpu:.2f}{' CPU s/GB' if curl_named else ''}{busy}"
    )


def cpu_reach(figure: Figure, base: Figure, target: float, base_name: str | None) -> str:
    """The CPU per GB of ``figure`` (server + curl) against that of ``base``: the ratio of the two
    when both are CPU-bound on the same CPUs, and the server CPU per GB that ``target`` leaves;
    spelt out when ``base_name`` is given, else short (a second clause of the same line)."""
    total, base_total = figure.total_cpu, base.total_cpu
    if total is None or base_total is None or figure.client_cpu is None:
        return "not measured"
    measured = f"{figure.ratio:.2f}x" if figure.ratio is not None else "-"
    budget = base_total / target - figure.client_cpu  # the most server CPU s/GB that meets it
    if budget <= 0:
        leaves = f"curl alone needs more than {target:.2f}x allows"
    elif base_name is not None:
        leaves = f"{target:.2f}x leaves the server {budget:.2f} s/GB"
    else:
        leaves = f"{target:.2f}x leaves {budget:.2f}"
    reach = f"{base_total / total:.2f}x" + (f" {base_name}" if base_name is not None else "")
    return f"{cpu_needs(figure, base_name is not None)}: CPU-bound, {reach} (measured {measured}; {leaves})"


def cpu_difference(more: Figure, less: Figure, what: str, why: str) -> str:
    """How much more (or less) server CPU per GB ``more`` costs than ``less``, with ``why`` when it is
    more; "about as much" within two clock ticks (one for each median)."""
    assert more.server_cpu is not None and less.server_cpu is not None
    difference = more.server_cpu - less.server_cpu
    resolution = max(more.tick, less.tick)
    if abs(difference) <= 2 * resolution * (1 + 1e-9):  # two ticks, whatever the rounding
        return (
            f"costs the server about as much CPU as {what} ({difference:+.2f} s/GB, within two clock "
            f"ticks of {resolution:.2f} s/GB)"
        )
    return (
        f"costs the server {abs(difference):.2f} s/GB {'more' if difference > 0 else 'less'} CPU than {what}"
        + (f" ({why})" if difference > 0 and why else "")
    )


def print_cpu_limits(
    bench: Bench,
    configs: Sequence[ZipConfig],
    default: ZipConfig,
    baseline: Figure | None,
    concurrent: tuple[Figure, Figure] | None,
) -> None:
    """One line per stored ZIP configuration (and one for figure 4): where the CPU puts the limit."""
    cpus = usable_cpus()
    lines = []
    ticks = []
    if bench.zip_figures and baseline is not None and baseline.total_cpu is not None:
        ticks.append(f"{baseline.tick:.2f} s/GB for one download of {baseline.size / MB:,.0f} MB")
        lines.append(f"  baseline: {cpu_needs(baseline, True)}")
        for config in configs:
            cold = bench.zip_figures.get((config, "cold"))
            warm = bench.zip_figures.get((config, "warm"))
            if cold is None or warm is None:
                continue
            name = config.name + ("*" if config == default else "")
            if cold.server_cpu is None or warm.server_cpu is None:
                lines.append(f"  {name}: not measured")
                continue
            costs = cpu_difference(cold, warm, "warm", "reading each file once for its CRC-32")
            cold_reach = cpu_reach(cold, baseline, TARGET_COLD, "the baseline")
            warm_reach = cpu_reach(warm, baseline, TARGET_WARM, None)
            lines.append(
                f"  {name}: cold {costs}; with the client on the same {cpus} CPUs, cold {cold_reach}; "
                f"warm {warm_reach}"
            )
    if concurrent is not None:
        sendfile, zipped = concurrent
        if zipped.server_cpu is not None and sendfile.server_cpu is not None:
            ticks.append(f"{zipped.tick:.3f} s/GB for figure 4's {zipped.size / MB:,.0f} MB")
            costs = cpu_difference(zipped, sendfile, "sendfile", "")
            zipped_reach = cpu_reach(zipped, sendfile, TARGET_CONCURRENT, "sendfile")
            lines.append(
                f"  {CONCURRENT} concurrent (-w 2): the stored ZIP {costs}; with the {CONCURRENT} curls on "
                f"the same {cpus} CPUs, sendfile needs {cpu_needs(sendfile, True)}, "
                f"the stored ZIP {zipped_reach}"
            )
        else:
            lines.append(f"  {CONCURRENT} concurrent (-w 2): not measured")
    if lines:
        print(
            "\nCPU per GB, medians (server: the gunicorn worker(s); curl: the client, on the same CPUs; "
            f"one clock tick is {' and '.join(ticks) or '-'}).\nCPU-bound with the same CPUs, MB/s goes "
            "as 1 / (server + curl CPU s/GB): a figure's ratio to its baseline is the baseline's sum over "
            "its own" + (" (* the default chunk_size)" if bench.zip_figures else "")
        )
        print("\n".join(lines))


def verdict(ratio: float | None, target: float) -> str:
    if ratio is None:
        return "not measured"
    return f"{ratio:.2f}x {'met' if ratio >= target else 'NOT MET'}"


def git_state() -> str:
    try:
        head = subprocess.run(
            ["git", "-C", str(PROJECT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        changes = subprocess.run(
            [
                "git",
                "-C",
                str(PROJECT),
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                "zipmiddleware",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "(not a git checkout)"
    return f"{head}{' + uncommitted changes in zipmiddleware/' if changes else ''}"


def parse_only(text: str | None, parser: argparse.ArgumentParser) -> set[int]:
    if not text:
        return set(FIGURE_NAMES.values())
    chosen = set()
    for word in text.replace(" ", "").split(","):
        if word.isdigit() and 1 <= int(word) <= 5:
            chosen.add(int(word))
        elif word in FIGURE_NAMES:
            chosen.add(FIGURE_NAMES[word])
        elif word:
            parser.error(f"--only: {word!r} is not a figure (1-5 or {', '.join(FIGURE_NAMES)})")
    return chosen


# -- main -------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 10 x 16 MiB files, one round")
    parser.add_argument("--repeat", type=int, help="rounds; medians are quoted (default 3, --quick 1)")
    parser.add_argument(
        "--only",
        metavar="FIGURES",
        help="comma-separated figures to run: 1-5 or baseline, direct, zip, concurrent, others "
        "(the baseline runs whenever 2, 3 or 5 do)",
    )
    parser.add_argument(
        "--file-mib", type=int, help="size of each of the 10 files in MiB (default 100, --quick 16)"
    )
    parser.add_argument("--data-dir", help=f"where the data set is kept (default {CACHE}/10xNMiB)")
    args = parser.parse_args()
    args.repeat = args.repeat if args.repeat is not None else (1 if args.quick else 3)
    file_mib = args.file_mib if args.file_mib is not None else (16 if args.quick else 100)
    if args.repeat < 1 or file_mib < 1:
        parser.error("--repeat and --file-mib must be positive")
    figures = parse_only(args.only, parser)
    if figures & {2, 3, 5}:
        figures.add(1)
    if shutil.which("curl") is None:
        raise SystemExit("error: curl is not installed")
    if not MAIN_GUNICORN.exists():
        raise SystemExit(f"error: {MAIN_GUNICORN} is missing (make venv)")

    import zipmiddleware
    from zipmiddleware.config import Settings

    defaults = {setting.name: setting.default for setting in dataclasses.fields(Settings)}
    has_zero_copy = "zero_copy" in defaults
    default_chunk = int(defaults["chunk_size"])  # type: ignore[call-overload]
    default = ZipConfig(bool(defaults["zero_copy"]) if has_zero_copy else None, default_chunk)
    zero_copies: list[bool | None] = [True, False] if has_zero_copy else [None]
    configs = [ZipConfig(zero_copy, chunk) for zero_copy in zero_copies for chunk in CHUNK_SIZES]
    if default not in configs:
        configs.insert(0, default)

    started = time.monotonic()
    root = Path(args.data_dir) if args.data_dir else CACHE / f"{FILES}x{file_mib}MiB"
    building = time.monotonic()
    data, built = build_data_set(root, file_mib * MIB)
    action = f"built in {time.monotonic() - building:.1f} s" if built else "reused"
    print(
        f"data set: {FILES} x {file_mib} MiB random files in {data.folder}, and the same concatenated "
        f"({human(data.total)}) in {data.big} ({action})"
    )
    available = available_memory()
    if available is not None and available < 2.2 * data.total:
        print(f"warning: {available / MB:,.0f} MB of available memory may not keep the data set cached")
    warm_page_cache(data)
    print(
        f"python {platform.python_version()}, {os.cpu_count()} CPUs, gunicorn {metadata.version('gunicorn')} "
        f"(gthread, --threads {THREADS}), curl {'.'.join(map(str, curl_version()))}, "
        f"zipmiddleware {zipmiddleware.__version__} at {git_state()}"
    )
    chunks = ", ".join(human(chunk) for chunk in CHUNK_SIZES)
    zero_copy_note = (
        f"zero_copy true (default: {str(default.zero_copy).lower()}) and false"
        if has_zero_copy
        else "zero_copy: not a setting of this zipmiddleware (Settings has no such field): "
        "the zero_copy=false variant is skipped"
    )
    print(
        f"stored ZIP configurations: chunk_size {chunks} (default {human(default_chunk)}); {zero_copy_note}"
    )
    print(f"median of {args.repeat}; load average {os.getloadavg()[0]:.2f} at start\n", flush=True)

    logdir = Path(tempfile.mkdtemp(prefix="zipmiddleware-bench-engine-logs-"))
    bench = Bench(args, data, logdir)
    single: list[Figure] = []
    concurrent: tuple[Figure, Figure] | None = None
    try:
        if figures & {1, 2, 3, 5}:
            single = bench.single(figures, configs, default)
        if 4 in figures:
            concurrent = bench.concurrent(default)
    except BaseException:
        print(f"\nserver logs are kept in {logdir}")
        raise
    if not bench.failures:
        shutil.rmtree(logdir, ignore_errors=True)

    # -- the report
    baseline = next((figure for figure in single if figure.number == 1), None)
    if single and baseline is not None:
        print_table(
            f"One download at a time (gunicorn -w 1 --threads {THREADS}); MB/s: median; x base: median of "
            "the runs' ratios,\neach run's MB/s / that of the baseline run (figure 1) made just before it"
            "\nserver / curl CPU s/GB: median CPU seconds (user + system) of the gunicorn worker(s) / of "
            "curl per GB (10**9 bytes) received",
            single,
            "base",
        )
    if concurrent is not None:
        print_table(
            f"{CONCURRENT} downloads at once (gunicorn -w 2 --threads {THREADS}); aggregate MB/s = all bytes / "
            "wall time;\nx sendfile: median of the rounds' ratios to the sendfile run of the same round"
            "\nserver / curl CPU s/GB: median CPU seconds (user + system) of the gunicorn workers / of "
            "the curls per GB (10**9 bytes) received in all",
            concurrent,
            "sendfile",
        )

    print("\nTargets" + ("" if figures & {3, 4} else ": none among the figures run (they are 3 and 4)"))
    if 3 in figures:
        names = {chunk: human(chunk) + ("*" if chunk == default_chunk else "") for chunk in CHUNK_SIZES}
        print(f"  {'stored ZIP / baseline':<34}" + "".join(f"{names[chunk]:>18}" for chunk in CHUNK_SIZES))
        for zero_copy in zero_copies:
            for cache, target in (("cold", TARGET_COLD), ("warm", TARGET_WARM)):
                cells = []
                for chunk in CHUNK_SIZES:
                    figure = bench.zip_figures.get((ZipConfig(zero_copy, chunk), cache))
                    cells.append(verdict(figure.ratio if figure is not None else None, target))
                zero_copy_name = "n/a" if zero_copy is None else str(zero_copy).lower()
                row = f"zero_copy={zero_copy_name}, {cache} >= {target:.2f}x"
                print(f"  {row:<34}" + "".join(f"{cell:>18}" for cell in cells))
        print(f"  (* the default chunk_size, {human(default_chunk)})")
    concurrent_ratio = None
    if concurrent is not None:
        concurrent_ratio = concurrent[1].ratio
        print(
            f"  {CONCURRENT} concurrent stored ZIPs (warm, defaults) / {CONCURRENT} sendfile >= "
            f"{TARGET_CONCURRENT:.2f}x: {verdict(concurrent_ratio, TARGET_CONCURRENT)}"
        )
    summary = []
    if 3 in figures:
        for cache, target in (("cold", TARGET_COLD), ("warm", TARGET_WARM)):
            figure = bench.zip_figures.get((default, cache))
            summary.append(f"{cache} {verdict(figure.ratio if figure is not None else None, target)}")
    if concurrent is not None:
        summary.append(f"{CONCURRENT} concurrent {verdict(concurrent_ratio, TARGET_CONCURRENT)}")
    if summary:
        print(f"  with the default settings ({default.name}): {'; '.join(summary)}")

    print_cpu_limits(bench, configs, default, baseline, concurrent)

    print(f"\nload average {os.getloadavg()[0]:.2f} at the end; {time.monotonic() - started:.0f} s in all")
    if bench.failures:
        print(f"\nFAILED: {len(bench.failures)} figure(s) are not figures (server logs kept in {logdir}):")
        shown: set[Path] = set()
        for figure in bench.failures:
            print(f"- {figure.number} {figure.label}: {figure.failure}")
            if figure.log_path is not None and figure.log_path in shown:
                print(f"  server log: {figure.log_path.name}, as above")
            elif figure.log_path is not None:
                shown.add(figure.log_path)
                print(
                    f"  server log {figure.log_path.name}, last lines:\n    "
                    + figure.log.replace("\n", "\n    ")
                )
        sys.exit(1)
    print(
        "verified: every timed response had status 200 and the expected byte count and Content-Length; "
        "every body's bytes were checked once before timing (see --help)."
    )


if __name__ == "__main__":
    main()
