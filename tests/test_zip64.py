"""ZIP64 archives past 2 GiB and 4 GiB, served by the real middleware and read by four readers.

Every archive is produced by calling the ZipMiddleware WSGI application with a
werkzeug environ, writing each chunk it yields to a file in the pytest temp dir,
and calling ``close()``. Each archive is then checked by:

* Python's zipfile: names, sizes, CRC-32s and offsets from the central directory,
  every entry read through (zipfile verifies the CRC at the end of each entry),
  plus the local header and data descriptor of every entry, byte by byte: a ZIP64
  extra in the local header exactly when the descriptor is the 64-bit form;
* Info-ZIP ``unzip -t`` (and ``unzip -lv`` for its view of sizes and CRCs);
* 7-Zip ``7z t`` (and ``7z l -slt``);
* libarchive's ``bsdtar`` reading the archive from a pipe, the streaming mode that
  trusts the local headers and data descriptors and never sees the central
  directory. ``bsdtar -tv`` in that mode lists data-descriptor entries with size 0
  and exits 0 even when it silently stops early, so ``bsdtar -xvO`` is used: it
  extracts every entry to stdout (checking each CRC) and, with stderr on the same
  pipe, announces each one as ``x NAME`` just before its data; the output is
  parsed against the expected names, sizes and contents.

The full response must carry a Content-Length equal to the body's length (it is
computed before the first byte from ``zipengine.Layout``, which is also compared
with the archive written) and ``Accept-Ranges: bytes``. The same middleware
instance, whose CRC-32 cache the full download filled, then answers ranges at
every kind of record and across 2 GiB - 1 and 4 GiB; each 206 must be exactly those
bytes of the full download, and a range of the last MiB must read little file data.
An archive of 65,600 small files (ZIP64 end record for the count alone) goes
through the same checks.

Inputs are sparse files (all zeros, no disk blocks). The archive is written as a
sparse file too: a chunk that is all zeros becomes a hole (seek instead of write).
Reading it back gives exactly the bytes the middleware yielded, without writing
gigabytes of zeros to the disk.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from werkzeug.test import EnvironBuilder

from zipmiddleware import ZipEntry, ZipMiddleware, ZipTarget
from zipmiddleware.planning import ZipPlan
from zipmiddleware.zipengine import Layout, crc32_combine

from .clients import unavailable

pytestmark = pytest.mark.slow

CHUNK_SIZE = 65536
LIMIT = zipfile.ZIP64_LIMIT  # 2 GiB - 1: where we (and stdlib) switch to ZIP64
FOUR_GIB = 1 << 32
MIN_FREE_BYTES = 15 * 10**9
TOOLS = ("cat", "unzip", "7z", "bsdtar")
READ_SIZE = 1 << 20
ZEROS = bytes(READ_SIZE)
TIMEOUT = 900  # seconds per external reader; far above what any of them needs


# -- the CRC-32 of n zero bytes, without reading them ---------------------------------


def crc32_of_zeros(length: int) -> int:
    """``zlib.crc32(bytes(length))`` in O(log length) steps, by doubling with
    ``crc32_combine`` (itself checked against zlib in test_ranges.py)."""
    if length <= READ_SIZE:
        return zlib.crc32(ZEROS[:length])
    half = crc32_of_zeros(length // 2)
    whole = crc32_combine(half, half, length // 2)
    return crc32_combine(whole, zlib.crc32(ZEROS[: length % 2]), length % 2)


# -- expected archive members ----------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """One expected entry: a sparse file of ``size`` zero bytes, or a small file with ``data``."""

    name: str
    size: int
    data: bytes | None = None

    @property
    def crc(self) -> int:
        return zlib.crc32(self.data) if self.data is not None else crc32_of_zeros(self.size)

    def create(self, folder: Path) -> Path:
        path = folder / self.name
        if self.data is not None:
            path.write_bytes(self.data)
        else:
            with open(path, "wb"):
                pass
            os.truncate(path, self.size)  # sparse: no data blocks
        return path


def zeros(name: str, size: int) -> Member:
    return Member(name, size)


def small(name: str) -> Member:
    data = bytes(range(256)) * 40 + name.encode()  # not zeros: a misplaced byte shows
    return Member(name, len(data), data)


# -- producing the archive through the WSGI application ----------------------------------

URL = "/zip64/case"


@dataclass
class Server:
    """One ZipMiddleware instance serving ``members`` at :data:`URL`.

    The same instance answers the full download and then the ranges, so that the
    ranges find the CRC-32s the full download left in its store: an SQLite file of its
    own, next to the sources, so that what the ranges read (SQLite's pages count in
    /proc/self/io too) does not depend on what earlier tests left in the per-user store.
    """

    middleware: ZipMiddleware
    target: ZipTarget

    @classmethod
    def serving(cls, sources: Path, members: list[Member], *, whole_folder: bool = False) -> Server:
        """Explicit entries in ``members``' order, or (``whole_folder``) the folder, walked and sorted."""
        paths = [member.create(sources) for member in members]
        if whole_folder:
            assert [m.name for m in members] == sorted(m.name for m in members)
            target = ZipTarget.from_directory(sources, "case.zip")
        else:
            target = ZipTarget([ZipEntry(p.name, path=p) for p in paths], "case.zip")

        def resolve(request: Any, case: str) -> ZipTarget:
            return target

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
            raise AssertionError("the download route must not reach the wrapped application")

        middleware = ZipMiddleware(
            app,
            routes={"/zip64/<case>": resolve},
            roots=[str(sources)],
            chunk_size=CHUNK_SIZE,
            crc_cache=str(sources.parent / "crc32.sqlite"),
        )
        return cls(middleware, target)

    def get(self, headers: dict[str, str] | None = None) -> tuple[str, dict[str, str], Iterable[bytes]]:
        """Call the middleware: its status, headers and (not yet iterated) body."""
        environ = EnvironBuilder(path=URL, method="GET", headers=headers).get_environ()
        started: list[tuple[str, list[tuple[str, str]]]] = []

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
            started.append((status, headers))

        body = self.middleware(environ, start_response)
        assert len(started) == 1
        status, header_list = started[0]
        return status, dict(header_list), body

    def layout(self) -> Layout:
        """The middleware's own layout of this archive, planned as a request would plan it."""
        plan = self.middleware.planner.plan(self.target)
        assert isinstance(plan, ZipPlan)
        return Layout(plan.entries)


@dataclass
class Produced:
    status: str
    headers: dict[str, str]
    total: int
    chunk_sizes: list[int]


def produce_archive(server: Server, output: Path) -> Produced:
    """Download the whole archive from ``server`` and write the response body to ``output``."""
    status, headers, body = server.get()
    chunk_sizes: list[int] = []
    zero_chunks: dict[int, bytes] = {}
    total = 0
    try:
        with open(output, "wb") as file:
            for chunk in body:
                assert isinstance(chunk, bytes), f"chunk {len(chunk_sizes)} is {type(chunk).__name__}"
                size = len(chunk)
                chunk_sizes.append(size)
                total += size
                zero = zero_chunks.get(size)
                if zero is None:
                    zero = zero_chunks[size] = bytes(size)
                if chunk == zero:
                    file.seek(size, os.SEEK_CUR)  # leave a hole: reads back as zeros
                else:
                    file.write(chunk)
            file.truncate(total)  # in case the archive ended in a hole
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()
    return Produced(status, headers, total, chunk_sizes)


def check_response(produced: Produced, output: Path) -> None:
    assert produced.status == "200 OK"
    assert produced.headers["Content-Type"] == "application/zip"
    assert output.stat().st_size == produced.total
    # The length was promised before the first byte: it must be the body's length.
    assert "Content-Length" in produced.headers, produced.headers
    assert int(produced.headers["Content-Length"]) == produced.total, (
        f"Content-Length {produced.headers['Content-Length']}, body {produced.total} bytes"
    )
    assert produced.headers.get("Accept-Ranges") == "bytes", produced.headers
    assert produced.headers.get("ETag"), produced.headers
    sizes = produced.chunk_sizes
    assert sizes, "the body yielded nothing"
    assert min(sizes) > 0, f"empty chunk at index {sizes.index(0)}"
    short = [(index, size) for index, size in enumerate(sizes[:-1]) if size < CHUNK_SIZE]
    assert not short, f"chunks before the last one shorter than {CHUNK_SIZE}: {short[:10]}"


# -- ranges of the archive, from the same middleware (CRC-32 cache warm) -----------------

RANGE_SIZE = 4096
TAIL_SIZE = 1 << 20
TAIL_READ_LIMIT = 8 << 20  # bytes a range of the last MiB may read, all files together


def read_rchar() -> int:
    """Bytes this process has read with read() and friends so far (any file, any thread)."""
    with open("/proc/self/io") as io_stats:
        fields = dict(line.split(": ") for line in io_stats.read().splitlines())
    return int(fields["rchar"])


def drain(body: Iterable[bytes]) -> bytes:
    """A WSGI body's bytes; the body is closed as a server would close it."""
    try:
        return b"".join(body)
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()


def request_range(server: Server, output: Path, label: str, start: int, size: int = RANGE_SIZE) -> bytes:
    """GET ``Range: bytes=start-(start+size-1)`` (clipped to the archive): check the 206 against the file."""
    total = output.stat().st_size
    stop = min(start + size, total)  # exclusive
    assert 0 <= start < stop, f"{label}: range {start}-{stop} outside {total} bytes"
    status, headers, body = server.get({"Range": f"bytes={start}-{stop - 1}"})
    data = drain(body)
    where = f"{label}: bytes {start}-{stop - 1} of {total}"
    assert status.split()[0] == "206", f"{where}: status {status}"
    assert headers.get("Content-Range") == f"bytes {start}-{stop - 1}/{total}", f"{where}: {headers}"
    assert headers.get("Content-Length") == str(stop - start), f"{where}: {headers}"
    assert headers.get("Accept-Ranges") == "bytes", f"{where}: {headers}"
    with open(output, "rb") as file:
        file.seek(start)
        expected = file.read(stop - start)
    if data != expected:
        first = next(
            (i for i, (a, b) in enumerate(zip(data, expected, strict=False)) if a != b),
            min(len(data), len(expected)),
        )
        raise AssertionError(
            f"{where}: {len(data)} bytes, first difference at archive offset {start + first}: "
            f"expected {expected[first : first + 32].hex(' ')}, got {data[first : first + 32].hex(' ')}"
        )
    return data


def end_records(output: Path) -> dict[str, int]:
    """Where the end record and (if present) the ZIP64 end record and locator start."""
    total = output.stat().st_size
    with open(output, "rb") as file:
        file.seek(total - 22)
        assert file.read(4) == b"PK\x05\x06", "no end record in the last 22 bytes (no comment)"
        positions = {"end record": total - 22}
        file.seek(total - 22 - 20)
        if file.read(4) == b"PK\x06\x07":
            positions["ZIP64 locator"] = total - 22 - 20
            file.seek(total - 22 - 20 + 8)
            (record,) = struct.unpack("<Q", file.read(8))
            assert record == total - 22 - 20 - 56, f"ZIP64 end record at {record}"
            file.seek(record)
            assert file.read(4) == b"PK\x06\x06", f"no ZIP64 end record at {record}"
            positions["ZIP64 end record"] = record
    return positions


def zip64_extra_at(extra: bytes) -> int | None:
    """Where the ZIP64 field (tag 0x0001) starts in an extra field, if it has one."""
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, pos)
        if tag == 0x0001:
            return pos
        pos += 4 + length
    return None


def local_records(output: Path, info: zipfile.ZipInfo) -> tuple[int, int | None, int]:
    """Where the entry's data, its local ZIP64 extra (if any) and its data descriptor start."""
    with open(output, "rb") as file:
        file.seek(info.header_offset)
        name_len, extra_len = struct.unpack("<HH", file.read(30)[26:30])
        file.seek(info.header_offset + 30 + name_len)
        extra = file.read(extra_len)
    at = zip64_extra_at(extra)
    zip64_extra = None if at is None else info.header_offset + 30 + name_len + at
    data = info.header_offset + 30 + name_len + extra_len
    return data, zip64_extra, data + info.compress_size


def interesting_offsets(output: Path, infos: list[zipfile.ZipInfo]) -> dict[str, int]:
    """Range starts at every kind of record, and across the 2 GiB - 1 and 4 GiB boundaries."""
    total = output.stat().st_size
    with zipfile.ZipFile(output) as archive:
        directory = archive.start_dir
    offsets = {"inside the first local header": 7}
    for boundary, label in ((LIMIT, "2 GiB - 1"), (FOUR_GIB, "4 GiB")):
        for delta in (-RANGE_SIZE // 2, -1, 0, 1):
            offsets[f"{label} {delta:+d}"] = boundary + delta
    # Every entry of the big archives; of many small entries (where each request costs
    # about a second of planning), the first and the last.
    sample = infos if len(infos) <= 8 else [infos[0], infos[-1]]
    for info in sample:
        data, zip64_extra, descriptor = local_records(output, info)
        name = info.filename
        offsets[f"{name}: across the end of the previous record into its local header"] = max(
            info.header_offset - 9, 0
        )
        offsets[f"{name}: start of its data"] = data
        if zip64_extra is not None:
            offsets[f"{name}: inside the ZIP64 local extra"] = zip64_extra + 6
        offsets[f"{name}: across the end of its data into the descriptor"] = max(descriptor - 100, 0)
        offsets[f"{name}: inside its data descriptor"] = descriptor + 5
    offsets["start of the central directory"] = directory
    offsets["middle of the central directory"] = directory + (total - directory) // 2
    for record, position in end_records(output).items():
        offsets[f"inside the {record}"] = position + 7
    offsets["last byte"] = total - 1
    unique: dict[int, str] = {}
    for label, offset in offsets.items():
        if 0 <= offset < total:
            unique.setdefault(offset, label)
    return {label: offset for offset, label in unique.items()}


def check_layout(server: Server, output: Path, infos: list[zipfile.ZipInfo]) -> None:
    """The Layout that gave Content-Length agrees with the archive actually written."""
    layout = server.layout()
    with zipfile.ZipFile(output) as archive:
        directory = archive.start_dir
    assert layout.length == output.stat().st_size
    assert layout.offsets == [info.header_offset for info in infos]
    assert layout.data_offsets == [local_records(output, info)[0] for info in infos]
    assert layout.directory_offset == directory
    assert layout.zip64_end == ("ZIP64 end record" in end_records(output))


def check_ranges(server: Server, output: Path, infos: list[zipfile.ZipInfo]) -> None:
    check_layout(server, output, infos)
    for label, start in interesting_offsets(output, infos).items():
        request_range(server, output, label, start)
    check_tail_reads_little(server, output)


def check_tail_reads_little(server: Server, output: Path) -> None:
    """The last MiB, with every CRC-32 cached, reads at most a few MiB of file data."""
    total = output.stat().st_size
    start = max(total - TAIL_SIZE, 0)
    before = read_rchar()
    status, headers, body = server.get({"Range": f"bytes={start}-{total - 1}"})
    data = drain(body)
    read = read_rchar() - before
    assert status.split()[0] == "206" and len(data) == total - start, (status, headers, len(data))
    assert read < TAIL_READ_LIMIT, f"a range of the last {total - start} bytes read {read} bytes"
    with open(output, "rb") as file:
        file.seek(start)
        assert data == file.read(), "the last MiB differs from the full download's"


# -- reader 1: Python's zipfile, and the raw local records -------------------------------


def check_with_zipfile(output: Path, members: list[Member]) -> list[zipfile.ZipInfo]:
    with zipfile.ZipFile(output) as archive:
        infos = archive.infolist()
        assert [info.filename for info in infos] == [m.name for m in members]
        for info, member in zip(infos, members, strict=True):
            assert info.compress_type == zipfile.ZIP_STORED, info.filename
            assert (info.file_size, info.compress_size) == (member.size, member.size), info.filename
            stored_crc = info.CRC
            assert stored_crc == member.crc, f"{info.filename}: CRC {stored_crc:08x} != {member.crc:08x}"
            assert info.flag_bits & 0x08, f"{info.filename}: no data descriptor flag"
        for info, member in zip(infos, members, strict=True):
            read = 0
            with archive.open(info) as entry:  # raises BadZipFile on a CRC mismatch at the end
                while data := entry.read(READ_SIZE):
                    expected = member.data[read : read + len(data)] if member.data is not None else None
                    if expected is None:
                        expected = ZEROS if len(data) == READ_SIZE else bytes(len(data))
                    assert data == expected, f"{info.filename}: wrong bytes near offset {read}"
                    read += len(data)
            assert read == member.size, f"{info.filename}: read {read} bytes, expected {member.size}"
    return infos


def check_local_records(output: Path, infos: list[zipfile.ZipInfo]) -> None:
    """Local header, data and data descriptor of every entry follow each other exactly.

    A streaming reader takes the descriptor's form from the local header: ZIP64
    extra present -> 24-byte descriptor (8-byte sizes), absent -> 16 bytes. The two
    must agree, and the next record must start right after the descriptor.
    """
    with zipfile.ZipFile(output) as archive:
        central_directory = archive.start_dir
    ends = [info.header_offset for info in infos[1:]] + [central_directory]
    with open(output, "rb") as file:
        for info, end in zip(infos, ends, strict=True):
            file.seek(info.header_offset)
            header = file.read(30)
            signature, _, flags, method, _, _, crc, csize, usize, name_len, extra_len = struct.unpack(
                "<4s5H3L2H", header
            )
            assert signature == b"PK\x03\x04", f"{info.filename}: no local header at {info.header_offset}"
            assert flags & 0x08 and method == zipfile.ZIP_STORED
            assert file.read(name_len).decode() == info.filename
            extra = file.read(extra_len)
            zip64_extra = zip64_extra_at(extra)
            if info.file_size > LIMIT:
                assert zip64_extra is not None, f"{info.filename}: {info.file_size} bytes, no ZIP64 extra"
            else:
                assert zip64_extra is None, (
                    f"{info.filename}: {info.file_size} bytes, but the local header has a ZIP64 extra "
                    "(streaming readers then expect a 64-bit data descriptor)"
                )
            data_start = info.header_offset + 30 + name_len + extra_len
            file.seek(data_start + info.compress_size)
            if zip64_extra is not None:
                descriptor = file.read(24)
                signature, crc, csize, usize = struct.unpack("<4sLQQ", descriptor)
            else:
                descriptor = file.read(16)
                signature, crc, csize, usize = struct.unpack("<4sLLL", descriptor)
            assert signature == b"PK\x07\x08", f"{info.filename}: no data descriptor after the data"
            assert (crc, csize, usize) == (info.CRC, info.compress_size, info.file_size), info.filename
            assert file.tell() == end, f"{info.filename}: {end - file.tell()} stray bytes after it"


# -- readers 2 and 3: unzip and 7-Zip (central directory readers) -------------------------


def run(args: list[str], output: Path) -> str:
    result = subprocess.run(
        [*args, str(output)], capture_output=True, text=True, errors="replace", timeout=TIMEOUT
    )
    assert result.returncode == 0, (
        f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}{result.stderr}"
    )
    return result.stdout + result.stderr


def check_unzip_listing(output: Path, members: list[Member]) -> None:
    text = run(["unzip", "-lv"], output)
    # "  Length  Method    Size  Cmpr    Date    Time   CRC-32   Name"
    rows = re.findall(r"^\s*(\d+)\s+Stored\s+(\d+)\s+\S+\s+\S+\s+\S+\s+([0-9a-f]{8})\s+(.+?)\s*$", text, re.M)
    assert [(int(u), int(c), int(crc, 16), name) for u, c, crc, name in rows] == [
        (m.size, m.size, m.crc, m.name) for m in members
    ], text


def check_unzip_test(process: subprocess.Popen[str], members: list[Member]) -> None:
    stdout, stderr = process.communicate(timeout=TIMEOUT)
    text = stdout + stderr
    assert process.returncode == 0, f"unzip -t exited {process.returncode}:\n{text}"
    assert "No errors detected in compressed data" in text, text
    tested = re.findall(r"^\s*testing: (.+?)\s+OK$", text, re.M)
    assert tested == [m.name for m in members], text


def complaints(text: str, output: Path) -> list[str]:
    """7-Zip's warning and error lines (lines naming the archive itself are not complaints)."""
    return [
        line
        for line in text.splitlines()
        if re.search(r"warning|error|unexpected|unsupported", line, re.I) and str(output) not in line
    ]


def check_7z(output: Path, members: list[Member]) -> None:
    text = run(["7z", "t", "-bd"], output)
    assert "Everything is Ok" in text, text
    assert not complaints(text, output), text
    assert re.search(rf"^Files: {len(members)}$", text, re.M), text
    assert re.search(rf"^Size:\s+{sum(m.size for m in members)}$", text, re.M), text

    listing = run(["7z", "l", "-slt"], output)
    assert not complaints(listing, output), listing
    blocks = listing.split("\n\n")
    entries = []
    for block in blocks:
        fields = dict(re.findall(r"^(\w[\w ]*?) = (.*)$", block, re.M))
        if "CRC" in fields and "Path" in fields:
            entries.append((fields["Path"], int(fields["Size"]), int(fields["CRC"], 16)))
    assert entries == [(m.name, m.size, m.crc) for m in members], listing


# -- reader 4: bsdtar, streaming from a pipe ----------------------------------------------


def check_bsdtar_stream(output: Path, members: list[Member]) -> None:
    """``cat archive | bsdtar -xvOf -``: every entry announced, then exactly its bytes."""
    cat = subprocess.Popen(["cat", str(output)], stdout=subprocess.PIPE)
    tar = subprocess.Popen(
        ["bsdtar", "-xvOf", "-"], stdin=cat.stdout, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert cat.stdout is not None and tar.stdout is not None
    cat.stdout.close()  # bsdtar holds the only reading end now
    stream = tar.stdout
    seen = []

    def context() -> str:
        rest = stream.read(2000).replace(b"\0", b"")
        return f"after entries {seen}: {rest.decode(errors='replace')!r}"

    try:
        for member in members:
            marker = b"x " + member.name.encode()
            got = stream.read(len(marker))
            assert got == marker, f"expected {marker!r}, got {got!r} " + context()
            read = 0
            while read < member.size:
                data = stream.read1(min(READ_SIZE, member.size - read))
                assert data, f"{member.name}: bsdtar output ended after {read} of {member.size} bytes"
                if member.data is not None:
                    expected = member.data[read : read + len(data)]
                else:
                    expected = ZEROS if len(data) == READ_SIZE else bytes(len(data))
                if data != expected:
                    first = next(i for i, (a, b) in enumerate(zip(data, expected, strict=True)) if a != b)
                    raise AssertionError(
                        f"{member.name}: unexpected bytes at offset {read + first} of {member.size}: "
                        f"{data[first : first + 300]!r}"
                    )
                read += len(data)
            got = stream.read(1)
            assert got == b"\n", f"{member.name}: expected its end after {member.size} bytes " + context()
            seen.append(member.name)
        rest = stream.read()
        assert rest == b"", f"bsdtar wrote more after the last entry: {rest[:2000]!r}"
        assert tar.wait(timeout=TIMEOUT) == 0, "bsdtar failed"
        assert cat.wait(timeout=TIMEOUT) == 0, "cat failed"
    finally:
        for process in (tar, cat):
            if process.poll() is None:
                process.kill()
                process.wait()
        stream.close()


# -- the whole check ----------------------------------------------------------------------


def require_tools() -> None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        unavailable(f"needs {', '.join(missing)} on PATH (Debian: unzip p7zip-full libarchive-tools)")


@pytest.fixture
def workdir(tmp_path: Path) -> Iterable[Path]:
    """An empty folder for sources and the archive, deleted as soon as the test ends."""
    require_tools()
    free = shutil.disk_usage(tmp_path).free
    if free < MIN_FREE_BYTES:
        pytest.skip(
            f"needs ~{MIN_FREE_BYTES / 1e9:.0f} GB free in {tmp_path} in case sparse files are not "
            f"supported there; only {free / 1e9:.1f} GB free"
        )
    folder = tmp_path / "zip64"
    (folder / "sources").mkdir(parents=True)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def serve_and_verify(
    folder: Path, members: list[Member], *, whole_folder: bool = False
) -> list[zipfile.ZipInfo]:
    output = folder / "archive.zip"
    server = Server.serving(folder / "sources", members, whole_folder=whole_folder)
    produced = produce_archive(server, output)
    check_response(produced, output)
    # Ranges need the source files and the middleware whose cache the download filled.
    with zipfile.ZipFile(output) as archive:
        check_ranges(server, output, archive.infolist())
    shutil.rmtree(folder / "sources")  # the archive is all that is needed from here on

    # unzip -t is the slowest reader (its CRC-32 runs at ~250 MB/s): start it first and
    # let it run on the second core while the other readers go.
    unzip = subprocess.Popen(
        ["unzip", "-t", str(output)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
    )
    try:
        check_bsdtar_stream(output, members)
        infos = check_with_zipfile(output, members)
        check_local_records(output, infos)
        check_7z(output, members)
        check_unzip_listing(output, members)
        check_unzip_test(unzip, members)
    finally:
        if unzip.poll() is None:
            unzip.kill()
            unzip.communicate()
    return infos


# -- the cases ------------------------------------------------------------------------------


def test_archive_over_4gib_of_files_under_2gib(workdir: Path) -> None:
    """3 x 1.45 GB then a small file: entries start past 2 GiB and past 4 GiB."""
    members = [zeros(f"part{n}.bin", 1_450_000_000) for n in (1, 2, 3)] + [small("tail.txt")]
    infos = serve_and_verify(workdir, members)
    offsets = [info.header_offset for info in infos]
    assert offsets[1] < LIMIT < offsets[2] < FOUR_GIB < offsets[3]


def test_single_entry_over_4gib(workdir: Path) -> None:
    """One 4.5 GB entry (sizes only in the ZIP64 extra), then a small file after it."""
    members = [zeros("huge.bin", 4_500_000_000), small("after-huge.txt")]
    infos = serve_and_verify(workdir, members)
    assert infos[0].file_size > FOUR_GIB and infos[1].header_offset > FOUR_GIB


def test_entry_just_below_the_zip64_limit(workdir: Path) -> None:
    """2,100,000,000 bytes, 5% below 2 GiB - 1: stored, it needs no ZIP64 (a writer that decides
    from ``size * 1.05`` would put a ZIP64 extra in its local header but not in its descriptor,
    as zipstream-new did); then a small file."""
    size = 2_100_000_000
    assert size * 1.05 > LIMIT >= size
    members = [zeros("band.bin", size), small("after-band.txt")]
    infos = serve_and_verify(workdir, members)
    assert infos[1].header_offset < LIMIT


ENTRY_COUNT = 65_600  # more than the 65,535 a 16-bit count holds


def test_more_than_65535_entries(tmp_path: Path) -> None:
    """65,600 files of a few bytes: a ZIP64 end record for the count alone, far below 2 GiB."""
    require_tools()
    assert ENTRY_COUNT > zipfile.ZIP_FILECOUNT_LIMIT
    folder = tmp_path / "many"
    (folder / "sources").mkdir(parents=True)
    members = [Member(f"f{n:05d}.txt", len(data), data) for n in range(ENTRY_COUNT) for data in [b"%d\n" % n]]
    try:
        # A folder: each request walks it (scandir) rather than resolving 65,600 explicit paths.
        infos = serve_and_verify(folder, members, whole_folder=True)
        assert len(infos) == ENTRY_COUNT
        assert infos[-1].header_offset < LIMIT
        assert "ZIP64 end record" in end_records(folder / "archive.zip")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
