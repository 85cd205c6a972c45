"""The ZIP engine: chunking, compression levels, dates, mid-stream failures, import guard."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from werkzeug.test import EnvironBuilder

from zipmiddleware import ZipEntry, ZipMiddleware, ZipTarget
from zipmiddleware.errors import StreamError
from zipmiddleware.zipengine import ZipRange, ZipStream

from .conftest import plain_app, read_zip, write_generated_tree, write_tree


def stream(root: Path, target: ZipTarget, **options) -> tuple[list[bytes], ZipStream | ZipRange]:
    """Run the middleware on one request and return the body's chunks."""
    middleware = ZipMiddleware(plain_app, routes={"/d": lambda request: target}, roots=[root], **options)
    body = middleware(EnvironBuilder(path="/d").get_environ(), lambda *args: None)
    assert isinstance(body, (ZipStream, ZipRange))
    try:
        return list(body), body
    finally:
        body.close()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return write_tree(
        tmp_path / "tree",
        {
            **{f"small/{i:03}.txt": f"file {i}\n".encode() * (i + 1) for i in range(300)},
            "big/random.bin": os.urandom(300_000),
            "big/text.txt": b"the quick brown fox jumps over the lazy dog\n" * 20_000,
            "empty.dat": b"",
        },
    )


@pytest.mark.parametrize("chunk_size", [1024, 4096, 65536, 1 << 20])
@pytest.mark.parametrize("level", [0, 6])
def test_chunks_are_merged_and_never_empty(tree: Path, chunk_size: int, level: int) -> None:
    chunks, _ = stream(tree, ZipTarget.from_directory(tree), chunk_size=chunk_size, compression_level=level)
    assert all(chunks), "an empty chunk was yielded"
    assert all(len(chunk) >= chunk_size for chunk in chunks[:-1])
    assert len(read_zip(b"".join(chunks))) == 303


def test_files_are_read_chunk_size_bytes_at_a_time(tree: Path, monkeypatch) -> None:
    sizes: list[int] = []
    real_read = os.read

    def spy(fd: int, size: int) -> bytes:
        sizes.append(size)
        return real_read(fd, size)

    monkeypatch.setattr(os, "read", spy)
    stream(tree, ZipTarget([ZipEntry("r", path=tree / "big/random.bin")]), chunk_size=131072)
    assert sizes[:2] == [131072, 131072] and max(sizes) == 131072


def test_stored_and_deflate_levels(tree: Path) -> None:
    target = ZipTarget(
        [ZipEntry("text.txt", path=tree / "big/text.txt"), ZipEntry("r", path=tree / "big/random.bin")]
    )
    sizes = {}
    for level in (0, 1, 9):
        body = b"".join(stream(tree, target, compression_level=level)[0])
        with zipfile.ZipFile(io.BytesIO(body)) as archive:
            types = {info.compress_type for info in archive.infolist()}
            assert types == ({zipfile.ZIP_STORED} if level == 0 else {zipfile.ZIP_DEFLATED})
            assert archive.read("text.txt") == (tree / "big/text.txt").read_bytes()
        sizes[level] = len(body)
    assert sizes[9] < sizes[1] < sizes[0]


@pytest.mark.parametrize(
    ("mtime", "date_time"),
    [
        (1_700_000_000, (2023, 11, 14, 22, 13, 20)),  # UTC, whatever TZ is
        (0, (1980, 1, 1, 0, 0, 0)),  # before 1980: clamped
        (-86400 * 365, (1980, 1, 1, 0, 0, 0)),
        (5_000_000_000, (2107, 12, 31, 23, 59, 58)),  # after 2107: clamped
    ],
)
def test_dates_come_from_mtime_in_utc_clamped(tree: Path, mtime: int, date_time: tuple[int, ...]) -> None:
    path = tree / "big/text.txt"
    os.utime(path, (mtime, mtime))
    body = b"".join(stream(tree, ZipTarget([ZipEntry("t", path=path), ZipEntry("s", source=b"x")]))[0])
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        assert archive.getinfo("t").date_time == date_time
        assert archive.getinfo("s").date_time == (1980, 1, 1, 0, 0, 0)  # never the clock


def test_same_input_gives_identical_bytes_in_any_time_zone(tree: Path) -> None:
    script = (
        "import sys; from pathlib import Path; from tests.test_engine import stream;"
        "from zipmiddleware import ZipTarget;"
        "p = Path(sys.argv[1]); sys.stdout.buffer.write(b''.join(stream(p, ZipTarget.from_directory(p))[0]))"
    )
    bodies = {
        tz: subprocess.run(
            [sys.executable, "-c", script, str(tree)],
            env={**os.environ, "TZ": tz},
            capture_output=True,
            check=True,
            cwd=Path(__file__).parent.parent,
        ).stdout
        for tz in ("UTC", "Asia/Tokyo", "America/Los_Angeles")
    }
    assert len(set(bodies.values())) == 1


def test_no_directory_entries_and_empty_folders_vanish(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "g", {"a/b/c.txt": b"c", "d.txt": b"d"})
    (root / "empty" / "deeper").mkdir(parents=True)
    body = b"".join(stream(root, ZipTarget.from_directory(root))[0])
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        assert archive.namelist() == ["a/b/c.txt", "d.txt"]
        assert not any(info.is_dir() for info in archive.infolist())


def iterate_after_change(root: Path, change, chunk_size: int = 4096) -> tuple[int, Exception | None]:
    """Start streaming, apply ``change`` after the first chunk, and collect the rest."""
    target = ZipTarget([ZipEntry("a", path=root / "a.bin"), ZipEntry("b", path=root / "b.bin")])
    middleware = ZipMiddleware(
        plain_app, routes={"/d": lambda request: target}, roots=[root], chunk_size=chunk_size
    )
    body = middleware(EnvironBuilder(path="/d").get_environ(), lambda *args: None)
    received = 0
    try:
        for index, chunk in enumerate(body):
            received += len(chunk)
            if index == 0:
                change()
    except StreamError as exc:
        return received, exc
    finally:
        body.close()
    return received, None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda root: os.truncate(root / "b.bin", 10), "changed since it was checked"),
        (lambda root: (root / "b.bin").unlink(), "cannot be opened any more"),
        (lambda root: os.truncate(root / "a.bin", 1000), "shorter than"),
        (lambda root: (root / "a.bin").open("ab").write(b"more"), "longer than"),
    ],
    ids=["next-file-truncated", "next-file-deleted", "current-file-shrinks", "current-file-grows"],
)
def test_changes_after_the_first_byte_abort(tmp_path: Path, change, message: str) -> None:
    root = write_tree(tmp_path / "g", {"a.bin": os.urandom(200_000), "b.bin": os.urandom(50_000)})
    received, error = iterate_after_change(root, lambda: change(root))
    assert error is not None and message in str(error)
    assert received < 250_000


def test_sources_are_checked_against_their_size(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for chunks, size, message in [
        ([b"abc"], 4, "yielded 3 bytes, not its size=4"),
        ([b"abc", b"de"], 4, "more than its size=4"),
        ([b"abc", "text"], None, "yielded str, not bytes"),
    ]:
        target = ZipTarget([ZipEntry("s", source=chunks, size=size)])
        middleware = ZipMiddleware(plain_app, routes={"/d": lambda request, target=target: target})
        statuses: list[str] = []
        caplog.clear()
        body = middleware(
            EnvironBuilder(path="/d").get_environ(),
            lambda status, *args, statuses=statuses: statuses.append(status),
        )
        # Found before the status line: a short error instead of the 200; the log says why.
        assert statuses == ["500 INTERNAL SERVER ERROR"]
        assert b"".join(body).startswith(b"Internal Server Error")
        assert message in caplog.text


# -- random trees, zipped and extracted back byte-identical ---------------------------------

name_part = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\\\x00"),
    min_size=1,
    max_size=12,
).filter(lambda s: s not in (".", "..") and s.strip() == s and len(s.encode()) < 60)

trees = st.dictionaries(
    keys=st.lists(name_part, min_size=1, max_size=3).map(tuple),
    values=st.binary(max_size=3000),
    min_size=2,
    max_size=25,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=trees, level=st.sampled_from([0, 0, 1, 9]), chunk_size=st.sampled_from([1024, 65536]))
def test_random_trees_round_trip(tmp_path_factory, files, level: int, chunk_size: int) -> None:
    root = tmp_path_factory.mktemp("tree")
    written = write_generated_tree(root, files)
    if len(written) < 2:
        return
    chunks, _ = stream(root, ZipTarget.from_directory(root), compression_level=level, chunk_size=chunk_size)
    entries = read_zip(b"".join(chunks))
    # Names equal ignoring case collide in the archive and are renamed, so compare
    # contents as a multiset and names where no rename happened.
    assert sorted(entries.values()) == sorted(written.values())
    kept = [name for name in written if name in entries]
    assert all(entries[name] == written[name] for name in kept)
    assert len({name.casefold() for name in entries}) == len(entries)
    assert all(not name.startswith("/") and ".." not in name.split("/") for name in entries)
    extract = tmp_path_factory.mktemp("out")
    with zipfile.ZipFile(io.BytesIO(b"".join(chunks))) as archive:
        archive.extractall(extract)
    extracted = sorted(p.read_bytes() for p in extract.rglob("*") if p.is_file())
    assert extracted == sorted(written.values())


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(0, 300), min_size=1, max_size=12), data=st.data())
def test_the_entries_a_range_needs_are_found_by_bisection_as_by_looking_at_each(
    sizes: list[int], data: st.DataObject
) -> None:
    """A range needs the CRC-32 of each entry whose data descriptor or central record it holds;
    found by bisection (fast on 65,600 entries), the same as by checking every entry."""
    from zipmiddleware.planning import FileSnapshot, PlannedEntry
    from zipmiddleware.zipengine import Layout

    entries = tuple(
        PlannedEntry(
            f"f{index}.bin",
            (2020, 1, 1, 0, 0, 0),
            file=FileSnapshot("/x/", f"f{index}.bin", (1, index, size, 0), 0, 1),
            size=size,
        )
        for index, size in enumerate(sizes)
    )
    layout = Layout(entries)
    start = data.draw(st.integers(0, layout.length - 1))
    stop = data.draw(st.integers(start + 1, layout.length))
    expected = []
    for index, descriptor in enumerate(layout.descriptor_offsets):
        record_start, record_stop = layout.record_span(index)
        in_descriptor = descriptor < stop and layout.entry_end(index) > start
        if in_descriptor or (record_start < stop and record_stop > start):
            expected.append(index)
    assert ZipRange(layout, start, stop, chunk_size=65536, crc_cache=None)._needed == expected
