"""The lint of tests/ziplint.py: archives crafted here, clean or breaking one rule each.

:func:`craft` writes an archive that follows every rule of the lint (each header and field
as our archives must have it); each case changes one thing, and the lint must name the rule
and the entry. Clean variants (descriptors or not, local sizes 0 or real, deflate, ZIP64
extras on small entries, a ZIP64 end record for 65,535 entries, an entry past 2 GiB in a
sparse file) must pass.
"""

from __future__ import annotations

import functools
import struct
import subprocess
import sys
import time
import unicodedata
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import pytest

from .ziplint import LintError, Problem, check, entry_names, lint

U32 = 0xFFFFFFFF
LIMIT = (1 << 31) - 1
MTIME = 1_700_000_000
PROJECT = Path(__file__).resolve().parent.parent

# -- a small writer whose every field can be overridden ------------------------------------------


def dos_time(mtime: int) -> tuple[int, int]:
    """(time, date) of ``mtime`` in UTC, clamped to the DOS range."""
    year, month, day, hour, minute, second = time.gmtime(mtime)[:6]
    if year < 1980:
        year, month, day, hour, minute, second = 1980, 1, 1, 0, 0, 0
    elif year > 2107:
        year, month, day, hour, minute, second = 2107, 12, 31, 23, 59, 58
    return hour << 11 | minute << 5 | second // 2, (year - 1980) << 9 | month << 5 | day


def extras(fields: list[tuple[int, bytes]]) -> bytes:
    return b"".join(struct.pack("<HH", tag, len(data)) + data for tag, data in fields)


def ut(mtime: int) -> tuple[int, bytes]:
    return 0x5455, b"\x01" + struct.pack("<L", mtime)


@functools.cache
def crc32_of_zeros(size: int) -> int:
    block = bytes(1 << 20)
    crc = 0
    for _ in range(size // len(block)):
        crc = zlib.crc32(block, crc)
    return zlib.crc32(block[: size % len(block)], crc)


@dataclass
class Entry:
    name: str | bytes = "a.txt"
    data: bytes = b"hello, world\n"
    zeros: int = 0  # instead of data: this many zero bytes, written as a hole
    method: int = 0
    descriptor: bool = True
    local_sizes: Literal["real", "zero"] = "real"
    zip64: bool = False  # a ZIP64 extra in the local header, and a 24-byte descriptor
    mtime: int = MTIME
    mode: int = 0o100644
    flags: int | None = None  # both headers; else bit 3 and bit 11 as they should be
    version: int | None = None  # "version needed" of both headers; else 20 or 45
    # Field overrides, applied last: local header, central record, descriptor.
    local: dict[str, Any] = field(default_factory=dict)
    central: dict[str, Any] = field(default_factory=dict)
    desc: dict[str, Any] = field(default_factory=dict)  # crc, csize, usize, sig, form (16/24)
    local_extra: list[tuple[int, bytes]] | None = None  # replaces the extra fields written
    central_extra: list[tuple[int, bytes]] | None = None
    gap_after: bytes = b""


@dataclass
class Archive:
    entries: list[Entry]
    prefix: bytes = b""
    before_directory: bytes = b""
    zip64_end: bool | None = None  # None: exactly when needed
    end: dict[str, Any] = field(default_factory=dict)  # count, size, offset, disk, comment
    zip64: dict[str, Any] = field(default_factory=dict)  # count, size, offset
    after: bytes = b""


Piece = bytes | int  # an int: that many zero bytes, left as a hole


def pieces_of(archive: Archive) -> list[Piece]:
    out: list[Piece] = []
    position = 0

    def put(piece: Piece) -> None:
        nonlocal position
        out.append(piece)
        position += piece if isinstance(piece, int) else len(piece)

    put(archive.prefix)
    records = []
    for entry in archive.entries:
        name = entry.name.encode() if isinstance(entry.name, str) else entry.name
        if entry.zeros:
            assert entry.method == 0
            usize = csize = entry.zeros
            crc = crc32_of_zeros(entry.zeros)
            body: Piece = entry.zeros
        else:
            usize, crc = len(entry.data), zlib.crc32(entry.data)
            if entry.method == 8:
                compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
                body = compressor.compress(entry.data) + compressor.flush()
            else:
                body = entry.data
            csize = len(body)
        offset = position
        central_zip64 = [usize, csize] if entry.zip64 else []
        if offset > LIMIT:
            central_zip64.append(offset)
        version = entry.version or (45 if entry.zip64 or central_zip64 else 20)
        flags = entry.flags
        if flags is None:
            flags = (0x08 if entry.descriptor else 0) | (0 if name.isascii() else 0x800)
        time_, date = dos_time(entry.mtime)
        local_u, local_c = (usize, csize) if entry.local_sizes == "real" or not entry.descriptor else (0, 0)
        local_extra = entry.local_extra
        if local_extra is None:
            local_extra = [(1, struct.pack("<2Q", local_u, local_c))] if entry.zip64 else []
            local_extra.append(ut(entry.mtime))
        local = {
            "version": version,
            "flags": flags,
            "method": entry.method,
            "time": time_,
            "date": date,
            "crc": 0 if entry.descriptor else crc,
            "csize": U32 if entry.zip64 else local_c,
            "usize": U32 if entry.zip64 else local_u,
            **entry.local,
        }
        local_extra_bytes = extras(local_extra)
        header = struct.pack(
            "<4s5H3L2H",
            b"PK\x03\x04",
            local["version"],
            local["flags"],
            local["method"],
            local["time"],
            local["date"],
            local["crc"],
            local["csize"],
            local["usize"],
            len(name),
            len(local_extra_bytes),
        )
        put(header + entry.local.get("name", name) + local_extra_bytes)
        put(body)
        if entry.descriptor:
            d: dict[str, Any] = {
                "sig": b"PK\x07\x08",
                "crc": crc,
                "csize": csize,
                "usize": usize,
                "form": 24 if entry.zip64 else 16,
            }
            d.update(entry.desc)
            size_format = "Q" if d["form"] == 24 else "L"
            put(d["sig"] + struct.pack(f"<L2{size_format}", d["crc"], d["csize"], d["usize"]))
        put(entry.gap_after)
        central_extra = entry.central_extra
        if central_extra is None:
            central_extra = (
                [(1, struct.pack(f"<{len(central_zip64)}Q", *central_zip64))] if central_zip64 else []
            )
            central_extra.append(ut(entry.mtime))
        central = {
            "made_by": 3 << 8 | version,
            "version": version,
            "flags": flags,
            "method": entry.method,
            "time": time_,
            "date": date,
            "crc": crc,
            "csize": U32 if entry.zip64 else csize,
            "usize": U32 if entry.zip64 else usize,
            "disk": 0,
            "internal": 0,
            "external": entry.mode << 16,
            "offset": U32 if offset > LIMIT else offset,
            **entry.central,
        }
        central_extra_bytes = extras(central_extra)
        records.append(
            struct.pack(
                "<4s6H3L5H2L",
                b"PK\x01\x02",
                central["made_by"],
                central["version"],
                central["flags"],
                central["method"],
                central["time"],
                central["date"],
                central["crc"],
                central["csize"],
                central["usize"],
                len(name),
                len(central_extra_bytes),
                0,
                central["disk"],
                central["internal"],
                central["external"],
                central["offset"],
            )
            + entry.central.get("name", name)
            + central_extra_bytes
        )
    put(archive.before_directory)
    directory_offset = position
    directory = b"".join(records)
    put(directory)
    count, size = len(records), len(directory)
    zip64_end = archive.zip64_end
    if zip64_end is None:
        zip64_end = count >= 0xFFFF or directory_offset > LIMIT or size > LIMIT
    if zip64_end:
        z = {"count": count, "size": size, "offset": directory_offset, **archive.zip64}
        record_at = position
        put(
            struct.pack(
                "<4sQ2H2L4Q",
                b"PK\x06\x06",
                44,
                3 << 8 | 45,
                45,
                0,
                0,
                z["count"],
                z["count"],
                z["size"],
                z["offset"],
            )
        )
        put(struct.pack("<4sLQL", b"PK\x06\x07", 0, record_at, 1))
        count, size, directory_offset = min(count, 0xFFFF), min(size, U32), min(directory_offset, U32)
    e = {"count": count, "size": size, "offset": directory_offset, "disk": 0, "comment": b"", **archive.end}
    put(
        struct.pack(
            "<4s4H2LH",
            b"PK\x05\x06",
            e["disk"],
            0,
            e["count"],
            e["count"],
            e["size"],
            e["offset"],
            len(e["comment"]),
        )
        + e["comment"]
    )
    put(archive.after)
    return out


def save(path: Path, archive: Archive) -> Path:
    with open(path, "wb") as file:
        for piece in pieces_of(archive):
            if isinstance(piece, int):
                file.seek(piece, 1)
            else:
                file.write(piece)
        file.truncate()
    return path


def one(**changes: Any) -> Archive:
    """An archive of ``a.txt`` then ``b/c.txt``, the first one changed as given."""
    return Archive([Entry(**changes), Entry(name="b/c.txt", data=b"second\n" * 100)])


def names(*names: str | bytes, **changes: Any) -> Archive:
    return Archive(
        [Entry(name=name, data=f"{index}".encode(), **changes) for index, name in enumerate(names)]
    )


# -- clean archives pass -------------------------------------------------------------------------

CLEAN: dict[str, Callable[[], Archive]] = {
    "stored, descriptor, real local sizes": lambda: one(),
    "stored, descriptor, zero local sizes": lambda: one(local_sizes="zero"),
    "stored, no descriptor": lambda: one(descriptor=False),
    "deflated, descriptor, zero local sizes": lambda: one(method=8, data=b"text " * 1000, local_sizes="zero"),
    "deflated, no descriptor": lambda: one(method=8, data=b"text " * 1000, descriptor=False),
    "ZIP64 extras on a small entry": lambda: one(zip64=True),
    "ZIP64 extras, zero local sizes": lambda: one(zip64=True, local_sizes="zero"),
    "ZIP64 extras, no descriptor": lambda: one(zip64=True, descriptor=False),
    "empty file, no descriptor": lambda: one(data=b"", descriptor=False),
    "empty file, descriptor": lambda: one(data=b""),
    "executable": lambda: one(mode=0o100755),
    "non-ASCII NFC names": lambda: names("café/naïve.txt", "日本語/データ.txt", "games 🎮/save 😀.dat"),
    "mtime before 1980 (DOS time clamped, not compared)": lambda: one(mtime=0),
    "mtime 2**32 - 1 (in 2106)": lambda: one(mtime=0xFFFFFFFF),
    "odd second (DOS rounds down)": lambda: one(mtime=MTIME + 1),
    "names close to reserved ones": lambda: names(
        "com10.txt", "console.txt", "lpt.txt", "connection/aux1", "nul_"
    ),
    "a single entry": lambda: Archive([Entry()]),
    "no entries": lambda: Archive([]),
}


@pytest.mark.parametrize("make", CLEAN.values(), ids=CLEAN.keys())
def test_clean_archives_pass(tmp_path: Path, make: Callable[[], Archive]) -> None:
    path = save(tmp_path / "clean.zip", make())
    lint(path)
    with zipfile.ZipFile(path) as archive:  # and Python agrees it is a ZIP
        assert archive.testzip() is None


def test_zip64_end_record_for_65535_entries(tmp_path: Path) -> None:
    entries = [Entry(name=f"f{n:05d}", data=b"%d" % n, descriptor=n % 2 == 0) for n in range(0xFFFF)]
    path = save(tmp_path / "many.zip", Archive(entries))
    started = time.perf_counter()
    summary = check(path)
    assert time.perf_counter() - started < 10
    assert summary.problems == [] and summary.zip64_end and summary.entries == 0xFFFF
    # The same without the ZIP64 end record and locator (the end record's values all fit).
    data = path.read_bytes()
    assert data[-22 - 76 : -22 - 72] == b"PK\x06\x06"
    without = tmp_path / "many-without.zip"
    without.write_bytes(data[: -22 - 76] + data[-22:])
    with pytest.raises(LintError) as error:
        lint(without)
    assert error.value.rules == {"zip64-end"}, error.value


def test_entry_past_2_gib_in_a_sparse_file(tmp_path: Path) -> None:
    """A 2.2 GB entry of zeros (a hole: its sizes in ZIP64 extras) then a small one, whose offset is
    in a ZIP64 extra; the directory's offset makes a ZIP64 end record necessary."""
    archive = Archive(
        [Entry(name="zeros.bin", zeros=2_200_000_000, descriptor=False, zip64=True), Entry(name="after.txt")]
    )
    path = save(tmp_path / "big.zip", archive)
    started = time.perf_counter()
    summary = check(path)
    assert time.perf_counter() - started < 2
    assert summary.problems == [], summary.problems
    assert summary.zip64_end and summary.central_zip64 == 2 and summary.local_zip64 == 1
    # The same with the second entry's offset left in its 32-bit slot (it fits: 2.2 GB < 4 GiB).
    first, second = archive.entries
    offset = 30 + len("zeros.bin") + 20 + 9 + first.zeros  # its ZIP64 and timestamp extras
    in_slot = replace(second, central={"offset": offset}, central_extra=[ut(MTIME)], version=20)
    with pytest.raises(LintError) as error:
        lint(save(tmp_path / "big-bad.zip", replace(archive, entries=[first, in_slot])))
    assert "zip64-central" in error.value.rules, error.value
    assert "offset 2200000068 is above 2**31 - 1" in str(error.value)
    # And without the ZIP64 end record.
    with pytest.raises(LintError) as error:
        lint(save(tmp_path / "big-no-end.zip", replace(archive, zip64_end=False)))
    assert error.value.rules == {"zip64-end"}


# -- each rule broken --------------------------------------------------------------------------


def zip64_sizes_central_only() -> Archive:
    """Central size slots at 0xFFFFFFFF (sizes in a ZIP64 extra), none in the local header."""
    data = b"hello, world\n"
    extra = [(1, struct.pack("<2Q", len(data), len(data))), ut(MTIME)]
    return one(data=data, version=45, central={"csize": U32, "usize": U32}, central_extra=extra)


def reordered(archive: Archive, which: str) -> Archive:
    entry = archive.entries[0]
    size = len(entry.data)
    fields = [ut(MTIME), (1, struct.pack("<2Q", size, size))]
    changed = replace(entry, local_extra=fields) if which == "local" else replace(entry, central_extra=fields)
    return replace(archive, entries=[changed, *archive.entries[1:]])


BROKEN: list[Any] = [
    # (archive, lint options, rule, text expected in the message)
    pytest.param(
        replace(one(), end={"comment": b"hi"}), {}, "end-record", "comment", id="end record with a comment"
    ),
    pytest.param(
        Archive([Entry()], after=b"junk"),
        {},
        "end-record",
        "no end of central directory",
        id="bytes after the end record",
    ),
    pytest.param(
        Archive([Entry()], end={"disk": 1}), {}, "end-record", "disk numbers", id="end record disk number"
    ),
    pytest.param(
        Archive([Entry()], zip64_end=True),
        {},
        "zip64-end",
        "a ZIP64 end record",
        id="ZIP64 end record not needed",
    ),
    pytest.param(
        Archive([Entry()], zip64_end=True, end={"count": 5}),
        {},
        "end-values",
        "count 5",
        id="end record count disagrees with ZIP64",
    ),
    pytest.param(
        Archive([Entry(), Entry(name="b")], end={"count": 1}),
        {},
        "directory",
        "2 records",
        id="end record count",
    ),
    pytest.param(
        Archive([Entry()], before_directory=b"\0" * 7),
        {},
        "layout",
        "the last entry ends at",
        id="gap before the directory",
    ),
    pytest.param(
        Archive([Entry(gap_after=b"xx"), Entry(name="b")]),
        {},
        "layout",
        "a gap of 2 bytes",
        id="gap between entries",
    ),
    pytest.param(
        Archive([Entry(), Entry(name="b", central={"offset": 0})]),
        {},
        "layout",
        "an overlap of",
        id="overlapping entries",
    ),
    pytest.param(
        Archive([Entry()], prefix=b"MZ\0\0"),
        {},
        "layout",
        "a gap of 4 bytes",
        id="bytes before the first entry",
    ),
    pytest.param(
        one(local={"version": 10}), {}, "version-needed", "local 10, central 20", id="version needed differs"
    ),
    pytest.param(one(version=45), {}, "version-needed", "must both be 20", id="version 45 without ZIP64"),
    pytest.param(
        one(zip64=True, version=20), {}, "version-needed", "must both be 45", id="version 20 with ZIP64"
    ),
    pytest.param(one(local={"flags": 0}), {}, "flags", "local 0x0000, central 0x0008", id="flags differ"),
    pytest.param(
        one(flags=0x09), {}, "flags", "unexpected general purpose bits 0x0001", id="encryption flag"
    ),
    pytest.param(one(local={"method": 8}), {}, "method", "local 8, central 0", id="method differs"),
    pytest.param(
        one(method=12, central={"method": 12}), {}, "method", "must be the same, 0 or 8", id="bzip2 method"
    ),
    pytest.param(one(local={"time": 0}), {}, "dos-time", "local", id="DOS time differs"),
    pytest.param(
        one(local={"date": 13 << 5 | 1}, central={"date": 13 << 5 | 1}),
        {},
        "dos-time",
        "no valid date",
        id="month 13",
    ),
    pytest.param(
        one(local={"name": b"b.txt"}),
        {},
        "name-bytes",
        "local b'b.txt', central b'a.txt'",
        id="local name differs",
    ),
    pytest.param(
        one(name="café.txt", flags=0x08), {}, "utf8-flag", "clear for a non-ASCII name", id="bit 11 missing"
    ),
    pytest.param(one(flags=0x808), {}, "utf8-flag", "set for an ASCII name", id="bit 11 for ASCII"),
    pytest.param(
        one(name=b"caf\xe9.txt", flags=0x808), {}, "name-utf8", "not valid UTF-8", id="name not UTF-8"
    ),
    pytest.param(
        one(descriptor=False, flags=0x08),
        {},
        "descriptor-flag",
        "bit 3 set but the data is followed by",
        id="bit 3 without descriptor",
    ),
    pytest.param(one(flags=0), {}, "descriptor-flag", "bit 3 is clear", id="descriptor without bit 3"),
    pytest.param(one(local={"crc": 0x1234}), {}, "local-crc", "not 0", id="local CRC with bit 3"),
    pytest.param(
        one(desc={"sig": b""}),
        {},
        "descriptor-signature",
        "lacks its signature",
        id="descriptor without signature",
    ),
    pytest.param(
        one(desc={"form": 24}),
        {},
        "descriptor-form",
        "24 bytes long but the local header has no ZIP64",
        id="64-bit descriptor without ZIP64 extra",
    ),
    pytest.param(
        one(zip64=True, desc={"form": 16}),
        {},
        "descriptor-form",
        "16 bytes long but the local header has ZIP64",
        id="32-bit descriptor with ZIP64 extra",
    ),
    pytest.param(
        one(desc={"crc": 1}), {}, "descriptor-values", "descriptor CRC-32 00000001", id="descriptor CRC"
    ),
    pytest.param(one(desc={"usize": 99}), {}, "descriptor-values", "99", id="descriptor size"),
    pytest.param(one(local={"usize": 0}), {}, "local-sizes", "local sizes 0, 13", id="one local size 0"),
    pytest.param(
        one(),
        {"local_sizes": "zero"},
        "local-sizes",
        "must be zero",
        id="real local sizes where zero required",
    ),
    pytest.param(
        one(local_sizes="zero"),
        {"local_sizes": "real"},
        "local-sizes",
        "must be real",
        id="zero local sizes where real required",
    ),
    pytest.param(
        one(zip64=True, local_sizes="zero"),
        {"local_sizes": "real"},
        "local-sizes",
        "must be real",
        id="zero ZIP64 local sizes where real required",
    ),
    pytest.param(
        one(descriptor=False, local={"crc": 1}),
        {},
        "local-values",
        "local CRC-32 00000001",
        id="local CRC without bit 3",
    ),
    pytest.param(
        one(descriptor=False, local={"csize": 12}),
        {},
        "local-values",
        "sizes 12, 13",
        id="local size without bit 3",
    ),
    pytest.param(
        reordered(one(zip64=True), "local"),
        {},
        "zip64-first",
        "0x5455, 0x0001",
        id="ZIP64 extra not first in local header",
    ),
    pytest.param(
        reordered(one(zip64=True), "central"),
        {},
        "zip64-first",
        "0x5455, 0x0001",
        id="ZIP64 extra not first in central record",
    ),
    pytest.param(
        one(zip64=True, local_extra=[(1, struct.pack("<3Q", 13, 13, 0)), ut(MTIME)]),
        {},
        "zip64-local",
        "24 bytes",
        id="local ZIP64 extra with an offset",
    ),
    pytest.param(
        one(zip64=True, local={"csize": 13, "usize": 13}),
        {},
        "zip64-local",
        "size slots 0xd, 0xd",
        id="local ZIP64 extra, real size slots",
    ),
    pytest.param(
        one(local={"usize": U32}),
        {},
        "zip64-local",
        "no ZIP64 extra",
        id="local size slot 0xFFFFFFFF without ZIP64",
    ),
    pytest.param(
        one(version=45, central_extra=[(1, struct.pack("<Q", 0)), ut(MTIME)]),
        {},
        "zip64-central",
        "need 0",
        id="central ZIP64 extra with no 0xFFFFFFFF slot",
    ),
    pytest.param(
        one(central={"usize": 1 << 31}),
        {},
        "zip64-central",
        "above 2**31 - 1 but not in the ZIP64 extra",
        id="central size over 2 GiB in its slot",
    ),
    pytest.param(
        zip64_sizes_central_only(),
        {},
        "zip64-central",
        "the local header has no ZIP64 extra",
        id="central ZIP64 sizes without local ZIP64 extra",
    ),
    pytest.param(
        one(zip64=True, local_extra=[ut(MTIME)], version=45, local={"csize": 13, "usize": 13}),
        {},
        "zip64-central",
        "central size slots are 0xFFFFFFFF",
        id="local header without the ZIP64 extra the central record has",
    ),
    pytest.param(
        one(central={"usize": U32}, version=45, central_extra=[(1, struct.pack("<Q", 13)), ut(MTIME)]),
        {},
        "zip64-central",
        "only one of the two size slots",
        id="one central size slot 0xFFFFFFFF",
    ),
    pytest.param(one(central={"disk": 1}), {}, "zip64-central", "disk number 1", id="disk number start"),
    pytest.param(one(local_extra=[]), {}, "timestamp", "in the local header", id="no local timestamp"),
    pytest.param(one(central_extra=[]), {}, "timestamp", "in the central header", id="no central timestamp"),
    pytest.param(
        one(
            local_extra=[(0x5455, b"\x03" + struct.pack("<2L", MTIME, MTIME))],
            central_extra=[(0x5455, b"\x03" + struct.pack("<2L", MTIME, MTIME))],
        ),
        {},
        "timestamp",
        "must be 01 + mtime",
        id="timestamp with atime",
    ),
    pytest.param(one(central_extra=[ut(MTIME + 60)]), {}, "timestamp", "equal", id="timestamps differ"),
    pytest.param(
        one(
            local_extra=[(0x5455, b"\x00" + struct.pack("<L", MTIME))],
            central_extra=[(0x5455, b"\x00" + struct.pack("<L", MTIME))],
        ),
        {},
        "timestamp",
        "must be 01",
        id="timestamp flags without mtime bit",
    ),
    pytest.param(
        one(local={"time": dos_time(MTIME + 3600)[0]}, central={"time": dos_time(MTIME + 3600)[0]}),
        {},
        "timestamp-dos",
        "-3600 s",
        id="DOS time in another time zone",
    ),
    pytest.param(
        one(local={"time": dos_time(MTIME - 2)[0]}, central={"time": dos_time(MTIME - 2)[0]}),
        {},
        "timestamp-dos",
        "+2 s",
        id="DOS time 2 s early",
    ),
    pytest.param(
        one(local_extra=[ut(MTIME), (0x7875, b"\x01\x04\0\0\0\0\x04\0\0\0\0")]),
        {},
        "extra-unknown",
        "0x7875",
        id="Info-ZIP unix extra",
    ),
    pytest.param(
        one(central_extra=[ut(MTIME), (0x000A, bytes(32))]), {}, "extra-unknown", "0x000a", id="NTFS extra"
    ),
    pytest.param(
        one(local_extra=[ut(MTIME), (0x5455, b"\x01")]), {}, "extra-format", "twice", id="extra field twice"
    ),
    pytest.param(
        one(central_extra=[ut(MTIME), (0xCAFE, b"")]), {}, "extra-unknown", "0xcafe", id="empty unknown extra"
    ),
    pytest.param(one(central={"made_by": 0 << 8 | 20}), {}, "made-by", "system 0", id="made by MS-DOS"),
    pytest.param(one(mode=0o100600), {}, "attributes", "mode 100600", id="mode 0600"),
    pytest.param(
        one(central={"external": 0o100644 << 16 | 0x20}),
        {},
        "attributes",
        "low byte 0x20",
        id="DOS archive bit",
    ),
    pytest.param(one(mode=0o040755, name="a/"), {}, "attributes", "mode 40755", id="folder entry"),
    pytest.param(one(mode=0o120777), {}, "attributes", "mode 120777", id="symlink"),
    pytest.param(one(name=unicodedata.normalize("NFD", "café.txt")), {}, "name-nfc", "NFC", id="NFD name"),
    pytest.param(one(name="/etc/passwd"), {}, "name-path", "absolute", id="absolute name"),
    pytest.param(one(name="a\\b.txt"), {}, "name-path", "backslash", id="backslash"),
    pytest.param(one(name="../evil.txt"), {}, "name-path", "'..'", id="parent component"),
    pytest.param(one(name="./a.txt"), {}, "name-path", "'.'", id="dot component"),
    pytest.param(one(name="a//b.txt"), {}, "name-path", "''", id="empty component"),
    pytest.param(one(name="a/"), {}, "name-path", "''", id="trailing slash"),
    pytest.param(one(name=""), {}, "name-path", "''", id="empty name"),
    pytest.param(one(name="C:/x.txt"), {}, "name-path", "drive letter", id="drive letter"),
    pytest.param(one(name="a\x01b.txt"), {}, "name-chars", "U+0001", id="control character"),
    pytest.param(one(name="a\x85b.txt"), {}, "name-chars", "U+0085", id="C1 control character"),
    *(
        pytest.param(one(name=f"a{c}b.txt"), {}, "name-chars", f"forbids: {c}", id=f"character {c}")
        for c in '<>:"|?*'
    ),
    pytest.param(
        one(name="folder./a.txt"), {}, "name-trailing", "ends with '.'", id="component ending with a dot"
    ),
    pytest.param(one(name="a.txt "), {}, "name-trailing", "ends with ' '", id="name ending with a space"),
    *(
        pytest.param(one(name=name), {}, "name-reserved", f"device name {device}", id=f"reserved {name}")
        for name, device in [
            ("con.txt", "CON"),
            ("PRN", "PRN"),
            ("folder/Aux.tar.gz", "AUX"),
            ("nul", "NUL"),
            ("COM1.log", "COM1"),
            ("com9", "COM9"),
            ("lpt1.txt", "LPT1"),
            ("LPT9/x.txt", "LPT9"),
            ("con .txt", "CON"),
        ]
    ),
    pytest.param(
        names("A.txt", "a.txt"),
        {},
        "name-duplicate",
        "the same name as entry 0",
        id="names equal ignoring case",
    ),
    pytest.param(
        names("Straße.txt", "STRASSE.txt"),
        {},
        "name-duplicate",
        "the same name as",
        id="names equal under casefold",
    ),
    pytest.param(
        names("a", "a/b.txt"),
        {},
        "name-folder",
        "another entry lies in a folder of this name",
        id="file named like a folder",
    ),
    pytest.param(
        names("a/b.txt", "A"),
        {},
        "name-folder",
        "folder of this name",
        id="file named like a folder in another case",
    ),
]


def first_problem_text(problems: list[Problem], rule: str) -> str:
    return "\n".join(str(problem) for problem in problems if problem.rule == rule)


@pytest.mark.parametrize(("archive", "options", "rule", "text"), BROKEN)
def test_each_rule_is_caught(
    tmp_path: Path, archive: Archive, options: dict[str, Any], rule: str, text: str
) -> None:
    path = save(tmp_path / "broken.zip", archive)
    with pytest.raises(LintError) as error:
        lint(path, **options)
    assert rule in error.value.rules, str(error.value)
    found = first_problem_text(error.value.problems, rule)
    assert text in found, found
    message = str(error.value)
    assert f"[{rule}]" in message
    # An entry's problem names the entry (records of the archive as a whole name themselves).
    if rule not in ("end-record", "end-values", "zip64-end", "directory"):
        problem = next(p for p in error.value.problems if p.rule == rule)
        assert problem.where.startswith(("entry ", "central directory")), problem


def test_the_message_names_entry_rule_and_count(tmp_path: Path) -> None:
    path = save(
        tmp_path / "many-bad.zip", names(*(f"com{n}.txt" for n in range(1, 10)), "a.txt", mode=0o100600)
    )
    with pytest.raises(LintError) as error:
        lint(path)
    message = str(error.value)
    assert "[name-reserved] 9 times" in message and "[attributes] 10 times" in message
    assert (
        "entry 0 'com1.txt' (local header at 0): component 'com1.txt' is the Windows device name COM1"
        in message
    )
    assert message.count("\n    entry") == 3 + 3  # three examples per rule


def test_entry_names_in_directory_order(tmp_path: Path) -> None:
    path = save(tmp_path / "names.zip", names("b.txt", "a/é.txt", "c"))
    assert entry_names(path) == [b"b.txt", "a/é.txt".encode(), b"c"]


def test_command_line(tmp_path: Path) -> None:
    good = save(tmp_path / "good.zip", one())
    bad = save(tmp_path / "bad.zip", one(name="con.txt"))
    command = [sys.executable, "-m", "tests.ziplint"]
    result = subprocess.run([*command, str(good)], cwd=PROJECT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 entries" in result.stdout and "local sizes of those: real 2" in result.stdout
    result = subprocess.run(
        [*command, str(good), str(bad)], cwd=PROJECT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 1
    assert "[name-reserved]" in result.stdout and "'con.txt'" in result.stdout
    result = subprocess.run(
        [*command, "--local-sizes", "zero", str(good)],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1 and "[local-sizes]" in result.stdout
