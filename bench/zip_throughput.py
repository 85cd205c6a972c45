#!/usr/bin/env python3
"""Throughput and memory of zipmiddleware's stored-ZIP engine against a plain read + CRC-32.

    .venv/bin/python bench/zip_throughput.py            # 20 x 100 MB, 64 KiB chunks, median of 3
    .venv/bin/python bench/zip_throughput.py --files 5 --size-mb 20 --repeat 5 --keep

The data set is random (incompressible) bytes, built once and reused when present;
it is read once before timing so every method reads from the page cache. One
round runs every method once, in a fixed order, and the rounds are repeated;
each method's figure is the median of its runs. MB/s counts the files' bytes
(1 MB = 10**6 bytes), for every method, so the figures compare directly.

Methods:
  (a) read + CRC-32: os.read(chunk) of each file and a CRC-32 over it (the one the
      middleware uses: ISA-L's where installed); the floor any stored ZIP writer that copies
      the data through user space has to do anyway.
  (b) zipmiddleware's ordinary path (zero_copy off, or no gunicorn): the archive as the
      range [0, length) of its layout, CRC-32s computed, as a WSGI server iterates it.
  (c) zipstream-new's own write(path) (8 KiB reads), for comparison, where it is installed
      (zipmiddleware no longer depends on it: `pip install 'zipstream-new>=1.1.8,<1.2'`).
  (d) zipmiddleware with 1 MiB chunks.

Targets: (b)/(a) >= 0.95 at 64 KiB; peak RSS of a fresh interpreter streaming the
whole archive < 40 MB.
"""

from __future__ import annotations

import argparse
import contextlib
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
from collections.abc import Callable, Iterable
from importlib import metadata
from pathlib import Path

# Imported before any timing, so that no method pays for imports. zipstream-new is optional;
# zipstream-ng installs the same import name and is not it.
try:
    import zipstream

    if not hasattr(getattr(zipstream, "ZipFile", None), "write_iter"):
        zipstream = None
except ImportError:
    zipstream = None

import zipmiddleware
from zipmiddleware import ZipEntry, ZipTarget
from zipmiddleware.compression import crc32
from zipmiddleware.config import build_settings
from zipmiddleware.crccache import MemoryCrcCache
from zipmiddleware.planning import Planner
from zipmiddleware.zipengine import Layout, ZipRange

MB = 10**6
RATIO_TARGET = 0.95
RSS_TARGET_MB = 40


# -- the data set ---------------------------------------------------------------------------


def data_files(folder: Path, files: int) -> list[Path]:
    return [folder / f"data-{index:04d}.bin" for index in range(files)]


def build_data_set(folder: Path, files: int, size: int) -> tuple[list[Path], bool]:
    """Random files of ``size`` bytes; existing files of the right size are reused."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = data_files(folder, files)
    built = False
    for path in paths:
        if path.is_file() and path.stat().st_size == size:
            continue
        built = True
        partial = path.with_suffix(".partial")
        with open(partial, "wb") as file:
            remaining = size
            while remaining:
                block = os.urandom(min(remaining, 1 << 20))
                file.write(block)
                remaining -= len(block)
        partial.replace(path)
    return paths, built


def warm_page_cache(paths: Iterable[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            while os.read(fd, 1 << 20):
                pass
        finally:
            os.close(fd)


def available_memory() -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


# -- the methods ----------------------------------------------------------------------------


def read_and_crc(paths: list[Path], chunk_size: int) -> int:
    total = 0
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            crc = 0
            while data := os.read(fd, chunk_size):
                crc = crc32(data, crc)
                total += len(data)
        finally:
            os.close(fd)
    return total


def zipmiddleware_stream(paths: list[Path], chunk_size: int) -> int:
    """Plan the entries as the middleware does, then iterate the body (the whole archive as
    the range [0, length) of its layout, CRC-32s computed: a cold cache) and close it."""
    planner = Planner(build_settings({"roots": [str(paths[0].parent)]}))
    plan = planner.plan(ZipTarget([ZipEntry(path.name, path=path) for path in paths]))
    layout = Layout(plan.entries)
    stream = ZipRange(layout, 0, layout.length, chunk_size=chunk_size, crc_cache=MemoryCrcCache())
    total = 0
    try:
        for chunk in stream:
            total += len(chunk)
    finally:
        stream.close()
    return total


def zipstream_new_write(paths: list[Path], chunk_size: int) -> int:
    archive = zipstream.ZipFile(mode="w", compression=zipfile.ZIP_STORED, allowZip64=True)
    for path in paths:
        archive.write(str(path), path.name)
    return sum(len(chunk) for chunk in archive)


# -- timing ---------------------------------------------------------------------------------


def measure(
    methods: list[tuple[str, Callable[[list[Path], int], int], int]],
    paths: list[Path],
    repeat: int,
) -> dict[str, list[float]]:
    """MB/s of every run of every method; rounds alternate the order, to even out drift."""
    data_bytes = sum(path.stat().st_size for path in paths)
    runs: dict[str, list[float]] = {label: [] for label, _, _ in methods}
    for round_ in range(repeat):
        for label, method, chunk_size in methods if round_ % 2 == 0 else methods[::-1]:
            start = time.perf_counter()
            produced = method(paths, chunk_size)
            elapsed = time.perf_counter() - start
            if produced < data_bytes:
                raise SystemExit(f"{label}: produced {produced} bytes for {data_bytes} bytes of files")
            runs[label].append(data_bytes / MB / elapsed)
    return runs


def child_peak_rss(folder: Path, files: int, chunk_size: int, generate: bool) -> float:
    """Peak RSS (VmHWM, MB) of a fresh interpreter that streams the archive (or only imports).

    The child reads its own VmHWM. RUSAGE_CHILDREN's ru_maxrss is not used: on Linux it
    also counts the memory the child had before exec, that is the parent's, so it
    reports this (larger) process rather than the streaming one.
    """
    command = [sys.executable, os.path.abspath(__file__), "--dir", str(folder), "--files", str(files)]
    command += ["--chunk-size", str(chunk_size), "--rss-child", "stream" if generate else "idle"]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return int(result.stdout.split()[-1]) * 1024 / MB


def vm_hwm_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def rss_child(args: argparse.Namespace) -> None:
    """Runs in the child: stream the archive (or only import everything), report VmHWM."""
    if args.rss_child == "stream":
        zipmiddleware_stream(data_files(Path(args.dir), args.files), args.chunk_size)
    print(vm_hwm_kib())


# -- main -----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=20, help="number of files (default 20)")
    parser.add_argument("--size-mb", type=int, default=100, help="size of each file in MB (default 100)")
    parser.add_argument("--chunk-size", type=int, default=65536, help="read/chunk size (default 65536)")
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs per method; the median counts (default 3)"
    )
    parser.add_argument("--dir", help="folder of the data set (default: a folder in the temp dir)")
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep a data set this run built, for the next run (one found in place is always kept)",
    )
    parser.add_argument("--rss-child", choices=["stream", "idle"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args)
        return
    if args.files < 1 or args.size_mb < 1 or args.repeat < 1 or args.chunk_size < 1:
        parser.error("--files, --size-mb, --repeat and --chunk-size must be positive")

    size = args.size_mb * MB
    default_dir = Path(tempfile.gettempdir()) / f"zipmiddleware-bench-{args.files}x{args.size_mb}MB"
    folder = Path(args.dir) if args.dir else default_dir
    created = not folder.exists()
    data_bytes = args.files * size
    try:
        free = shutil.disk_usage(folder if folder.exists() else folder.parent).free
        started = time.perf_counter()
        paths, built = build_data_set(folder, args.files, size)
        if built and free < data_bytes:
            print(f"warning: only {free / MB:,.0f} MB were free for {data_bytes / MB:,.0f} MB of data")
        action = "built" if built else "reused"
        print(f"data set: {args.files} x {args.size_mb} MB random bytes in {folder} ({action}", end="")
        print(f" in {time.perf_counter() - started:.1f} s)" if built else ")")
        available = available_memory()
        if available is not None and available < data_bytes * 1.2:
            print(f"warning: {available / MB:,.0f} MB available memory may not hold the data set in cache")
        warm_page_cache(paths)

        chunk = args.chunk_size
        other = f"zipstream-new {metadata.version('zipstream-new')}" if zipstream else "no zipstream-new"
        print(
            f"python {platform.python_version()}, {os.cpu_count()} CPUs, zipmiddleware "
            f"{zipmiddleware.__version__}, {other}, chunk {chunk} bytes, median of {args.repeat}\n"
        )
        mib = 1 << 20
        methods = [
            (f"(a) read + CRC-32, {chunk // 1024} KiB", read_and_crc, chunk),
            (f"(b) zipmiddleware ZipRange, {chunk // 1024} KiB", zipmiddleware_stream, chunk),
            ("(c) zipstream-new write(path), 8 KiB reads", zipstream_new_write, chunk),
            ("(d) zipmiddleware ZipRange, 1 MiB", zipmiddleware_stream, mib),
        ]
        if zipstream is None:
            del methods[2]
        runs = measure(methods, paths, args.repeat)
        medians = {label: statistics.median(values) for label, values in runs.items()}
        baseline = medians[methods[0][0]]
        width = max(len(label) for label in medians)
        print(f"{'method':<{width}}  {'MB/s':>7}  {'x (a)':>6}  runs (MB/s)")
        for label, value in medians.items():
            values = ", ".join(f"{v:,.0f}" for v in runs[label])
            print(f"{label:<{width}}  {value:>7,.0f}  {value / baseline:>6.2f}  {values}")

        ratio = medians[methods[1][0]] / baseline
        paired = ", ".join(
            f"{b / a:.3f}" for a, b in zip(runs[methods[0][0]], runs[methods[1][0]], strict=True)
        )
        verdict = "ok" if ratio >= RATIO_TARGET else "BELOW TARGET"
        print(
            f"\n(b)/(a) = {ratio:.3f} at {chunk // 1024} KiB (target >= {RATIO_TARGET}): {verdict}"
            f"  [round by round: {paired}]"
        )

        hwm = child_peak_rss(folder, args.files, chunk, generate=True)
        idle = child_peak_rss(folder, args.files, chunk, generate=False)
        verdict = "ok" if hwm < RSS_TARGET_MB else "ABOVE TARGET"
        print(
            f"peak RSS streaming the archive in a fresh interpreter: {hwm:.1f} MB VmHWM "
            f"({idle:.1f} MB after the imports alone) "
            f"(target < {RSS_TARGET_MB} MB): {verdict}"
        )
    finally:
        if created and not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
