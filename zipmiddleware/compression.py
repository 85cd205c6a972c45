"""CRC-32 and raw deflate through python-isal (Intel ISA-L) when it imports, else stock zlib.

This is the one module of the package that imports ``isal``; everything else takes
:func:`crc32` and :func:`compressobj` from here.

- :func:`crc32` is ``isal.isal_zlib.crc32`` or ``zlib.crc32`` itself (no wrapper, so no
  per-call cost): ``crc32(data, value=0, /) -> int``, positional-only like zlib's. Both
  give the same values for any input and running value; ISA-L's is about 3.5x faster.
- :func:`compressobj` returns a raw deflate compressor (wbits -15, no header or trailer,
  as a ZIP entry needs) with zlib's ``compress(data)`` / ``flush(mode=Z_FINISH)``
  interface, for the middleware's ``compression_level`` 1-9.
- :data:`COMPRESSOR` names the compressor, its version and the level mapping. Deflate
  streams are not standardised byte for byte: ISA-L's differ from zlib's, and may differ
  between versions, so a deflated archive's ETag must include this string.

Levels. ISA-L has levels 0-3 where zlib has 1-9, and no lazy matching, so on text its
output is a few percent larger than zlib at 6 at every level. Measured with
bench/deflate_speed.py (2-core VM, python-isal 1.9.1 / ISA-L 2.32.1 against zlib 1.2.13,
64 KiB pieces, median of 3) on 32 MB of access-log lines and on 32 MB of Zipf-distributed
words; ratio = compressed / original:

    ================  ====================  ====================
    compressor        log lines             words
    ================  ====================  ====================
    zlib 1            140 MB/s  0.126       50 MB/s  0.485
    zlib 6             60 MB/s  0.107       13 MB/s  0.436
    zlib 9             40 MB/s  0.102       12 MB/s  0.435
    ISA-L 0           700 MB/s  0.148      190 MB/s  0.526
    ISA-L 1           650 MB/s  0.116      160 MB/s  0.467
    ISA-L 2           520 MB/s  0.116      180 MB/s  0.456
    ISA-L 3           100 MB/s  0.114       85 MB/s  0.448
    ================  ====================  ====================

So the mapping, ``LEVELS`` (zlib level -> ISA-L level):

- 1-3 -> ISA-L 1: the best speed per ratio there is. ISA-L 0 is hardly faster (at best
  +10%, and slower on some data) but writes 15-30% more bytes, more than zlib 1 does;
  ISA-L 1 writes fewer bytes than zlib 1 at 4-10x its speed.
- 4-6 -> ISA-L 2: zlib's default level asks for a balance; ISA-L 2 is a little smaller than
  1 at about the same speed, still 8-15x faster than zlib 6.
- 7-9 -> ISA-L 3: the smallest ISA-L output, at 80-100 MB/s, still faster than zlib 6.

Without isal, level N is zlib level N, as before.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final, Protocol

__all__ = ["COMPRESSOR", "CRC32_NAME", "LEVELS", "Compressor", "compressobj", "crc32"]

Buffer = bytes | bytearray | memoryview


class Compressor(Protocol):
    """What :func:`compressobj` returns: zlib's compressor interface."""

    def compress(self, data: Buffer, /) -> bytes: ...

    def flush(self, mode: int = zlib.Z_FINISH, /) -> bytes: ...


class _Crc32(Protocol):
    def __call__(self, data: Buffer, value: int = 0, /) -> int: ...


# zlib level (1-9) -> ISA-L level (0-3); see the module docstring for the measurements.
LEVELS: Final[Mapping[int, int]] = MappingProxyType({1: 1, 2: 1, 3: 1, 4: 2, 5: 2, 6: 2, 7: 3, 8: 3, 9: 3})

try:
    import isal
    from isal import isal_zlib
except ImportError:  # not installed: no wheel for this platform, or left out on purpose
    _ISAL = False
else:
    _ISAL = True

_ZLIB_NAME = f"zlib/{zlib.ZLIB_RUNTIME_VERSION}"

crc32: Final[_Crc32] = isal_zlib.crc32 if _ISAL else zlib.crc32

# What computes CRC-32s, e.g. "isal/1.9.1" or "zlib/1.2.13" (the values are the same).
CRC32_NAME: Final[str] = f"isal/{isal.__version__}" if _ISAL else _ZLIB_NAME

# What deflates, e.g. "isal/1.9.1 isa-l/2.32.1 levels/111222333" or "zlib/1.2.13". The
# ISA-L library and the level mapping decide the bytes too, so a change to either changes
# the name, and so the ETags of deflated archives.
COMPRESSOR: Final[str] = (
    f"isal/{isal.__version__} isa-l/{isal.ISAL_VERSION} levels/{''.join(map(str, LEVELS.values()))}"
    if _ISAL
    else _ZLIB_NAME
)


def compressobj(level: int) -> Compressor:
    """A raw deflate compressor (no zlib header, no trailer) for ``compression_level`` 1-9."""
    if type(level) is not int or not 1 <= level <= 9:
        raise ValueError(f"deflate level must be 1-9, got {level!r}")
    if _ISAL:
        return isal_zlib.compressobj(LEVELS[level], isal_zlib.DEFLATED, -15)
    return zlib.compressobj(level, zlib.DEFLATED, -15)
