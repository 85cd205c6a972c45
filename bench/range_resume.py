#!/usr/bin/env python3
"""Resuming a big stored ZIP download: what a Range request costs, with a cold and a warm CRC-32 cache.

    .venv/bin/python bench/range_resume.py                      # 40 files, 4 GiB, median of 3
    .venv/bin/python bench/range_resume.py --size-gb 0.2 --files 10 --repeat 1   # smoke run
    .venv/bin/python bench/range_resume.py --keep               # keep the data set for the next run
    sudo .venv/bin/python bench/range_resume.py --drop-caches   # cold disk: drop the page cache before each run

The data set is --files files of (--size-gb GiB / --files) bytes each, every file a
random 1 MiB block written over and over (incompressible, not sparse). It is built
once and reused when present (--dir, --keep: as in zip_throughput.py).

Every request goes through the real middleware, in process: ZipMiddleware with the
route "/z" whose resolver returns ZipTarget.from_directory(folder), called as a WSGI
app with an environ from werkzeug's EnvironBuilder; the body is iterated and closed.

Cases, in this order in every round: the full download (200), then ranges from 10%,
50% and 99% of the archive to its end ("bytes=N-") and the last 1 MiB
("bytes=-1048576"), each with a COLD CRC-32 cache (fresh and empty) and a WARM one
(the cache the round's full download filled). A cold range whose end holds the
central directory needs the CRC-32 of every file, so it reads all of them.

Figures (median of --repeat rounds):
  TTFB     from calling the app (routing, planning, layout) to the first non-empty chunk;
  total    until close() returned, minus the time this script spends hashing the body;
  MB/s     bytes sent / total (1 MB = 10**6 bytes);
  read     /proc/self/io rchar after - before: the files' data, plus a few hundred
           bytes of other reads (and SQLite pages with --sqlite-file);
  expected the least file data the response can need (from the archive's Layout):
           warm = the part of the files inside the range; cold = that, plus the rest
           of every file whose descriptor or central record lies in the range;
  max gap  the longest pause between two chunks after the first.

Correctness is checked on every run: status, Content-Range, length, and the sha256 of
each body against the same slice of the full download (hashed once, as it streams, so
nothing near the archive's size is held in memory). The central directory is also
parsed by zipfile from the full download's last MiB and checked against the files
(names, sizes, offsets, and CRC-32s computed here with zlib.crc32). Timings are
figures, not assertions; wrong bytes make the script exit with status 1.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from werkzeug.test import EnvironBuilder

# bench/ is on sys.path when a script of it runs: share the page-cache helpers.
from zip_throughput import available_memory, warm_page_cache  # noqa: E402

import zipmiddleware
from zipmiddleware import ZipMiddleware, ZipTarget
from zipmiddleware.crccache import SQLiteCrcCache
from zipmiddleware.planning import ZipPlan
from zipmiddleware.zipengine import Layout

MB = 10**6
MIB = 1 << 20
GIB = 1 << 30
BLOCK = MIB  # the random block each data file repeats
LAST = MIB  # the "last 1 MiB" case
PROC_IO = "/proc/self/io"
DROP_CACHES = "/proc/sys/vm/drop_caches"
SPACE_MARGIN = 64 * MIB  # SQLite files, temporary files


# -- the data set ---------------------------------------------------------------------------


def data_files(folder: Path, files: int) -> list[Path]:
    return [folder / f"data-{index:04d}.bin" for index in range(files)]


def write_file(path: Path, size: int) -> None:
    """``size`` bytes: one random 1 MiB block, repeated (written with os.write)."""
    block = memoryview(os.urandom(BLOCK))
    partial = path.with_suffix(".partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        written = 0
        while written < size:
            offset = written % BLOCK
            written += os.write(fd, block[offset : offset + min(BLOCK - offset, size - written)])
    finally:
        os.close(fd)
    partial.replace(path)


def missing_files(paths: list[Path], size: int) -> list[Path]:
    return [path for path in paths if not (path.is_file() and path.stat().st_size == size)]


def check_folder(folder: Path, paths: list[Path]) -> None:
    """The archive is the whole folder: refuse a folder that holds anything else."""
    for stale in folder.glob("data-*.partial"):  # left by an interrupted build
        stale.unlink()
    expected = {path.name for path in paths}
    others = sorted(name for name in os.listdir(folder) if name not in expected)
    if others:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise SystemExit(
            f"error: {folder} holds other entries than the data set ({shown}); the archive would "
            "include them. Use an empty or dedicated --dir."
        )


def free_space(folder: Path) -> int:
    existing = folder
    while not existing.exists():
        existing = existing.parent
    return shutil.disk_usage(existing).free


def drop_page_cache() -> None:
    os.sync()
    with open(DROP_CACHES, "w") as file:
        file.write("3\n")


def file_crc32(path: Path) -> int:
    crc = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while data := os.read(fd, MIB):
            crc = zlib.crc32(data, crc)
    finally:
        os.close(fd)
    return crc


# -- requests -------------------------------------------------------------------------------


def rchar() -> int | None:
    try:
        with open(PROC_IO) as io:
            for line in io:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


@dataclass
class Run:
    status: str
    headers: dict[str, str]
    ttfb: float | None  # seconds
    total: float  # seconds, without the time spent in ``consume``
    sent: int
    read: int | None  # bytes (rchar difference)
    gap: float  # the longest pause between two chunks after the first, seconds


def request(app: Any, range_header: str | None, consume: Callable[[bytes], None]) -> Run:
    """GET /z through the WSGI app; ``consume`` sees every chunk, and its time is not counted."""
    headers = {"Range": range_header} if range_header else {}
    environ = EnvironBuilder(path="/z", headers=headers).get_environ()
    response: dict[str, Any] = {}

    def start_response(status: str, response_headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        response["status"], response["headers"] = status, dict(response_headers)
        return lambda data: None

    before = rchar()
    excluded = 0.0
    first: float | None = None
    gap = 0.0
    sent = 0
    started = time.perf_counter()
    body = app(environ, start_response)
    try:
        resumed = started  # when the app last got control back
        for chunk in body:
            now = time.perf_counter()
            if not chunk:
                continue
            if first is None:
                first = now - started
            else:
                gap = max(gap, now - resumed)
            sent += len(chunk)
            consume(chunk)
            resumed = time.perf_counter()
            excluded += resumed - now
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()
    total = time.perf_counter() - started - excluded
    after = rchar()
    read = None if before is None or after is None else after - before
    return Run(response["status"], response["headers"], first, total, sent, read, gap)


class SliceHashes:
    """sha256 of the whole body and of its suffixes from given offsets, fed chunk by chunk."""

    def __init__(self, offsets: Iterable[int], keep_tail: int) -> None:
        self.pending = sorted(set(offsets))
        self.active: dict[int, Any] = {}
        self.full = hashlib.sha256()
        self.position = 0
        self.keep_tail = keep_tail
        self.tail = bytearray()

    def __call__(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        end = self.position + len(view)
        for digest in self.active.values():
            digest.update(view)
        while self.pending and self.pending[0] < end:  # suffixes that start in this chunk
            offset = self.pending.pop(0)
            self.active[offset] = hashlib.sha256(view[offset - self.position :])
        self.full.update(view)
        if self.keep_tail:
            self.tail += view[-self.keep_tail :]
            del self.tail[: max(len(self.tail) - self.keep_tail, 0)]
        self.position = end

    def digests(self) -> dict[int, str]:
        found = {offset: digest.hexdigest() for offset, digest in self.active.items()}
        found[0] = self.full.hexdigest()
        return found


class TailFile:
    """A read-only file of ``length`` bytes of which only the last ``len(tail)`` are known.

    Enough for zipfile, which reads only the end records and the central directory.
    """

    def __init__(self, tail: bytes, length: int) -> None:
        self.tail, self.length, self.base, self.position = tail, length, length - len(tail), 0

    def seek(self, offset: int, whence: int = 0) -> int:
        self.position = offset + (0, self.position, self.length)[whence]
        return self.position

    def tell(self) -> int:
        return self.position

    def read(self, size: int = -1) -> bytes:
        if self.position < self.base:
            raise OSError(f"read at {self.position}, before the last {len(self.tail)} bytes")
        start = self.position - self.base
        data = bytes(self.tail[start : None if size < 0 else start + size])
        self.position += len(data)
        return data


# -- the cases ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    label: str
    header: str | None
    start: int  # of the range (0: the full download)


def cases_for(length: int) -> list[Case]:
    cases = [Case("full download", None, 0)]
    for percent in (10, 50, 99):
        start = length * percent // 100
        cases.append(Case(f"from {percent}% (bytes={start}-)", f"bytes={start}-", start))
    cases.append(Case(f"last 1 MiB (bytes=-{LAST})", f"bytes=-{LAST}", max(length - LAST, 0)))
    return cases


def expected_read(layout: Layout, start: int, stop: int, warm: bool) -> int:
    """The least file data a response for ``[start, stop)`` can read (see the module doc)."""
    total = 0
    for index, entry in enumerate(layout.entries):
        size = entry.size or 0
        data = layout.data_offsets[index]
        inside = max(0, min(stop, data + size) - max(start, data))
        total += inside
        if warm or not size:
            continue
        descriptor, following = data + size, layout.entry_end(index)
        record_start, record_stop = layout.record_span(index)
        if (descriptor < stop and following > start) or (record_start < stop and record_stop > start):
            total += size - inside  # its CRC-32 needs the rest of the file
    return total


# -- main -----------------------------------------------------------------------------------


def make_app(folder: Path, cache: SQLiteCrcCache, chunk_size: int) -> ZipMiddleware:
    def resolve(request: Any) -> ZipTarget:
        return ZipTarget.from_directory(folder)

    def not_found(environ: Any, start_response: Any) -> list[bytes]:
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]

    # No cold_range_limit: this measures what a cold range costs when it is served (see
    # cold_ranges.py for the limit, which answers such ranges with the whole archive).
    return ZipMiddleware(
        not_found,
        routes={"/z": resolve},
        roots=[str(folder)],
        crc_cache=cache,
        chunk_size=chunk_size,
        cold_range_limit=1 << 62,
    )


def median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-gb", type=float, default=4, help="total size of the files in GiB (default 4)")
    parser.add_argument("--files", type=int, default=40, help="number of files (default 40)")
    parser.add_argument(
        "--repeat", type=int, default=3, help="rounds of every case; medians are quoted (default 3)"
    )
    parser.add_argument("--chunk-size", type=int, default=65536, help="the middleware's chunk_size")
    parser.add_argument("--dir", help="folder of the data set (default: a folder in the temp dir)")
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep a data set this run built, for the next run (one found in place is always kept)",
    )
    parser.add_argument(
        "--sqlite-file",
        action="store_true",
        help="CRC-32 caches in fresh SQLite files (in the temp dir) rather than in memory",
    )
    parser.add_argument(
        "--drop-caches",
        action="store_true",
        help=f"cold disk: sync and write 3 to {DROP_CACHES} before every request (root only)",
    )
    args = parser.parse_args()
    if args.files < 2 or args.repeat < 1 or args.size_gb <= 0:
        parser.error(
            "--files must be at least 2 (one file is sent as itself), --repeat and --size-gb positive"
        )
    size = int(args.size_gb * GIB) // args.files
    if size < 1:
        parser.error("--size-gb too small for that many files")
    if args.drop_caches and os.geteuid() != 0:
        parser.error("--drop-caches needs root")

    default_dir = Path(tempfile.gettempdir()) / f"zipmiddleware-range-{args.files}x{size}"
    folder = Path(args.dir).resolve() if args.dir else default_dir
    created = not folder.exists()
    paths = data_files(folder, args.files)
    data_bytes = size * args.files
    caches_dir = Path(tempfile.mkdtemp(prefix="zipmiddleware-range-caches-"))
    try:
        # -- data set
        to_build = missing_files(paths, size) if folder.exists() else paths
        needed, free = len(to_build) * size, free_space(folder)
        if to_build and free < needed + SPACE_MARGIN:
            raise SystemExit(
                f"error: not enough free disk space in {folder}: the data set needs "
                f"{(needed + SPACE_MARGIN) / GIB:.2f} GiB more, only {free / GIB:.2f} GiB are free. "
                "Free some space, point --dir at a larger file system, or use a smaller --size-gb."
            )
        folder.mkdir(parents=True, exist_ok=True)
        check_folder(folder, paths)
        started = time.perf_counter()
        for path in to_build:
            write_file(path, size)
        if to_build:
            os.sync()  # no write-back while timing
        action = f"built in {time.perf_counter() - started:.1f} s" if to_build else "reused"
        print(
            f"data set: {args.files} x {size:,} bytes = {data_bytes:,} bytes ({data_bytes / GIB:.2f} GiB), "
            f"a random 1 MiB block repeated per file, in {folder} ({action}; "
            f"{free_space(folder) / GIB:.1f} GiB free)"
        )
        available = available_memory()
        if available is not None and available < data_bytes * 1.2 and not args.drop_caches:
            print(f"warning: {available / GIB:.1f} GiB available memory may not hold the data set in cache")
        if args.drop_caches:
            try:
                drop_page_cache()
            except OSError as exc:
                raise SystemExit(f"error: cannot drop the page cache ({DROP_CACHES}): {exc}") from None
            page_cache = "COLD: synced and dropped (echo 3 > drop_caches) before every request"
        else:
            warm_page_cache(paths)
            page_cache = (
                "WARM: the data set was read once before timing, so every run reads from memory "
                "(a cold-disk variant: --drop-caches, as root)"
            )
        if rchar() is None:
            print(f"warning: {PROC_IO} is not readable: file data read is not measured")

        # -- the archive and its reference hashes
        counter = iter(range(1 << 30))

        def fresh_cache(kind: str) -> SQLiteCrcCache:
            if args.sqlite_file:
                return SQLiteCrcCache(caches_dir / f"{kind}-{next(counter)}.sqlite3")
            return SQLiteCrcCache()

        probe = make_app(folder, fresh_cache("probe"), args.chunk_size)
        plan = probe.planner.plan(ZipTarget.from_directory(folder))
        assert isinstance(plan, ZipPlan)
        layout = Layout(plan.entries, probe.settings.zip64)
        length = layout.length
        cases = cases_for(length)
        print(
            f"archive: {length:,} bytes, {len(plan.entries)} entries, stored, ZIP64 "
            f"{'end records' if layout.zip64_end else 'not needed'}; chunk {args.chunk_size} bytes"
        )
        print(
            f"python {platform.python_version()}, {os.cpu_count()} CPUs, zipmiddleware "
            f"{zipmiddleware.__version__}, CRC-32 cache: "
            f"{'fresh SQLite files' if args.sqlite_file else 'in-memory SQLiteCrcCache'}, "
            f"median of {args.repeat}, load average {os.getloadavg()[0]:.2f} at start"
        )
        print(f"page cache: {page_cache}")
        # One untimed request first, for what the first request of a process pays once (lazy
        # imports, mimetypes reading its tables): bytes=0-0 reads no file data.
        request(probe, "bytes=0-0", lambda chunk: None)
        sys.stdout.flush()

        runs: dict[tuple[str, str], list[Run]] = {}
        failures: list[str] = []
        reference: dict[int, str] = {}

        def check(case: Case, cache: str, run: Run, digest: str) -> None:
            where = f"{case.label}, {cache} cache"
            want_status = "200" if case.header is None else "206"
            want_length = length - case.start
            problems = []
            if not run.status.startswith(want_status):
                problems.append(f"status {run.status!r}, expected {want_status}")
            if run.headers.get("Content-Length") != str(want_length):
                problems.append(f"Content-Length {run.headers.get('Content-Length')}, expected {want_length}")
            if case.header is not None:
                content_range = f"bytes {case.start}-{length - 1}/{length}"
                if run.headers.get("Content-Range") != content_range:
                    problems.append(
                        f"Content-Range {run.headers.get('Content-Range')!r}, expected {content_range!r}"
                    )
            if run.sent != want_length:
                problems.append(f"{run.sent:,} bytes sent, expected {want_length:,}")
            want = reference.get(case.start, "(the full download was too short)")
            if reference and digest != want:
                problems.append(
                    f"sha256 {digest[:16]}... differs from bytes {case.start}- of the full download "
                    f"({want[:16]}...)"
                )
            failures.extend(f"{where}: {problem}" for problem in problems)

        def timed(app: ZipMiddleware, case: Case, cache: str) -> None:
            if args.drop_caches:
                drop_page_cache()
            digest = hashlib.sha256()
            run = request(app, case.header, digest.update)
            check(case, cache, run, digest.hexdigest())
            runs.setdefault((case.label, cache), []).append(run)

        for round_ in range(args.repeat):
            warm_cache = fresh_cache("warm")
            warm_app = make_app(folder, warm_cache, args.chunk_size)
            full = cases[0]
            if round_ == 0:  # the reference: the full body, and the sha256 of every suffix needed
                if args.drop_caches:
                    drop_page_cache()
                hashes = SliceHashes((case.start for case in cases[1:]), keep_tail=min(LAST, length))
                run = request(warm_app, full.header, hashes)
                reference.update(hashes.digests())
                check(full, "-", run, reference[0])
                runs.setdefault((full.label, "-"), []).append(run)
                tail = bytes(hashes.tail)
            else:
                timed(warm_app, full, "-")
            for case in cases[1:]:
                timed(make_app(folder, fresh_cache("cold"), args.chunk_size), case, "cold")
                timed(warm_app, case, "warm")

        # -- the central directory, against the files themselves
        try:
            with zipfile.ZipFile(TailFile(tail, length)) as archive:  # type: ignore[arg-type]
                infos = archive.infolist()
        except (OSError, zipfile.BadZipFile) as exc:
            failures.append(f"the full download's central directory cannot be read: {exc!r}")
            infos = []
        if infos:
            if [info.filename for info in infos] != [path.name for path in paths]:
                failures.append(f"central directory names {[info.filename for info in infos][:3]}...")
            for index, (info, path) in enumerate(zip(infos, paths, strict=False)):
                crc = file_crc32(path)
                if (info.file_size, info.compress_size, info.compress_type) != (size, size, 0):
                    failures.append(f"{info.filename}: sizes/method {info.file_size}, {info.compress_type}")
                if info.header_offset != layout.offsets[index]:
                    failures.append(f"{info.filename}: header offset {info.header_offset}")
                if crc != info.CRC:
                    failures.append(
                        f"{info.filename}: CRC-32 {info.CRC:08x}, zlib.crc32 of the file {crc:08x}"
                    )

        # -- the table
        rows = []
        for case in cases:
            for cache in ("-",) if case.header is None else ("cold", "warm"):
                measured = runs[(case.label, cache)]
                reads = [run.read for run in measured if run.read is not None]
                read = median(reads) if reads else None
                sent = measured[0].sent
                expected = expected_read(layout, case.start, length, warm=cache != "cold")
                ttfbs = [run.ttfb for run in measured if run.ttfb is not None]
                flag = ""
                if read is not None and read > expected * 1.01 + MIB:
                    flag = " MORE THAN EXPECTED"
                rows.append(
                    (
                        case.label,
                        cache,
                        f"{sent / MIB:,.1f}",
                        f"{median(ttfbs) * 1000:,.1f}" if ttfbs else "-",
                        f"{median([run.total for run in measured]):.3f}",
                        f"{median([run.sent / MB / run.total for run in measured]):,.0f}",
                        "-" if read is None else f"{read / MIB:,.1f}",
                        f"{expected / MIB:,.1f}",
                        "-" if read is None else f"{read / sent:,.3f}",
                        f"{median([run.gap for run in measured]):.3f}",
                        ", ".join(f"{run.total:.2f}" for run in measured) + flag,
                    )
                )
        titles = (
            "case",
            "cache",
            "sent MiB",
            "TTFB ms",
            "total s",
            "MB/s",
            "read MiB",
            "expect MiB",
            "read/sent",
            "max gap s",
            "runs: total s",
        )
        widths = [max(len(title), *(len(row[i]) for row in rows)) for i, title in enumerate(titles)]
        print()
        for row in (titles, *rows):
            cells = [f"{row[0]:<{widths[0]}}", f"{row[1]:<{widths[1]}}"]
            cells += [f"{cell:>{width}}" for cell, width in zip(row[2:-1], widths[2:-1], strict=True)]
            print("  ".join([*cells, row[-1]]).rstrip())
        print(
            f"\npage cache: {page_cache.split(':')[0]}. cold = a fresh, empty CRC-32 cache per run; warm = the "
            "cache the round's full download filled.\nread = /proc/self/io rchar difference (file data plus "
            "a few hundred bytes of other reads); expect = the least file data the\nresponse can need: warm, "
            "the files' part inside the range; cold, plus the rest of every file whose CRC-32 it needs."
        )
        print(f"load average {os.getloadavg()[0]:.2f} at the end")
        if failures:
            print(f"\nWRONG: {len(failures)} problem(s):")
            for failure in failures:
                print(f"  {failure}")
            sys.exit(1)
        print(
            f"verified: every body's length, headers and sha256 equal the same slice of the full download; "
            f"its central directory (read by zipfile) lists the {len(infos)} files with their sizes, offsets "
            "and zlib.crc32."
        )
    finally:
        shutil.rmtree(caches_dir, ignore_errors=True)
        if created and not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
