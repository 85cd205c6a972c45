"""A strict lint of a ZIP archive's records: what our archives must look like, byte for byte.

``lint(path)`` raises :class:`LintError` (an ``AssertionError``) listing every rule broken,
each with the entry (name, index, local header offset) that breaks it; :func:`check` returns a
:class:`Summary` of what it found instead of ``None``. It reads the end records, the central
directory, and each entry's local header and data descriptor, never file data, so a 4.5 GB
archive or one of 65,600 entries takes well under a second or two.

Run it on a file: ``python -m tests.ziplint archive.zip [--local-sizes zero|real|either]``.

Rules (the ``rule`` of each problem is the name in brackets):

End records and layout
  [end-record] the end of central directory record is the last thing in the file, its disk
  fields are 0 and its counts agree. [zip64-end] a ZIP64 end record and locator are present
  exactly when there are >= 65,535 entries or the directory's offset or size exceed
  ``zipfile.ZIP64_LIMIT`` (2**31 - 1), with the locator right after the record and the record
  right after the directory. [end-values] the end records' count, size and offset agree with
  the directory as found (a 16/32-bit field holds the value, or 0xFFFF/0xFFFFFFFF where the
  value does not fit or a ZIP64 end record holds it). [directory] the records fill the
  directory exactly. [layout] entries are contiguous from offset 0: each local header starts
  where the previous entry (with its descriptor) ends, the directory where the last one ends.

Each entry, local header against central record
  [version-needed] the same in both, 45 when either has a ZIP64 extra, else 20.
  [flags] the same in both; only bits 3 and 11 (and 1-2, deflate's level, for deflate).
  [method] the same in both, stored (0) or deflate (8); stored sizes are equal.
  [dos-time] the same DOS time and date in both, and a valid one. [name-bytes] the same name
  bytes in both. [utf8-flag] bit 11 set exactly when the name is not ASCII.
  [name-utf8] the name is valid UTF-8.

Data descriptors
  [descriptor-flag] bit 3 set exactly when a data descriptor (``PK\\x07\\x08``) follows the
  data. [local-crc] with bit 3 the local CRC-32 is 0. [descriptor-form] the descriptor has
  8-byte sizes (24 bytes) exactly when the local header has a ZIP64 extra, else 16 bytes.
  [descriptor-signature] it starts with its signature. [descriptor-values] its CRC-32 and
  sizes are the central record's. [local-sizes] with bit 3 the local sizes (in the ZIP64 extra
  where it holds them) are both 0 or both the real sizes (``local_sizes`` picks which are
  allowed). [local-values] without bit 3 the local CRC-32 and sizes are the central record's.

ZIP64 extra (0x0001)
  [zip64-first] when present it is the first extra field. [zip64-local] in a local header it
  holds exactly the two 8-byte sizes and both size slots are 0xFFFFFFFF. [zip64-central] in a
  central record it holds exactly the values whose 32-bit slots are 0xFFFFFFFF, in the order
  uncompressed size, compressed size, offset; a value above 2**31 - 1 must be in it; the two
  size slots are 0xFFFFFFFF exactly when the local header has a ZIP64 extra; the disk is 0.

Extended timestamp (0x5455)
  [timestamp] present in both headers, 5 bytes (flags with bit 0, then the mtime), identical.
  [timestamp-dos] where the mtime lies in the DOS range (1980-01-01 .. 2107-12-31), the DOS
  time and date read as UTC are that moment rounded down to an even second.

Other fields
  [extra-format] extra fields are well formed (their lengths add up exactly, none twice).
  [extra-unknown] no extra field but 0x0001 and 0x5455. [made-by] "version made by" says Unix
  (high byte 3). [attributes] the external attributes are a regular file 0o100644 or 0o100755
  in the high 16 bits, and 0 in the low byte.

Names
  [name-nfc] in Unicode NFC. [name-path] relative (no leading "/"), forward slashes only (no
  "\\"), no empty, "." or ".." component, no drive letter. [name-chars] no control character
  and none of ``<>:"|?*``. [name-trailing] no component ends with "." or " ".
  [name-reserved] no component whose stem is a Windows device name (CON, PRN, AUX, NUL,
  COM1-9, LPT1-9, in any case, with or without an extension). [name-duplicate] no two names
  equal under ``casefold()``. [name-folder] no entry named like a folder of another entry.
"""

from __future__ import annotations

import argparse
import calendar
import functools
import os
import re
import struct
import sys
import unicodedata
import zipfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal

LocalSizes = Literal["zero", "real", "either"]

ZIP64_LIMIT = zipfile.ZIP64_LIMIT  # 2**31 - 1
COUNT_LIMIT = zipfile.ZIP_FILECOUNT_LIMIT  # 65,535
U16, U32 = 0xFFFF, 0xFFFFFFFF

END = struct.Struct("<4s4H2LH")  # 22 bytes
END_SIG = b"PK\x05\x06"
ZIP64_END = struct.Struct("<4sQ2H2L4Q")  # 56 bytes
ZIP64_END_SIG = b"PK\x06\x06"
LOCATOR = struct.Struct("<4sLQL")  # 20 bytes
LOCATOR_SIG = b"PK\x06\x07"
CENTRAL = struct.Struct("<4s4B4H3L5H2L")  # 46 bytes
CENTRAL_SIG = b"PK\x01\x02"
LOCAL = struct.Struct("<4s5H3L2H")  # 30 bytes
LOCAL_SIG = b"PK\x03\x04"
DESCRIPTOR_SIG = b"PK\x07\x08"
# What may follow an entry: the next entry, or the directory (or, with no entries, the end records).
NEXT_SIGS = (LOCAL_SIG, CENTRAL_SIG, ZIP64_END_SIG, END_SIG)

ZIP64_EXTRA, TIMESTAMP_EXTRA = 0x0001, 0x5455
FLAG_DESCRIPTOR, FLAG_UTF8 = 1 << 3, 1 << 11
DEFLATE_LEVEL_FLAGS = 0b110
STORED, DEFLATED = 0, 8
UNIX = 3
MODES = (0o100644, 0o100755)

DOS_MIN = calendar.timegm((1980, 1, 1, 0, 0, 0))
DOS_MAX = calendar.timegm((2107, 12, 31, 23, 59, 59))

CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")  # Unicode category Cc, exactly
FORBIDDEN = re.compile(r'[<>:"|?*]')
RESERVED = {
    "con",
    "prn",
    "aux",
    "nul",
    *(f"com{n}" for n in range(1, 10)),
    *(f"lpt{n}" for n in range(1, 10)),
}
DRIVE = re.compile(r"^[A-Za-z]:")

EXAMPLES = 3  # entries quoted per rule in the error message


@dataclass(frozen=True)
class Problem:
    rule: str
    where: str  # the entry (name, index, offset) or the record
    detail: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.where}: {self.detail}"


class LintError(AssertionError):
    """Every problem found in an archive (``problems``), summarised in the message."""

    def __init__(self, path: Path, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__(self._message(path, problems))

    @property
    def rules(self) -> set[str]:
        return {problem.rule for problem in self.problems}

    @staticmethod
    def _message(path: Path, problems: list[Problem]) -> str:
        by_rule: dict[str, list[Problem]] = defaultdict(list)
        for problem in problems:
            by_rule[problem.rule].append(problem)
        lines = [f"{path}: {len(problems)} problems, {len(by_rule)} rules broken"]
        for rule, found in by_rule.items():
            lines.append(f"  [{rule}] {len(found)} times, e.g.")
            lines += [f"    {problem.where}: {problem.detail}" for problem in found[:EXAMPLES]]
        return "\n".join(lines)


class Fatal(Exception):
    """A record the lint cannot read past (an entry's: the lint goes on with the next entry)."""

    def __init__(self, message: str, rule: str = "unreadable") -> None:
        super().__init__(message)
        self.rule = rule


@dataclass
class Summary:
    """What an archive that passed (or not) looks like, for reports."""

    entries: int = 0
    zip64_end: bool = False
    descriptors: int = 0  # entries with bit 3
    local_sizes: Counter[str] = field(default_factory=Counter)  # "zero"/"real" of entries with bit 3
    local_zip64: int = 0  # local headers with a ZIP64 extra
    central_zip64: int = 0  # central records with a ZIP64 extra
    methods: Counter[int] = field(default_factory=Counter)
    problems: list[Problem] = field(default_factory=list)


@dataclass(slots=True)
class Central:
    index: int
    name: bytes
    made_by: int
    system: int
    needed: int
    flags: int
    method: int
    time: int
    date: int
    crc: int
    csize: int  # the real values (from the ZIP64 extra where the slot says so)
    usize: int
    offset: int
    slots: tuple[int, int, int]  # the 32-bit csize, usize and offset fields as written
    disk: int
    external: int
    extras: dict[int, bytes]
    extra_order: list[int]

    @property
    def label(self) -> str:
        return f"entry {self.index} {self.name.decode('utf-8', 'replace')!r} (local header at {self.offset})"


class Where:
    """An entry's label (plus a part: " local", " central"), made only if a problem needs it."""

    __slots__ = ("record", "part")

    def __init__(self, record: Central, part: str = "") -> None:
        self.record = record
        self.part = part

    def __add__(self, part: str) -> Where:
        return Where(self.record, self.part + part)

    def __str__(self) -> str:
        return self.record.label + self.part


def unsigned_descriptor(after: bytes, record: Central, zip64: bool) -> bool:
    """Whether the CRC-32 and sizes of ``record`` start ``after``, without a signature."""
    layout = "<L2Q" if zip64 else "<3L"
    if len(after) < struct.calcsize(layout):
        return False
    return struct.unpack_from(layout, after) == (record.crc, record.csize, record.usize)


def parse_extras(data: bytes) -> tuple[dict[int, bytes], list[int], str | None]:
    """An extra field block: {tag: data}, tags in order, and what is malformed (or None)."""
    extras: dict[int, bytes] = {}
    order: list[int] = []
    position = 0
    while position < len(data):
        if position + 4 > len(data):
            return extras, order, f"{len(data) - position} stray bytes at the end of the extra fields"
        tag, length = struct.unpack_from("<HH", data, position)
        if position + 4 + length > len(data):
            return (
                extras,
                order,
                f"field 0x{tag:04x} claims {length} bytes, {len(data) - position - 4} are left",
            )
        if tag in extras:
            return extras, order, f"field 0x{tag:04x} twice"
        extras[tag] = data[position + 4 : position + 4 + length]
        order.append(tag)
        position += 4 + length
    return extras, order, None


@functools.lru_cache(maxsize=4096)
def dos_to_unix(date: int, time: int) -> int | None:
    """A DOS date and time as a POSIX time, read as UTC; None if not a valid date."""
    year, month, day = 1980 + (date >> 9), (date >> 5) & 0xF, date & 0x1F
    hour, minute, second = time >> 11, (time >> 5) & 0x3F, (time & 0x1F) * 2
    if not (1 <= month <= 12 and 1 <= day <= calendar.monthrange(year, month)[1]):
        return None
    if not (hour <= 23 and minute <= 59 and second <= 59):
        return None
    return calendar.timegm((year, month, day, hour, minute, second))


def name_problems(name: str) -> list[tuple[str, str]]:
    """(rule, detail) for every name rule ``name`` breaks."""
    found: list[tuple[str, str]] = []
    if not unicodedata.is_normalized("NFC", name):
        found.append(("name-nfc", "not in Unicode NFC"))
    if name.startswith("/"):
        found.append(("name-path", "absolute (leading '/')"))
    if "\\" in name:
        found.append(("name-path", "contains a backslash"))
    if DRIVE.match(name):
        found.append(("name-path", "starts with a drive letter"))
    controls = sorted({f"U+{ord(c):04X}" for c in CONTROL.findall(name)}) if CONTROL.search(name) else []
    if controls:
        found.append(("name-chars", f"control characters {', '.join(controls)}"))
    forbidden = sorted(set(FORBIDDEN.findall(name))) if FORBIDDEN.search(name) else []
    if forbidden:
        found.append(("name-chars", f"characters Windows forbids: {' '.join(forbidden)}"))
    for component in name.split("/"):
        if component in ("", ".", ".."):
            found.append(("name-path", f"a component {component!r}"))
            continue
        if component.endswith((".", " ")):
            found.append(("name-trailing", f"component {component!r} ends with {component[-1]!r}"))
        stem = component.split(".", 1)[0].rstrip(" ").casefold()
        if stem in RESERVED:
            found.append(
                ("name-reserved", f"component {component!r} is the Windows device name {stem.upper()}")
            )
    return found


class Linter:
    def __init__(self, file: BinaryIO, local_sizes: LocalSizes) -> None:
        self.file = file
        self.fd = file.fileno()
        self.size = os.fstat(self.fd).st_size
        self.local_sizes = local_sizes
        self.summary = Summary()

    def problem(self, rule: str, where: str | Where, detail: str) -> None:
        self.summary.problems.append(Problem(rule, str(where), detail))

    def read_some(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (fewer at the end of the file)."""
        return os.pread(self.fd, max(0, min(length, self.size - offset)), offset) if offset >= 0 else b""

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or offset + length > self.size:
            raise Fatal(f"{length} bytes at {offset} lie outside the file ({self.size} bytes)")
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise Fatal(f"short read of {length} bytes at {offset}")
        return data

    # -- end records ---------------------------------------------------------------------

    def end_records(self) -> tuple[int, int, int, int]:
        """(entry count, directory offset, directory size, where the directory must end)."""
        where = "end record"
        tail_length = min(self.size, END.size + 0xFFFF)
        tail = self.read(self.size - tail_length, tail_length)
        at = None
        for match in reversed([m.start() for m in re.finditer(re.escape(END_SIG), tail)]):
            if match + END.size <= len(tail):
                (comment_length,) = struct.unpack_from("<H", tail, match + 20)
                if match + END.size + comment_length == len(tail):
                    at = self.size - tail_length + match
                    break
        if at is None:
            raise Fatal("no end of central directory record ends the file", "end-record")
        if at + END.size != self.size:
            self.problem("end-record", where, f"a {self.size - at - END.size}-byte comment follows it")
        _, disk, cd_disk, disk_count, count, cd_size, cd_offset, _ = END.unpack(self.read(at, END.size))
        if disk or cd_disk:
            self.problem("end-record", where, f"disk numbers {disk}, {cd_disk} (must be 0)")
        if disk_count != count:
            self.problem("end-record", where, f"entries on this disk {disk_count}, in all {count}")
        directory_end = at
        locator_at = at - LOCATOR.size
        has_zip64 = locator_at >= 0 and self.read(locator_at, 4) == LOCATOR_SIG
        end32 = (count, cd_size, cd_offset)
        if has_zip64:
            self.summary.zip64_end = True
            _, locator_disk, record_at, disks = LOCATOR.unpack(self.read(locator_at, LOCATOR.size))
            if locator_disk != 0 or disks != 1:
                self.problem("zip64-end", "ZIP64 locator", f"disk {locator_disk} of {disks} (must be 0 of 1)")
            if record_at + ZIP64_END.size > locator_at or self.read(record_at, 4) != ZIP64_END_SIG:
                raise Fatal(
                    f"the ZIP64 locator points at {record_at}, where no ZIP64 end record is", "zip64-end"
                )
            fields = ZIP64_END.unpack(self.read(record_at, ZIP64_END.size))
            _, record_size, _, needed, disk64, cd_disk64, disk_count64, count, cd_size, cd_offset = fields
            if record_at + 12 + record_size != locator_at:
                self.problem(
                    "zip64-end",
                    "ZIP64 end record",
                    f"at {record_at}, {record_size} + 12 bytes long, but the locator is at {locator_at}",
                )
            if needed != 45:
                self.problem("zip64-end", "ZIP64 end record", f"version needed {needed} (must be 45)")
            if disk64 or cd_disk64 or disk_count64 != count:
                self.problem(
                    "zip64-end",
                    "ZIP64 end record",
                    f"disks {disk64}, {cd_disk64}; entries {disk_count64}/{count}",
                )
            for label, value32, value, limit in zip(
                ("count", "directory size", "directory offset"),
                end32,
                (count, cd_size, cd_offset),
                (U16, U32, U32),
                strict=True,
            ):
                if value32 not in (min(value, limit), limit):
                    self.problem(
                        "end-values",
                        where,
                        f"{label} {value32} (ZIP64 end record: {value}; must be that or 0x{limit:X})",
                    )
            directory_end = record_at
        needs_zip64 = count >= COUNT_LIMIT or cd_offset > ZIP64_LIMIT or cd_size > ZIP64_LIMIT
        if needs_zip64 != has_zip64:
            self.problem(
                "zip64-end",
                where,
                f"{'a' if has_zip64 else 'no'} ZIP64 end record and locator, with {count} entries, "
                f"directory at {cd_offset} of {cd_size} bytes",
            )
        if cd_offset + cd_size != directory_end:
            self.problem(
                "layout",
                "central directory",
                f"at {cd_offset} of {cd_size} bytes ends at {cd_offset + cd_size}, "
                f"the next record starts at {directory_end}",
            )
        return count, cd_offset, cd_size, directory_end

    # -- central directory -----------------------------------------------------------------

    def central_records(self, count: int, cd_offset: int, cd_size: int) -> list[Central]:
        directory = self.read(cd_offset, cd_size)
        records: list[Central] = []
        position = 0
        while position < len(directory):
            if position + CENTRAL.size > len(directory):
                raise Fatal(
                    f"{len(directory) - position} stray bytes at the end of the central directory",
                    "directory",
                )
            fields = CENTRAL.unpack_from(directory, position)
            (sig, version, system, needed, _, flags, method, time, date, crc, csize, usize) = fields[:12]
            name_length, extra_length, comment_length, disk, _, external, offset = fields[12:]
            if sig != CENTRAL_SIG:
                raise Fatal(
                    f"no central record signature at directory offset {position}: {sig!r}", "directory"
                )
            start = position + CENTRAL.size
            name = directory[start : start + name_length]
            extra = directory[start + name_length : start + name_length + extra_length]
            position = start + name_length + extra_length + comment_length
            if position > len(directory):
                raise Fatal(f"central record {len(records)} runs past the end of the directory", "directory")
            index = len(records)
            record = Central(
                index,
                name,
                version,
                system,
                needed,
                flags,
                method,
                time,
                date,
                crc,
                csize,
                usize,
                offset,
                (csize, usize, offset),
                disk,
                external,
                {},
                [],
            )
            record.extras, record.extra_order, malformed = parse_extras(extra)
            if malformed:
                self.problem("extra-format", record.label + " central", malformed)
            self.central_zip64(record)
            records.append(record)
        if len(records) != count:
            self.problem(
                "directory", "central directory", f"{len(records)} records, the end records say {count}"
            )
        return records

    def central_zip64(self, record: Central) -> None:
        """Resolve the ZIP64 extra of a central record, checking [zip64-central]."""
        where = Where(record, " central")
        csize, usize, offset = record.slots
        wanted = [("uncompressed size", usize), ("compressed size", csize), ("offset", offset)]
        in_extra = [label for label, slot in wanted if slot == U32]
        data = record.extras.get(ZIP64_EXTRA)
        if data is None:
            if in_extra:
                self.problem("zip64-central", where, f"{', '.join(in_extra)} 0xFFFFFFFF but no ZIP64 extra")
        else:
            self.summary.central_zip64 += 1
            if len(data) != 8 * len(in_extra):
                self.problem(
                    "zip64-central",
                    where,
                    f"ZIP64 extra of {len(data)} bytes; the slots at 0xFFFFFFFF "
                    f"({', '.join(in_extra) or 'none'}) "
                    f"need {8 * len(in_extra)}",
                )
            values = list(struct.unpack_from(f"<{min(len(data), 24) // 8}Q", data))
            for label in in_extra:
                if not values:
                    break
                value = values.pop(0)
                if label == "uncompressed size":
                    record.usize = value
                elif label == "compressed size":
                    record.csize = value
                else:
                    record.offset = value
        if record.disk != 0:
            self.problem("zip64-central", where, f"disk number {record.disk} (must be 0)")
        for label, slot, value in (
            ("uncompressed size", usize, record.usize),
            ("compressed size", csize, record.csize),
            ("offset", offset, record.offset),
        ):
            if value > ZIP64_LIMIT and slot != U32:
                self.problem(
                    "zip64-central", where, f"{label} {value} is above 2**31 - 1 but not in the ZIP64 extra"
                )
        if (usize == U32) != (csize == U32):
            self.problem("zip64-central", where, "only one of the two size slots is 0xFFFFFFFF")

    # -- each entry --------------------------------------------------------------------------

    def entry(self, record: Central) -> int:
        """Check one entry against its central record; return where the entry ends."""
        where = Where(record)
        # One read for the header, its name and (most often) its extra fields.
        header = self.read_some(record.offset, LOCAL.size + len(record.name) + 64)
        if len(header) < LOCAL.size:
            raise Fatal(f"the local header at {record.offset} runs past the end of the file", "layout")
        fields = LOCAL.unpack_from(header)
        sig, needed, flags, method, time, date, crc, csize, usize, name_length, extra_length = fields
        if sig != LOCAL_SIG:
            raise Fatal(f"no local header signature at {record.offset}: {sig!r}", "layout")
        end_of_header = LOCAL.size + name_length + extra_length
        if len(header) < end_of_header:
            header = self.read(record.offset, end_of_header)
        name, extra = (
            header[LOCAL.size : LOCAL.size + name_length],
            header[LOCAL.size + name_length : end_of_header],
        )
        extras, order, malformed = parse_extras(extra)
        if malformed:
            self.problem("extra-format", where + " local", malformed)
        data_start: int = record.offset + LOCAL.size + name_length + extra_length
        self.summary.methods[record.method] += 1

        # Local against central.
        local_zip64 = ZIP64_EXTRA in extras
        central_zip64 = ZIP64_EXTRA in record.extras
        self.summary.local_zip64 += local_zip64
        expected_version = 45 if local_zip64 or central_zip64 else 20
        if needed != record.needed or needed != expected_version:
            self.problem(
                "version-needed",
                where,
                f"local {needed}, central {record.needed}; must both be {expected_version}"
                f" ({'a' if expected_version == 45 else 'no'} ZIP64 extra)",
            )
        if flags != record.flags:
            self.problem("flags", where, f"local 0x{flags:04x}, central 0x{record.flags:04x}")
        allowed = FLAG_DESCRIPTOR | FLAG_UTF8 | (DEFLATE_LEVEL_FLAGS if record.method == DEFLATED else 0)
        if record.flags & ~allowed:
            self.problem("flags", where, f"unexpected general purpose bits 0x{record.flags & ~allowed:04x}")
        if method != record.method or record.method not in (STORED, DEFLATED):
            self.problem(
                "method", where, f"local {method}, central {record.method}; must be the same, 0 or 8"
            )
        if record.method == STORED and record.csize != record.usize:
            self.problem("method", where, f"stored with sizes {record.csize} != {record.usize}")
        if (time, date) != (record.time, record.date):
            self.problem(
                "dos-time",
                where,
                f"local 0x{date:04x} 0x{time:04x}, central 0x{record.date:04x} 0x{record.time:04x}",
            )
        dos = dos_to_unix(record.date, record.time)
        if dos is None:
            self.problem("dos-time", where, f"no valid date: 0x{record.date:04x} 0x{record.time:04x}")
        if name != record.name:
            self.problem("name-bytes", where, f"local {name!r}, central {record.name!r}")
        if bool(record.flags & FLAG_UTF8) != (not record.name.isascii()):
            self.problem(
                "utf8-flag",
                where,
                f"bit 11 {'set' if record.flags & FLAG_UTF8 else 'clear'} for a"
                f"{'n ASCII' if record.name.isascii() else ' non-ASCII'} name",
            )

        # ZIP64 extras.
        if local_zip64 and order[0] != ZIP64_EXTRA:
            self.problem("zip64-first", where + " local", f"extra fields in the order {_tags(order)}")
        if central_zip64 and record.extra_order[0] != ZIP64_EXTRA:
            self.problem(
                "zip64-first", where + " central", f"extra fields in the order {_tags(record.extra_order)}"
            )
        local_usize, local_csize = usize, csize
        if local_zip64:
            data = extras[ZIP64_EXTRA]
            if len(data) != 16:
                self.problem(
                    "zip64-local", where, f"ZIP64 extra of {len(data)} bytes (must be 16: two sizes)"
                )
            if (usize, csize) != (U32, U32):
                self.problem("zip64-local", where, f"size slots {usize:#x}, {csize:#x} (must be 0xFFFFFFFF)")
            if len(data) >= 16:
                local_usize, local_csize = struct.unpack_from("<2Q", data)
        elif U32 in (usize, csize):
            self.problem("zip64-local", where, "a size slot is 0xFFFFFFFF but there is no ZIP64 extra")
        central_sizes_in_zip64 = record.slots[0] == U32 or record.slots[1] == U32
        if central_sizes_in_zip64 != local_zip64:
            self.problem(
                "zip64-central",
                where,
                f"central size slots {'are' if central_sizes_in_zip64 else 'are not'} 0xFFFFFFFF, "
                f"the local header {'has' if local_zip64 else 'has no'} ZIP64 extra",
            )

        # Data descriptor.
        data_end = data_start + record.csize
        if data_end > self.size:
            raise Fatal(f"its data ends at {data_end}, past the end of the file", "layout")
        # What follows the data: a descriptor (16 or 24 bytes) and the next record's signature.
        after = self.read_some(data_end, 28)
        follows = after[:4]
        end = data_end
        if record.flags & FLAG_DESCRIPTOR:
            self.summary.descriptors += 1
            if crc != 0:
                self.problem("local-crc", where, f"bit 3 set but the local CRC-32 is {crc:08x}, not 0")
            if (local_usize, local_csize) == (0, 0):
                kind = "zero"
            elif (local_usize, local_csize) == (record.usize, record.csize):
                kind = "real"
            else:
                kind = "other"
            self.summary.local_sizes[kind] += 1
            if kind == "other" or (self.local_sizes != "either" and kind != self.local_sizes):
                allowed_kinds = "0 or the real sizes" if self.local_sizes == "either" else self.local_sizes
                self.problem(
                    "local-sizes",
                    where,
                    f"local sizes {local_usize}, {local_csize} with bit 3 (must be {allowed_kinds}: "
                    f"{record.usize}, {record.csize})",
                )
            if follows != DESCRIPTOR_SIG:
                if unsigned_descriptor(after, record, local_zip64):
                    self.problem(
                        "descriptor-signature", where, "the data descriptor lacks its signature PK\\x07\\x08"
                    )
                else:
                    self.problem(
                        "descriptor-flag", where, f"bit 3 set but the data is followed by {follows!r}"
                    )
                return data_end
            form = 24 if local_zip64 else 16
            other = 16 if form == 24 else 24
            length = form
            if after[form : form + 4] not in NEXT_SIGS and after[other : other + 4] in NEXT_SIGS:
                length = other
                self.problem(
                    "descriptor-form",
                    where,
                    f"the descriptor is {other} bytes long but the local header "
                    f"{'has' if local_zip64 else 'has no'} ZIP64 extra (so a reader expects {form})",
                )
            if len(after) < length:
                raise Fatal(f"its data descriptor at {data_end} runs past the end of the file", "layout")
            _, d_crc, d_csize, d_usize = struct.unpack_from("<4sL2Q" if length == 24 else "<4s3L", after)
            end = data_end + length
            if (d_crc, d_csize, d_usize) != (record.crc, record.csize, record.usize):
                self.problem(
                    "descriptor-values",
                    where,
                    f"{length}-byte descriptor CRC-32 {d_crc:08x}, sizes {d_csize}, {d_usize}; central "
                    f"{record.crc:08x}, {record.csize}, {record.usize}",
                )
        else:
            if follows == DESCRIPTOR_SIG:
                self.problem(
                    "descriptor-flag", where, "a data descriptor follows the data but bit 3 is clear"
                )
            if (crc, local_csize, local_usize) != (record.crc, record.csize, record.usize):
                self.problem(
                    "local-values",
                    where,
                    f"local CRC-32 {crc:08x}, sizes {local_csize}, {local_usize}; central "
                    f"{record.crc:08x}, {record.csize}, {record.usize}",
                )

        # Extended timestamp.
        local_ut, central_ut = extras.get(TIMESTAMP_EXTRA), record.extras.get(TIMESTAMP_EXTRA)
        if local_ut is None or central_ut is None:
            missing = " and ".join(n for n, v in (("local", local_ut), ("central", central_ut)) if v is None)
            self.problem("timestamp", where, f"no extended timestamp (0x5455) in the {missing} header")
        else:
            if len(local_ut) != 5 or local_ut != central_ut or not local_ut[0] & 1:
                self.problem(
                    "timestamp",
                    where,
                    f"local {local_ut.hex()}, central {central_ut.hex()} (must be 01 + mtime, equal)",
                )
            if len(local_ut) == 5 and dos is not None:
                (mtime,) = struct.unpack_from("<L", local_ut, 1)
                if DOS_MIN <= mtime <= DOS_MAX and not 0 <= mtime - dos < 2:
                    self.problem(
                        "timestamp-dos",
                        where,
                        f"mtime {mtime} but the DOS time says {dos} (UTC), {mtime - dos:+d} s",
                    )
        unknown = sorted((set(extras) | set(record.extras)) - {ZIP64_EXTRA, TIMESTAMP_EXTRA})
        if unknown:
            self.problem("extra-unknown", where, f"extra fields {_tags(unknown)}")

        # Version made by, attributes.
        if record.system != UNIX:
            self.problem("made-by", where, f"version made by says system {record.system}, not 3 (Unix)")
        mode, low = record.external >> 16, record.external & 0xFF
        if mode not in MODES or low:
            self.problem(
                "attributes",
                where,
                f"external attributes 0x{record.external:08x}: mode {mode:o}, low byte {low:#x} "
                "(must be 100644 or 100755, and 0)",
            )
        return end

    # -- names ---------------------------------------------------------------------------------

    def names(self, records: list[Central]) -> None:
        seen: dict[str, Central] = {}
        keys: list[tuple[Central, str]] = []  # the name as compared: NFC, case folded
        for record in records:
            try:
                name = record.name.decode("utf-8")
            except UnicodeDecodeError as exc:
                self.problem("name-utf8", Where(record), f"not valid UTF-8: {exc}")
                continue
            for rule, detail in name_problems(name):
                self.problem(rule, Where(record), detail)
            key = (name if name.isascii() else unicodedata.normalize("NFC", name)).casefold()
            keys.append((record, key))
            if key in seen:
                self.problem(
                    "name-duplicate", Where(record), f"the same name as {seen[key].label} (ignoring case)"
                )
            else:
                seen[key] = record
        folders: set[str] = set()
        for _, key in keys:
            cut = key.rfind("/")
            while cut > 0 and key[:cut] not in folders:
                folders.add(key[:cut])
                cut = key.rfind("/", 0, cut)
        for record, key in keys:
            if key in folders:
                self.problem("name-folder", Where(record), "another entry lies in a folder of this name")

    # -- all ---------------------------------------------------------------------------------

    def run(self) -> Summary:
        count, cd_offset, cd_size, _ = self.end_records()
        records = self.central_records(count, cd_offset, cd_size)
        self.summary.entries = len(records)
        position: int | None = 0  # where the previous entry ends (None: not known)
        for record in sorted(records, key=lambda r: r.offset):
            if position is not None and record.offset != position:
                gap = "a gap of" if record.offset > position else "an overlap of"
                self.problem(
                    "layout",
                    record.label,
                    f"starts at {record.offset}, the previous entry ends at {position}: "
                    f"{gap} {abs(record.offset - position)} bytes",
                )
            try:
                position = self.entry(record)
            except Fatal as exc:
                self.problem(exc.rule, record.label, str(exc))
                position = None
        if position is not None and position != cd_offset:
            self.problem(
                "layout", "central directory", f"starts at {cd_offset}, the last entry ends at {position}"
            )
        self.names(records)
        return self.summary


def _tags(tags: list[int]) -> str:
    return ", ".join(f"0x{tag:04x}" for tag in tags)


def check(path: Path | str, local_sizes: LocalSizes = "either") -> Summary:
    """Lint ``path`` and return what was found, problems included (raises only :class:`LintError`
    for a file too broken to read on)."""
    path = Path(path)
    with open(path, "rb") as file:
        linter = Linter(file, local_sizes)
        try:
            return linter.run()
        except Fatal as exc:
            linter.problem(exc.rule, str(path), str(exc))
            raise LintError(path, linter.summary.problems) from None


def entry_names(path: Path | str) -> list[bytes]:
    """The name bytes of every central directory record, in directory order."""
    with open(path, "rb") as file:
        linter = Linter(file, "either")
        try:
            count, cd_offset, cd_size, _ = linter.end_records()
            return [record.name for record in linter.central_records(count, cd_offset, cd_size)]
        except Fatal as exc:
            linter.problem(exc.rule, str(path), str(exc))
            raise LintError(Path(path), linter.summary.problems) from None


def lint(path: Path | str, local_sizes: LocalSizes = "either") -> None:
    """Raise :class:`LintError` naming every entry and rule broken, if any."""
    summary = check(path, local_sizes)
    if summary.problems:
        raise LintError(Path(path), summary.problems)


def describe(summary: Summary) -> str:
    sizes = ", ".join(f"{kind} {n}" for kind, n in sorted(summary.local_sizes.items())) or "-"
    methods = ", ".join(f"{method}: {n}" for method, n in sorted(summary.methods.items()))
    return (
        f"{summary.entries} entries (methods {methods}); "
        f"ZIP64 end record: {'yes' if summary.zip64_end else 'no'}; "
        f"bit 3 on {summary.descriptors} (local sizes of those: {sizes}); ZIP64 extras: "
        f"{summary.local_zip64} local, {summary.central_zip64} central"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.ziplint", description=__doc__.split("\n")[0])
    parser.add_argument("archives", nargs="+", type=Path)
    parser.add_argument("--local-sizes", choices=("zero", "real", "either"), default="either")
    arguments = parser.parse_args(argv)
    status = 0
    for path in arguments.archives:
        try:
            summary = check(path, arguments.local_sizes)
        except LintError as exc:
            print(exc)
            status = 1
            continue
        print(f"{path}: {describe(summary)}")
        if summary.problems:
            print(LintError(path, summary.problems))
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
