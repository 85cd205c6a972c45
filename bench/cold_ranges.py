#!/usr/bin/env python3
"""What a range request can make the server read: cold CRC-32 work under attack and for honest resumes.

    .venv/bin/python bench/cold_ranges.py                       # 8 files x 256 MiB (2 GiB)
    .venv/bin/python bench/cold_ranges.py --files 4 --file-mib 64   # smoke run
    .venv/bin/python bench/cold_ranges.py --compare-with /tmp/old   # the same cases against another checkout

A stored archive's ranges need the CRC-32 of every entry whose descriptor or central
record they hold; what the cache lacks is learnt by reading files without sending
them. This script serves one folder (--files files of --file-mib MiB, a random 1 MiB
block repeated: incompressible, not sparse) with a real gunicorn (gthread, one worker,
8 threads, page cache warm) and measures, for each case, what the worker read
(/proc/PID/io rchar: bytes returned by read(2)) against what the client received:

  suffix -100, -1000, -64 KiB   an unauthenticated client asking for the archive's tail
                                on a cold cache (a new server with crc_cache = ":memory:"),
                                then the same request again (the cache now holds its work);
  from 50%                      a cold range from the middle to the end;
  honest resume                 a full download cut at 40% (inside a file), then resumed
                                from the bytes received, as curl -C - does;
  8 at once                     eight concurrent cold "-1000" requests (no limit);
  16 abandoned                  sixteen cold "-1000" requests (no limit) whose clients hang
                                up after 0.2 s: what the worker reads and burns in CPU
                                in all, and how long an unrelated small request sent just
                                after they hung up takes.

Each case runs with the default cold_range_limit (64 MiB) where that is what is
measured, else without a limit. Figures are single runs on a noisy machine: the byte
counts are exact, the times are not. Every body is checked against the archive's bytes
(sha256 of the same slice of a full download); a wrong body exits with status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
PROJECT = BENCH.parent
MIB = 1 << 20
NO_LIMIT = str(1 << 62)


# -- the app gunicorn serves (this module, imported by the worker) ------------------------------


def _make_app() -> Any:
    from zipmiddleware import FileTarget, ZipMiddleware, ZipTarget

    folder = os.environ["ZM_BENCH_DATA"]
    options: dict[str, Any] = {"crc_cache": ":memory:"}
    if os.environ.get("ZM_BENCH_LIMIT"):
        options["cold_range_limit"] = int(os.environ["ZM_BENCH_LIMIT"])

    def plain(environ: Any, start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3")])
        return [b"ok\n"]

    small = os.path.join(os.environ["ZM_BENCH_SMALL"], "small.txt")
    routes = {
        "/z": lambda request: ZipTarget.from_directory(folder),
        "/small": lambda request: FileTarget(small),
    }
    try:
        return ZipMiddleware(plain, routes=routes, roots=[folder, os.path.dirname(small)], **options)
    except Exception:  # an older checkout without these settings (--compare-with)
        return ZipMiddleware(plain, routes=routes, roots=[folder, os.path.dirname(small)])


if os.environ.get("ZM_BENCH_DATA") and __name__ != "__main__":
    app = _make_app()


# -- a gunicorn to measure ---------------------------------------------------------------------


def gunicorn_executable() -> str:
    for candidate in (PROJECT / ".venv" / "bin" / "gunicorn", Path(sys.executable).parent / "gunicorn"):
        if candidate.exists():
            return str(candidate)
    found = shutil.which("gunicorn")
    if not found:
        raise SystemExit("gunicorn is not installed")
    return found


class Server:
    def __init__(self, tree: Path, data: Path, small: Path, limit: str | None) -> None:
        self.tree, self.data, self.small, self.limit = tree, data, small, limit
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.log = tempfile.NamedTemporaryFile(prefix="cold-ranges-", suffix=".log", delete=False)  # noqa: SIM115

    def __enter__(self) -> Server:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        env = {
            **os.environ,
            "ZM_BENCH_DATA": str(self.data),
            "ZM_BENCH_SMALL": str(self.small),
            "PYTHONPATH": f"{self.tree}{os.pathsep}{BENCH}",
        }
        if self.limit:
            env["ZM_BENCH_LIMIT"] = self.limit
        command = [
            gunicorn_executable(),
            "--worker-class", "gthread", "--workers", "1", "--threads", "8",
            "--bind", f"127.0.0.1:{self.port}", "--timeout", "120", "--graceful-timeout", "2",
            "--no-control-socket", "cold_ranges:app",
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=BENCH
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                status, _ = get(self.port, "/small")
                if status == 200 and self.worker():
                    return self
            time.sleep(0.1)
        raise SystemExit(f"gunicorn did not start: {Path(self.log.name).read_text()}")

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        os.unlink(self.log.name)

    def worker(self) -> int:
        assert self.process is not None
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError):
                    stat = Path(f"/proc/{entry}/stat").read_bytes()
                    if int(stat[stat.rfind(b")") + 2 :].split()[1]) == self.process.pid:
                        return int(entry)
        return 0

    def rchar(self) -> int:
        for line in Path(f"/proc/{self.worker()}/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
        return 0

    def cpu(self) -> float:
        fields = Path(f"/proc/{self.worker()}/stat").read_bytes().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def quiet_rchar(self, settle: float = 0.5) -> int:
        """rchar once it has stopped moving (background work finished or abandoned)."""
        last = self.rchar()
        while True:
            time.sleep(settle)
            now = self.rchar()
            if now == last:
                return now
            last = now


def get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


# -- the data set ------------------------------------------------------------------------------


def build(folder: Path, files: int, size: int) -> None:
    block = os.urandom(MIB)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(files):
        path = folder / f"part-{index:02d}.bin"
        if path.exists() and path.stat().st_size == size:
            continue
        with open(path, "wb") as out:
            for _ in range(size // MIB):
                out.write(block)
    for path in folder.iterdir():  # warm the page cache
        with open(path, "rb") as source:
            while source.read(8 * MIB):
                pass


@dataclass
class Row:
    case: str
    status: str
    received: int
    read: int
    note: str = ""

    def line(self) -> str:
        ratio = f"{self.read / self.received:,.1f}" if self.received else "-"
        return (
            f"{self.case:<34} {self.status:>6} {self.received:>14,} {self.read / MIB:>10,.1f} {ratio:>12}  {self.note}"
        )


# -- the cases ---------------------------------------------------------------------------------


def run_cases(tree: Path, data: Path, small: Path, full: bytes, limit: str) -> Iterator[Row]:
    length = len(full)
    digest_of = {}

    def check(start: int, body: bytes, status: int) -> None:
        expected = full if status == 200 else full[start : start + len(body)]
        key = (start, len(body), status)
        if key not in digest_of:
            digest_of[key] = hashlib.sha256(expected).hexdigest()
        if hashlib.sha256(body).hexdigest() != digest_of[key]:
            raise SystemExit(f"wrong body for a range from {start} ({status})")

    for label, tail in (("suffix -100", 100), ("suffix -1000", 1000), ("suffix -64 KiB", 65536)):
        with Server(tree, data, small, limit) as server:
            for attempt in ("cold", "again"):
                before = server.rchar()
                status, body = get(server.port, "/z", {"Range": f"bytes=-{tail}"})
                check(length - tail, body, status)
                yield Row(f"{label} ({attempt})", str(status), len(body), server.quiet_rchar() - before)
    with Server(tree, data, small, limit) as server:
        start = length // 2
        before = server.rchar()
        status, body = get(server.port, "/z", {"Range": f"bytes={start}-"})
        check(start, body, status)
        yield Row("from 50% (cold)", str(status), len(body), server.quiet_rchar() - before)
    with Server(tree, data, small, limit) as server:
        cut = int(length * 0.4)
        before = server.rchar()
        received = read_part(server.port, cut)
        first = server.quiet_rchar() - before
        yield Row("cut at 40% (the first attempt)", "200", received, first, "client hung up")
        before = server.rchar()
        status, body = get(server.port, "/z", {"Range": f"bytes={received}-"})
        check(received, body, status)
        yield Row("honest resume from there", str(status), len(body), server.quiet_rchar() - before)
    with Server(tree, data, small, NO_LIMIT) as server:
        before = server.rchar()
        results: list[tuple[int, bytes]] = []
        threads = [
            threading.Thread(target=lambda: results.append(get(server.port, "/z", {"Range": "bytes=-1000"})))
            for _ in range(8)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for status, body in results:
            check(length - 1000, body, status)
        total = sum(len(body) for _, body in results)
        yield Row("8 at once, -1000 (no limit)", "206" if all(s == 206 for s, _ in results) else "mixed",
                  total, server.quiet_rchar() - before, f"archive {length / MIB:,.0f} MiB")  # fmt: skip
    with Server(tree, data, small, NO_LIMIT) as server:
        before, cpu_before = server.rchar(), server.cpu()
        sockets = []
        for _ in range(16):
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.sendall(b"GET /z HTTP/1.1\r\nHost: x\r\nRange: bytes=-1000\r\n\r\n")
            sockets.append(sock)
        time.sleep(0.2)
        for sock in sockets:
            sock.close()
        started = time.monotonic()
        get(server.port, "/small")
        small_ms = (time.monotonic() - started) * 1000
        read = server.quiet_rchar(1.0) - before
        note = f"CPU {server.cpu() - cpu_before:.2f} s; a small request just after {small_ms:.0f} ms"
        yield Row("16 abandoned after 0.2 s (no limit)", "-", 0, read, note)


def read_part(port: int, at_least: int) -> int:
    """Start a full download and hang up once ``at_least`` bytes arrived; how many did."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"GET /z HTTP/1.1\r\nHost: x\r\n\r\n")
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        buffer += sock.recv(65536)
    received = len(buffer.split(b"\r\n\r\n", 1)[1])
    while received < at_least:
        received += len(sock.recv(1 << 20))
    sock.close()
    return received


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--file-mib", type=int, default=256)
    parser.add_argument("--dir", type=Path, default=None, help="where the data set is built (kept)")
    parser.add_argument("--compare-with", type=Path, default=None, help="another checkout to run the cases on")
    args = parser.parse_args()
    data = args.dir or Path(tempfile.gettempdir()) / f"zipmiddleware-cold-{args.files}x{args.file_mib}"
    small = Path(tempfile.mkdtemp(prefix="cold-small-"))
    (small / "small.txt").write_bytes(b"a small file\n")
    build(data, args.files, args.file_mib * MIB)
    trees = [("this checkout", PROJECT)] + ([("compared", args.compare_with)] if args.compare_with else [])
    with Server(PROJECT, data, small, NO_LIMIT) as server:
        _, full = get(server.port, "/z")
    print(f"archive: {len(full):,} bytes, {args.files} files of {args.file_mib} MiB; gunicorn gthread, 1 worker")
    for name, tree in trees:
        print(f"\n{name}: {tree}")
        print(f"{'case':<34} {'status':>6} {'received bytes':>14} {'read MiB':>10} {'read/recv':>12}  note")
        for row in run_cases(tree, data, small, full, str(64 * MIB)):
            print(row.line(), flush=True)
    shutil.rmtree(small, ignore_errors=True)


if __name__ == "__main__":
    main()
