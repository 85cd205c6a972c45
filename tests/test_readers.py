"""Every archive layout read by every real ZIP reader (tests/readers.py), and linted (tests/ziplint.py).

Each layout is built once per session through the real middleware, in this process, with
werkzeug's test client, and written to a file (runs of zero chunks as holes, so that a 4.5 GB
archive of a sparse file costs no disk space); ``test_build`` builds them, so its durations
are the build times. Every reader must return exactly the names, sizes and SHA-256 of the
source files (``info_zip`` on gigabytes: the CRC-32, see tests/readers.py);
:func:`tests.ziplint.lint` must find nothing; Go's archive/zip must see each file's mode
(0644, or 0755 for an executable) and mtime.

Layouts: ``small`` (a few files in nested folders, one executable), ``unicode`` (NFD names as
macOS writes them, CJK, emoji, names Windows refuses: the writer may rename those, so the
names are taken from the archive's central directory and matched with the sources in order),
``empty`` (empty files among others), ``mixed`` (files and byte sources, with and without a
size), ``deflated`` (``small`` at level 6), ``big_first`` (a sparse 4.5 GB file, then small
files past 4 GiB) and ``many`` (65,600 files: a ZIP64 end record for the count alone). Every
stored layout is built twice: with data descriptors (the default) and with
``data_descriptors=False``; a middleware that refuses that setting fails those cases.

Readers that see only local headers cannot read some STORED entries by design: Java's
ZipInputStream none with a data descriptor, stream-unzip none whose local header lacks the
size (a source of unknown size). Those cases are strict xfails that must fail with that
reader's own message for it, so that they flag the day they stop failing.

``pytest -m "not slow"`` leaves out ``big_first`` and ``many``.
"""

from __future__ import annotations

import calendar
import hashlib
import os
import random
import shutil
import tempfile
import unicodedata
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from werkzeug.test import Client

from zipmiddleware import ConfigError, ZipEntry, ZipMiddleware, ZipTarget

from .readers import (
    CANNOT_READ_STORED_WITH_DESCRIPTOR,
    CANNOT_READ_STORED_WITHOUT_LOCAL_SIZE,
    CRC_ONLY,
    READERS,
    Contents,
    Limitation,
    ReaderFailed,
    go_archive_zip_entries,
    tmpfs_with_room,
)
from .ziplint import entry_names, lint

CHUNK_SIZE = 256 * 1024
BIG_SIZE = 4_500_000_000
MANY = 65_600
MIN_FREE_BYTES = 10 * 10**9  # in case the temporary folder does not keep files sparse
SOURCES_ROOM = 1 << 30  # what the source trees may take on tmpfs (65,600 files: ~270 MB)
DOS_EPOCH = calendar.timegm((1980, 1, 1, 0, 0, 0))  # what a byte source's entry is dated


def nfd(name: str) -> str:
    return unicodedata.normalize("NFD", name)


# -- what goes into an archive ------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """One expected entry, in archive order: its name as given, size, SHA-256, CRC-32, mode, mtime."""

    name: str
    size: int
    sha256: str
    crc32: int
    executable: bool = False
    mtime: int = DOS_EPOCH

    @classmethod
    def of(cls, name: str, data: bytes, **options: Any) -> Source:
        return cls(name, len(data), hashlib.sha256(data).hexdigest(), zlib.crc32(data), **options)


@dataclass
class Tree:
    """Source files (and byte sources) for one kind of layout, made once per session."""

    root: Path
    sources: list[Source]
    # Called per request (a generator is used up by one archive): the target to serve.
    target: Callable[[], ZipTarget]
    # The writer may rename these (names Windows refuses): compare with the archive's names.
    names_from_archive: bool = False


def write(
    root: Path, name: str, data: bytes, *, executable: bool = False, mtime: int = 1_700_000_000
) -> Source:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(0o755 if executable else 0o644)
    os.utime(path, (mtime, mtime))
    return Source.of(name, data, executable=executable, mtime=mtime)


def small_tree(root: Path) -> Tree:
    rng = random.Random(1)
    sources = [
        write(
            root,
            "bin/run.sh",
            b"#!/bin/sh\necho 'hello from the archive'\n",
            executable=True,
            mtime=1_600_000_001,
        ),
        write(root, "data/level1/level2/blob.bin", rng.randbytes(300_000), mtime=1_650_000_000),
        write(
            root, "data/level1/notes.md", b"# Notes\n\n" + b"- a line of notes\n" * 600, mtime=1_234_567_891
        ),
        write(root, "data/pattern.dat", bytes(range(256)) * 2800, mtime=1_700_000_000),
        write(root, "readme.txt", "Read me: caf\u00e9 cr\u00e8me\n".encode() * 80, mtime=946_684_800),
    ]
    return Tree(root, sources, lambda: ZipTarget.from_directory(root, "small.zip"))


def unicode_tree(root: Path) -> Tree:
    # Written with NFD names, as macOS's file systems hand them out.
    names = [
        nfd("caf\u00e9/r\u00e9sum\u00e9 cr\u00e8me br\u00fbl\u00e9e.txt"),
        nfd("\u65e5\u672c\u8a9e/\u30c7\u30fc\u30bf\u30d5\u30a1\u30a4\u30eb.txt"),  # 日本語/データファイル.txt
        "\u4e2d\u6587\u6587\u4ef6\u5939/\u62a5\u544a.txt",  # 中文文件夹/报告.txt
        "games \U0001f3ae/save \U0001f600.dat",
        "what: why?.txt",
        "con.txt",
        "ends with a dot.",
        nfd("\u00c5ngstr\u00f6m/\u00f1and\u00fa.txt"),
    ]
    sources = [
        write(root, name, f"{index}: {name}\n".encode() * (index + 3)) for index, name in enumerate(names)
    ]

    def target() -> ZipTarget:
        return ZipTarget([ZipEntry(name, path=root / name) for name in names], "unicode.zip")

    return Tree(root, sources, target, names_from_archive=True)


def empty_tree(root: Path) -> Tree:
    sources = [
        write(root, "a.txt", b"not empty\n"),
        write(root, "empty.txt", b""),
        write(root, "folder/also-empty", b""),
        write(root, "folder/z.bin", bytes(range(256)) * 4),
    ]
    return Tree(root, sources, lambda: ZipTarget.from_directory(root, "empty.zip"))


def chunks(data: bytes, size: int) -> Iterator[bytes]:
    for offset in range(0, len(data), size):
        yield data[offset : offset + size]


def mixed_tree(root: Path) -> Tree:
    rng = random.Random(2)
    first = write(root, "files/first.bin", rng.randbytes(70_000))
    last = write(root, "files/last.txt", b"the last file\n" * 100)
    generated = {
        "generated/bytes-with-size.bin": rng.randbytes(5000),
        "generated/bytes-without-size.txt": b"bytes without a size\n" * 50,
        "generated/stream-with-size.bin": rng.randbytes(200_000),
        "generated/stream-without-size.txt": b"a line from a generator\n" * 3000,
        "generated/empty-stream.txt": b"",
    }
    sources = [first]
    sources += [Source.of(name, data) for name, data in generated.items()]
    sources.append(last)

    def target() -> ZipTarget:
        g = generated
        return ZipTarget(
            [
                ZipEntry(first.name, path=root / first.name),
                ZipEntry(
                    "generated/bytes-with-size.bin", source=g["generated/bytes-with-size.bin"], size=5000
                ),
                ZipEntry("generated/bytes-without-size.txt", source=g["generated/bytes-without-size.txt"]),
                ZipEntry(
                    "generated/stream-with-size.bin",
                    source=chunks(g["generated/stream-with-size.bin"], 7000),
                    size=200_000,
                ),
                ZipEntry(
                    "generated/stream-without-size.txt",
                    source=chunks(g["generated/stream-without-size.txt"], 999),
                ),
                ZipEntry("generated/empty-stream.txt", source=iter(())),
                ZipEntry(last.name, path=root / last.name),
            ],
            "mixed.zip",
        )

    return Tree(root, sources, target)


# A few bytes that are not zero, so that a misplaced piece of the big file shows in its hash.
BIG_MARKS = {
    0: b"first bytes",
    (1 << 31) - 5: b"across 2 GiB",
    (1 << 32) - 3: b"across 4 GiB",
    BIG_SIZE - 4: b"end!",
}


def big_first_tree(root: Path) -> Tree:
    free = shutil.disk_usage(root).free
    if free < MIN_FREE_BYTES:
        pytest.skip(f"needs ~{MIN_FREE_BYTES / 1e9:.0f} GB free in {root} in case files are not sparse there")
    path = root / "huge.bin"
    with open(path, "wb") as file:
        for offset, data in BIG_MARKS.items():
            file.seek(offset)
            file.write(data)
        file.truncate(BIG_SIZE)  # the rest: holes, no disk blocks
    os.utime(path, (1_500_000_000, 1_500_000_000))
    sha256, crc, size = hashlib.sha256(), 0, 0
    with open(path, "rb") as source:  # holes read as zeros: ~4 s
        while block := source.read(1 << 20):
            sha256.update(block)
            crc = zlib.crc32(block, crc)
            size += len(block)
    assert size == BIG_SIZE
    sources = [Source("huge.bin", size, sha256.hexdigest(), crc, mtime=1_500_000_000)]
    sources += [
        write(root, f"after/small-{n}.txt", f"small file {n} after 4 GiB\n".encode() * (n + 1))
        for n in range(5)
    ]

    def target() -> ZipTarget:
        return ZipTarget([ZipEntry(s.name, path=root / s.name) for s in sources], "big.zip")

    return Tree(root, sources, target)


def many_tree(root: Path) -> Tree:
    sources = []
    for n in range(MANY):
        name = f"folder{n % 4}/f{n:05d}.txt"
        data = b"%d\n" % n
        path = root / name
        if n < 4:
            path.parent.mkdir(parents=True)
        path.write_bytes(data)
        os.utime(path, (1_700_000_000, 1_700_000_000))
        sources.append(Source.of(name, data, mtime=1_700_000_000))
    return Tree(root, sources, lambda: ZipTarget.from_directory(root, "many.zip"))


@dataclass(frozen=True)
class TreeKind:
    make: Callable[[Path], Tree]
    slow: bool = False  # over 4 GiB or 65,535 entries: marked slow
    # Entries from iterables: their CRC-32 is known only at their end, so a streamed archive
    # gives them a data descriptor whatever ``data_descriptors`` says; with ``unsized``, one
    # has no size either, so its local header cannot give it.
    streams: bool = False
    unsized: bool = False


TREES: dict[str, TreeKind] = {
    "small": TreeKind(small_tree),
    "unicode": TreeKind(unicode_tree),
    "empty": TreeKind(empty_tree),
    "mixed": TreeKind(mixed_tree, streams=True, unsized=True),
    "big_first": TreeKind(big_first_tree, slow=True),
    "many": TreeKind(many_tree, slow=True),
}


@dataclass(frozen=True)
class Layout:
    id: str
    tree: str
    compression_level: int = 0
    data_descriptors: bool = True

    @property
    def slow(self) -> bool:
        return TREES[self.tree].slow

    @property
    def stored_with_descriptors(self) -> bool:
        """Whether some STORED entry has a data descriptor."""
        return self.compression_level == 0 and (self.data_descriptors or TREES[self.tree].streams)

    @property
    def stored_without_local_size(self) -> bool:
        """Whether some STORED entry has no size in its local header (a source of unknown size)."""
        return self.compression_level == 0 and TREES[self.tree].unsized


LAYOUTS = [Layout(tree, tree) for tree in TREES]
LAYOUTS.insert(4, Layout("deflated", "small", compression_level=6))
LAYOUTS += [Layout(f"{tree}-no-descriptors", tree, data_descriptors=False) for tree in TREES]
LAYOUT_BY_ID = {layout.id: layout for layout in LAYOUTS}


# -- building the archives, once per session ---------------------------------------------------


@dataclass
class Archive:
    layout: Layout
    path: Path | None = None
    expected: Contents = field(default_factory=dict)
    # Expected entry -> its source, for checks beyond the contents (modes, times).
    sources: dict[str, Source] = field(default_factory=dict)
    failure: str | None = None

    def ready(self) -> Path:
        """The archive's path, or a test failure saying why it could not be built."""
        if self.failure is not None:
            pytest.fail(self.failure, pytrace=False)
        assert self.path is not None
        return self.path


@pytest.fixture(scope="session")
def trees(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Tree]]:
    """The source trees, each made on first use and removed at the end of the session; on tmpfs
    where there is room (65,600 files cost ~20 s to write and delete on this machine's ext4)."""
    made: dict[str, Tree] = {}

    def get(kind: str) -> Tree:
        if kind not in made:
            shm = tmpfs_with_room(SOURCES_ROOM)
            if shm is None:
                root = tmp_path_factory.mktemp(f"sources-{kind}")
            else:
                root = Path(tempfile.mkdtemp(prefix=f"zm-sources-{kind}-", dir=shm))
            made[kind] = TREES[kind].make(root)
        return made[kind]

    yield get
    for tree in made.values():
        shutil.rmtree(tree.root, ignore_errors=True)


def unexpected_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    raise AssertionError("the download route must not reach the wrapped application")


def download(middleware: ZipMiddleware, output: Path) -> None:
    """GET the archive through the middleware and write its body to ``output`` (zero chunks as holes)."""
    response = Client(middleware).get("/zip/archive", buffered=False)
    zeros: dict[int, bytes] = {}
    total = 0
    try:
        assert response.status_code == 200, response.get_data()
        assert response.mimetype == "application/zip", response.headers
        with open(output, "wb") as file:
            for chunk in response.iter_encoded():
                size = len(chunk)
                total += size
                if chunk == zeros.setdefault(size, bytes(size)):
                    file.seek(size, os.SEEK_CUR)
                else:
                    file.write(chunk)
            file.truncate(total)
    finally:
        response.close()
    if response.content_length is not None:
        assert response.content_length == total, (
            f"Content-Length {response.content_length}, body {total} bytes"
        )


def build(layout: Layout, tree: Tree, folder: Path) -> Archive:
    """Serve ``tree`` as ``layout`` says and write the archive into ``folder``; a middleware that
    refuses the settings, or fails to write the archive, gives an Archive that says why."""
    built = Archive(layout)
    # An in-memory CRC-32 cache per archive: nothing learnt by another run or build is used.
    options: dict[str, Any] = {
        "compression_level": layout.compression_level,
        "zero_copy": False,
        "crc_cache": ":memory:",
    }
    if not layout.data_descriptors:
        options["data_descriptors"] = False
    settings = ", ".join(f"{key}={value!r}" for key, value in options.items())
    try:
        middleware = ZipMiddleware(
            unexpected_app,
            routes={"/zip/<name>": lambda request, name: tree.target()},
            roots=[str(tree.root)],
            chunk_size=CHUNK_SIZE,
            **options,
        )
    except ConfigError as exc:
        built.failure = f"layout {layout.id}: ZipMiddleware({settings}) refused: {exc}"
        return built
    built.path = folder / f"{layout.id}.zip"
    try:
        download(middleware, built.path)
    except Exception as exc:
        built.failure = f"layout {layout.id}: writing the archive with {settings} failed: {exc!r}"
        return built
    names = [source.name for source in tree.sources]
    if tree.names_from_archive:
        raw = entry_names(built.path)
        if len(raw) != len(tree.sources):
            built.failure = (
                f"layout {layout.id}: {len(raw)} entries in the archive for {len(tree.sources)} sources"
            )
            return built
        names = [name.decode("utf-8", "replace") for name in raw]
    built.sources = dict(zip(names, tree.sources, strict=True))
    built.expected = {name: (source.size, source.sha256) for name, source in built.sources.items()}
    return built


@pytest.fixture(scope="session")
def archives(
    trees: Callable[[str], Tree], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[str], Archive]]:
    """Each layout's archive, built on first use (test_build, which comes first) and kept for
    the session: one build per layout whatever order the tests run in."""
    built: dict[str, Archive] = {}
    folders: list[Path] = []

    def get(layout_id: str) -> Archive:
        if layout_id not in built:
            layout = LAYOUT_BY_ID[layout_id]
            tree = trees(layout.tree)
            folders.append(tmp_path_factory.mktemp(f"archive-{layout.id}"))
            built[layout_id] = build(layout, tree, folders[-1])
        return built[layout_id]

    yield get
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def archive(request: pytest.FixtureRequest, archives: Callable[[str], Archive]) -> Archive:
    """The archive of the layout this case is parametrized with (indirectly)."""
    return archives(request.param)


# -- the matrix --------------------------------------------------------------------------------


def describe(name: str) -> str:
    return ascii(name)  # NFD and NFC, or look-alikes, differ visibly


def compare(reader: str, got: Contents, archive: Archive) -> None:
    """``got`` must be the archive's expected contents; where the reader gives the CRC-32 it
    checked instead of a SHA-256 (``crc32:...``), that CRC-32 must be the source's."""
    expected = dict(archive.expected)
    for name, (_, digest) in got.items():
        if digest.startswith(CRC_ONLY) and name in archive.sources:
            source = archive.sources[name]
            expected[name] = (source.size, f"{CRC_ONLY}{source.crc32:08x}")
    if got == expected:
        return
    missing = [name for name in expected if name not in got]
    unexpected = [name for name in got if name not in expected]
    wrong = [name for name in expected if name in got and got[name] != expected[name]]
    lines = [f"{reader} read {len(got)} entries, {len(expected)} expected:"]
    for label, names in (("missing", missing), ("not expected", unexpected)):
        if names:
            lines.append(f"  {len(names)} {label}: {', '.join(describe(n) for n in names[:10])}")
    if wrong:
        lines.append(f"  {len(wrong)} with other contents (size, sha256): expected / read")
        lines += [f"    {describe(n)}: {expected[n]} / {got[n]}" for n in wrong[:10]]
    raise AssertionError("\n".join(lines))


def layout_param(layout: Layout, *marks: pytest.MarkDecorator, reader: str | None = None) -> Any:
    """A case of ``layout`` (with ``reader``, if given): the slow mark where the layout is slow."""
    marks += (pytest.mark.slow,) if layout.slow else ()
    if reader is None:
        return pytest.param(layout.id, id=layout.id, marks=marks)
    return pytest.param(layout.id, reader, id=f"{layout.id}-{reader}", marks=marks)


def limitation(layout: Layout, reader: str) -> Limitation | None:
    """Why ``reader`` cannot read ``layout``'s archive by design, if it cannot."""
    if layout.stored_with_descriptors and reader in CANNOT_READ_STORED_WITH_DESCRIPTOR:
        return CANNOT_READ_STORED_WITH_DESCRIPTOR[reader]
    if layout.stored_without_local_size and reader in CANNOT_READ_STORED_WITHOUT_LOCAL_SIZE:
        return CANNOT_READ_STORED_WITHOUT_LOCAL_SIZE[reader]
    return None


def reader_cases() -> list[Any]:
    cases = []
    for layout in LAYOUTS:
        for reader in READERS:
            known = limitation(layout, reader)
            marks = []
            if known is not None:
                marks.append(pytest.mark.xfail(strict=True, raises=ReaderFailed, reason=known.reason))
            cases.append(layout_param(layout, *marks, reader=reader))
    return cases


@pytest.mark.parametrize("archive", [layout_param(layout) for layout in LAYOUTS], indirect=True)
def test_build(archive: Archive) -> None:
    """The archive of each layout is built (its time is this test's); the other tests reuse it."""
    assert archive.ready().stat().st_size > 0


@pytest.mark.parametrize(("archive", "reader"), reader_cases(), indirect=["archive"])
def test_reader(archive: Archive, reader: str) -> None:
    path = archive.ready()
    known = limitation(archive.layout, reader)
    try:
        got = READERS[reader](path)
    except ReaderFailed as exc:
        if known is not None and not known.message.search(str(exc)):
            # Not the failure this reader is known for: a real failure, not the expected one.
            raise AssertionError(
                f"expected only /{known.message.pattern}/ ({known.reason}), got:\n{exc}"
            ) from exc
        raise
    compare(reader, got, archive)


@pytest.mark.parametrize("archive", [layout_param(layout) for layout in LAYOUTS], indirect=True)
def test_lint(archive: Archive) -> None:
    lint(archive.ready())


@pytest.mark.parametrize(
    "archive", [layout_param(layout) for layout in LAYOUTS if not layout.slow], indirect=True
)
def test_modes_and_times(archive: Archive) -> None:
    """Go's archive/zip sees mode 0755 for the executable file and 0644 for the others, and
    each file's mtime (a byte source's entry: 1980-01-01)."""
    path = archive.ready()
    got = {entry["name"]: (entry["mode"], entry["modified"]) for entry in go_archive_zip_entries(path)}
    expected = {
        name: (
            "-rwxr-xr-x" if source.executable else "-rw-r--r--",
            datetime.fromtimestamp(source.mtime, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
        for name, source in archive.sources.items()
    }
    assert got == expected


@pytest.mark.parametrize("reader", READERS)
def test_every_reader_rejects_a_wrong_crc(tmp_path: Path, reader: str) -> None:
    """The harness itself: a stored entry with one byte changed after its CRC-32 was taken fails
    every reader, with the reader's own words for it."""
    path = tmp_path / "corrupt.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("a.txt", b"hello world " * 100)
        archive.writestr("b/c.txt", b"second file\n" * 50, compress_type=zipfile.ZIP_DEFLATED)
    data = bytearray(path.read_bytes())
    data[data.index(b"hello world") + 5] ^= 0x20
    path.write_bytes(bytes(data))
    with pytest.raises(ReaderFailed, match=r"(?i)crc|checksum"):
        READERS[reader](path)
