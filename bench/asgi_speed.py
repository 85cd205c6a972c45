#!/usr/bin/env python3
"""The ASGI middleware under uvicorn against Starlette's own FileResponse: a direct file and a
stored ZIP of the same bytes, with the CRC-32 store warm and cold.

    .venv/bin/python bench/asgi_speed.py                        # 4 x 256 MB, median of 5, about 1 minute
    .venv/bin/python bench/asgi_speed.py --files 2 --size-mb 16 --repeat 2     # smoke run

The data set is --files random files of --size-mb MB (1 MB = 10**6 bytes) in ``parts/``, and
``all.bin``: those files end to end, so it holds the very bytes of the ZIP's entries. It is built in
a folder in the temp dir (synced to disk before anything is timed, so that no writeback runs
during the rounds, and still in the page cache) and removed at the end.

One uvicorn (``tests/asgi_app.py``: Starlette, zipmiddleware.asgi.ZipMiddleware in front, a CRC-32
store in an SQLite file of this run, empty at the start; uvicorn's defaults: uvloop and httptools
where installed, one process) on 127.0.0.1 serves every case; curl is the client, the body to
/dev/null, its time the ``time_total`` it reports. Cases:

  FileResponse, all.bin   the baseline: ``/starlette/all.bin``, Starlette's ``FileResponse`` (64 KiB
                          reads, each through a worker thread; uvicorn offers no
                          ``http.response.pathsend``, so the file goes through Python);
  FileResponse, 256 KiB   ``/starlette-256k/all.bin``: the same with the middleware's chunk size
                          (Starlette's is 64 KiB), for reference: what a chunk size does alone;
  direct file, all.bin    ``/files/all.bin``: the middleware's ``directory`` resolver sending the
                          same file as it is (its default 256 KiB chunks, made in a worker thread);
  ZIP, warm store         ``/files/parts``: the folder as a stored ZIP, every CRC-32 from the store;
  ZIP, cold store         the first download of that ZIP, once: the store empty (every CRC-32
                          computed while the entries stream, and written to the store) and the
                          folder walked for the first time.

The baseline of both the direct file and the ZIP is the same FileResponse of all.bin: it sends
the ZIP's data bytes, the same amount from one file, so the ZIP is measured against a file of its
own size (its response is a few hundred bytes longer: the headers and the central directory) and
no figure is scaled from a download of another size. What the ZIP costs over it (four files opened,
headers, CRC-32s looked up) is what is measured.

Round 0 (untimed, except the cold ZIP): FileResponse and the direct file are downloaded to disk
and must have all.bin's sha256; then the cold ZIP to /dev/null; then the ZIP, warm, to disk, read
with zipfile: the files' names in order, stored, their sizes and sha256s (zipfile checks every
CRC-32 too, so the CRC-32s the cold download put in the store are checked as well). Then --repeat
rounds, each downloading every case once, the order rotated from round to round (the first case
of round r is case r mod 3) so that drift and noise hit all alike; each must have status 200 and
the verified length.

Figures, per case the median of the rounds (the cold ZIP: its one download):
  MB/s        response bytes / curl's time_total; x base = over the baseline's median; round
              by round, each case's MB/s over the baseline's in the same round;
  peak RSS    uvicorn's VmHWM during a download (reset before it), the highest of the rounds;
  +RSS        that peak minus uvicorn's VmRSS before the download, the highest of the rounds;
  server, curl  CPU seconds per GB sent (1 GB = 10**9 bytes) of the uvicorn process (all its
              threads) and of curl; all CPU: the whole machine's busy time (/proc/stat) over the
              wall time of the curl process, 100% = one core.

Targets: direct file >= 0.9x FileResponse; ZIP with the store warm >= 0.7x FileResponse of the
same bytes. Timings are figures, not assertions; wrong bytes (or a failed download) make the
script exit with status 1.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
if str(PROJECT) not in sys.path:
    sys.path.insert(0, str(PROJECT))

import zipmiddleware  # noqa: E402

# Measured and printed as the other server benchmarks do.
from bench.remote_sources import build_data_set, data_files, file_sha256, machine_busy, vm_rss  # noqa: E402
from bench.scaling_out import Curl, children_cpu, curl, median, print_table, verify_zip  # noqa: E402
from tests.servers import AsgiServer, cpu_seconds, peak_memory, reset_peak_memory  # noqa: E402

MB = 10**6
GB = 10**9
MIB = 1 << 20
DIRECT_TARGET = 0.9  # direct file over FileResponse
ZIP_TARGET = 0.7  # ZIP, store warm, over FileResponse of the same bytes
BIG = "all.bin"
FOLDER = "parts"

BASELINE = "FileResponse, all.bin (baseline)"
BASELINE_256 = "FileResponse, 256 KiB reads"
DIRECT = "direct file, all.bin"
ZIP_WARM = "ZIP, warm store"
ZIP_COLD = "ZIP, cold store (first download)"
PATHS = {
    BASELINE: f"/starlette/{BIG}",
    BASELINE_256: f"/starlette-256k/{BIG}",
    DIRECT: f"/files/{BIG}",
    ZIP_WARM: f"/files/{FOLDER}",
}


# -- the data set ---------------------------------------------------------------------------


def concatenate(paths: list[Path], target: Path) -> None:
    """``target``: the files end to end, copied in the kernel."""
    with open(target, "wb") as out:
        for path in paths:
            with open(path, "rb") as source:
                remaining = path.stat().st_size
                while remaining:
                    copied = os.copy_file_range(source.fileno(), out.fileno(), remaining)
                    if not copied:
                        raise OSError(f"{path} ended {remaining} bytes early")
                    remaining -= copied


def digests(paths: list[Path]) -> tuple[dict[str, str], str]:
    """The sha256 of every file by name, and of all of them end to end (all.bin's), in one read."""
    whole = hashlib.sha256()
    found = {}
    for path in paths:
        digest = hashlib.sha256()
        with open(path, "rb", buffering=0) as file:
            while data := file.read(MIB):
                digest.update(data)
                whole.update(data)
        found[path.name] = digest.hexdigest()
    return found, whole.hexdigest()


# -- measuring ------------------------------------------------------------------------------


@dataclass
class Sample:
    seconds: float  # curl's time_total
    size: int  # response bytes
    peak_rss: int  # bytes: uvicorn's VmHWM during the download
    rss_growth: int  # bytes: that minus its VmRSS before
    server_cpu: float  # seconds
    curl_cpu: float  # seconds
    machine_cpu: float  # seconds, all cores
    wall: float  # seconds the machine's CPU was counted over (curl's process, start to end)

    @property
    def mbps(self) -> float:
        return self.size / MB / self.seconds


def download(pid: int, url: str, output: str | Path = "/dev/null") -> tuple[Curl, Sample]:
    """One curl of ``url``, with uvicorn's (``pid``) memory and CPU, curl's and the machine's CPU."""
    reset_peak_memory(pid)
    rss_before = vm_rss(pid)
    server_before, curl_before, machine_before = cpu_seconds(pid), children_cpu(), machine_busy()
    wall = time.perf_counter()
    got = curl(url, output)
    wall = time.perf_counter() - wall
    server_cpu, curl_cpu = cpu_seconds(pid) - server_before, children_cpu() - curl_before
    machine_cpu = machine_busy() - machine_before
    peak = peak_memory(pid)
    sample = Sample(got.seconds, got.size, peak, peak - rss_before, server_cpu, curl_cpu, machine_cpu, wall)
    return got, sample


@dataclass
class Run:
    failures: list[str] = field(default_factory=list)
    samples: dict[str, list[Sample]] = field(default_factory=dict)
    lengths: dict[str, int] = field(default_factory=dict)  # verified response lengths by case

    def fail(self, where: str, problem: str | list[str] | None) -> bool:
        problems = [problem] if isinstance(problem, str) else problem or []
        self.failures += [f"{where}: {text}" for text in problems]
        return bool(problems)


def round_zero(
    run: Run, server: AsgiServer, scratch: Path, part_digests: dict[str, str], big_digest: str, size: int
) -> None:
    """The untimed downloads, each checked, and the timed cold one (see the module doc)."""
    output = scratch / "download"
    try:
        for case in (BASELINE, BASELINE_256, DIRECT):
            got, _ = download(server.pid, server.url + PATHS[case], output)
            if run.fail(f"{case}, round 0", got.problem((200,))):
                continue
            if file_sha256(output) != big_digest:
                run.fail(f"{case}, round 0", f"the body's sha256 is not {BIG}'s")
                continue
            run.lengths[case] = got.size
            output.unlink()
        got, cold = download(server.pid, server.url + PATHS[ZIP_WARM])
        cold_ok = not run.fail(f"{ZIP_COLD}, round 0", got.problem((200,)))
        got, _ = download(server.pid, server.url + PATHS[ZIP_WARM], output)
        if run.fail(f"{ZIP_WARM}, round 0", got.problem((200,))) or run.fail(
            f"{ZIP_WARM}, round 0", verify_zip(output, part_digests, dict.fromkeys(part_digests, size))
        ):
            return
        run.lengths[ZIP_WARM] = got.size
        if cold_ok and not run.fail(
            ZIP_COLD, None if cold.size == got.size else f"{cold.size} bytes, not {got.size}"
        ):
            run.samples[ZIP_COLD] = [cold]
    finally:
        output.unlink(missing_ok=True)


def timed_rounds(run: Run, server: AsgiServer, repeat: int) -> list[dict[str, Sample]]:
    """--repeat rounds of every verified case, the order rotated; each round's samples by case."""
    cases = [case for case in PATHS if case in run.lengths]
    rounds = []
    for index in range(repeat):
        shift = index % len(cases) if cases else 0
        found = {}
        for case in cases[shift:] + cases[:shift]:
            got, sample = download(server.pid, server.url + PATHS[case])
            if not run.fail(f"{case}, round {index + 1}", got.problem((200,), run.lengths[case])):
                found[case] = sample
                run.samples.setdefault(case, []).append(sample)
        rounds.append(found)
        print(
            f"  round {index + 1}: " + ", ".join(f"{case} {s.mbps:,.0f}" for case, s in found.items()),
            flush=True,
        )
    return rounds


# -- the report -----------------------------------------------------------------------------


def report(run: Run, rounds: list[dict[str, Sample]], repeat: int) -> None:
    base = run.samples.get(BASELINE)
    base_mbps = median([s.mbps for s in base]) if base else None
    rows = []
    for case in (BASELINE, BASELINE_256, DIRECT, ZIP_WARM, ZIP_COLD):
        samples = run.samples.get(case)
        if not samples:
            rows.append((case, *["-"] * 10, "no good download"))
            continue
        mbps = median([s.mbps for s in samples])
        rows.append(
            (
                case,
                f"{median([s.size for s in samples]) / MB:,.1f}",
                f"{median([s.seconds for s in samples]):.2f}",
                f"{mbps:,.0f}",
                f"{mbps / base_mbps:.2f}" if base_mbps else "-",
                f"{max(s.peak_rss for s in samples) / MB:.1f}",
                f"{max(s.rss_growth for s in samples) / MB:.1f}",
                f"{median([s.server_cpu / (s.size / GB) for s in samples]):.2f}",
                f"{median([s.curl_cpu / (s.size / GB) for s in samples]):.2f}",
                f"{median([s.machine_cpu / s.wall for s in samples]):.0%}",
                str(len(samples)),
                ", ".join(f"{s.mbps:,.0f}" for s in samples),
            )
        )
    print()
    titles = (
        "case",
        "MB",
        "seconds",
        "MB/s",
        "x base",
        "peak RSS MB",
        "+RSS MB",
        "server s/GB",
        "curl s/GB",
        "all CPU",
        "runs",
        "runs: MB/s",
    )
    print_table(titles, rows)
    cores = os.cpu_count() or 1
    print(
        f"\nmedian of {repeat} (the cold ZIP: its one download); MB/s = response bytes / curl's time_total "
        "(1 MB = 10**6 bytes);\nx base = MB/s over FileResponse's, which sends the same bytes from one file; "
        "peak RSS = uvicorn's VmHWM during a\ndownload, +RSS = that minus its VmRSS before (the highest of the "
        "rounds); server, curl = CPU seconds per GB\nsent of the uvicorn process (all threads) and of curl "
        "(counted in the kernel's 10 ms ticks); all CPU = the\nmachine's busy time over the curl process's wall time, "
        f"100% = one core ({cores * 100}% = all {cores} busy)."
    )
    if not base_mbps:
        return
    for case, target in ((DIRECT, DIRECT_TARGET), (ZIP_WARM, ZIP_TARGET)):
        samples = run.samples.get(case)
        if not samples:
            continue
        ratio = median([s.mbps for s in samples]) / base_mbps
        paired = ", ".join(
            f"{found[case].mbps / found[BASELINE].mbps:.2f}"
            for found in rounds
            if case in found and BASELINE in found
        )
        verdict = "ok" if ratio >= target else "BELOW TARGET"
        print(
            f"{case} / FileResponse = {ratio:.2f} (target >= {target:g}): {verdict}  [round by round: {paired}]"
        )
    reference = run.samples.get(BASELINE_256)
    for case in (DIRECT, ZIP_WARM):
        samples = run.samples.get(case)
        if reference and samples:
            ratio = median([s.mbps for s in samples]) / median([s.mbps for s in reference])
            print(
                f"{case} / FileResponse with 256 KiB reads = {ratio:.2f} (for reference: the same chunk size)"
            )


# -- main -----------------------------------------------------------------------------------


def versions() -> str:
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    curl_version = subprocess.run(["curl", "--version"], capture_output=True, text=True).stdout.split()[1]
    return (
        f"zipmiddleware {zipmiddleware.__version__}, uvicorn {metadata.version('uvicorn')} ({loop}, {http}), "
        f"starlette {metadata.version('starlette')}, curl {curl_version}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=4, help="files in the ZIP's folder (default 4)")
    parser.add_argument("--size-mb", type=int, default=256, help="size of each file in MB (default 256)")
    parser.add_argument("--repeat", type=int, default=5, help="timed rounds; medians are quoted (default 5)")
    args = parser.parse_args()
    if args.files < 2 or args.size_mb < 1 or args.repeat < 1:
        parser.error(
            "--size-mb and --repeat must be positive, --files at least 2 (a folder of one file is sent as it is)"
        )
    if shutil.which("curl") is None:
        raise SystemExit("error: curl is not installed (Debian: apt-get install curl)")
    size = args.size_mb * MB
    total = args.files * size

    print(
        f"python {platform.python_version()}, {os.cpu_count()} CPUs, {versions()}, "
        f"load average {os.getloadavg()[0]:.2f} at the start",
        flush=True,
    )
    scratch = Path(tempfile.mkdtemp(prefix="zipmiddleware-asgi-"))
    run = Run()
    started = time.perf_counter()
    try:
        free = shutil.disk_usage(scratch).free
        if free < total * 3 + 64 * MIB:  # the parts, all.bin and one saved download
            print(f"warning: {free / MB:,.0f} MB free for {total * 3 / MB:,.0f} MB (data and one download)")
        root = scratch / "data"
        (root / FOLDER).mkdir(parents=True)
        paths = data_files(root / FOLDER, args.files)
        build_data_set(paths, size)
        concatenate(paths, root / BIG)
        os.sync()
        part_digests, big_digest = digests(paths)
        print(
            f"data set: {args.files} x {args.size_mb} MB random files in {FOLDER}/ and {BIG} "
            f"({total / MB:,.0f} MB, their bytes end to end), built in {time.perf_counter() - started:.1f} s",
            flush=True,
        )
        env = {"ZM_ASGI_ROOT": str(root), "ZM_ASGI_CRC": str(scratch / "crc32.sqlite")}
        with AsgiServer("tests.asgi_app:app", env=env, chdir=PROJECT) as server:
            print(
                f"uvicorn on {server.url} (pid {server.pid}), {vm_rss(server.pid) / MB:.1f} MB RSS idle",
                flush=True,
            )
            round_zero(run, server, scratch, part_digests, big_digest, size)
            cold = run.samples.get(ZIP_COLD)
            print(
                "  round 0: "
                + ("verified" if not run.failures else f"WRONG ({len(run.failures)} problems)")
                + (f", cold ZIP {cold[0].mbps:,.0f} MB/s" if cold else ""),
                flush=True,
            )
            rounds = timed_rounds(run, server, args.repeat)
        report(run, rounds, args.repeat)
        print(
            f"\n{time.perf_counter() - started:.0f} s in all; load average {os.getloadavg()[0]:.2f} at the end"
        )
        if run.failures:
            print(f"\nWRONG: {len(run.failures)} problem(s):")
            for failure in run.failures:
                print(f"  {failure}")
            sys.exit(1)
        print(
            f"verified: FileResponse's and the direct file's bodies had {BIG}'s sha256; the ZIP read by zipfile "
            f"lists the {args.files} files in order, stored, each with its size, CRC-32 and sha256; every timed "
            "download had status 200 and that length."
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
