"""zipmiddleware.compression: CRC-32 and raw deflate through ISA-L, with zlib as the fallback."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import random
import subprocess
import sys
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zipmiddleware import compression
from zipmiddleware.compression import COMPRESSOR, CRC32_NAME, LEVELS, compressobj, crc32

HAVE_ISAL = importlib.util.find_spec("isal") is not None

# Text that deflates well, then bytes that do not, with the 5 KiB size at which isal
# starts releasing the GIL on either side of some piece boundaries.
RNG = random.Random(5)
TEXT = b"".join(
    b"line %d: the quick brown fox jumps over the lazy dog %d\n" % (i, i % 7) for i in range(20000)
)
NOISE = RNG.randbytes(300_000)
SAMPLE = TEXT + NOISE + TEXT[:5121]


def inflate(stream: bytes) -> bytes:
    """Inflate a raw deflate stream, which must end exactly where ``stream`` ends."""
    inflater = zlib.decompressobj(-15)
    data = inflater.decompress(stream) + inflater.flush()
    assert inflater.eof, "the deflate stream has no final block"
    assert inflater.unused_data == b""
    return data


def deflate(level: int, data: bytes, piece: int = 65536) -> bytes:
    compressor = compressobj(level)
    view = memoryview(data)
    out = [compressor.compress(view[offset : offset + piece]) for offset in range(0, len(data), piece)]
    return b"".join(out) + compressor.flush()


# -- CRC-32 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 15, 16, 63, 64, 5120, 5121, 65536, 1 << 20, 3 * 1024 * 1024 + 7])
def test_crc32_equals_zlib_on_random_data(size: int) -> None:
    data = random.Random(size).randbytes(size)
    assert crc32(data) == zlib.crc32(data)
    assert crc32(data, 0) == zlib.crc32(data, 0)


def test_crc32_of_nothing() -> None:
    assert crc32(b"") == 0 == zlib.crc32(b"")
    for value in (1, 0x12345678, 0xDEADBEEF, 0xFFFFFFFF):
        assert crc32(b"", value) == zlib.crc32(b"", value) == value


@pytest.mark.parametrize("value", [0, 1, 0x7FFFFFFF, 0x80000000, 0xDEADBEEF, 0xFFFFFFFF])
def test_crc32_with_a_running_value(value: int) -> None:
    data = SAMPLE[:100_000]
    assert crc32(data, value) == zlib.crc32(data, value)


def test_crc32_in_pieces_equals_crc32_of_the_whole() -> None:
    view = memoryview(SAMPLE)
    for piece in (1000, 4096, 5121, 65536):
        running = 0
        for offset in range(0, len(SAMPLE), piece):
            running = crc32(view[offset : offset + piece], running)
        assert running == zlib.crc32(SAMPLE)


def test_crc32_takes_any_contiguous_buffer() -> None:
    expected = zlib.crc32(TEXT)
    assert crc32(TEXT) == crc32(bytearray(TEXT)) == crc32(memoryview(TEXT)) == expected
    assert crc32(memoryview(TEXT)[10:20_000]) == zlib.crc32(TEXT[10:20_000])


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=20_000), st.integers(0, 0xFFFFFFFF), st.lists(st.integers(0, 20_000), max_size=6))
def test_crc32_equals_zlib_for_any_data_and_split(data: bytes, value: int, cuts: list[int]) -> None:
    bounds = [0, *sorted(min(cut, len(data)) for cut in cuts), len(data)]
    ours, stock = value, value
    for low, high in zip(bounds, bounds[1:], strict=False):
        ours = crc32(data[low:high], ours)
        stock = zlib.crc32(data[low:high], stock)
    assert ours == stock == zlib.crc32(data, value)


# -- deflate ----------------------------------------------------------------------------------


@pytest.mark.parametrize("level", range(1, 10))
def test_every_level_writes_a_raw_deflate_stream_that_inflates_back(level: int) -> None:
    stream = deflate(level, SAMPLE)
    assert inflate(stream) == SAMPLE
    assert len(stream) < len(TEXT)  # the text shrank
    with pytest.raises(zlib.error):  # raw: no zlib header
        zlib.decompress(stream)


@pytest.mark.parametrize("level", [1, 6, 9])
@pytest.mark.parametrize(
    "data", [b"", b"x", TEXT[:100], NOISE[:70_000]], ids=["empty", "1 byte", "100 bytes", "noise"]
)
def test_small_and_incompressible_inputs(level: int, data: bytes) -> None:
    assert inflate(deflate(level, data)) == data
    compressor = compressobj(level)
    assert inflate(compressor.flush()) == b""  # no compress() call at all


def test_one_big_compress_call_and_bytearray_input() -> None:
    compressor = compressobj(1)
    stream = compressor.compress(bytearray(SAMPLE)) + compressor.flush(zlib.Z_FINISH)
    assert inflate(stream) == SAMPLE


def test_levels_are_ordered_and_isal_levels() -> None:
    assert sorted(LEVELS) == list(range(1, 10))
    values = [LEVELS[level] for level in range(1, 10)]
    assert values == sorted(values)
    assert set(values) <= {0, 1, 2, 3}
    with pytest.raises(TypeError):
        LEVELS[1] = 0  # type: ignore[index]


@pytest.mark.skipif(not HAVE_ISAL, reason="python-isal is not installed")
@pytest.mark.parametrize("level", range(1, 10))
def test_with_isal_each_level_is_its_isal_level(level: int) -> None:
    from isal import isal_zlib

    reference = isal_zlib.compressobj(LEVELS[level], isal_zlib.DEFLATED, -15)
    assert deflate(level, SAMPLE) == b"".join(
        [reference.compress(SAMPLE[offset : offset + 65536]) for offset in range(0, len(SAMPLE), 65536)]
        + [reference.flush()]
    )


@pytest.mark.parametrize("level", [0, 10, -1, True, 1.0, "1", None])
def test_levels_outside_1_to_9_are_refused(level: object) -> None:
    with pytest.raises(ValueError, match="1-9"):
        compressobj(level)  # type: ignore[arg-type]


# -- which implementation, and its name -------------------------------------------------------


def test_compressor_names_what_is_used_and_its_version() -> None:
    if HAVE_ISAL:
        import isal
        from isal import isal_zlib

        assert crc32 is isal_zlib.crc32
        name = f"isal/{isal.__version__}"
        assert name == CRC32_NAME
        mapping = "".join(str(LEVELS[level]) for level in range(1, 10))
        assert f"{name} isa-l/{isal.ISAL_VERSION} levels/{mapping}" == COMPRESSOR
    else:
        assert crc32 is zlib.crc32
        assert COMPRESSOR == CRC32_NAME == f"zlib/{zlib.ZLIB_RUNTIME_VERSION}"


def test_isal_is_used_wherever_the_package_requires_it() -> None:
    """Where setup.cfg's environment markers ask for isal, it is installed and in use."""
    requirements = pytest.importorskip("packaging.requirements")
    declared = [
        requirements.Requirement(line)
        for line in importlib.metadata.requires("zipmiddleware") or []
        if line.startswith("isal")
    ]
    assert len(declared) == 1, "setup.cfg declares isal once"
    marker = declared[0].marker
    assert marker is not None, "isal is limited to the platforms it has wheels for"
    if marker.evaluate():
        assert COMPRESSOR.startswith("isal/"), f"isal is required on this platform, but {COMPRESSOR} is used"
    for platform, machine in [
        ("linux", "x86_64"),
        ("linux", "aarch64"),
        ("darwin", "arm64"),
        ("win32", "AMD64"),
    ]:
        assert marker.evaluate({"sys_platform": platform, "platform_machine": machine})
    for platform, machine in [
        ("linux", "armv7l"),
        ("linux", "ppc64le"),
        ("win32", "ARM64"),
        ("freebsd14", "amd64"),
    ]:
        assert not marker.evaluate({"sys_platform": platform, "platform_machine": machine})
    assert not marker.evaluate({"platform_python_implementation": "PyPy"})


FALLBACK_CHILD = r"""
import json, sys, zlib
sys.modules["isal"] = None  # `import isal` now raises ImportError, as where it is not installed
from zipmiddleware import compression

text = b"".join(b"record %d of the fallback test\n" % i for i in range(5000))
result = {"compressor": compression.COMPRESSOR, "crc32_name": compression.CRC32_NAME,
          "crc32_is_zlib": compression.crc32 is zlib.crc32,
          "crc": compression.crc32(text, 7) == zlib.crc32(text, 7), "levels": {}}
for level in range(1, 10):
    ours = compression.compressobj(level)
    stream = ours.compress(text[:50000]) + ours.compress(text[50000:]) + ours.flush()
    stock = zlib.compressobj(level, zlib.DEFLATED, -15)
    inflater = zlib.decompressobj(-15)
    result["levels"][level] = {
        "round_trip": inflater.decompress(stream) + inflater.flush() == text and inflater.eof,
        "same_as_zlib": stream == stock.compress(text) + stock.flush(),
    }
result["isal_loaded"] = any(name.startswith("isal.") for name in sys.modules)
print(json.dumps(result))
"""


def test_fallback_to_zlib_when_isal_cannot_be_imported() -> None:
    done = subprocess.run(
        [sys.executable, "-c", FALLBACK_CHILD],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["compressor"] == result["crc32_name"] == f"zlib/{zlib.ZLIB_RUNTIME_VERSION}"
    assert result["compressor"].startswith("zlib/")
    assert result["crc32_is_zlib"] and result["crc"]
    assert not result["isal_loaded"]
    for level in range(1, 10):
        # Without isal, level N is zlib level N, byte for byte.
        assert result["levels"][str(level)] == {"round_trip": True, "same_as_zlib": True}, level


def test_module_is_the_only_importer_of_isal() -> None:
    package = os.path.dirname(compression.__file__)
    importers = []
    for name in sorted(os.listdir(package)):
        if name.endswith(".py") and name != "compression.py":
            with open(os.path.join(package, name), encoding="utf-8") as source:
                text = source.read()
            if "import isal" in text or "from isal" in text:
                importers.append(name)
    assert importers == []
