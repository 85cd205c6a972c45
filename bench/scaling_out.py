#!/usr/bin/env python3
"""Scaling out: S3 folders as ZIPs from moto, ranges with a warm and a cold CRC-32 store, and
what a shared store (PostgreSQL) costs against an SQLite file.

    .venv/bin/python bench/scaling_out.py                       # the three parts, about 2 minutes
    .venv/bin/python bench/scaling_out.py --parts 3             # only the stores
    .venv/bin/python bench/scaling_out.py --objects 8 --repeat 1 --ranges 2 --small-files 2000  # smoke run

Every server is a real gunicorn (gthread, one worker, --threads threads, on 127.0.0.1) serving
bench/apps/middleware_app.py: ZipMiddleware from a TOML file of this run with the built-in
``s3`` resolver (``/s3/<path:subpath>``) and ``directory`` resolver (``/files/<path:subpath>``),
and a CRC-32 store (``crc_cache``) of its own. curl is the client; times are curl's
``time_total``. S3 is moto's server (``moto.server.ThreadedMotoServer``, as tests/s3.py starts
it, with the same fake credentials) in a process of its own, so that its CPU can be measured
and it does not share a GIL with the benchmark; the objects live in its memory.

1. S3 folder ZIP. --objects random objects of --size-mib MiB below ``folder/`` and one object
   ``big.bin`` of all of them end to end. Cases, each the median of --repeat rounds:
     boto3, one after another   the baseline: this process reads the objects with get_object to
                                the end, one after another, as a naive server would (botocore
                                checks each one's CRC-32 as it ends);
     boto3, 5 at once           the same with 5 threads: what prefetch 4 keeps open;
     boto3, big.bin             the one large object;
     big.bin, SourceTarget      the large object sent as it is by the middleware;
     ZIP, prefetch 0 / 4        the folder as a stored ZIP (a server per prefetch value).
   Before its rounds, each middleware case downloads once to disk and checks it: the ZIP read
   with zipfile (names in order, sizes, CRC-32s, sha256 of every entry), big.bin by its sha256;
   every round must have status 200 and that length. Figures: MB/s (1 MB = 10**6 bytes of the
   response), x boto3 (MB/s over the baseline's), the worker's RSS growth (VmHWM after a round,
   reset before it, minus VmRSS before it; the highest of the rounds), and the CPU of the worker,
   of moto's process and of the whole machine over the round's time (100% = one core).

2. Ranges late in the S3 ZIP, through a counting proxy (tests/origin.py's FaultProxy, threads
   of this process, no faults) between the worker and moto:
     -1000               ``bytes=-1000``: the end record and the last central records, which
                         need the CRC-32s of the last 15 or so entries;
     central directory   from the directory's first record to the end (what a remote ZIP
                         reader asks for after the end record): every entry's CRC-32;
     1 MiB across ...    the end of the second-to-last entry's data, its descriptor (its CRC-32)
                         and the start of the last entry.
   Warm: a server whose store one full download filled (checked with zipfile), --ranges times.
   Cold: --ranges times, each on a new server with an empty store; the default
   ``cold_range_limit`` (64 MiB) applies, so a range needing more is answered with the whole
   archive (200). Figures: the status, curl's time (median), and what the worker asked moto for
   (GetObject requests and the body bytes moto sent for them; the metadata requests, HeadObject
   and ListObjectsV2, counted apart). Every 206 body equals that slice of the checked archive,
   every 200 body that archive.

3. The shared store's cost: folders of --small-files and of 300 files of 1 KiB on disk, the
   ``directory`` resolver, for each store: ``:memory:`` (the baseline: no store), an SQLite file
   and PostgreSQL (a throwaway server on 127.0.0.1 from tests/postgres.py, ``-F``: no fsync).
   Per store a new server: one full download with the store empty (it also walks the folders;
   the plan is cached for the next requests), then --repeat full downloads with the store warm,
   and --ranges of ``bytes=-1000`` and of the whole central directory (as in part 2). The first
   download of each folder is read with zipfile (names, sha256 of every entry); every other full
   download must have the same sha256 (also across stores), every range that slice of it.

Timings are figures, not assertions; wrong bytes (or a failed request) make the script exit
with status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
APPS = PROJECT / "bench" / "apps"
if str(PROJECT) not in sys.path:
    sys.path.insert(0, str(PROJECT))

import zipmiddleware  # noqa: E402

# Measured the same way as the remote-sources benchmark.
from bench.remote_sources import machine_busy, own_cpu, vm_rss, wait_idle  # noqa: E402
from tests.origin import FaultProxy  # noqa: E402
from tests.postgres import PostgresServer, find_bindir, free_port  # noqa: E402
from tests.s3 import client as s3_client  # noqa: E402
from tests.s3 import fake_credentials, make_bucket  # noqa: E402
from tests.servers import GunicornServer, cpu_seconds, peak_memory, reset_peak_memory  # noqa: E402

MB = 10**6
KIB = 1 << 10
MIB = 1 << 20
TAIL = 1000  # Range: bytes=-1000
PARALLEL = 5  # boto3 reads at once: prefetch 4 keeps the entry being sent and 4 more open
FEW_FILES = 300
SMALL_SIZE = KIB
CURL_TIMEOUT = 600.0
MOTO_START_TIMEOUT = 30.0
# Plans of folders are cached only when everything they saw is older than this (README, The plan cache).
PLAN_AGE = 3.5

MOTO_MAIN = """\
import logging, sys
from moto.server import ThreadedMotoServer
logging.getLogger("werkzeug").setLevel(logging.WARNING)
server = ThreadedMotoServer(ip_address="127.0.0.1", port=int(sys.argv[1]), verbose=False)
server.start()
sys.stdin.read()  # until the benchmark closes it
server.stop()
"""


# -- measuring ------------------------------------------------------------------------------


def children_cpu() -> float:
    """CPU of this process's children that have ended and been waited for (curl, once it ends)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as file:
        while data := file.read(MIB):
            digest.update(data)
    return digest.hexdigest()


@dataclass
class Curl:
    returncode: int
    status: int
    size: int
    seconds: float  # curl's time_total
    error: str

    def problem(self, statuses: tuple[int, ...], size: int | None = None) -> str | None:
        if self.returncode or self.status not in statuses or (size is not None and self.size != size):
            return f"curl {self.returncode}, HTTP {self.status}, {self.size} bytes: {self.error}"
        return None


def curl(url: str, output: str | Path = "/dev/null", headers: dict[str, str] | None = None) -> Curl:
    command = [
        "curl",
        "-sS",
        "--fail",
        "-o",
        str(output),
        "-w",
        "%{http_code} %{size_download} %{time_total}",
    ]
    for name, value in (headers or {}).items():
        command += ["-H", f"{name}: {value}"]
    result = subprocess.run([*command, url], capture_output=True, text=True, timeout=CURL_TIMEOUT)
    fields = result.stdout.split()
    if len(fields) != 3:
        return Curl(result.returncode or 1, 0, 0, 0.0, result.stderr.strip() or result.stdout)
    return Curl(result.returncode, int(fields[0]), int(fields[1]), float(fields[2]), result.stderr.strip())


@dataclass
class Round:
    seconds: float
    size: int
    rss_growth: int | None = None  # bytes; None: no worker (boto3 in this process)
    reader_cpu: float = 0.0  # seconds: the worker's, or this process's (boto3)
    curl_cpu: float = 0.0  # seconds: this process's children that ended during the round (curl)
    moto_cpu: float = 0.0
    machine_cpu: float = 0.0

    @property
    def mbps(self) -> float:
        return self.size / MB / self.seconds


@dataclass
class Meter:
    """CPU of the reader (a worker, else this process), of curl, of moto and of the machine, and the
    worker's memory, around a round."""

    worker: int | None
    moto: int
    started: dict[str, float] = field(default_factory=dict)
    rss_before: int = 0

    def __enter__(self) -> Meter:
        if self.worker is not None:
            reset_peak_memory(self.worker)
            self.rss_before = vm_rss(self.worker)
        self.started["reader"] = cpu_seconds(self.worker) if self.worker is not None else own_cpu()
        self.started["children"] = children_cpu()
        self.started["moto"] = cpu_seconds(self.moto)
        self.started["machine"] = machine_busy()
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def round(self, seconds: float, size: int) -> Round:
        found = Round(seconds, size)
        found.moto_cpu = cpu_seconds(self.moto) - self.started["moto"]
        found.machine_cpu = machine_busy() - self.started["machine"]
        found.curl_cpu = children_cpu() - self.started["children"]
        reader = cpu_seconds(self.worker) if self.worker is not None else own_cpu()
        found.reader_cpu = reader - self.started["reader"]
        if self.worker is not None:
            found.rss_growth = peak_memory(self.worker) - self.rss_before
        return found


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def cpu_share(rounds: list[Round], seconds: Callable[[Round], float]) -> str:
    """The median over ``rounds`` of CPU ``seconds`` per second of the round, as a percentage."""
    return f"{median([seconds(r) / r.seconds for r in rounds]):.0%}"


def print_table(titles: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> None:
    """Columns right-aligned, except the first (left) and the last (as it is)."""
    widths = [max(len(title), *(len(row[i]) for row in rows)) for i, title in enumerate(titles)]
    for row in (titles, *rows):
        cells = [f"{row[0]:<{widths[0]}}"]
        cells += [f"{cell:>{width}}" for cell, width in zip(row[1:-1], widths[1:-1], strict=True)]
        print("  ".join([*cells, row[-1]]).rstrip())


# -- servers --------------------------------------------------------------------------------


class Moto:
    """moto's S3 server in a process of its own (this process's environment: fake credentials)."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def __enter__(self) -> Moto:
        self.port = free_port()
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-c", MOTO_MAIN, str(self.port)],
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + MOTO_START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto exited during start-up:\n{self.log.read_text(errors='replace')}")
            try:
                with urllib.request.urlopen(f"{self.url}/moto-api/", timeout=2):
                    return self
            except urllib.error.HTTPError:  # an answer all the same
                return self
            except OSError:
                if time.monotonic() > deadline:
                    self.__exit__()
                    raise RuntimeError(f"moto did not answer within {MOTO_START_TIMEOUT:g} s") from None
                time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        with contextlib.suppress(OSError):
            assert process.stdin is not None
            process.stdin.close()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    return json.dumps(str(value))  # a JSON string is a TOML basic string


def write_config(path: Path, settings: dict[str, object], routes: dict[str, dict[str, str]]) -> None:
    lines = ["[zipmiddleware]", *(f"{name} = {toml_value(value)}" for name, value in settings.items())]
    lines += ["", "[zipmiddleware.routes]"]
    for rule, table in routes.items():
        inline = ", ".join(f"{name} = {toml_value(value)}" for name, value in table.items())
        lines.append(f"{json.dumps(rule)} = {{ {inline} }}")
    path.write_text("\n".join(lines) + "\n")


class Run:
    """What the parts share: arguments, a scratch folder, the problems found."""

    def __init__(self, args: argparse.Namespace, scratch: Path) -> None:
        self.args = args
        self.scratch = scratch
        self.failures: list[str] = []
        self.counter = 0

    def fresh(self, suffix: str) -> Path:
        self.counter += 1
        return self.scratch / f"{self.counter:03d}-{suffix}"

    def server(self, settings: dict[str, object], routes: dict[str, dict[str, str]]) -> GunicornServer:
        """A gunicorn of the middleware with these settings and routes (not started)."""
        toml = self.fresh("zipmiddleware.toml")
        write_config(toml, settings, routes)
        return GunicornServer(
            "middleware_app:app",
            pythonpath=[APPS],
            env={"ZM_BENCH_CONFIG": str(toml)},
            threads=self.args.threads,
        )

    def fail(self, where: str, problem: str | list[str] | None) -> bool:
        """Record ``problem`` (if any) as a failure of ``where``; whether there was one."""
        problems = [problem] if isinstance(problem, str) else problem or []
        self.failures += [f"{where}: {text}" for text in problems]
        return bool(problems)


def central_directory(archive: zipfile.ZipFile) -> int:
    """Where the central directory of an opened archive starts (its first record's offset)."""
    return int(archive.start_dir)  # set by zipfile as it opens one (not documented)


def verify_zip(path: Path, digests: dict[str, str], sizes: dict[str, int]) -> list[str]:
    """What is wrong with the archive at ``path``: its entries must be ``digests``' names in
    order (sorted), stored, with those sizes and sha256s (zipfile checks every CRC-32)."""
    problems = []
    names = sorted(digests)
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            listed = [info.filename for info in infos]
            if listed != names:
                problems.append(
                    f"entries {listed[:3]}... ({len(listed)}), not the {len(names)} expected in order"
                )
            for info in infos:
                if info.filename not in digests:
                    continue
                if info.file_size != sizes[info.filename] or info.compress_type != zipfile.ZIP_STORED:
                    problems.append(f"{info.filename}: size {info.file_size}, method {info.compress_type}")
                digest = hashlib.sha256()
                with archive.open(info) as entry:
                    while data := entry.read(MIB):
                        digest.update(data)
                if digest.hexdigest() != digests[info.filename]:
                    problems.append(f"{info.filename}: sha256 differs")
                if len(problems) > 5:
                    break
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        problems.append(f"zipfile: {error!r}")
    return problems


# -- part 1: an S3 folder as a ZIP ---------------------------------------------------------------


@dataclass
class S3Data:
    bucket: str
    keys: list[str]  # folder/f000.bin ...
    digests: dict[str, str]  # entry name -> sha256
    sizes: dict[str, int]
    big_key: str
    big_size: int
    big_digest: str


def upload(endpoint: str, objects: int, size: int) -> S3Data:
    blobs = [os.urandom(size) for _ in range(objects)]
    names = [f"f{index:03d}.bin" for index in range(objects)]
    files = {f"folder/{name}": blob for name, blob in zip(names, blobs, strict=True)}
    big = b"".join(blobs)
    files["big.bin"] = big
    bucket = make_bucket(endpoint, files)
    return S3Data(
        bucket,
        [f"folder/{name}" for name in names],
        {name: hashlib.sha256(blob).hexdigest() for name, blob in zip(names, blobs, strict=True)},
        dict.fromkeys(names, size),
        "big.bin",
        len(big),
        hashlib.sha256(big).hexdigest(),
    )


def boto3_rounds(run: Run, moto: Moto, data: S3Data, keys: list[str], threads: int) -> list[Round]:
    """``keys`` read to the end by get_object in this process, ``threads`` at once."""
    client = s3_client(moto.url)

    def read(key: str) -> int:
        body = client.get_object(Bucket=data.bucket, Key=key)["Body"]
        got = 0
        while chunk := body.read(MIB):
            got += len(chunk)
        return got

    expected = data.big_size if keys == [data.big_key] else sum(data.sizes.values())
    read(keys[0])  # the client's first call (credentials, endpoint) is not timed
    rounds = []
    for _ in range(run.args.repeat):
        with Meter(None, moto.pid) as meter:
            started = time.perf_counter()
            if threads == 1:
                got = sum(read(key) for key in keys)
            else:
                with ThreadPoolExecutor(threads) as pool:
                    got = sum(pool.map(read, keys))
            found = meter.round(time.perf_counter() - started, got)
        if got != expected:
            run.fail("boto3", f"{got} bytes read, not {expected}")
            continue
        rounds.append(found)
    return rounds


def middleware_rounds(
    run: Run, server: GunicornServer, moto: Moto, path: str, check: Callable[[Path], list[str]]
) -> tuple[list[Round], Path | None]:
    """One download of ``path`` to disk, checked, then --repeat timed ones to /dev/null.
    Returns the rounds and the checked download (None if it failed)."""
    url = server.url + path
    output = run.fresh(Path(path).name)
    got = curl(url, output)
    if run.fail(path, got.problem((200,))) or run.fail(path, check(output)):
        return [], None
    rounds = []
    for _ in range(run.args.repeat):
        with Meter(server.worker_pid, moto.pid) as meter:
            timed = curl(url)
            found = meter.round(timed.seconds, timed.size)
        if not run.fail(path, timed.problem((200,), got.size)):
            rounds.append(found)
    return rounds, output


def part_s3_zip(run: Run, moto: Moto, data: S3Data) -> None:
    args = run.args
    print(f"\n1. S3 folder ZIP: {len(data.keys)} objects x {args.size_mib:g} MiB from moto", flush=True)
    cases: dict[str, list[Round]] = {}
    cases["boto3 get_object, one after another (baseline)"] = boto3_rounds(run, moto, data, data.keys, 1)
    cases[f"boto3 get_object, {PARALLEL} at once"] = boto3_rounds(run, moto, data, data.keys, PARALLEL)
    cases["boto3 get_object, big.bin (one object)"] = boto3_rounds(run, moto, data, [data.big_key], 1)

    def check_big(path: Path) -> list[str]:
        return [] if sha256_file(path) == data.big_digest else ["big.bin: sha256 differs"]

    def check_zip(path: Path) -> list[str]:
        return verify_zip(path, data.digests, data.sizes)

    routes = {"/s3/<path:subpath>": {"resolver": "s3", "bucket": data.bucket, "endpoint_url": moto.url}}
    archive_size = 0
    for prefetch in (0, 4):
        settings: dict[str, object] = {"crc_cache": run.fresh("crc32.sqlite"), "prefetch": prefetch}
        with run.server(settings, routes) as server:
            if prefetch == 4:
                rounds, output = middleware_rounds(run, server, moto, "/s3/big.bin", check_big)
                cases["middleware, big.bin (SourceTarget)"] = rounds
                if output:
                    output.unlink()
            rounds, output = middleware_rounds(run, server, moto, "/s3/folder", check_zip)
            cases[f"middleware, folder ZIP, prefetch {prefetch}"] = rounds
            if output:
                archive_size = output.stat().st_size
                output.unlink()
        print(f"  prefetch {prefetch}: done", flush=True)

    base = cases["boto3 get_object, one after another (baseline)"]
    base_mbps = median([r.mbps for r in base]) if base else None
    rows = []
    for label, rounds in cases.items():
        if not rounds:
            rows.append((label, *["-"] * 9, "no good round"))
            continue
        mbps = median([r.mbps for r in rounds])
        growths = [r.rss_growth for r in rounds if r.rss_growth is not None]

        rows.append(
            (
                label,
                f"{median([r.seconds for r in rounds]):.2f}",
                f"{mbps:,.0f}",
                f"{mbps / base_mbps:.2f}" if base_mbps else "-",
                f"{max(growths) / MB:.1f}" if growths else "-",
                cpu_share(rounds, lambda r: r.reader_cpu),
                cpu_share(rounds, lambda r: r.curl_cpu) if growths else "-",
                cpu_share(rounds, lambda r: r.moto_cpu),
                cpu_share(rounds, lambda r: max(0.0, r.machine_cpu - r.reader_cpu - r.curl_cpu - r.moto_cpu)),
                cpu_share(rounds, lambda r: r.machine_cpu),
                ", ".join(f"{r.seconds:.2f}" for r in rounds),
            )
        )
    print()
    titles = (
        "case",
        "seconds",
        "MB/s",
        "x boto3",
        "RSS MB",
        "reader CPU",
        "curl",
        "moto",
        "other",
        "all CPU",
        "runs: s",
    )
    print_table(titles, rows)
    cores = os.cpu_count() or 1
    print(
        f"\nmedian of {args.repeat}; MB/s = response bytes / curl's time_total (boto3: bytes read / wall time); "
        f"ZIP {archive_size / MB:,.1f} MB,\nobjects {sum(data.sizes.values()) / MB:,.1f} MB; x boto3 = MB/s "
        "over the baseline's; RSS MB = the worker's VmHWM after a round minus its\nVmRSS before (the highest "
        "of the rounds); CPU over the round's time, 100% = one core: reader = the gunicorn worker\n(boto3 rows: "
        "this process), curl, moto = moto's process, other = the rest of the machine's busy time (the\nkernel's "
        f"own threads, anything else running), all = the machine's {cores} cores ({cores * 100}% = all busy);\n"
        "CPU times are counted in the kernel's ticks (10 ms)."
    )


# -- part 2: a range late in the ZIP, warm and cold ----------------------------------------------


@dataclass
class Ranged:
    status: int
    seconds: float
    size: int
    gets: int  # GetObject requests the worker made
    get_bytes: int  # body bytes moto sent for them
    others: int  # HeadObject, ListObjectsV2


def ranged_request(
    run: Run, server: GunicornServer, proxy: FaultProxy, bucket: str, spec: str, expected: bytes, whole: str
) -> Ranged | None:
    """One ``Range: bytes=spec`` of the folder's ZIP; its body must be ``expected`` (a 206) or the
    whole archive of sha256 ``whole`` (a 200)."""
    wait_idle(proxy)
    proxy.reset_counters()
    output = run.fresh("range.bin")
    got = curl(server.url + "/s3/folder", output, {"Range": f"bytes={spec}"})
    wait_idle(proxy)
    where = f"range {spec}"
    try:
        if run.fail(where, got.problem((200, 206))):
            return None
        if got.status == 206 and output.read_bytes() != expected:
            run.fail(where, "the 206 body differs from that slice of the archive")
            return None
        if got.status == 200 and sha256_file(output) != whole:
            run.fail(where, "the 200 body differs from the archive")
            return None
    finally:
        output.unlink(missing_ok=True)
    requests = proxy.requests
    gets = [r for r in requests if r.method == "GET" and r.path.startswith(f"/{bucket}/")]
    return Ranged(
        got.status,
        got.seconds,
        got.size,
        len(gets),
        sum(r.bytes_sent for r in gets),
        len(requests) - len(gets),
    )


def part_ranges(run: Run, moto: Moto, data: S3Data) -> None:
    args = run.args
    print(f"\n2. Ranges late in the S3 ZIP: warm and cold store, median of {args.ranges}", flush=True)
    results: dict[tuple[str, str], list[Ranged]] = {}
    with FaultProxy(moto.url) as proxy:
        routes = {"/s3/<path:subpath>": {"resolver": "s3", "bucket": data.bucket, "endpoint_url": proxy.url}}
        with run.server({"crc_cache": run.fresh("crc32.sqlite")}, routes) as server:
            archive = run.fresh("warm-up.zip")
            got = curl(server.url + "/s3/folder", archive)
            if run.fail("warm-up download", got.problem((200,))) or run.fail(
                "warm-up download", verify_zip(archive, data.digests, data.sizes)
            ):
                return
            content = archive.read_bytes()
            archive.unlink()
            whole = hashlib.sha256(content).hexdigest()
            with zipfile.ZipFile(io.BytesIO(content)) as opened:
                last = opened.infolist()[-1].header_offset
                directory = central_directory(opened)
            start = last - MIB // 2
            ranges = {
                f"-{TAIL}": (f"-{TAIL}", content[-TAIL:]),
                "central directory": (f"{directory}-", content[directory:]),
                "1 MiB across the last two entries": (
                    f"{start}-{start + MIB - 1}",
                    content[start : start + MIB],
                ),
            }
            for label, (spec, expected) in ranges.items():
                found = [
                    ranged_request(run, server, proxy, data.bucket, spec, expected, whole)
                    for _ in range(args.ranges)
                ]
                results[(label, "warm")] = [r for r in found if r]
        for label, (spec, expected) in ranges.items():
            found = []
            for _ in range(args.ranges):
                with run.server({"crc_cache": run.fresh("crc32.sqlite")}, routes) as server:
                    found.append(ranged_request(run, server, proxy, data.bucket, spec, expected, whole))
            results[(label, "cold")] = [r for r in found if r]
            print(f"  {label}, cold: done", flush=True)

    rows = []
    for (label, store), rounds in results.items():
        if not rounds:
            rows.append((label, store, *["-"] * 7, "no good round"))
            continue
        warm = results.get((label, "warm"))
        ms = median([r.seconds * 1000 for r in rounds])
        warm_ms = median([r.seconds * 1000 for r in warm]) if warm else None
        rows.append(
            (
                label,
                store,
                ",".join(str(s) for s in sorted({r.status for r in rounds})),
                f"{ms:,.1f}",
                f"{ms / warm_ms:,.1f}" if warm_ms else "-",
                f"{median([r.size for r in rounds]):,.0f}",
                f"{median([r.gets for r in rounds]):g}",
                f"{median([r.get_bytes for r in rounds]) / MB:,.2f}",
                f"{median([r.others for r in rounds]):g}",
                ", ".join(f"{r.seconds * 1000:.0f}" for r in rounds),
            )
        )
    print()
    titles = (
        "range",
        "store",
        "status",
        "ms",
        "x warm",
        "bytes sent",
        "GetObject",
        "MB from moto",
        "other req",
        "runs: ms",
    )
    print_table(titles, rows)
    print(
        f"\nms = curl's time_total, median of {args.ranges}; bytes sent = the response body; GetObject = the "
        "worker's object reads and MB\nfrom moto the bytes moto sent for them (the proxy's count); other req = "
        "HeadObject and ListObjectsV2 (every request\nresolves the folder again). Warm: one server, its store "
        "filled by one full download; cold: a new server with an\nempty store for each request, default "
        "cold_range_limit (64 MiB: a range needing more gets the whole archive, 200).\n-1000 needs the last "
        "central records' CRC-32s, the central directory every CRC-32, the 1 MiB range the second-to-last\n"
        "entry's. Everything passes the counting proxy (Python threads of this process)."
    )


# -- part 3: the shared store's cost ----------------------------------------------------------


def build_small(folder: Path, count: int) -> tuple[dict[str, str], dict[str, int]]:
    """``count`` random files of 1 KiB in folders of 1,000; their sha256 and sizes by relative path."""
    digests, sizes = {}, {}
    for index in range(count):
        relative = f"d{index // 1000:03d}/f{index:05d}.bin"
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        data = os.urandom(SMALL_SIZE)
        path.write_bytes(data)
        digests[relative] = hashlib.sha256(data).hexdigest()
        sizes[relative] = SMALL_SIZE
    return digests, sizes


@dataclass
class StoreFigures:
    first: float  # seconds: the full download with the store empty
    full: list[float] = field(default_factory=list)
    ranges: dict[str, list[float]] = field(default_factory=dict)  # seconds by range label


@contextlib.contextmanager
def postgres() -> Iterator[PostgresServer | None]:
    bindir = find_bindir()
    if bindir is None:
        print(
            "  PostgreSQL server binaries not found (Debian: apt-get install postgresql): its row is left out"
        )
        yield None
        return
    server = PostgresServer(bindir).start()
    try:
        yield server
    finally:
        server.stop()


def part_stores(
    run: Run, root: Path, folders: dict[str, tuple[dict[str, str], dict[str, int]]], built: float
) -> None:
    args = run.args
    print(
        f"\n3. The store's cost: folders of small files on disk, median of {args.repeat} / {args.ranges}",
        flush=True,
    )
    if (wait := built + PLAN_AGE - time.time()) > 0:
        time.sleep(wait)  # so that the first walk's plan is cached, as it would be for files not just written
    routes = {"/files/<path:subpath>": {"resolver": "directory", "root": str(root)}}
    archives: dict[str, tuple[str, bytes]] = {}  # folder -> sha256, the archive
    results: dict[tuple[str, str], StoreFigures] = {}
    labels = (f"-{TAIL}", "directory")
    with postgres() as database:
        stores: dict[str, str] = {
            ":memory: (baseline)": ":memory:",
            "SQLite file": str(run.fresh("crc32.sqlite")),
        }
        if database is not None:
            stores["PostgreSQL"] = database.url()
        for store, crc_cache in stores.items():
            with run.server({"crc_cache": crc_cache}, routes) as server:
                for folder, (digests, sizes) in folders.items():
                    where = f"{store}, {folder}"
                    figures = store_rounds(
                        run, server.url + f"/files/{folder}", where, digests, sizes, archives
                    )
                    if figures is not None:
                        results[(folder, store)] = figures
            print(f"  {store}: done", flush=True)

    rows = []
    baseline = next(iter(stores))
    for folder in folders:
        for store in stores:
            figures = results.get((folder, store))
            if figures is None:
                continue
            base = results.get((folder, baseline))
            cells = [
                f"{folder}: {store}",
                f"{len(archives[folder][1]) / MB:,.1f}",
                f"{figures.first * 1000:,.0f}",
            ]
            runs = []
            for label, mine, theirs in (
                ("full", figures.full, base.full if base else []),
                *((label, figures.ranges[label], base.ranges[label] if base else []) for label in labels),
            ):
                ms = median(mine) * 1000 if mine else None
                base_ms = median(theirs) * 1000 if theirs else None
                cells.append("-" if ms is None else f"{ms:,.0f}" if ms >= 100 else f"{ms:,.1f}")
                cells.append(f"{ms / base_ms:.2f}" if ms and base_ms else "-")
                runs.append(f"{label} " + ", ".join(f"{seconds * 1000:.0f}" for seconds in mine))
            rows.append((*cells, "; ".join(runs)))
    print()
    titles = (
        "folder: store",
        "ZIP MB",
        "first ms",
        "full ms",
        "x mem",
        f"-{TAIL} ms",
        "x mem",
        "directory ms",
        "x mem",
        "runs: ms",
    )
    print_table(titles, rows)
    print(
        "\nms = curl's time_total. first = the first full download (the store empty: every CRC-32 computed and "
        f"written;\nthe folder walked); full = median of {args.repeat} full downloads with the store warm; "
        f"-{TAIL} = Range: bytes=-{TAIL}\n(the last central records: the CRC-32s of the last 15 or so entries); "
        "directory = the range from the central\ndirectory's start to the end (what a remote ZIP reader asks "
        f"for: every CRC-32 from the store); ranges: median\nof {args.ranges}; x mem = over the :memory: "
        "store's (each worker's own dict: no store at all). PostgreSQL runs on\nthis machine (-F: no fsync)."
    )


def store_rounds(
    run: Run,
    url: str,
    where: str,
    digests: dict[str, str],
    sizes: dict[str, int],
    archives: dict[str, tuple[str, bytes]],
) -> StoreFigures | None:
    """The first full download (checked with zipfile the first time a folder is served, else
    against that archive), --repeat full downloads and --ranges of each range, all checked."""
    folder = url.rsplit("/", 1)[1]
    output = run.fresh(f"{folder}.zip")
    try:
        got = curl(url, output)
        if run.fail(where, got.problem((200,))):
            return None
        digest = sha256_file(output)
        if folder not in archives:
            if run.fail(where, verify_zip(output, digests, sizes)):
                return None
            archives[folder] = (digest, output.read_bytes())
        elif digest != archives[folder][0]:
            run.fail(where, "the archive differs from the first store's")
            return None
        figures = StoreFigures(got.seconds)
        content = archives[folder][1]
        for _ in range(run.args.repeat):
            got = curl(url, output)
            if run.fail(where, got.problem((200,), len(content))):
                continue
            if sha256_file(output) != digest:
                run.fail(where, "a full download differs from the verified one")
                continue
            figures.full.append(got.seconds)
        with zipfile.ZipFile(io.BytesIO(content)) as opened:
            directory = central_directory(opened)
        ranges = {
            f"-{TAIL}": (f"-{TAIL}", content[-TAIL:]),
            "directory": (f"{directory}-", content[directory:]),
        }
        for label, (spec, expected) in ranges.items():
            figures.ranges[label] = []
            for _ in range(run.args.ranges):
                got = curl(url, output, {"Range": f"bytes={spec}"})
                if run.fail(f"{where}, range {spec}", got.problem((206,), len(expected))):
                    continue
                if output.read_bytes() != expected:
                    run.fail(f"{where}, range {spec}", "differs from that slice of the archive")
                    continue
                figures.ranges[label].append(got.seconds)
        return figures
    finally:
        output.unlink(missing_ok=True)


# -- main -----------------------------------------------------------------------------------


def part_list(text: str) -> set[int]:
    try:
        values = {int(part) for part in text.split(",") if part.strip()}
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of parts: {text!r}") from None
    if not values or not values <= {1, 2, 3}:
        raise argparse.ArgumentTypeError("parts are 1, 2 and 3")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--objects", type=int, default=40, help="objects in the S3 folder (default 40)")
    parser.add_argument("--size-mib", type=float, default=4, help="size of each object in MiB (default 4)")
    parser.add_argument("--repeat", type=int, default=3, help="timed downloads per case (default 3)")
    parser.add_argument("--ranges", type=int, default=5, help="timed ranges per case (default 5)")
    parser.add_argument(
        "--small-files",
        type=int,
        default=20_000,
        help="files of 1 KiB in part 3's big folder (default 20000)",
    )
    parser.add_argument("--threads", type=int, default=8, help="gunicorn gthread threads (default 8)")
    parser.add_argument(
        "--parts", type=part_list, default={1, 2, 3}, help="which parts, e.g. 1,3 (default 1,2,3)"
    )
    args = parser.parse_args()
    size = int(args.size_mib * MIB)
    if (
        min(args.objects, size, args.repeat, args.ranges, args.small_files, args.threads) < 1
        or args.objects < 2
    ):
        parser.error(
            "every number must be positive, and --objects at least 2 (a folder of one is sent as it is)"
        )
    if shutil.which("curl") is None:
        raise SystemExit("error: curl is not installed (Debian: apt-get install curl)")

    import moto

    print(
        f"python {platform.python_version()}, {os.cpu_count()} CPUs, zipmiddleware {zipmiddleware.__version__}, "
        f"moto {moto.__version__}, gunicorn gthread 1 worker x {args.threads} threads, "
        f"load average {os.getloadavg()[0]:.2f} at the start",
        flush=True,
    )
    scratch = Path(tempfile.mkdtemp(prefix="zipmiddleware-scaling-"))
    run = Run(args, scratch)
    started = time.perf_counter()
    try:
        with fake_credentials():
            folders: dict[str, tuple[dict[str, str], dict[str, int]]] = {}
            root = scratch / "files"
            built = time.time()
            if 3 in args.parts:
                for count in (args.small_files, FEW_FILES):
                    folders[f"small{count}"] = build_small(root / f"small{count}", count)
                built = time.time()
            if args.parts & {1, 2}:
                with Moto(scratch / "moto.log") as moto_server:
                    began = time.perf_counter()
                    data = upload(moto_server.url, args.objects, size)
                    print(
                        f"moto on {moto_server.url} (pid {moto_server.pid}): {args.objects} x {args.size_mib:g} MiB "
                        f"and big.bin uploaded in {time.perf_counter() - began:.1f} s",
                        flush=True,
                    )
                    if 1 in args.parts:
                        part_s3_zip(run, moto_server, data)
                    if 2 in args.parts:
                        part_ranges(run, moto_server, data)
            if 3 in args.parts:
                part_stores(run, root, folders, built)
        print(
            f"\n{time.perf_counter() - started:.0f} s in all; load average {os.getloadavg()[0]:.2f} at the end"
        )
        if run.failures:
            print(f"\nWRONG: {len(run.failures)} problem(s):")
            for failure in run.failures:
                print(f"  {failure}")
            sys.exit(1)
        print("verified: every archive, object and range had the expected bytes (see the module doc).")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
