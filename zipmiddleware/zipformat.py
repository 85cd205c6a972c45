"""The ZIP format: every record of an archive, packed field by field.

References: PKWARE's APPNOTE.TXT 6.3.10 (sections 4.3.7 local header, 4.3.9 data
descriptor, 4.3.12 central record, 4.3.14-16 end records, 4.5.3 ZIP64 extra) and
Info-ZIP's extra-field list (0x5455, the extended timestamp).

Each rule below is one that some widely used reader enforces; what reads our archives,
and the evidence for each rule, is in the README ("ZIP format"):

- A member's "version needed" is the same in its local header and its central record:
  45 when either holds a ZIP64 extra, else 20 (.NET's ZipArchive and WindowsBase refuse
  a mismatch).
- A member whose size may pass :data:`ZIP64_LIMIT` (decided before its data, from its
  planned size) has a ZIP64 extra in its local header, with both sizes in it and
  ``0xFFFFFFFF`` in the header's size fields (the form macOS Archive Utility and
  libarchive accept), an 8-byte-size data descriptor, and ``0xFFFFFFFF`` sizes with a
  ZIP64 extra in its central record. So local header, descriptor and central record
  agree (7-Zip warns "Headers Error" otherwise; streaming readers pick the descriptor's
  form from the local header).
- A ZIP64 extra comes first among the extras and, in a central record, holds exactly
  the fields whose 32-bit slots say ``0xFFFFFFFF``, in the order of the APPNOTE
  (uncompressed size, compressed size, offset): Windows Explorer and Go read it so.
- Every member has an extended timestamp (0x5455: flags 1, the mtime as a 32-bit UTC
  Unix time) in both headers, next to the DOS date and time, which are UTC: readers
  that know the extra (Info-ZIP, 7-Zip, libarchive, Go) show the right time in every
  time zone; the others show UTC.
- Data descriptors carry their signature ``PK\\x07\\x08`` (macOS Archive Utility).
- Modes: "made by" Unix, with a regular file's type bits and 0644, or 0755 for a file
  that anyone may execute, in the external attributes.
- Names are UTF-8, with general purpose bit 11 when they are not ASCII.

All of it is pure: the records of a member depend on nothing but their arguments.
"""

from __future__ import annotations

import functools
import stat
import struct
import time
from dataclasses import dataclass

# Sizes and offsets above this get ZIP64 fields: Python's zipfile uses the same limit
# (2 GiB - 1, not 4 GiB - 1), since some readers take the 32-bit fields as signed.
ZIP64_LIMIT = (1 << 31) - 1
# An archive with this many entries or more needs the ZIP64 end records (the count is 16 bits).
ZIP_FILECOUNT_LIMIT = 0xFFFF
ZIP64_SLOT = 0xFFFFFFFF  # a 32-bit size or offset field saying "in the ZIP64 extra"

VERSION = 20  # 2.0: deflate, folders
VERSION_ZIP64 = 45  # 4.5: ZIP64
MADE_BY_UNIX = 3 << 8  # upper byte of "version made by": external attributes are a Unix mode

FLAG_DESCRIPTOR = 0x08  # bit 3: CRC-32 and sizes follow the data, in a data descriptor
FLAG_UTF8 = 0x800  # bit 11: the name is UTF-8

STORED = 0
DEFLATED = 8

UT_MAX = 0x7FFFFFFF  # the extended timestamp is a signed 32-bit time: up to 2038-01-19

# Record layouts (little-endian), with their sizes:
LOCAL_HEADER = struct.Struct("<4sHHHHHLLLHH")  # 30 bytes
CENTRAL_RECORD = struct.Struct("<4sHHHHHHLLLHHHHHLL")  # 46 bytes
DESCRIPTOR = struct.Struct("<4sLLL")  # 16 bytes
DESCRIPTOR_ZIP64 = struct.Struct("<4sLQQ")  # 24 bytes
END_RECORD = struct.Struct("<4sHHHHLLH")  # 22 bytes
ZIP64_END_RECORD = struct.Struct("<4sQHHLLQQQQ")  # 56 bytes
ZIP64_END_LOCATOR = struct.Struct("<4sLQL")  # 20 bytes
EXTRA_HEADER = struct.Struct("<HH")
UT_EXTRA = struct.Struct("<HHBL")  # tag 0x5455, length 5, flags (bit 0: mtime), mtime

LOCAL_ZIP64_EXTRA_SIZE = EXTRA_HEADER.size + 16  # both sizes, always
UT_EXTRA_SIZE = UT_EXTRA.size  # 9


DOS_MIN = 315532800  # 1980-01-01 00:00:00 UTC
DOS_MAX = 4354819198  # 2107-12-31 23:59:58 UTC


@functools.lru_cache(maxsize=4096)
def dos_date_time(second: int) -> tuple[int, int]:
    """The DOS (time, date) fields of a UTC second, clamped to 1980-01-01 .. 2107-12-31 (the
    fields' range), in two-second steps. Cached: entries written in bulk share their seconds."""
    t = time.gmtime(min(max(second, DOS_MIN), DOS_MAX))
    dos_time = t.tm_hour << 11 | t.tm_min << 5 | t.tm_sec // 2
    return dos_time, (t.tm_year - 1980) << 9 | t.tm_mon << 5 | t.tm_mday


def external_attributes(executable: bool) -> int:
    """A regular file's Unix mode in the upper 16 bits: 0755 for an executable file, else 0644."""
    return (stat.S_IFREG | (0o755 if executable else 0o644)) << 16


@dataclass(frozen=True, slots=True)
class Member:
    """What both headers of one entry say about it, besides its CRC-32 and sizes.

    ``zip64``: the local header has a ZIP64 extra (decided before the data, from the
    planned size) and the descriptor has 8-byte sizes. ``descriptor``: the CRC-32 and
    sizes follow the data (bit 3), else the local header holds them.
    """

    name: bytes  # UTF-8
    method: int  # STORED or DEFLATED
    mtime: int  # UTC seconds, in the DOS range (planning clamps it)
    executable: bool
    offset: int  # of the local header
    zip64: bool
    descriptor: bool

    @property
    def flags(self) -> int:
        utf8 = 0 if self.name.isascii() else FLAG_UTF8
        return utf8 | (FLAG_DESCRIPTOR if self.descriptor else 0)

    @property
    def version(self) -> int:
        """ "Version needed", the same in both headers: 4.5 if either holds a ZIP64 extra."""
        return VERSION_ZIP64 if self.zip64 or self.offset > ZIP64_LIMIT else VERSION

    @property
    def header_size(self) -> int:
        zip64_extra = LOCAL_ZIP64_EXTRA_SIZE if self.zip64 else 0
        return LOCAL_HEADER.size + len(self.name) + zip64_extra + UT_EXTRA_SIZE

    @property
    def descriptor_size(self) -> int:
        if not self.descriptor:
            return 0
        return DESCRIPTOR_ZIP64.size if self.zip64 else DESCRIPTOR.size

    @property
    def record_size(self) -> int:
        fields = 2 * self.zip64 + (self.offset > ZIP64_LIMIT)
        zip64_extra = EXTRA_HEADER.size + 8 * fields if fields else 0
        return CENTRAL_RECORD.size + len(self.name) + zip64_extra + UT_EXTRA_SIZE


def _ut_extra(mtime: int) -> bytes:
    return UT_EXTRA.pack(0x5455, 5, 1, min(max(mtime, 0), UT_MAX))


def _fields(member: Member, crc: int, compressed: int, size: int, extra: bytes) -> tuple[int, ...]:
    """The fields that a local header and its central record share, in the order both have them
    (version needed, flags, method, DOS time and date, CRC-32, sizes, name and extra lengths): one
    source for both, since readers such as 7-Zip compare the two."""
    dos_time, dos_date = dos_date_time(member.mtime)
    flags, name = member.flags, member.name
    return (
        member.version,
        flags,
        member.method,
        dos_time,
        dos_date,
        crc,
        compressed,
        size,
        len(name),
        len(extra),
    )


def local_header(member: Member, crc: int = 0, compressed: int = 0, size: int = 0) -> bytes:
    """The local file header.

    With a descriptor, ``crc`` is written as 0 (the descriptor has it); the sizes given
    are written as they are: the planned sizes where they are known, 0 where not.
    """
    if member.descriptor:
        crc = 0
    extra = b""
    if member.zip64:
        extra = EXTRA_HEADER.pack(0x0001, 16) + struct.pack("<QQ", size, compressed)
        compressed = size = ZIP64_SLOT
    elif compressed > ZIP64_LIMIT or size > ZIP64_LIMIT:
        raise ValueError(f"{member.name!r}: {size} bytes need a member planned with zip64")
    extra += _ut_extra(member.mtime)
    return (
        LOCAL_HEADER.pack(b"PK\x03\x04", *_fields(member, crc, compressed, size, extra)) + member.name + extra
    )


def data_descriptor(member: Member, crc: int, compressed: int, size: int) -> bytes:
    """The data descriptor after a member's data: 8-byte sizes exactly when its local header
    has a ZIP64 extra (streaming readers decide the form from the local header)."""
    if member.zip64:
        return DESCRIPTOR_ZIP64.pack(b"PK\x07\x08", crc, compressed, size)
    if compressed > ZIP64_LIMIT or size > ZIP64_LIMIT:
        raise ValueError(f"{member.name!r}: {size} bytes need a member planned with zip64")
    return DESCRIPTOR.pack(b"PK\x07\x08", crc, compressed, size)


def central_record(member: Member, crc: int, compressed: int, size: int) -> bytes:
    """The central directory record: sizes in the ZIP64 extra exactly when the local header
    has one; the offset there when it passes :data:`ZIP64_LIMIT`."""
    fields: list[int] = []
    offset = member.offset
    if member.zip64:
        fields += [size, compressed]
        size = compressed = ZIP64_SLOT
    if offset > ZIP64_LIMIT:
        fields.append(offset)
        offset = ZIP64_SLOT
    extra = b""
    if fields:
        extra = EXTRA_HEADER.pack(0x0001, 8 * len(fields)) + struct.pack(f"<{len(fields)}Q", *fields)
    extra += _ut_extra(member.mtime)
    record = CENTRAL_RECORD.pack(
        b"PK\x01\x02",
        MADE_BY_UNIX | member.version,
        *_fields(member, crc, compressed, size, extra),
        0,  # comment length
        0,  # disk number
        0,  # internal attributes
        external_attributes(member.executable),
        offset,
    )
    return record + member.name + extra


def needs_zip64_end(count: int, directory_offset: int, directory_size: int) -> bool:
    """Whether the end records need their ZIP64 forms (a count or position past 16/32 bits)."""
    return count >= ZIP_FILECOUNT_LIMIT or directory_offset > ZIP64_LIMIT or directory_size > ZIP64_LIMIT


def end_records_size(count: int, directory_offset: int, directory_size: int) -> int:
    zip64 = ZIP64_END_RECORD.size + ZIP64_END_LOCATOR.size
    return END_RECORD.size + (zip64 if needs_zip64_end(count, directory_offset, directory_size) else 0)


def end_records(count: int, directory_offset: int, directory_size: int) -> bytes:
    """The end of central directory record (no comment), after the ZIP64 end record and its
    locator where :func:`needs_zip64_end` says so."""
    records = b""
    if needs_zip64_end(count, directory_offset, directory_size):
        records += ZIP64_END_RECORD.pack(
            b"PK\x06\x06",
            ZIP64_END_RECORD.size - 12,  # the record's size, not counting these 12 bytes
            MADE_BY_UNIX | VERSION_ZIP64,
            VERSION_ZIP64,
            0,  # this disk
            0,  # the disk where the directory starts
            count,  # entries on this disk
            count,  # entries in all
            directory_size,
            directory_offset,
        )
        records += ZIP64_END_LOCATOR.pack(b"PK\x06\x07", 0, directory_offset + directory_size, 1)
        count = min(count, 0xFFFF)
        directory_size = min(directory_size, ZIP64_SLOT)
        directory_offset = min(directory_offset, ZIP64_SLOT)
    return records + END_RECORD.pack(b"PK\x05\x06", 0, 0, count, count, directory_size, directory_offset, 0)
