#!/usr/bin/env python3
"""Folders of 65,600 and 100,000 files: time to first byte with the plan cache warm and cold,
and a worker's memory while a 100,000-entry archive streams.

    .venv/bin/python bench/plan_scale.py                       # a few minutes (the data set once)
    .venv/bin/python bench/plan_scale.py --reps 3 --files 20000 --big 30000   # a smoke run
    .venv/bin/python bench/plan_scale.py --checkout /tmp/old   # the same against another checkout

Data (built once, kept under the temporary folder; --data elsewhere): a game library of
65,600 small files (16 games x 25 folders x 164 files of 0-2 KB, ``levels/`` nested, a few
``.nfo`` files and an ``updates`` folder left out by ignore/exclude), and a folder of 100,000
tiny files (100 folders x 1,000 files of 0-100 bytes).

Servers: a real gunicorn (gthread, one worker, 8 threads) with the README's configuration (the
built-in ``directory`` resolver, exclude, ignore, chunk_size 65536, stored, zip64) and a CRC-32
cache in an SQLite file of its own (new for each server), one with the plan cache (default
bound) and one with ``plan_cache_entries = 0``, where every request plans from scratch (cold).

Cases, each the median of --reps requests after one unmeasured request (which fills the CRC-32
cache, and the plan cache where there is one): HEAD, ``Range: bytes=-1000`` and a 1,000-byte
range in the middle of the archive; the time from sending the request to the first byte of the
answer. Then the worker's resident memory (VmRSS, VmHWM of /proc/PID/status) before and while
a client downloads the 100,000-entry archive whole (the peak is reset first, where the kernel
allows). Last, where the time of a cold plan goes, in process: walk, names, entries, layout,
validators, and the check of a cached plan.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
PROJECT = BENCH.parent
MIB = 1 << 20
GAME_SHAPE = (16, 25, 164)  # games, folders per game, files per folder: 65,600 files
BIG_SHAPE = (100, 1000)  # folders, files per folder: 100,000 files
TARGET_WARM, TARGET_COLD, TARGET_RSS = 0.1, 1.0, 100 * MIB


# -- the app gunicorn serves (this module, imported by the worker) ------------------------------


def _make_app() -> Any:
    from zipmiddleware import ZipMiddleware

    data = os.environ["ZM_BENCH_DATA"]

    def plain(environ: Any, start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3")])
        return [b"ok\n"]

    options: dict[str, Any] = {
        "routes": {"/files/<path:subpath>": {"resolver": "directory", "root": data}},
        "roots": [data],
        "exclude": ["updates", "extras"],
        "ignore": ["*.nfo", "*.sfv", "file_id.diz"],
        "chunk_size": 65536,
        "compression_level": 0,
        "zip64": True,
        "crc_cache": os.environ["ZM_BENCH_CRC_CACHE"],
    }
    entries = os.environ.get("ZM_BENCH_PLAN_CACHE_ENTRIES")
    if entries:  # only when asked: a checkout older than the setting runs without it
        options["plan_cache_entries"] = int(entries)
    return ZipMiddleware(plain, **options)


if os.environ.get("ZM_BENCH_DATA") and __name__ != "__main__":
    app = _make_app()


# -- the data set ------------------------------------------------------------------------------


def build_games(folder: Path, shape: tuple[int, int, int]) -> int:
    games, folders, files = shape
    rnd = random.Random(1)
    count = 0
    for game in range(games):
        top = folder / f"game-{game:02d}"
        for number in range(folders):
            sub = top / ("levels" if number % 5 == 0 else "") / f"assets-{number:02d}"
            sub.mkdir(parents=True, exist_ok=True)
            for index in range(files):
                (sub / f"texture_{index:04d}.dds").write_bytes(b"x" * rnd.randrange(2048))
                count += 1
        (top / "readme.nfo").write_bytes(b"ignored")
        (top / "updates").mkdir(exist_ok=True)
        (top / "updates" / "patch.bin").write_bytes(b"excluded")
    return count


def build_big(folder: Path, shape: tuple[int, int]) -> int:
    folders, files = shape
    rnd = random.Random(2)
    for number in range(folders):
        sub = folder / f"batch-{number:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        for index in range(files):
            (sub / f"item-{index:05d}.txt").write_bytes(b"y" * rnd.randrange(100))
    return folders * files


def data_set(root: Path, games: tuple[int, int, int], big: tuple[int, int]) -> tuple[Path, Path]:
    """The two folders under ``root``, built unless a previous run left them complete."""
    built = False
    for name, shape, make in (("games", games, build_games), ("big", big, build_big)):
        folder = root / f"{name}-{'x'.join(map(str, shape))}"
        done = folder / ".complete"
        if not done.exists():
            started = time.monotonic()
            print(f"building {folder} ...", end=" ", flush=True)
            with contextlib.suppress(FileNotFoundError):
                subprocess.run(["rm", "-rf", str(folder)], check=True)
            count = make(folder / "library", shape)  # type: ignore[operator]
            done.write_text(str(count))
            print(f"{count:,} files in {time.monotonic() - started:.0f} s", flush=True)
            built = True
    if built:
        time.sleep(3.5)  # older than the plan cache's margin (3 s), so that plans are kept
    return (
        root / f"games-{'x'.join(map(str, games))}",
        root / f"big-{'x'.join(map(str, big))}",
    )


# -- a gunicorn to measure ---------------------------------------------------------------------


class Server:
    def __init__(self, checkout: Path, data: Path, plan_cache_entries: int | None) -> None:
        self.checkout, self.data, self.entries = checkout, data, plan_cache_entries
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.log = tempfile.NamedTemporaryFile(prefix="plan-scale-", suffix=".log", delete=False)  # noqa: SIM115

    def __enter__(self) -> Server:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.crc = tempfile.mkdtemp(prefix="plan-scale-crc-")
        env = {
            **os.environ,
            "ZM_BENCH_DATA": str(self.data),
            "ZM_BENCH_CRC_CACHE": os.path.join(self.crc, "crc32.sqlite"),
            "PYTHONPATH": f"{self.checkout}{os.pathsep}{BENCH}",
        }
        if self.entries is not None:
            env["ZM_BENCH_PLAN_CACHE_ENTRIES"] = str(self.entries)
        command = [
            gunicorn_executable(),
            "--worker-class", "gthread", "--workers", "1", "--threads", "8",
            "--bind", f"127.0.0.1:{self.port}", "--timeout", "300", "--graceful-timeout", "2",
            "--no-control-socket", "plan_scale:app",
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=BENCH
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if request(self.port, "GET", "/")[1].startswith(b"HTTP/1.1 200") and self.worker():
                    return self
            time.sleep(0.1)
        raise SystemExit(f"gunicorn did not start: {Path(self.log.name).read_text()}")

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        os.unlink(self.log.name)
        shutil.rmtree(self.crc, ignore_errors=True)

    def worker(self) -> int:
        assert self.process is not None
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError):
                    stat = Path(f"/proc/{entry}/stat").read_bytes()
                    if int(stat[stat.rfind(b")") + 2 :].split()[1]) == self.process.pid:
                        return int(entry)
        return 0

    def memory(self) -> dict[str, int]:
        """VmRSS and VmHWM of the worker, in bytes."""
        found = {}
        for line in Path(f"/proc/{self.worker()}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0]) * 1024
        return found

    def reset_peak(self) -> bool:
        try:
            Path(f"/proc/{self.worker()}/clear_refs").write_text("5")
            return True
        except OSError:
            return False


def gunicorn_executable() -> str:
    for candidate in (PROJECT / ".venv" / "bin" / "gunicorn", Path(sys.executable).parent / "gunicorn"):
        if candidate.exists():
            return str(candidate)
    raise SystemExit("gunicorn is not installed")


def request(port: int, method: str, path: str, headers: dict[str, str] | None = None) -> tuple[float, bytes]:
    """Seconds from sending the request to its answer's first byte, and the whole answer."""
    lines = [f"{method} {path} HTTP/1.1", "Host: bench", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    with socket.create_connection(("127.0.0.1", port), timeout=300) as sock:
        started = time.perf_counter()
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        first = sock.recv(65536)
        seconds = time.perf_counter() - started
        answer = [first]
        while data := sock.recv(1 << 20):
            answer.append(data)
    return seconds, b"".join(answer)


def download(port: int, path: str) -> tuple[int, float]:
    """Download ``path`` whole, dropping the bytes: how many came, in how many seconds."""
    with socket.create_connection(("127.0.0.1", port), timeout=600) as sock:
        started = time.perf_counter()
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
        received = 0
        while data := sock.recv(1 << 20):
            received += len(data)
    return received, time.perf_counter() - started


def header(answer: bytes, name: str) -> str:
    head = answer.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    for line in head.split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == name.lower():
            return value.strip()
    raise SystemExit(f"no {name} in the answer:\n{head}")


def status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


# -- the cases ---------------------------------------------------------------------------------


def time_to_first_byte(port: int, path: str, reps: int) -> Iterator[tuple[str, int, list[float]]]:
    _, answer = request(port, "HEAD", path)
    length = int(header(answer, "Content-Length"))
    middle = length // 2
    cases = [
        ("HEAD", "HEAD", {}),
        ("Range: bytes=-1000", "GET", {"Range": "bytes=-1000"}),
        (f"Range: bytes={middle}-{middle + 999}", "GET", {"Range": f"bytes={middle}-{middle + 999}"}),
    ]
    for label, method, headers in cases:
        request(port, method, path, headers)  # the CRC-32s this range needs, and the plan where kept
        times = []
        for _ in range(reps):
            seconds, answer = request(port, method, path, headers)
            times.append(seconds)
        yield label, status(answer), times


def stream_memory(checkout: Path, big: Path, files: int) -> None:
    with Server(checkout, big, None) as server:
        before = server.memory()["VmRSS"]
        reset = server.reset_peak()
        received, seconds = download(server.port, "/files/library")
        after = server.memory()
        peak = after["VmHWM"] if reset else max(after["VmHWM"], after["VmRSS"])
        growth = peak - before
        verdict = "ok" if growth < TARGET_RSS else "OVER"
        print(
            f"  {files:,}-entry archive ({received / MIB:,.1f} MiB) downloaded in {seconds:.1f} s; worker VmRSS "
            f"{before / MIB:.0f} MiB before, peak {peak / MIB:.0f} MiB"
            f"{'' if reset else ' (VmHWM could not be reset)'}, {after['VmRSS'] / MIB:.0f} MiB after: "
            f"growth {growth / MIB:.0f} MiB (target < {TARGET_RSS / MIB:.0f} MiB: {verdict})",
            flush=True,
        )
        received, seconds = download(server.port, "/files/library")
        again = server.memory()
        print(
            f"  again (its plan cached, where there is a plan cache): {seconds:.1f} s; "
            f"VmRSS {again['VmRSS'] / MIB:.0f} MiB, "
            f"VmHWM {again['VmHWM'] / MIB:.0f} MiB",
            flush=True,
        )


def profile(checkout: Path, games: Path) -> None:
    """Where a cold plan's time goes, in this process (the checkout's code)."""
    sys.path.insert(0, str(checkout))
    from zipmiddleware import planning
    from zipmiddleware.config import build_settings
    from zipmiddleware.confinement import open_inside
    from zipmiddleware.targets import ZipTarget
    from zipmiddleware.zipengine import Layout, archive_validators

    root = str(games / "library")
    settings = build_settings({"roots": [root], "exclude": ["updates", "extras"], "ignore": ["*.nfo"]})
    planner = planning.Planner(settings)
    stages: dict[str, list[float]] = {}

    def timed(name: str, work: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        result = work()
        stages.setdefault(name, []).append(time.perf_counter() - started)
        return result

    def walk() -> Any:
        top = open_inside(root, planner.roots, folder=True)
        try:
            return planner.walk(top, planner.roots)
        finally:
            os.close(top.fd)

    for _ in range(3):
        found = timed("walk (list, stat, confine, exclude/ignore)", walk)
        found = getattr(found, "found", found)
        if hasattr(planning, "arcnames"):
            timed("names", lambda: planning.arcnames([rel for rel, _ in found]))  # noqa: B023
        plan = timed("plan, all of it (walk, names, dates, entries)",
                     lambda: planning.Planner(settings).plan(ZipTarget.from_directory(root)))  # fmt: skip
        timed("Layout (zipengine)", lambda: Layout(plan.entries, True))  # noqa: B023
        timed("validators (zipengine)", lambda: archive_validators(plan.entries, 0, True))  # noqa: B023
    cache = getattr(planner, "cache", None)
    if cache is not None and cache.limit:
        plan = planner.plan(ZipTarget.from_directory(root))
        if len(cache):
            for _ in range(3):
                timed("check of a cached plan", lambda: planner.plan(ZipTarget.from_directory(root)))
    for name, times in stages.items():
        print(f"  {name:<48} {statistics.median(times) * 1000:>8,.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=5, help="requests per case (median)")
    parser.add_argument("--files", type=int, default=65_600, help="files of the game library (16 x 25 x N)")
    parser.add_argument("--big", type=int, default=100_000, help="files of the big folder (100 x N)")
    parser.add_argument(
        "--data", type=Path, default=Path(tempfile.gettempdir()) / f"zm-plan-scale-{os.getuid()}"
    )
    parser.add_argument("--checkout", type=Path, default=PROJECT, help="the zipmiddleware to serve with")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    games_shape = (GAME_SHAPE[0], GAME_SHAPE[1], max(1, args.files // (GAME_SHAPE[0] * GAME_SHAPE[1])))
    big_shape = (BIG_SHAPE[0], max(1, args.big // BIG_SHAPE[0]))
    args.data.mkdir(parents=True, exist_ok=True)
    games, big = data_set(args.data, games_shape, big_shape)
    files = games_shape[0] * games_shape[1] * games_shape[2]
    print(f"checkout {args.checkout}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(
        f"{files:,} files ({games}); gunicorn gthread, 1 worker; median of {args.reps}, seconds to first byte"
    )
    for kind, entries, target in (("warm", None, TARGET_WARM), ("cold", 0, TARGET_COLD)):
        label = "plan cache on (default bound)" if entries is None else "plan_cache_entries = 0"
        print(f"\nplan {kind}: {label}", flush=True)
        with Server(args.checkout, games, entries) as server:
            before = server.memory()["VmRSS"]
            request(server.port, "HEAD", "/files/library")
            grown = server.memory()["VmRSS"] - before
            print(
                f"  the first request's plan: worker VmRSS +{grown / MIB:.1f} MiB, {grown / files:,.0f} B per file"
            )
            for case, code, times in time_to_first_byte(server.port, "/files/library", args.reps):
                median = statistics.median(times)
                spread = " ".join(f"{t:.3f}" for t in times)
                verdict = "ok" if median < target else "OVER"
                print(
                    f"  {case:<34} {code}  {median:7.3f} s  (target < {target:g} s: {verdict})  [{spread}]",
                    flush=True,
                )
    if not args.skip_memory:
        print(f"\nmemory: {big_shape[0] * big_shape[1]:,} tiny files ({big})", flush=True)
        stream_memory(args.checkout, big, big_shape[0] * big_shape[1])
    print("\nwhere a cold plan's time goes (in process, median of 3):", flush=True)
    profile(args.checkout, games)
    print(f"\nload average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
