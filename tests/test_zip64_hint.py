"""The ZIP64 decisions that tests/test_zip64.py proves with gigabytes, checked in milliseconds.

zipstream-new puts a ZIP64 extra in an entry's local header when
``hint * 1.05 > ZIP64_LIMIT`` (``hint`` is the ``buffer_size`` given to
``write_iter``) but writes a 64-bit data descriptor only when the real size is
over ``ZIP64_LIMIT``. A streaming reader takes the descriptor's form from the
local header, so the two must agree; ``size_hint`` is what keeps them agreeing.
The local headers below are zipstream-new's real output, obtained cheaply from a
source that claims a large size but yields three bytes; the descriptors are its
real ``DataDescriptor()``.
"""

from __future__ import annotations

import struct
import zipfile
from collections.abc import Iterator
from typing import Any

import pytest
import zipstream
from hypothesis import given
from hypothesis import strategies as st
from werkzeug.test import EnvironBuilder

from zipmiddleware import ZipEntry, ZipMiddleware, ZipTarget
from zipmiddleware.config import build_settings
from zipmiddleware.errors import StreamError
from zipmiddleware.planning import Planner
from zipmiddleware.zipengine import ZIP64_LIMIT, ZipStream, size_hint

LIMIT = zipfile.ZIP64_LIMIT  # 2**31 - 1
# The first size for which `size * 1.05 > LIMIT`: sizes from here to LIMIT would get a
# ZIP64 local header but a 32-bit data descriptor if their size were passed as the hint.
BAND_START = 2_045_222_521

SIZES = [
    0,
    1,
    BAND_START - 1,
    BAND_START,
    BAND_START + 1,
    2_100_000_000,
    LIMIT - 1,
    LIMIT,
    LIMIT + 1,
    2**32 - 1,
    2**32,
    2**32 + 1,
    4_500_000_000,
]


def header_decision(hint: int) -> bool:
    """zipstream-new's test for a ZIP64 extra in the local header (ZipFile.__write)."""
    return hint * 1.05 > LIMIT


def descriptor_is_zip64(size: int) -> bool:
    """Whether zipstream-new's real data descriptor for ``size`` bytes is the 24-byte form."""
    info = zipstream.ZipInfo("x", (1980, 1, 1, 0, 0, 0))
    info.CRC, info.file_size, info.compress_size = 0, size, size
    length = len(info.DataDescriptor())
    assert length in (16, 24)
    return length == 24


def local_header_has_zip64(header: bytes) -> bool:
    signature, *_, name_len, extra_len = struct.unpack_from("<4s5H3L2H", header)
    assert signature == b"PK\x03\x04"
    extra = header[30 + name_len : 30 + name_len + extra_len]
    assert len(extra) == extra_len, "the first chunk is not a whole local header"
    tags = []
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, pos)
        tags.append(tag)
        pos += 4 + length
    return 0x0001 in tags


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


def test_band_bounds_are_what_the_float_arithmetic_gives() -> None:
    assert LIMIT == ZIP64_LIMIT == 2**31 - 1
    assert not header_decision(BAND_START - 1)
    assert header_decision(BAND_START)
    assert header_decision(2_045_222_522)  # the band start quoted in the field notes is one higher
    # Passing the real size as the hint disagrees with the descriptor exactly in the band.
    for size in SIZES:
        in_band = BAND_START <= size <= LIMIT
        assert (header_decision(size) != descriptor_is_zip64(size)) == in_band, size


def test_header_detector_sees_zipstream_new_band_defect() -> None:
    """Unhinted (the real size as hint), zipstream-new writes the disagreeing header."""
    archive = zipstream.ZipFile(mode="w", compression=zipfile.ZIP_STORED, allowZip64=True)
    archive.write_iter("band.bin", iter([b"abc"]), buffer_size=2_100_000_000, date_time=(1980, 1, 1, 0, 0, 0))
    header = next(iter(archive))
    assert local_header_has_zip64(header) and not descriptor_is_zip64(2_100_000_000)


@pytest.mark.parametrize("size", [None, *SIZES])
def test_size_hint_boundaries(size: int | None) -> None:
    expected = size if size is not None and size > LIMIT else 0
    assert size_hint(size) == expected
    if size is not None:
        assert header_decision(size_hint(size)) == descriptor_is_zip64(size) == (size > LIMIT)


@given(st.integers(min_value=0, max_value=2**44))
def test_hinted_header_always_agrees_with_the_descriptor(size: int) -> None:
    assert header_decision(size_hint(size)) == (size > LIMIT)


@given(st.integers(min_value=BAND_START, max_value=LIMIT))
def test_no_zip64_header_anywhere_in_the_band(size: int) -> None:
    assert size_hint(size) == 0 and not header_decision(size_hint(size)) and not descriptor_is_zip64(size)


@pytest.mark.parametrize("size", SIZES)
def test_real_local_header_matches_the_descriptor(size: int) -> None:
    """The engine's first chunk is zipstream-new's local header for an entry of ``size`` bytes."""
    source = LyingSource()
    plan = Planner(build_settings({})).plan(ZipTarget([ZipEntry("big.bin", source=source, size=size)]))
    stream = ZipStream(plan.entries, chunk_size=1)  # every piece is passed on as it comes
    chunks = iter(stream)
    try:
        header = next(chunks)
        assert local_header_has_zip64(header) == descriptor_is_zip64(size) == (size > LIMIT)
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
