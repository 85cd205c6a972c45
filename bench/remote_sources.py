#!/usr/bin/env python3
"""Remote entries (UrlSource) behind a slow origin: what prefetch buys, and what it costs in memory.

    .venv/bin/python bench/remote_sources.py                    # 200 x 4 MiB, 50 ms, prefetch 0,1,2,4,8
    .venv/bin/python bench/remote_sources.py --files 40 --repeat 1 --prefetch 0,4   # smoke run
    .venv/bin/python bench/remote_sources.py --delay 0.2 --keep

The data set is --files random files of --size-mib MiB (f000.bin, ...), built once in --dir
(default: a folder in the temp dir) and reused when present; --keep keeps one this run built.

The origin is a real nginx serving that folder (tests/origin.py), behind the tests' FaultProxy
(Python threads of this process) that holds every response --delay seconds before its first
byte, as a distant object store would. For each prefetch value a fresh gunicorn (gthread, one
worker, --threads threads, on 127.0.0.1) serves bench/apps/remote_app.py: ZipMiddleware whose
``/remote.zip`` is the --files files, each a ``UrlSource(url, size=...)`` on the proxy, stored,
with that ``prefetch``. curl downloads it.

Per case (prefetch value), in order:
  verify   one download saved to disk and read with zipfile: the entries' names, in order,
           and the sha256 of every entry equal the files' (zipfile checks each CRC-32 too).
           It is also the worker's warm-up (fetch threads, connections to the origin).
  rounds   --repeat downloads by curl to /dev/null, each checked for status 200, curl's
           exit status 0 and the verified length.

Figures (the median of the rounds, except where said):
  seconds  wall time of the curl process;
  MB/s     archive bytes / seconds (1 MB = 10**6 bytes);
  x p0     MB/s over prefetch 0's;
  bound    the MB/s Little's law allows: prefetch + 1 requests open at once, each taking the
           delay plus its transfer at the proxy's one-download ceiling (below), and no more
           than the proxy's aggregate ceiling. With prefetch p, entry i + p is asked for when
           entry i begins, so about p + 1 files come per (delay + transfer);
  in flight  the most requests the proxy had open at once during a round (the highest of the
           rounds); expected prefetch + 1: the entry being sent and the ones opened ahead;
  RSS MB   the worker's growth during a round: VmHWM after the download minus VmRSS before it
           (VmHWM reset with /proc/PID/clear_refs before each round); the highest of the rounds;
  worker CPU, proxy CPU   CPU time of the gunicorn worker (all its threads) and of this process
           (the proxy's threads, essentially) over the wall time: 100% is one core;
  all CPU  the whole machine's busy time (/proc/stat) over the wall time: gunicorn, the proxy,
           nginx, curl, and anything else running meanwhile; 100% per core.

Before the cases, the origin's own ceilings, by curl over the first --files (at most 50) files
one after another on one connection, without gunicorn: nginx directly, the proxy without the
delay (one download, and four at once: the proxy's threads share one GIL), each the median of
--repeat; and once, the proxy with the delay over 20 files (about the best prefetch 0 can do).

Targets: prefetch 4 >= 3x prefetch 0; RSS growth < 64 MB in every case. Timings are figures, not
assertions; wrong bytes (or a failed download) make the script exit with status 1.
"""

from __future__ import annotations

import argparse
import hashlib
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
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
APPS = PROJECT / "bench" / "apps"
if str(PROJECT) not in sys.path:
    sys.path.insert(0, str(PROJECT))

import zipmiddleware  # noqa: E402
from tests.origin import Fault, FaultProxy, start_nginx_origin  # noqa: E402
from tests.servers import GunicornServer, cpu_seconds, peak_memory, reset_peak_memory  # noqa: E402

MB = 10**6
MIB = 1 << 20
RATIO_TARGET = 3.0  # prefetch 4 against prefetch 0
RSS_TARGET_MB = 64
CEILING_FILES = 50  # files the origin's ceilings are measured over
PARALLEL = 4  # downloads at once for the proxy's aggregate ceiling
CURL_TIMEOUT = 600.0


# -- the data set ---------------------------------------------------------------------------


def data_files(folder: Path, files: int) -> list[Path]:
    return [folder / f"f{index:03d}.bin" for index in range(files)]


def build_data_set(paths: list[Path], size: int) -> int:
    """Random files of ``size`` bytes; existing ones of that size are kept. Returns how many were written."""
    built = 0
    for path in paths:
        if path.is_file() and path.stat().st_size == size:
            continue
        partial = path.with_suffix(".partial")
        with open(partial, "wb") as file:
            remaining = size
            while remaining:
                remaining -= file.write(os.urandom(min(remaining, MIB)))
        partial.replace(path)
        built += 1
    return built


def file_sha256(path: Path) -> str:
    """Also brings the file into the page cache, so that nginx serves it from memory."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as file:
        while data := file.read(MIB):
            digest.update(data)
    return digest.hexdigest()


# -- measuring ------------------------------------------------------------------------------


def vm_rss(pid: int) -> int:
    """Process ``pid``'s resident set now (VmRSS), in bytes."""
    with open(f"/proc/{pid}/status") as file:
        line = next(line for line in file if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (all cores: /proc/stat less idle and iowait)."""
    with open("/proc/stat") as file:
        ticks = [int(value) for value in file.readline().split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Curl:
    returncode: int
    status: str
    size: int
    seconds: float  # wall time of the curl process
    error: str


def curl_command(urls: list[str], output: str = "/dev/null") -> list[str]:
    """GET ``urls`` one after another on one connection, every body into ``output``."""
    command = ["curl", "-sS", "--fail", "-w", "%{http_code} %{size_download}\\n"]
    for url in urls:
        command += ["-o", output, url]
    return command


def curl_result(returncode: int, stdout: str, stderr: str, seconds: float) -> Curl:
    rows = [line.split() for line in stdout.splitlines() if line.strip()]
    status = ",".join(sorted({row[0] for row in rows}))
    return Curl(returncode, status, sum(int(row[1]) for row in rows), seconds, stderr.strip())


def curl(urls: list[str], output: str = "/dev/null") -> Curl:
    started = time.perf_counter()
    result = subprocess.run(curl_command(urls, output), capture_output=True, text=True, timeout=CURL_TIMEOUT)
    return curl_result(result.returncode, result.stdout, result.stderr, time.perf_counter() - started)


def wait_idle(proxy: FaultProxy, timeout: float = 5.0) -> None:
    """Until the proxy has counted the end of every request (a moment after the client's last byte)."""
    deadline = time.monotonic() + timeout
    while proxy.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)


@dataclass
class Ceilings:
    """The origin's throughput without the middleware, MB/s; ``failed``: what went wrong."""

    nginx: float
    proxy: float  # one download, no delay
    parallel: float  # PARALLEL downloads at once, no delay: the proxy's aggregate ceiling
    delayed: float  # one download, one file after another, with the delay
    failed: list[str]


def parallel_curls(urls: list[str], count: int) -> list[Curl]:
    """``count`` curls of ``urls`` at once; each one's seconds are until the last one ended."""
    command = curl_command(urls)
    started = time.perf_counter()
    processes = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(count)
    ]
    outputs = [process.communicate(timeout=CURL_TIMEOUT) for process in processes]
    seconds = time.perf_counter() - started
    return [
        curl_result(process.returncode, out, err, seconds)
        for process, (out, err) in zip(processes, outputs, strict=True)
    ]


def ceilings(
    origin_url: str, proxy: FaultProxy, names: list[str], delay: float, size: int, repeat: int
) -> Ceilings:
    """Median of ``repeat`` runs without the delay (they are quick), one run with it."""
    failed: list[str] = []

    def mbps(label: str, measure: Callable[[], list[Curl]], count: int, runs: int) -> float:
        figures = []
        for _ in range(runs):
            curls = measure()
            for run in curls:
                if run.returncode or run.status != "200" or run.size != count * size:
                    failed.append(f"{label}: curl {run.returncode}, HTTP {run.status}: {run.error}")
            figures.append(count * len(curls) * size / MB / max(run.seconds for run in curls))
        return statistics.median(figures)

    direct = [f"{origin_url}/{name}" for name in names]
    proxied = [f"{proxy.url}/{name}" for name in names]
    few = proxied[:20]
    proxy.default_fault = Fault()
    found = Ceilings(
        nginx=mbps("nginx", lambda: [curl(direct)], len(names), repeat),
        proxy=mbps("proxy", lambda: [curl(proxied)], len(names), repeat),
        parallel=mbps("proxy in parallel", lambda: parallel_curls(proxied, PARALLEL), len(names), repeat),
        delayed=0.0,
        failed=failed,
    )
    proxy.default_fault = Fault(first_byte_delay=delay)
    found.delayed = mbps("proxy with the delay", lambda: [curl(few)], len(few), 1)
    wait_idle(proxy)
    return found


def bound(prefetch: int, size: int, delay: float, found: Ceilings) -> float:
    """MB/s at best with ``prefetch + 1`` requests open at once, each taking the delay plus its
    transfer at the proxy's one-download ceiling (Little's law), and at most the proxy's
    aggregate ceiling. The archive's headers are left out (0.01% here)."""
    each = delay + size / MB / found.proxy
    return min((prefetch + 1) * size / MB / each, max(found.parallel, found.proxy))


@dataclass
class Round:
    seconds: float
    mbps: float
    in_flight: int
    requests: int
    rss_growth: int  # bytes
    worker_cpu: float  # seconds
    proxy_cpu: float  # seconds
    machine_cpu: float  # seconds, all cores


def verify(output: Path, names: list[str], digests: dict[str, str], size: int) -> list[str]:
    """What is wrong with the archive at ``output`` (nothing: an empty list)."""
    problems = []
    try:
        with zipfile.ZipFile(output) as archive:
            infos = archive.infolist()
            listed = [info.filename for info in infos]
            if listed != names:
                problems.append(
                    f"entries {listed[:3]}... ({len(listed)}), not the {len(names)} files in order"
                )
            for info in infos:
                if info.filename not in digests:
                    continue
                if info.file_size != size or info.compress_type != zipfile.ZIP_STORED:
                    problems.append(f"{info.filename}: size {info.file_size}, method {info.compress_type}")
                digest = hashlib.sha256()
                with archive.open(info) as entry:  # zipfile checks the CRC-32 at the end
                    while data := entry.read(MIB):
                        digest.update(data)
                if digest.hexdigest() != digests[info.filename]:
                    problems.append(f"{info.filename}: sha256 differs from the file's")
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        problems.append(f"zipfile: {error!r}")
    return problems


def run_case(
    prefetch: int,
    args: argparse.Namespace,
    proxy: FaultProxy,
    manifest: Path,
    names: list[str],
    digests: dict[str, str],
    size: int,
    scratch: Path,
) -> tuple[list[Round], int, list[str]]:
    """Start a gunicorn with this prefetch, verify one download, time --repeat ones.

    Returns the rounds, the archive's length and the problems found.
    """
    env = {
        "ZM_BENCH_ORIGIN": proxy.url,
        "ZM_BENCH_MANIFEST": str(manifest),
        "ZM_BENCH_SETTINGS": json.dumps({"prefetch": prefetch}),
    }
    problems: list[str] = []
    rounds: list[Round] = []
    with GunicornServer("remote_app:app", pythonpath=[APPS], env=env, threads=args.threads) as server:
        url = f"{server.url}/remote.zip"
        output = scratch / f"remote-p{prefetch}.zip"
        try:
            got = curl([url], str(output))
            if got.returncode or got.status != "200":
                problems.append(f"verify download: curl {got.returncode}, HTTP {got.status}: {got.error}")
                return rounds, 0, problems
            length = got.size
            problems += verify(output, names, digests, size)
        finally:
            output.unlink(missing_ok=True)
        pid = server.worker_pid
        for _ in range(args.repeat):
            wait_idle(proxy)
            proxy.reset_counters()
            reset_peak_memory(pid)
            rss_before = vm_rss(pid)
            worker_before, proxy_before, machine_before = cpu_seconds(pid), own_cpu(), machine_busy()
            got = curl([url])
            worker_cpu, proxy_cpu = cpu_seconds(pid) - worker_before, own_cpu() - proxy_before
            machine_cpu = machine_busy() - machine_before
            growth = peak_memory(pid) - rss_before
            wait_idle(proxy)
            if got.returncode or got.status != "200" or got.size != length:
                problems.append(
                    f"download: curl {got.returncode}, HTTP {got.status}, {got.size} bytes "
                    f"(not {length}): {got.error}"
                )
                continue
            requests = len(proxy.requests)
            rounds.append(
                Round(
                    got.seconds,
                    length / MB / got.seconds,
                    proxy.max_in_flight,
                    requests,
                    growth,
                    worker_cpu,
                    proxy_cpu,
                    machine_cpu,
                )
            )
    return rounds, length, problems


# -- main -----------------------------------------------------------------------------------


def prefetch_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not values or any(not 0 <= value <= 8 for value in values):
        raise argparse.ArgumentTypeError("prefetch values are 0 to 8")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=200, help="number of files (default 200)")
    parser.add_argument("--size-mib", type=float, default=4, help="size of each file in MiB (default 4)")
    parser.add_argument(
        "--delay", type=float, default=0.05, help="seconds before each response's first byte (default 0.05)"
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="timed downloads per case; medians are quoted (default 3)"
    )
    parser.add_argument(
        "--prefetch",
        type=prefetch_list,
        default=[0, 1, 2, 4, 8],
        help="comma-separated prefetch values, one case each (default 0,1,2,4,8)",
    )
    parser.add_argument("--threads", type=int, default=4, help="gunicorn gthread threads (default 4)")
    parser.add_argument("--dir", help="folder of the data set (default: a folder in the temp dir)")
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep a data set this run built, for the next run (one found in place is always kept)",
    )
    args = parser.parse_args()
    size = int(args.size_mib * MIB)
    if args.files < 1 or size < 1 or args.repeat < 1 or args.delay < 0 or args.threads < 1:
        parser.error("--files, --size-mib, --repeat and --threads must be positive, --delay not negative")
    for tool in ("curl", "nginx"):
        if shutil.which(tool) is None and not (tool == "nginx" and os.access("/usr/sbin/nginx", os.X_OK)):
            raise SystemExit(f"error: {tool} is not installed (Debian: apt-get install {tool})")

    default_dir = Path(tempfile.gettempdir()) / f"zipmiddleware-remote-{args.files}x{size}"
    folder = Path(args.dir).resolve() if args.dir else default_dir
    created = not folder.exists()
    scratch = Path(tempfile.mkdtemp(prefix="zipmiddleware-remote-run-"))
    failures: list[str] = []
    try:
        folder.mkdir(parents=True, exist_ok=True)
        paths = data_files(folder, args.files)
        needed = args.files * size
        free = shutil.disk_usage(folder).free
        if free < needed * 2 + 64 * MIB:  # the files, and one saved archive at a time
            print(f"warning: {free / MB:,.0f} MB free for {needed * 2 / MB:,.0f} MB (files and one archive)")
        started = time.perf_counter()
        built = build_data_set(paths, size)
        digests = {path.name: file_sha256(path) for path in paths}
        names = [path.name for path in paths]
        manifest = scratch / "manifest.json"
        manifest.write_text(json.dumps({name: size for name in names}))
        action = f"built {built} in" if built else "reused, hashed in"
        print(
            f"data set: {args.files} x {size / MIB:g} MiB random files in {folder} "
            f"({action} {time.perf_counter() - started:.1f} s)"
        )
        print(
            f"python {platform.python_version()}, {os.cpu_count()} CPUs, zipmiddleware "
            f"{zipmiddleware.__version__}, gunicorn gthread 1 worker x {args.threads} threads, "
            f"delay {args.delay * 1000:g} ms, median of {args.repeat}"
        )

        origin = start_nginx_origin(folder, scratch / "nginx")
        try:
            with FaultProxy(origin.url) as proxy:
                count = min(CEILING_FILES, len(names))
                found = ceilings(origin.url, proxy, names[:count], args.delay, size, args.repeat)
                print(
                    f"\norigin ceilings (curl, {count} files in a row, no middleware, median of {args.repeat}):"
                )
                for label, value in (
                    ("nginx directly, one download", found.nginx),
                    ("proxy, no delay, one download", found.proxy),
                    (f"proxy, no delay, {PARALLEL} downloads at once", found.parallel),
                    (f"proxy, {args.delay * 1000:g} ms delay, one file after another (once)", found.delayed),
                ):
                    print(f"  {label:<58} {value:>6,.0f} MB/s")
                failures += [f"ceiling: {failure}" for failure in found.failed]
                proxy.default_fault = Fault(first_byte_delay=args.delay)
                results: dict[int, tuple[list[Round], int]] = {}
                for prefetch in args.prefetch:
                    case_started = time.perf_counter()
                    rounds, length, problems = run_case(
                        prefetch, args, proxy, manifest, names, digests, size, scratch
                    )
                    failures += [f"prefetch {prefetch}: {problem}" for problem in problems]
                    results[prefetch] = (rounds, length)
                    verdict = "verified" if not problems else f"WRONG ({len(problems)} problems)"
                    print(
                        f"  prefetch {prefetch}: {verdict}, {len(rounds)} rounds, "
                        f"{time.perf_counter() - case_started:.1f} s",
                        flush=True,
                    )
        finally:
            origin.stop()

        print_table(results, args, size, found)
        print(f"load average {os.getloadavg()[0]:.2f} at the end")
        if failures:
            print(f"\nWRONG: {len(failures)} problem(s):")
            for failure in failures:
                print(f"  {failure}")
            sys.exit(1)
        print(
            f"verified: per case, one archive read by zipfile lists the {args.files} files in order, each "
            "with its size, CRC-32 and sha256; every timed download had status 200 and that length."
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if created and not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


def print_table(
    results: dict[int, tuple[list[Round], int]], args: argparse.Namespace, size: int, found: Ceilings
) -> None:
    def med(rounds: list[Round], field: str) -> float:
        return float(statistics.median(getattr(run, field) for run in rounds))

    base = results.get(0)
    base_mbps = med(base[0], "mbps") if base and base[0] else None
    titles = (
        "prefetch",
        "seconds",
        "MB/s",
        "x p0",
        "bound",
        "in flight",
        "RSS MB",
        "worker CPU",
        "proxy CPU",
        "all CPU",
        "runs: seconds",
    )
    rows = []
    notes = []
    for prefetch, (rounds, _) in results.items():
        if not rounds:
            rows.append((str(prefetch), *["-"] * (len(titles) - 2), "no good round"))
            continue
        seconds, mbps = med(rounds, "seconds"), med(rounds, "mbps")
        in_flight = max(run.in_flight for run in rounds)
        if in_flight != prefetch + 1:
            notes.append(f"prefetch {prefetch}: {in_flight} requests in flight at most, not {prefetch + 1}")
        if any(run.requests != args.files for run in rounds):
            counts = ", ".join(str(run.requests) for run in rounds)
            notes.append(
                f"prefetch {prefetch}: origin requests per download {counts} (retries?), not {args.files}"
            )
        rows.append(
            (
                str(prefetch),
                f"{seconds:.2f}",
                f"{mbps:,.0f}",
                f"{mbps / base_mbps:.2f}" if base_mbps else "-",
                f"{bound(prefetch, size, args.delay, found):,.0f}",
                str(in_flight),
                f"{max(run.rss_growth for run in rounds) / MB:.1f}",
                f"{statistics.median(run.worker_cpu / run.seconds for run in rounds):.0%}",
                f"{statistics.median(run.proxy_cpu / run.seconds for run in rounds):.0%}",
                f"{statistics.median(run.machine_cpu / run.seconds for run in rounds):.0%}",
                ", ".join(f"{run.seconds:.2f}" for run in rounds),
            )
        )
    widths = [max(len(title), *(len(row[i]) for row in rows)) for i, title in enumerate(titles)]
    print()
    for row in (titles, *rows):
        cells = [f"{cell:>{width}}" for cell, width in zip(row[:-1], widths[:-1], strict=True)]
        print("  ".join([*cells, row[-1]]).rstrip())
    length = next((length for _, length in results.values() if length), 0)
    cores = os.cpu_count() or 1
    print(
        f"\narchive {length / MB:,.1f} MB; MB/s = archive bytes / seconds; bound = MB/s at best with prefetch + 1 "
        "requests open,\neach taking the delay plus its transfer at the proxy's one-download ceiling (at most the "
        "proxy's aggregate\nceiling); in flight = the most requests the origin had open at once (expected "
        "prefetch + 1); RSS MB = the worker's\nVmHWM after a round minus its VmRSS before (the highest of the "
        f"rounds); CPU: 100% = one core, all CPU = the machine's\n{cores} cores ({cores * 100}% = all busy: "
        "gunicorn, the proxy, nginx, curl)."
    )
    for note in notes:
        print(f"note: {note}")
    if base_mbps and 4 in results and results[4][0]:
        ratio = med(results[4][0], "mbps") / base_mbps
        verdict = "ok" if ratio >= RATIO_TARGET else "BELOW TARGET"
        print(f"prefetch 4 / prefetch 0 = {ratio:.2f} (target >= {RATIO_TARGET:g}): {verdict}")
    growths = [run.rss_growth for rounds, _ in results.values() for run in rounds]
    if growths:
        verdict = "ok" if max(growths) < RSS_TARGET_MB * MB else "ABOVE TARGET"
        print(f"RSS growth at most {max(growths) / MB:.1f} MB (target < {RSS_TARGET_MB} MB): {verdict}")


if __name__ == "__main__":
    main()
