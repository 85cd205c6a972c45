"""The ZIP records, checked field by field in milliseconds (tests/test_zip64.py proves the
same decisions with gigabytes, tests/test_readers.py with every reader)."""

from __future__ import annotations

import calendar
import stat
import struct
import zipfile
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from werkzeug.test import EnvironBuilder

from zipmiddleware import ZipEntry, ZipMiddleware, ZipTarget
from zipmiddleware.config import build_settings
from zipmiddleware.errors import StreamError
from zipmiddleware.planning import PlannedEntry, Planner, zip_second
from zipmiddleware.zipengine import ZipStream, member
from zipmiddleware.zipformat import (
    Member,
    central_record,
    data_descriptor,
    dos_date_time,
    end_records,
    end_records_size,
    external_attributes,
    local_header,
)

LIMIT = zipfile.ZIP64_LIMIT  # 2**31 - 1: Python's zipfile switches to ZIP64 there too

SIZES = [0, 1, 2_045_222_521, 2_100_000_000, LIMIT - 1, LIMIT, LIMIT + 1, 2**32 - 1, 2**32, 4_500_000_000]


def extras(data: bytes) -> list[tuple[int, bytes]]:
    """The extra fields of a header, in order; asserts that their lengths add up exactly."""
    fields, pos = [], 0
    while pos < len(data):
        tag, length = struct.unpack_from("<HH", data, pos)
        fields.append((tag, data[pos + 4 : pos + 4 + length]))
        pos += 4 + length
    assert pos == len(data)
    return fields


def parse_local(header: bytes) -> dict[str, Any]:
    (sig, version, flags, method, dos_time, dos_date, crc, csize, usize, n, m) = struct.unpack_from(
        "<4sHHHHHLLLHH", header
    )
    assert sig == b"PK\x03\x04" and len(header) == 30 + n + m
    return dict(
        version=version, flags=flags, method=method, time=(dos_time, dos_date), crc=crc, sizes=(csize, usize),
        name=header[30 : 30 + n], extras=extras(header[30 + n :]),
    )  # fmt: skip


def parse_central(record: bytes) -> dict[str, Any]:
    fields = struct.unpack_from("<4sHHHHHHLLLHHHHHLL", record)
    (
        sig,
        made_by,
        version,
        flags,
        method,
        dos_time,
        dos_date,
        crc,
        csize,
        usize,
        n,
        m,
        k,
        _,
        _,
        attrs,
        off,
    ) = fields
    assert sig == b"PK\x01\x02" and k == 0 and len(record) == 46 + n + m
    return dict(
        made_by=made_by, version=version, flags=flags, method=method, time=(dos_time, dos_date), crc=crc,
        sizes=(csize, usize), offset=off, attrs=attrs, name=record[46 : 46 + n], extras=extras(record[46 + n :]),
    )  # fmt: skip


def a_member(**fields: Any) -> Member:
    values: dict[str, Any] = dict(
        name=b"a.txt", method=0, mtime=zip_second(1_700_000_000), executable=False, offset=0, zip64=False,
        descriptor=True,
    )  # fmt: skip
    values.update(fields)
    return Member(**values)


members = st.builds(
    a_member,
    name=st.text(min_size=1, max_size=40).map(lambda text: text.encode("utf-8", "surrogatepass")),
    method=st.sampled_from([0, 8]),
    mtime=st.integers(calendar.timegm((1980, 1, 1, 0, 0, 0)), calendar.timegm((2107, 12, 31, 23, 59, 58))),
    executable=st.booleans(),
    offset=st.integers(0, 2**40),
    zip64=st.booleans(),
    descriptor=st.booleans(),
)
sizes = st.integers(0, 2**40)


@given(members, st.integers(0, 2**32 - 1), sizes)
def test_every_record_has_its_computed_size_and_the_rules_hold(header: Member, crc: int, size: int) -> None:
    if not header.zip64:
        size = min(size, LIMIT)
    local = parse_local(local_header(header, crc, size, size))
    central = parse_central(central_record(header, crc, size, size))
    assert len(local_header(header, crc, size, size)) == header.header_size
    assert len(central_record(header, crc, size, size)) == header.record_size
    if header.descriptor:
        assert len(data_descriptor(header, crc, size, size)) == header.descriptor_size
        assert data_descriptor(header, crc, size, size)[:4] == b"PK\x07\x08"
    else:
        assert header.descriptor_size == 0
    # One "version needed" in both, 45 exactly where either has a ZIP64 extra.
    has_zip64 = any(tag == 1 for tag, _ in local["extras"] + central["extras"])
    assert local["version"] == central["version"] == (45 if has_zip64 else 20)
    assert central["made_by"] >> 8 == 3
    for key in ("flags", "method", "time", "name"):
        assert local[key] == central[key]
    assert bool(local["flags"] & 0x800) == (not header.name.isascii())
    assert bool(local["flags"] & 0x08) == header.descriptor
    assert local["crc"] == (0 if header.descriptor else crc) and central["crc"] == crc
    # ZIP64 extras first; in the local header both sizes with 0xFFFFFFFF slots; in the central
    # record exactly the fields whose slots say 0xFFFFFFFF.
    ut = [(tag, data) for tag, data in local["extras"] if tag == 0x5455]
    assert ut == [(tag, data) for tag, data in central["extras"] if tag == 0x5455] and len(ut) == 1
    assert ut[0][1] == struct.pack("<BL", 1, min(header.mtime, 0x7FFFFFFF))
    if header.zip64:
        assert (
            local["extras"][0] == (1, struct.pack("<QQ", size, size)) and local["sizes"] == (2**32 - 1,) * 2
        )
    else:
        assert [tag for tag, _ in local["extras"]] == [0x5455] and local["sizes"] == (size, size)
    slots = [central["sizes"][1], central["sizes"][0], central["offset"]]
    values = [size, size, header.offset]
    overflowing = [value for slot, value in zip(slots, values, strict=True) if slot == 2**32 - 1]
    if overflowing:
        assert central["extras"][0] == (1, struct.pack(f"<{len(overflowing)}Q", *overflowing))
    else:
        assert [tag for tag, _ in central["extras"]] == [0x5455]
    assert (central["sizes"] == (2**32 - 1,) * 2) == header.zip64
    assert (header.offset > LIMIT) == (central["offset"] == 2**32 - 1)
    assert central["attrs"] >> 16 == stat.S_IFREG | (0o755 if header.executable else 0o644)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("deflated", [False, True], ids=["stored", "deflated"])
def test_zip64_is_decided_from_the_planned_size(size: int, deflated: bool) -> None:
    entry = PlannedEntry("big.bin", zip_second(0), source=[], size=size)
    header = member(entry, 0, zip64=True, data_descriptors=True, deflated=deflated)
    # Deflate may grow incompressible data a little: ZIP64 from 5% below the limit.
    assert header.zip64 == (size + size // 20 > LIMIT if deflated else size > LIMIT)
    assert len(data_descriptor(header, 0, 1, 1)) == (24 if header.zip64 else 16)
    assert not member(entry, 0, zip64=False, data_descriptors=True, deflated=deflated).zip64


def test_only_empty_or_checked_stored_files_go_without_a_descriptor(tmp_path: Any) -> None:
    (tmp_path / "f").write_bytes(b"x")
    file = Planner(build_settings({"roots": [str(tmp_path)]})).check_file(str(tmp_path / "f"))
    cases = {
        "file": PlannedEntry("f", 0, file=file, size=1),
        "empty source": PlannedEntry("e", 0, source=[], size=0),
        "sized source": PlannedEntry("s", 0, source=[b"x"], size=1),
        "unsized source": PlannedEntry("u", 0, source=[b"x"]),
    }
    descriptors = {
        (name, data_descriptors, deflated): member(
            entry, 0, zip64=True, data_descriptors=data_descriptors, deflated=deflated
        ).descriptor
        for name, entry in cases.items()
        for data_descriptors in (True, False)
        for deflated in (True, False)
    }
    assert {key for key, descriptor in descriptors.items() if not descriptor} == {
        ("file", False, False),
        ("empty source", True, False),
        ("empty source", False, False),
    }


def test_local_header_refuses_a_size_it_cannot_hold() -> None:
    with pytest.raises(ValueError, match="zip64"):
        local_header(a_member(), 0, LIMIT + 1, LIMIT + 1)
    with pytest.raises(ValueError, match="zip64"):
        data_descriptor(a_member(), 0, LIMIT + 1, LIMIT + 1)


@pytest.mark.parametrize(
    ("when", "dos"),
    [
        ((1980, 1, 1, 0, 0, 0), (0, 1 << 5 | 1)),
        ((2026, 11, 30, 23, 59, 59), (23 << 11 | 59 << 5 | 29, 46 << 9 | 11 << 5 | 30)),
        ((2107, 12, 31, 23, 59, 58), (23 << 11 | 59 << 5 | 29, 127 << 9 | 12 << 5 | 31)),
    ],
    ids=["dos-epoch", "odd-second", "dos-end"],
)
def test_dos_fields_are_utc(when: tuple[int, ...], dos: tuple[int, int]) -> None:
    assert dos_date_time(calendar.timegm(when)) == dos


def test_extended_timestamp_stops_at_2038() -> None:
    late = a_member(mtime=calendar.timegm((2100, 1, 1, 0, 0, 0)))
    ut = dict(parse_local(local_header(late))["extras"])[0x5455]
    assert ut == struct.pack("<BL", 1, 0x7FFFFFFF)


def test_modes() -> None:
    assert external_attributes(False) == 0o100644 << 16
    assert external_attributes(True) == 0o100755 << 16


@pytest.mark.parametrize(
    ("count", "offset", "size", "zip64"),
    [
        (0, 0, 0, False),
        (65_534, 10, 10, False),
        (65_535, 10, 10, True),
        (3, LIMIT, 100, False),
        (3, LIMIT + 1, 100, True),
        (3, 100, LIMIT + 1, True),
    ],
)
def test_end_records(count: int, offset: int, size: int, zip64: bool) -> None:
    records = end_records(count, offset, size)
    assert len(records) == end_records_size(count, offset, size) == (22 + 76 if zip64 else 22)
    sig, _, _, on_disk, total, dir_size, dir_offset, comment = struct.unpack("<4sHHHHLLH", records[-22:])
    assert sig == b"PK\x05\x06" and comment == 0
    if zip64:
        fields = struct.unpack("<4sQHHLLQQQQ", records[:56])
        assert fields[0] == b"PK\x06\x06" and fields[1] == 44 and fields[6:] == (count, count, size, offset)
        locator = struct.unpack("<4sLQL", records[56:76])
        assert locator == (b"PK\x06\x07", 0, offset + size, 1)
        assert on_disk == total == min(count, 0xFFFF)
    else:
        assert (on_disk, total, dir_size, dir_offset) == (count, count, size, offset)


# -- through the writer ----------------------------------------------------------------------


class LyingSource:
    """Three bytes, whatever size the entry claims; records whether it was closed."""

    def __init__(self, pieces: int = 1, piece: bytes = b"abc") -> None:
        self.pieces = pieces
        self.piece = piece
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        for _ in range(self.pieces):
            yield self.piece

    def close(self) -> None:
        self.closed = True


def local_header_has_zip64(header: bytes) -> bool:
    return any(
        tag == 1
        for tag, _ in parse_local(header[: 30 + sum(struct.unpack_from("<HH", header, 26))])["extras"]
    )


@pytest.mark.parametrize("size", SIZES[1:])
@pytest.mark.parametrize("level", [0, 6], ids=["stored", "deflated"])
def test_the_first_chunk_is_the_planned_local_header(size: int, level: int) -> None:
    source = LyingSource()
    plan = Planner(build_settings({})).plan(ZipTarget([ZipEntry("big.bin", source=source, size=size)]))
    stream = ZipStream(plan.entries, chunk_size=1, compression_level=level)  # pieces pass as they come
    chunks = iter(stream)
    try:
        if size < len(source.piece):  # its first piece already breaks its size: nothing goes out
            with pytest.raises(StreamError, match=r"'big\.bin'"):
                next(chunks)
        else:
            header = next(chunks)
            assert local_header_has_zip64(header) == (size + size // 20 > LIMIT if level else size > LIMIT)
            with pytest.raises(StreamError, match=r"'big\.bin'"):
                for _ in chunks:
                    pass
    finally:
        stream.close()
    assert source.closed


@pytest.mark.parametrize("size", [2_100_000_000, 4_500_000_000])
def test_source_lying_about_its_size_fails_mid_stream(size: int) -> None:
    """Through the middleware: 200, bytes flow, then StreamError; nothing looks complete."""
    source = LyingSource(pieces=3, piece=b"z" * 50_000)  # 150,000 bytes, far less than claimed
    middleware = ZipMiddleware(
        lambda environ, start_response: [],
        routes={"/lie": lambda request: ZipTarget([ZipEntry("lie.bin", source=source, size=size)])},
        chunk_size=65536,
    )
    statuses: list[str] = []

    def start_response(status: str, headers: Any, exc_info: Any = None) -> None:
        statuses.append(status)

    body = middleware(EnvironBuilder(path="/lie").get_environ(), start_response)
    received = []
    try:
        with pytest.raises(StreamError, match=rf"yielded 150000 bytes, not its size={size}"):
            for chunk in body:
                received.append(chunk)
    finally:
        body.close()  # type: ignore[attr-defined]
    assert statuses == ["200 OK"]
    assert received and all(len(chunk) >= 65536 for chunk in received), "the failure was not mid-stream"
    assert received[0].startswith(b"PK\x03\x04")
    assert local_header_has_zip64(received[0]) == (size > LIMIT)
    assert source.closed


@given(st.integers(0, 2**44))
def test_a_planned_zip64_header_always_agrees_with_its_descriptor(size: int) -> None:
    entry = PlannedEntry("x", 0, source=[], size=size)
    for deflated in (False, True):
        header = member(entry, 0, zip64=True, data_descriptors=True, deflated=deflated)
        has_zip64 = local_header_has_zip64(local_header(header))
        assert has_zip64 == header.zip64 == (len(data_descriptor(header, 0, 0, 0)) == 24)
