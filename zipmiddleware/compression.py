"""CRC-32 and raw deflate through python-isal (Intel ISA-L) when it imports, else stock zlib.

This is the one module of the package that imports ``isal``; everything else takes
:func:`crc32` and :func:`compressobj` from here.

- :func:`crc32` is ``isal.isal_zlib.crc32`` or ``zlib.crc32`` itself (no wrapper, so no
  per-call cost): ``crc32(data, value=0, /) -> int``, positional-only like zlib's. Both
  give the same values for any input and running value; ISA-L's is about 3x faster (8
  against 2.6 GB/s here).
- :func:`compressobj` returns a raw deflate compressor (wbits -15, no header or trailer,
  as a ZIP entry needs) with zlib's ``compress(data)`` / ``flush(mode=Z_FINISH)``
  interface, for the middleware's ``compression_level`` 1-9.
- :data:`COMPRESSOR` names the compressor, its version and the level mapping. Deflate
  streams are not standardised byte for byte: ISA-L's differ from zlib's, and may differ
  between versions, so a deflated archive's ETag must include this string.

Levels. ISA-L has levels 0-3 where zlib has 1-9, and no lazy matching, so its output is
larger than zlib's at 6 at every level. Measured on a 2-core AMD EPYC VM (AVX2), python-isal
1.9.1 with ISA-L 2.32.1 against zlib 1.2.13, data fed in 64 KiB pieces, MB/s of input per
CPU-second, median of 3, then the ratio output / input. "log" and "words" are the generated
text of bench/deflate_speed.py (32 and 16 MB), "py" 16 MB of Python source, "elf" 16 MB of
shared libraries, "random" 16 MB of random bytes:

    =========  ===========  ===========  ===========  ===========  ===========
               log          words        py           elf          random
    =========  ===========  ===========  ===========  ===========  ===========
    zlib 1     152  0.128    53  0.482    79  0.275    81  0.251    28  1.000
    zlib 6      62  0.109    15  0.425    24  0.221    23  0.229    27  1.000
    zlib 9      45  0.104    13  0.425     6  0.218     4  0.229    28  1.000
    ISA-L 0    678  0.150   202  0.511   321  0.282   382  0.321   204  1.229
    ISA-L 1    609  0.119   174  0.460   283  0.269   323  0.254   270  1.001
    ISA-L 2    599  0.118   172  0.449   282  0.265   313  0.252   272  1.001
    ISA-L 3    108  0.116    83  0.440    92  0.255    92  0.249    87  1.001
    =========  ===========  ===========  ===========  ===========  ===========

So the mapping, :data:`LEVELS` (zlib level -> ISA-L level), follows zlib's own split between
its fast levels (1-3, no lazy matching) and its lazy ones:

- 1-3 -> ISA-L 1: the best speed per ratio. ISA-L 0 is only 10-20% faster on text (and
  slower on random bytes) but writes 5-26% more than ISA-L 1, more than zlib 1, and 23%
  more than its input on incompressible data. ISA-L 1 writes about what zlib 1 writes
  (a little less on text) at 3-4x its speed on text, 10x on incompressible data.
- 4-6 -> ISA-L 2: here as fast as ISA-L 1 and 0.4-2.5% smaller; but on other text it has
  been measured far slower than ISA-L 1 (650 against 1,040 MB/s), so not for 1-3.
- 7-9 -> ISA-L 3: the smallest ISA-L output (1-4% below ISA-L 2) at 80-110 MB/s, still
  faster than zlib 6 everywhere, and than zlib 1 except on the log lines.

Against zlib 6, ISA-L 1 writes 8-22% more at 10-14x the speed, ISA-L 3 3.5-15% more at
1.7-5.5x. So the goal "the fastest level at >= 500 MB/s, within 5% of zlib 6's size on
text" is met for speed on log-like text only (170-320 MB/s on the other data), and for size
by no level that fast: only ISA-L 3 on the words comes within 5% (3.5%, at 83 MB/s).

The default ``memLevel`` (8) is kept: 9 gains nothing, and 4 costs ISA-L 1 12% of its
speed. A live ISA-L 1-3 compressor holds about 360-420 KiB (a zlib one about 260 KiB).

Both ``crc32`` (on buffers over 5 KiB) and ``compress()`` release the GIL while ISA-L works,
as zlib's do, so downloads in other threads go on meanwhile.

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
