"""The streamed ZIP writer. The ONLY module that imports ``zipstream`` (zipstream-new).

Every workaround for a measured zipstream-new defect lives here (numbers refer to
the list of defects in the project's field notes):

1. ``allowZip64`` is passed explicitly (it defaults to False).
2./3. Entries are fed with ``write_iter`` and a size hint that keeps the local
   header and the data descriptor in agreement: the hint is the real size only
   when the size needs ZIP64; otherwise 0, so no ZIP64 extra is written.
4. No directory entries are ever written.
5. Files are read by our own reader, ``chunk_size`` bytes at a time, and the
   output is merged into chunks of at least ``chunk_size``; no empty chunk.
6. The deflate level is honoured (see :class:`DeflateLevel`); names are made
   safe before they get here; dates come from mtimes, clamped, never the clock.
7. Every file handle and user iterable is closed by :meth:`ZipStream.close`,
   without relying on garbage collection.
8. zipstream-ng installs the same import name: refused at import.

A stored archive of known sizes is laid out in advance (:class:`Layout`): its
exact length, and where each header, data and descriptor lies. That one
description writes every byte of it (:class:`ZipRange`; the full download is the
range [0, length), and only an archive of files has other ranges), with
zipstream-new's own record code for the headers and the CRC-32 cache, reading file
data only where the range needs it and sending it with sendfile where the server
allows (:mod:`.zerocopy`). :class:`ZipStream` writes the others (deflated, or with
a source of unknown size) through zipstream-new.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import importlib.metadata
import logging
import os
import struct
import zipfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from . import compression
from .checksums import ClientGoneError, ColdCrcWork, Present, RunningCrc, always_present, crc32_combine
from .crccache import CHECKPOINT_EVERY, Checkpoint, CrcCache, Key
from .errors import StreamError
from .planning import FileSnapshot, PlannedEntry, reopen
from .zerocopy import ZeroCopy, send_part

logger = logging.getLogger("zipmiddleware")


def _import_zipstream_new() -> Any:
    import zipstream

    # zipstream-ng has ZipStream and no write_iter; zipstream-new is the reverse.
    if not hasattr(zipstream, "ZipFile") or not hasattr(zipstream.ZipFile, "write_iter"):
        raise ImportError(
            "zipmiddleware needs zipstream-new, but the 'zipstream' module found at "
            f"{getattr(zipstream, '__file__', '?')} is another package (probably zipstream-ng, "
            "which installs the same import name). Fix: pip uninstall zipstream-ng zipstream-new "
            "&& pip install 'zipstream-new>=1.1.8,<1.2'"
        )
    return zipstream


zipstream = _import_zipstream_new()

# A range gives the cache what it learnt every this many files (and when it ends).
FLUSH_EVERY = 256


# stdlib's limit (2 GiB - 1) that zipstream-new compares sizes and offsets with.
ZIP64_LIMIT: int = zipfile.ZIP64_LIMIT
ZIP_FILECOUNT_LIMIT: int = zipfile.ZIP_FILECOUNT_LIMIT


class DeflateLevel(int):
    """``ZIP_DEFLATED`` that carries a compression level.

    zipstream-new builds every compressor with ``zlib.Z_DEFAULT_COMPRESSION``
    (level 6), from its module function ``_get_compressor(compress_type)``. The
    entry's ``compress_type`` reaches that function untouched, so an ``int``
    equal to ``ZIP_DEFLATED`` that also knows its level is enough: it packs into
    headers as 8, and the wrapped function below reads the level from it and builds
    :func:`.compression.compressobj` (ISA-L where it is installed, else zlib). Plain
    ints behave exactly as before, so other users of zipstream are unaffected.
    """

    level: int

    def __new__(cls, level: int) -> DeflateLevel:
        value = super().__new__(cls, zipfile.ZIP_DEFLATED)
        value.level = level
        return value


def _install_level_aware_compressor() -> None:
    original = zipstream._get_compressor
    if getattr(original, "honours_deflate_level", False):
        return

    def get_compressor(compress_type: int) -> Any:
        if isinstance(compress_type, DeflateLevel):
            return compression.compressobj(compress_type.level)
        return original(compress_type)

    get_compressor.honours_deflate_level = True  # type: ignore[attr-defined]
    zipstream._get_compressor = get_compressor
    # The CRC-32 zipstream-new computes of each entry: the same values, faster (see compression.py).
    zipstream.crc32 = compression.crc32


_install_level_aware_compressor()


def size_hint(size: int | None) -> int:
    """The ``buffer_size`` to give ``write_iter`` (defect 3).

    zipstream-new writes a ZIP64 extra into the local header when
    ``hint * 1.05 > ZIP64_LIMIT`` but a 64-bit data descriptor only when the
    real size exceeds ``ZIP64_LIMIT``. Passing the size only when it exceeds the
    limit makes both agree for every size, as streaming readers require.
    """
    return size if size is not None and size > ZIP64_LIMIT else 0


def needs_zip64(entries: Iterable[PlannedEntry]) -> bool:
    """Whether an archive of these entries (stored sizes) would pass a 32-bit limit."""
    offset = 0
    count = 0
    for entry in entries:
        count += 1
        size = entry.size or 0
        if size > ZIP64_LIMIT or offset > ZIP64_LIMIT:
            return True
        offset += 30 + len(entry.arcname.encode("utf-8")) + size + 16
    return count >= ZIP_FILECOUNT_LIMIT or offset > ZIP64_LIMIT


class Output:
    """The "file" zipstream-new writes to: hands each piece back and counts the position.

    The same role as zipstream-new's ``PointerIO``, without its per-write property
    lookup and type checks (measurable at 64 KiB chunks: see bench/). It may start
    at any position: that is how a central directory is written on its own.
    """

    __slots__ = ("position",)

    def __init__(self, position: int = 0) -> None:
        self.position = position

    def write(self, data: bytes) -> bytes:
        self.position += len(data)
        return data

    def tell(self) -> int:
        return self.position

    def flush(self) -> None:
        pass


def _writer_version() -> str:
    try:
        return importlib.metadata.version("zipstream-new")
    except importlib.metadata.PackageNotFoundError:
        return str(getattr(zipstream, "__version__", "?"))


# Everything besides the entries that decides an archive's bytes. Bump the first
# part whenever our use of the writer changes the bytes for the same inputs.
FORMAT = f"zipmiddleware-zip/1 zipstream-new/{_writer_version()}"


def merged(pieces: Iterable[bytes | int], chunk_size: int, length: int | None = None) -> Iterator[bytes]:
    """Merge small pieces into chunks of at least ``chunk_size``; none is empty.

    A piece that is an int ``n`` says that ``n`` bytes went to the client directly (see
    :mod:`.zerocopy`): what is buffered goes out first, so that when the next piece is
    asked for, everything before it has been handed to the server. ``0`` only does that.

    With ``length``, the total must be exactly that, as promised in Content-Length:
    more or fewer bytes raise :class:`StreamError` (the connection is aborted)
    before anything past the promise is sent.
    """
    buffer = bytearray()
    sent = 0
    for piece in pieces:
        if isinstance(piece, int):  # out directly: what is buffered goes first
            if buffer:
                sent += len(buffer)
                _within(sent, length)
                yield bytes(buffer)
                buffer.clear()
            sent += piece
            _within(sent, length)
            continue
        if buffer:
            buffer += piece
            if len(buffer) < chunk_size:
                continue
            chunk = bytes(buffer)
            buffer.clear()
        elif len(piece) >= chunk_size:  # file data: passed on without a copy
            chunk = piece
        else:
            buffer += piece
            continue
        sent += len(chunk)
        _within(sent, length)
        yield chunk
    if buffer:
        sent += len(buffer)
        _within(sent, length)
        yield bytes(buffer)
    if length is not None and sent != length:
        raise StreamError(f"archive of {sent} bytes, not its promised {length}")


def _within(sent: int, length: int | None) -> None:
    """Nothing past a promised length goes out: :class:`StreamError` before it would."""
    if length is not None and sent > length:
        raise StreamError(f"archive longer than its promised {length} bytes")


class ZipStream:
    """A WSGI body: iterate for the archive's bytes; ``close()`` releases everything.

    Nothing is opened until iteration starts, so a HEAD request or a response
    that is never iterated reads no file data. With ``length`` the body must be
    exactly that long. The CRC-32 of every file entry that was completed goes to
    ``crc_cache``, also when the client goes away part-way.
    """

    def __init__(
        self,
        entries: tuple[PlannedEntry, ...],
        *,
        chunk_size: int = 65536,
        compression_level: int = 0,
        zip64: bool = True,
        length: int | None = None,
        crc_cache: CrcCache | None = None,
    ) -> None:
        self.entries = entries
        self.chunk_size = chunk_size
        self.compression_level = compression_level
        self.zip64 = zip64
        self.length = length
        self.crc_cache = crc_cache
        self._readers: list[Iterator[bytes]] = []
        self._output: Iterator[bytes] | None = None
        self._archive_file: Any = None

    def __iter__(self) -> Iterator[bytes]:
        if self._output is None:
            self._output = merged(self._archive(), self.chunk_size, self.length)
        return self._output

    def _archive(self) -> Iterator[bytes]:
        archive = zipstream.ZipFile(Output(), mode="w", compression=zipfile.ZIP_STORED, allowZip64=self.zip64)
        self._archive_file = archive
        compress_type = DeflateLevel(self.compression_level) if self.compression_level else zipfile.ZIP_STORED
        for entry in self.entries:
            reader = self._reader(entry)
            self._readers.append(reader)
            archive.write_iter(
                entry.arcname,
                reader,
                compress_type=compress_type,
                buffer_size=size_hint(entry.size),
                date_time=entry.date_time,
            )
        output = iter(archive)
        try:
            yield from output
        except StreamError as exc:
            logger.error("download aborted: %s", exc)
            raise
        except Exception as exc:  # zipstream-new's own RuntimeErrors, I/O errors, ...
            logger.error("download aborted: archive generation failed: %r", exc)
            raise StreamError(f"archive generation failed: {exc}") from exc
        finally:
            close = getattr(output, "close", None)
            if close is not None:
                close()
            self._remember_crcs()

    def _remember_crcs(self) -> None:
        """Give the cache the CRC-32 of every file entry zipstream-new finished."""
        archive, self._archive_file = self._archive_file, None
        if archive is None or self.crc_cache is None:
            return
        finished = zip(archive.filelist, self.entries, strict=False)  # filelist grows in entry order
        self.crc_cache.put_many({entry.file.identity: info.CRC for info, entry in finished if entry.file})

    def _reader(self, entry: PlannedEntry) -> Iterator[bytes]:
        if entry.file is not None:
            return read_file(entry.arcname, entry.file, self.chunk_size)
        assert entry.source is not None
        return read_source(entry.arcname, entry.source, entry.size)

    def close(self) -> None:
        """Close the output, every reader (and so every file) and every user iterable."""
        _close_all([self._output, *self._readers, *(entry.source for entry in self.entries)])
        self._remember_crcs()  # when iteration never started or was cut short


def _close_all(closables: Iterable[object]) -> None:
    for closable in closables:
        close = getattr(closable, "close", None)
        if callable(close):
            try:
                close()
            except Exception:  # keep closing the rest
                logger.exception("error while closing a download")


# -- layout and ranges of stored archives ----------------------------------------------


def _zipinfo(entry: PlannedEntry, header_offset: int = 0) -> Any:
    """The ``ZipInfo`` zipstream-new's ``write_iter`` makes for this stored entry."""
    assert entry.size is not None
    arcname = os.path.normpath(os.path.splitdrive(entry.arcname)[1]).lstrip("/" + os.sep)
    info = zipstream.ZipInfo(arcname, entry.date_time)
    info.external_attr = 0o600 << 16
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = size_hint(entry.size)
    info.flag_bits = 0x08
    info.header_offset = header_offset
    return info


def _written(entry: PlannedEntry, header_offset: int, zip64: bool, crc: int) -> tuple[Any, bytes]:
    """The ``ZipInfo`` of a written stored entry and its local header, as zipstream-new has them
    after the entry: the header also sets the versions the central record repeats."""
    info = _zipinfo(entry, header_offset)
    header = info.FileHeader(zip64 and info.file_size * 1.05 > ZIP64_LIMIT)
    info.CRC = crc
    info.compress_size = info.file_size = entry.size
    return info, header


class Layout:
    """Where every byte of a stored archive lies, from names and sizes alone.

    The records are zipstream-new's, with the size hint of :func:`size_hint`
    (n = the name's length as the running Python encodes it):

    - local header ``30 + n``, plus a 20-byte ZIP64 extra when the size needs it;
    - the data; a descriptor of 16 bytes, or 24 when the size needs ZIP64;
    - a central record ``46 + n``, plus ``4 + 8`` per ZIP64 field (sizes, offset);
    - the end record, 22 bytes, after a ZIP64 end record and locator (56 + 20)
      when there are 65,535 entries or more, or the directory starts or grows
      past 2 GiB - 1.

    The tests compare this with what zipstream-new writes, byte for byte.
    """

    def __init__(self, entries: tuple[PlannedEntry, ...], zip64: bool = True) -> None:
        self.entries = entries
        self.zip64 = zip64
        self.offsets: list[int] = []  # of each local header
        self.data_offsets: list[int] = []
        self.descriptor_offsets: list[int] = []
        self.records: list[int] = []  # of each central record, from the directory's start
        position = directory = 0
        for entry in entries:
            if entry.size is None:
                raise ValueError(f"{entry.arcname!r}: a layout needs every size")
            big = entry.size > ZIP64_LIMIT
            name = len(_zipinfo(entry)._encodeFilenameFlags()[0])
            self.offsets.append(position)
            self.records.append(directory)
            self.data_offsets.append(position + 30 + name + (20 if big and zip64 else 0))
            self.descriptor_offsets.append(self.data_offsets[-1] + entry.size)
            fields = 2 * big + (position > ZIP64_LIMIT)
            position = self.descriptor_offsets[-1] + (24 if big else 16)
            directory += 46 + name + (4 + 8 * fields if fields else 0)
        self.directory_offset = position
        self.directory_size = directory
        self.zip64_end = (
            len(entries) >= ZIP_FILECOUNT_LIMIT or position > ZIP64_LIMIT or directory > ZIP64_LIMIT
        )
        self.length = position + directory + (56 + 20 if self.zip64_end else 0) + 22
        self.needs_zip64 = self.zip64_end or any(entry.size > ZIP64_LIMIT for entry in entries)  # type: ignore[operator]

    def entry_end(self, index: int) -> int:
        """Where entry ``index``'s data descriptor ends."""
        return self.offsets[index + 1] if index + 1 < len(self.offsets) else self.directory_offset

    def record_span(self, index: int) -> tuple[int, int]:
        """Where entry ``index``'s central record lies in the archive."""
        start = self.directory_offset + self.records[index]
        following = self.records[index + 1] if index + 1 < len(self.records) else self.directory_size
        return start, self.directory_offset + following


def archive_validators(
    entries: tuple[PlannedEntry, ...], compression_level: int, zip64: bool
) -> tuple[str, float] | None:
    """A strong ETag and the newest mtime for an archive of files; None if any entry is a source.

    The ETag covers everything that decides the bytes: each entry's name, date,
    and file (device, inode, size, mtime in ns), the settings that shape the
    archive, the compressor's name and version when deflating (its bytes are its own), and
    the writer's format.
    """
    if not entries or any(entry.file is None for entry in entries):
        return None
    digest = hashlib.sha256(repr((FORMAT, compression_level, zip64)).encode())
    if compression_level:
        digest.update(compression.COMPRESSOR.encode())
    newest = 0.0
    for entry in entries:
        assert entry.file is not None
        digest.update(repr((entry.arcname, entry.date_time, entry.file.identity)).encode() + b"\0")
        newest = max(newest, entry.file.mtime)
    return "zip-" + digest.hexdigest()[:40], newest


def central_record(info: Any) -> bytes:
    """The central directory record of a written entry, as zipstream-new writes it (the body
    of the loop over ``filelist`` in its ``ZipFile.__close``), so that a range packs only the
    records it sends. Stored entries only; the tests compare whole archives with zipstream-new's."""
    year, month, day, hour, minute, second = info.date_time
    dosdate = (year - 1980) << 9 | month << 5 | day
    dostime = hour << 11 | minute << 5 | (second // 2)
    extra: list[int] = []
    file_size, compress_size, header_offset = info.file_size, info.compress_size, info.header_offset
    if file_size > ZIP64_LIMIT or compress_size > ZIP64_LIMIT:
        extra += [file_size, compress_size]
        file_size = compress_size = 0xFFFFFFFF
    if header_offset > ZIP64_LIMIT:
        extra.append(header_offset)
        header_offset = 0xFFFFFFFF
    extra_data, min_version = info.extra, 0
    if extra:
        extra_data = struct.pack("<HH" + "Q" * len(extra), 1, 8 * len(extra), *extra) + extra_data
        min_version = zipfile.ZIP64_VERSION
    filename, flag_bits = info._encodeFilenameFlags()
    record = struct.pack(
        zipstream.structCentralDir,
        zipstream.stringCentralDir,
        max(min_version, info.create_version),
        info.create_system,
        max(min_version, info.extract_version),
        info.reserved,
        flag_bits,
        info.compress_type,
        dostime,
        dosdate,
        info.CRC,
        compress_size,
        file_size,
        len(filename),
        len(extra_data),
        len(info.comment),
        0,
        info.internal_attr,
        info.external_attr,
        header_offset,
    )
    return bytes(record + filename + extra_data + info.comment)


def end_records(layout: Layout) -> bytes:
    """The end of central directory record, after the ZIP64 end record and locator where the
    layout has them, as zipstream-new writes them (no archive comment)."""
    count, size, offset = len(layout.entries), layout.directory_size, layout.directory_offset
    records = b""
    if layout.zip64_end:
        records += struct.pack(
            zipstream.structEndArchive64,
            zipstream.stringEndArchive64,
            44,
            45,
            45,
            0,
            0,
            count,
            count,
            size,
            offset,
        )
        records += struct.pack(
            zipstream.structEndArchive64Locator, zipstream.stringEndArchive64Locator, 0, offset + size, 1
        )
        count, size, offset = min(count, 0xFFFF), min(size, 0xFFFFFFFF), min(offset, 0xFFFFFFFF)
    return records + struct.pack(
        zipstream.structEndArchive, zipstream.stringEndArchive, 0, 0, count, count, size, offset, 0
    )


class ZipRange:
    """Bytes ``[start, stop)`` of the archive a :class:`Layout` describes: a WSGI body.

    The full download is the range ``[0, length)``. File data is read only for the
    entries the range covers, and only the part it covers. A descriptor or central
    record in the range needs its entry's CRC-32: computed on the way when the range
    reads that file from its start; else from the cache; else learnt by reading the
    file without sending it (*cold* work, see :mod:`.checksums`). A range that starts
    inside a file whose CRC-32 it needs sends first and learns the CRC-32 of the head
    it skipped, from the nearest checkpoint, once its client has received as much.

    Every CRC-32 computed from data is compared with the cache's: a wrong cached
    value is logged and replaced, and aborts the response if it was already sent.
    """

    def __init__(
        self,
        layout: Layout,
        start: int,
        stop: int,
        *,
        chunk_size: int,
        crc_cache: CrcCache | None,
        cold_work: ColdCrcWork | None = None,
        present: Present = always_present,
        zero_copy: ZeroCopy | None = None,
    ) -> None:
        if not 0 <= start < stop <= layout.length:
            raise ValueError(f"range {start}-{stop} outside an archive of {layout.length} bytes")
        if (start, stop) != (0, layout.length) and any(entry.file is None for entry in layout.entries):
            raise ValueError("a source can only be read from its start: only the whole archive has sources")
        self.layout = layout
        self.start = start
        self.stop = stop
        self.chunk_size = chunk_size
        self.crc_cache = crc_cache
        self.cold_work = cold_work or ColdCrcWork(crc_cache)
        self.present = present
        # Sends file data with sendfile where it can (see zerocopy.py); None: all through the server.
        self.zero_copy = zero_copy
        # Admitted by cold_work.reserve(): released once the cold work is done (or at close).
        self.reserved = False
        self._cold_pending: set[int] = set()  # entries whose CRC-32 needs reading without sending
        self._crcs: dict[int, int] | None = None  # entry index -> CRC-32, once looked up
        self._cached: dict[int, int] = {}  # what the cache said, until checked against data
        self._sent_cached: set[int] = set()  # entries whose cached CRC-32 went out unchecked
        self._checkpoints: dict[int, list[Checkpoint]] = {}
        self._learnt: dict[Key, int] = {}  # computed here, not yet given to the cache
        self._progress: tuple[Key, RunningCrc] | None = None  # the file being read from its start
        self._pieces: Iterator[bytes | int] | None = None
        self._output: Iterator[bytes] | None = None

    def __iter__(self) -> Iterator[bytes]:
        if self._output is None:
            self._pieces = self._generate()
            length = self.stop - self.start
            pieces = self._pieces if self.zero_copy is None else self.zero_copy.counted(self._pieces, length)
            self._output = merged(pieces, self.chunk_size, length)
        return self._output

    def close(self) -> None:
        """Close the output, every file and every source (read or not), keep what was learnt."""
        _close_all([self._output, self._pieces, *(entry.source for entry in self.layout.entries)])
        self._cold_done()
        if self._progress is not None:  # cut inside a file: keep what was learnt of its head
            key, running = self._progress
            self._progress = None
            self.cold_work.keep_checkpoints(key, running.points)
        self._flush()

    # -- what the range needs ------------------------------------------------------------

    @functools.cached_property
    def _needed(self) -> list[int]:
        """The entries whose descriptor or central record lies in the range (worked out when
        first asked: never for a HEAD, whose body is not iterated). Both kinds lie in order,
        so each is one run of entries, found by bisection."""
        layout, start, stop = self.layout, self.start, self.stop
        # Entry i's descriptor runs from descriptor_offsets[i] to offsets[i + 1] (or the directory).
        first = max(bisect.bisect_right(layout.offsets, start) - 1, 0)
        descriptors = range(first, bisect.bisect_left(layout.descriptor_offsets, stop))
        if start >= layout.directory_offset:
            descriptors = range(0)
        # Entry i's record runs from records[i] to records[i + 1] (or the directory's end).
        low, high = start - layout.directory_offset, stop - layout.directory_offset
        records = range(
            max(bisect.bisect_right(layout.records, low) - 1, 0), bisect.bisect_left(layout.records, high)
        )
        if low >= layout.directory_size or high <= 0:
            records = range(0)
        return sorted(set(descriptors).union(records))

    def _read_span(self, index: int) -> tuple[int, int] | None:
        """The part ``[low, high)`` of entry ``index``'s data that the range sends, if any."""
        data, descriptor = self.layout.data_offsets[index], self.layout.descriptor_offsets[index]
        if self.start < descriptor and self.stop > data:
            return max(self.start - data, 0), min(self.stop - data, descriptor - data)
        return None

    def _reads_to_end(self, index: int) -> int | None:
        """Where the range starts reading entry ``index``'s data, if it reads it to its end."""
        span = self._read_span(index)
        size = self.layout.entries[index].size
        return span[0] if span is not None and span[1] == size else None

    def _look_up(self) -> dict[int, int]:
        """CRC-32s and checkpoints from the cache, once per body."""
        if self._crcs is None:
            keys: dict[int, Key] = {}
            self._crcs = {}
            for index in self._needed:
                entry = self.layout.entries[index]
                if not entry.size:
                    self._crcs[index] = 0
                elif entry.file is not None:
                    keys[index] = entry.file.identity
            if keys and self.crc_cache is not None:
                found = self.crc_cache.get_many(set(keys.values()))
                self._cached = {index: found[key] for index, key in keys.items() if key in found}
                self._crcs.update(self._cached)
            # Checkpoints matter only where a file's head must be read without being sent.
            cold = {
                index: key
                for index, key in keys.items()
                if index not in self._crcs and self._cold_start(index)
            }
            get_checkpoints = getattr(self.crc_cache, "get_checkpoints", None)
            if cold and callable(get_checkpoints):
                points = get_checkpoints(set(cold.values()))
                self._checkpoints = {index: points[key] for index, key in cold.items() if key in points}
        return self._crcs

    def _cold_start(self, index: int) -> int:
        """How far into entry ``index``'s file its CRC-32 needs reading without sending."""
        low = self._reads_to_end(index)
        return self.layout.entries[index].size or 0 if low is None else low

    def _best_checkpoint(self, index: int, offset: int) -> Checkpoint:
        best = (0, 0)
        for point in self._checkpoints.get(index, ()):
            if best[0] < point[0] <= offset:
                best = point
        return best

    @functools.cached_property
    def _needed_set(self) -> set[int]:
        return set(self._needed)

    def cold_cost(self) -> int:
        """File data this range would read without sending it (with the cache as it is now);
        the entries that need it are noted, to give back its admission when they are done."""
        known = self._look_up()
        total = 0
        for index in self._needed:
            if index not in known:
                offset = self._cold_start(index)
                cost = offset - self._best_checkpoint(index, offset)[0]
                if cost:
                    self._cold_pending.add(index)
                total += cost
        return total

    def _cold_done(self, index: int | None = None) -> None:
        """Entry ``index``'s cold work is done; once all is, give back the admission."""
        if index is not None:
            self._cold_pending.discard(index)
        if self.reserved and (index is None or not self._cold_pending):
            self.reserved = False
            self.cold_work.release()

    # -- the bytes -----------------------------------------------------------------------

    def _window(self, position: int, data: bytes) -> bytes:
        """The part of ``data``, which lies at ``position``, inside the range."""
        return data[max(self.start - position, 0) : max(self.stop - position, 0)]

    def _generate(self) -> Iterator[bytes | int]:
        self._look_up()
        try:
            yield from self._entries()
            if self.stop > self.layout.directory_offset:
                yield from self._directory()
        except StreamError as exc:
            # A client that went away is no error of the server's (and may be frequent).
            level = logging.INFO if isinstance(exc, ClientGoneError) else logging.ERROR
            logger.log(level, "range aborted: %s", exc)
            raise

    def _entries(self) -> Iterator[bytes | int]:
        layout, start, stop = self.layout, self.start, self.stop
        if start >= layout.directory_offset:
            return
        first = max(bisect.bisect_right(layout.offsets, start) - 1, 0)
        for index in range(first, len(layout.entries)):
            offset = layout.offsets[index]
            if offset >= stop:
                break
            entry = layout.entries[index]
            data, descriptor = layout.data_offsets[index], layout.descriptor_offsets[index]
            info, header = _written(entry, offset, layout.zip64, 0)
            if start < data:
                yield self._window(offset, header)
            span = self._read_span(index)
            if entry.source is not None:  # the whole archive: read in full, CRC-32 on the way
                running = RunningCrc()
                for piece in read_source(entry.arcname, entry.source, entry.size):
                    running.update(piece)
                    yield piece
                self._look_up()[index] = running.crc
            elif entry.size and span is not None:
                assert entry.file is not None
                low, high = span
                crcs = self._look_up()
                cold = index in self._needed_set and index not in crcs
                # A file read whole checks its cached CRC-32 on the way. The zero-copy path, whose
                # point is not to read what it sends, does so only until this process has seen
                # the data give that value (so a forged row is still corrected once per process).
                trusted = index in crcs and self.cold_work.confirmed(entry.file.identity, crcs[index])
                check = low == 0 and (self.zero_copy is None or not trusted)
                if high == entry.size and (check or cold):
                    yield from self._read_learning(index, low)
                else:  # the CRC-32 is cached, or not needed here
                    yield from self._data(index, low, high)
            if start < layout.entry_end(index) and stop > descriptor:
                info.CRC = self._crc(index)
                yield self._window(descriptor, info.DataDescriptor())
            self._flush(every=FLUSH_EVERY)

    def _directory(self) -> Iterator[bytes]:
        """The central records in the range, then the end records if they are in it."""
        layout = self.layout
        for index in self._needed:
            self._crc(index)  # compute what the cache lacked, before the first record
        crcs = self._look_up()
        first = max(bisect.bisect_right(layout.records, self.start - layout.directory_offset) - 1, 0)
        for index in range(first, len(layout.entries)):
            record_start, record_stop = layout.record_span(index)
            if record_start >= self.stop:
                return
            if record_stop <= self.start:  # the range starts after the records
                break
            info = _written(layout.entries[index], layout.offsets[index], layout.zip64, crcs[index])[0]
            yield self._window(record_start, central_record(info))
        end = layout.directory_offset + layout.directory_size
        if self.stop > end:
            yield self._window(end, end_records(layout))

    # -- CRC-32s -----------------------------------------------------------------------

    def _reader(self, index: int) -> Callable[[int, int], Iterator[bytes]]:
        entry = self.layout.entries[index]
        assert entry.file is not None
        file = entry.file
        return lambda low, high: read_file(entry.arcname, file, self.chunk_size, low, high)

    def _crc(self, index: int) -> int:
        """Entry ``index``'s CRC-32, going out now: learnt without sending if need be."""
        crcs = self._look_up()
        if index not in crcs:
            entry = self.layout.entries[index]
            assert entry.file is not None and entry.size is not None
            start = self._best_checkpoint(index, entry.size)
            crcs[index] = self.cold_work.prefix(
                entry.file.identity, entry.size, self._reader(index), start, self.present
            )
            self.cold_work.confirm(entry.file.identity, crcs[index])
            self._cold_done(index)
        elif index in self._cached:
            self._sent_cached.add(index)
        return crcs[index]

    def _read_learning(self, index: int, low: int) -> Iterator[bytes | int]:
        """Pass on a file's data from ``low`` to its end, learning its CRC-32 on the way.

        From 0, or from a checkpoint at ``low``, the CRC-32 runs from the file's start and
        leaves checkpoints, so that a download cut here resumes cheaply. Else the data goes
        out first, with the CRC-32 of ``[low, ...)``, and the head ``[0, low)`` is learnt
        (shared, bounded cold work from the nearest checkpoint) only once the client has
        received as much as that costs, or at the file's end: a client that asks for a
        range and leaves costs what it received, not a head it never waited for.
        """
        entry = self.layout.entries[index]
        assert entry.file is not None and entry.size is not None
        key = entry.file.identity
        nearest = self._best_checkpoint(index, low)
        head_known = nearest[0] == low  # low == 0 included
        running = RunningCrc(nearest if head_known else (low, 0))
        if head_known:
            self._progress = (key, running)
        for piece in self._data(index, low, entry.size, running, ahead=head_known):
            yield piece
            if not head_known and running.offset - low >= low - nearest[0]:
                self._join_head(index, low, nearest, running)
                head_known, self._progress = True, (key, running)
        if not head_known:
            self._join_head(index, low, nearest, running)
        self._progress = None
        self._learn(index, running.crc)

    def _join_head(self, index: int, low: int, nearest: Checkpoint, tail: RunningCrc) -> None:
        """Make ``tail`` (the CRC-32 of ``[low, ...)``) that of ``[0, ...)``: the CRC-32 of
        the head ``[0, low)`` is learnt (cold work) and joined to it."""
        entry = self.layout.entries[index]
        assert entry.file is not None
        head = self.cold_work.prefix(entry.file.identity, low, self._reader(index), nearest, self.present)
        self._cold_done(index)
        tail.crc, tail.points = crc32_combine(head, tail.crc, tail.offset - low), []

    def _data(
        self, index: int, low: int, high: int, running: RunningCrc | None = None, ahead: bool = False
    ) -> Iterator[bytes | int]:
        """Bytes ``[low, high)`` of entry ``index``'s file, sent directly where the server allows
        it (ints: counts sent), else yielded; ``running`` is given every byte on the way (by
        a reader thread when sent directly and ``ahead``: then ``running`` is complete only
        once this ends, so nothing may look at it meanwhile)."""
        entry = self.layout.entries[index]
        assert entry.file is not None
        # Data shorter than a chunk goes the ordinary way, merged with the headers around it: a
        # direct send would cost more (a write of the headers before it, a sendfile) than it saves.
        if self.zero_copy is not None and high - low >= self.chunk_size:
            fd = reopened(entry.arcname, entry.file)
            try:
                yield from send_part(
                    self.zero_copy, fd, entry.arcname, entry.file, low, high, running, self.chunk_size, ahead
                )
            finally:
                os.close(fd)
            return
        for piece in read_file(entry.arcname, entry.file, self.chunk_size, low, high):
            if running is not None:
                running.update(piece)
            yield piece

    def _learn(self, index: int, crc: int) -> None:
        """A CRC-32 computed from the data: it wins over the cache's."""
        entry = self.layout.entries[index]
        assert entry.file is not None
        cached = self._cached.pop(index, None)
        self._look_up()[index] = crc
        self.cold_work.confirm(entry.file.identity, crc)
        if cached == crc:
            return
        self._learnt[entry.file.identity] = crc
        if entry.file.size >= CHECKPOINT_EVERY:  # a big file: worth a write of its own at once
            self._flush()
        if cached is not None:
            logger.error(
                "CRC-32 cache: %r had %08x, its data gives %08x; corrected", entry.arcname, cached, crc
            )
            if index in self._sent_cached:
                raise StreamError(f"{entry.arcname!r}: a wrong cached CRC-32 was already sent")

    def _flush(self, every: int = 0) -> None:
        """Give the cache what was learnt (in batches: one write per file would be slow)."""
        if len(self._learnt) > every and self.crc_cache is not None:
            learnt, self._learnt = self._learnt, {}
            self.crc_cache.put_many(learnt)


# -- readers -----------------------------------------------------------------------------


def reopened(arcname: str, file: FileSnapshot) -> int:
    """The checked file opened again for reading (see :func:`.planning.reopen`), or :class:`StreamError`."""
    try:
        return reopen(file)
    except OSError as exc:
        raise StreamError(f"{arcname!r}: cannot be opened any more: {exc}") from exc


def read_file(
    arcname: str, file: FileSnapshot, chunk_size: int, start: int = 0, stop: int | None = None
) -> Iterator[bytes]:
    """Exactly bytes ``[start, stop)`` of the checked file, or :class:`StreamError`.

    The file is reopened and must be the one that was checked (same device,
    inode, size and mtime); a file that is shorter or longer than that when
    read, or modified while being read, aborts the download rather than
    producing a damaged archive.
    """
    stop = file.size if stop is None else stop
    fd = reopened(arcname, file)
    try:
        if start:
            os.lseek(fd, start, os.SEEK_SET)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, start, stop - start, os.POSIX_FADV_SEQUENTIAL)
        remaining = stop - start
        while remaining:
            data = os.read(fd, min(chunk_size, remaining))
            if not data:
                raise StreamError(f"{arcname!r}: shorter than its {file.size} bytes")
            remaining -= len(data)
            if not remaining:  # checked before the last piece goes out, not after
                if stop == file.size and os.read(fd, 1):
                    raise StreamError(f"{arcname!r}: longer than its {file.size} bytes")
                # A write changes mtime or ctime before its data can be read, so whatever
                # was read so far is the checked version if this still holds.
                if not file.unchanged(os.fstat(fd)):
                    raise StreamError(f"{arcname!r}: modified while being read")
            yield data
    finally:
        os.close(fd)


def read_source(arcname: str, source: Iterable[bytes], size: int | None) -> Iterator[bytes]:
    """The source's bytes, checked against ``size``; empty pieces are dropped."""
    # Without a size the local header is written without ZIP64, so the entry
    # cannot pass ZIP64_LIMIT (see size_hint); stop at once rather than at the end.
    limit = ZIP64_LIMIT if size is None else size
    count = 0
    for data in source:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise StreamError(f"{arcname!r}: source yielded {type(data).__name__}, not bytes")
        if not data:
            continue
        count += len(data)
        if count > limit:
            if size is None:
                raise StreamError(f"{arcname!r}: a source without size= cannot pass {ZIP64_LIMIT} bytes")
            raise StreamError(f"{arcname!r}: source yielded more than its size={size} bytes")
        yield bytes(data)
    if size is not None and count != size:
        raise StreamError(f"{arcname!r}: source yielded {count} bytes, not its size={size}")
