"""The streamed ZIP writer: archives written from the plan, in constant memory.

Every record is packed by :mod:`.zipformat`; this module decides what goes where.

A stored archive of known sizes is laid out in advance (:class:`Layout`): its exact
length, and where each header, data and descriptor lies. That one description writes
every byte of it (:class:`ZipRange`; the full download is the range [0, length), and
only an archive of files has other ranges), with the CRC-32 cache, reading file data
only where the range needs it and sending it with sendfile where the server allows
(:mod:`.zerocopy`). :class:`ZipStream` writes the others: deflated, or with a source
of unknown size, in one pass.

What each entry's headers hold (reasons in :mod:`.zipformat` and the README):

- Stored entries of known size say their real sizes in their local header, also when a
  data descriptor follows (as nginx's mod_zip does): streaming readers such as
  stream-unzip then find where the data ends. An empty entry has nothing to describe
  later and gets no descriptor.
- With ``data_descriptors`` false, a stored entry of a file has its CRC-32 in its local
  header and no descriptor (Java's ``ZipInputStream`` reads no other stored entry); the
  CRC-32 comes from the cache, or from reading the file once before it is sent.
- Entries whose size is unknown before their data (deflated, or a source without a size)
  always use a descriptor.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import hashlib
import itertools
import logging
import os
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import cast

from . import compression
from .checksums import ClientGoneError, ColdCrcWork, Present, RunningCrc, always_present, crc32_combine
from .closing import close_all
from .crccache import CHECKPOINT_EVERY, Checkpoint, CrcCache, Key, storable_name
from .errors import StreamError, UpstreamError
from .events import DONE, FAILED, SKIPPED, Report
from .fetching import EntryFailed, Fetcher, Policy, failure_reason
from .names import NameTable
from .planning import FileSnapshot, PlannedEntry, reopen
from .sources import VersionedSource, is_versioned
from .zerocopy import ZeroCopy, send_part
from .zipformat import (
    DEFLATED,
    DOS_MIN,
    STORED,
    ZIP64_LIMIT,
    Member,
    central_record,
    data_descriptor,
    end_records,
    end_records_size,
    local_header,
    needs_zip64_end,
)

logger = logging.getLogger("zipmiddleware")

# A range gives the cache what it learnt every this many files (and when it ends).
FLUSH_EVERY = 256

# Everything besides the entries and the settings that decides an archive's bytes. Bump it
# whenever the same inputs would give other bytes (and so the ETags change once).
FORMAT = "zipmiddleware-zip/3"


def member(
    entry: PlannedEntry, offset: int, *, zip64: bool, data_descriptors: bool, deflated: bool
) -> Member:
    """The header fields of ``entry`` written at ``offset``.

    ZIP64 fields when the planned size may pass the limit (deflate may grow incompressible
    data a little: 5% is far more than it adds); a descriptor unless the CRC-32 and sizes
    can be in the local header (see the module docstring).
    """
    size = entry.size
    # Without a size: no ZIP64, and so the entry may not pass ZIP64_LIMIT (see fetching.checked).
    big = size is not None and zip64 and (size + size // 20 if deflated else size) > ZIP64_LIMIT
    descriptor = deflated or size is None or (size > 0 and (data_descriptors or entry.file is None))
    return Member(
        entry.arcname.encode("utf-8"),
        DEFLATED if deflated else STORED,
        entry.mtime,
        entry.file is not None and entry.file.executable,
        offset,
        big,
        descriptor,
    )


def needs_zip64(entries: Iterable[PlannedEntry]) -> bool:
    """Whether an archive of these entries (stored sizes) would pass a 32-bit limit."""
    offset = 0
    count = 0
    for entry in entries:
        count += 1
        size = entry.size or 0
        if size > ZIP64_LIMIT or offset > ZIP64_LIMIT:
            return True
        header = member(entry, offset, zip64=False, data_descriptors=True, deflated=False)
        offset += header.header_size + size + header.descriptor_size
    return needs_zip64_end(count, offset, 0)


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


class Body:
    """What both archive bodies share: their chunks are made once, by ``_chunks()``, and the
    first may be made ahead with :meth:`prime` (see the middleware), kept, and sent first."""

    _output: Iterator[bytes] | None = None
    _first: bytes | None = None

    def _chunks(self) -> Iterator[bytes]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __iter__(self) -> Iterator[bytes]:
        if self._output is None:
            self._output = self._chunks()
        if self._first is not None:
            first, self._first = self._first, None
            return itertools.chain((first,), self._output)
        return self._output

    def prime(self) -> None:
        """Make the first chunk now: a failure before anything went out raises here."""
        if self._output is None:
            self._output = self._chunks()
        self._first = next(self._output, None)


class ZipStream(Body):
    """A WSGI body: iterate for the archive's bytes; ``close()`` releases everything.

    Writes, in one pass, an archive that cannot be laid out in advance: deflated, with a
    source of unknown size, or one whose failing sources are left out (``skip``: then
    the archive ends with :data:`SKIPPED_LIST`'s entry naming them). Nothing is opened
    until iteration starts, so a HEAD request or a response that is never iterated reads
    no file data. With ``length`` the body must be exactly that long. The CRC-32 of every
    file entry that was completed goes to ``crc_cache``, also when the client goes away
    part-way.
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
        data_descriptors: bool = True,
        fetcher: Fetcher | None = None,
        report: Report | None = None,
        skip: str | None = None,
    ) -> None:
        self.entries = entries
        self.chunk_size = chunk_size
        self.compression_level = compression_level
        self.zip64 = zip64
        self.length = length
        self.crc_cache = crc_cache
        self.data_descriptors = data_descriptors
        self.fetcher = fetcher or Fetcher(entries, Policy())
        self.report = report or Report()
        # With a name: sources that fail before their first byte are left out, and listed in
        # an entry of that name at the end.
        self.skip = skip
        self._readers: list[Iterator[bytes]] = []
        self._output: Iterator[bytes] | None = None
        self._learnt: dict[Key, int] = {}  # CRC-32s of files read whole, not yet given to the cache
        self._cached: dict[Key, int] | None = None  # what the cache knew, once asked

    def _chunks(self) -> Iterator[bytes]:
        return merged(self._archive(), self.chunk_size, self.length)

    def _archive(self) -> Iterator[bytes]:
        written: list[tuple[Member, int, int, int]] = []  # member, CRC-32, compressed size, size
        skipped: list[tuple[str, str]] = []  # arcname, reason
        position = 0
        self.fetcher.warm()
        try:
            for index, entry in enumerate(self.entries):
                begun = self._begin(index, skipped)
                if begun is None:
                    continue
                entry, pieces = begun
                for piece in self._entry(entry, position, pieces, written, index):
                    position += len(piece)
                    yield piece
            if skipped:
                listing, text = skipped_listing(self.entries, skipped, self.skip or SKIPPED_LIST)
                for piece in self._entry(listing, position, iter((text,)), written):
                    position += len(piece)
                    yield piece
            directory = position
            for header, crc, compressed, size in written:
                record = central_record(header, crc, compressed, size)
                position += len(record)
                yield record
            yield end_records(len(written), directory, position - directory)
        except StreamError as exc:
            logger.error("download aborted: %s", exc)
            raise
        except Exception as exc:  # I/O errors, compressor errors, ...
            logger.error("download aborted: archive generation failed: %r", exc)
            raise StreamError(f"archive generation failed: {exc}") from exc
        finally:
            self._remember_crcs()

    def _begin(
        self, index: int, skipped: list[tuple[str, str]]
    ) -> tuple[PlannedEntry, Iterator[bytes]] | None:
        """Entry ``index`` (with the size its source learnt) and its data, before its header is
        written; None if it failed and is left out."""
        entry = self.entries[index]
        if entry.file is not None:
            return entry, read_file(entry.arcname, entry.file, self.chunk_size)
        try:
            pieces = self.fetcher.begin(index)
        except EntryFailed as exc:
            status = SKIPPED if self.skip else FAILED
            self.report.entry(entry.arcname, status, 0, exc.attempts, exc.reason)
            if not self.skip:
                raise UpstreamError(str(exc)) from exc
            logger.warning("left out of the archive: %s", exc)
            skipped.append((entry.arcname, exc.reason))
            return None
        size = self.fetcher.size(index)
        return (entry if size == entry.size else dataclasses.replace(entry, size=size)), pieces

    def _entry(
        self,
        entry: PlannedEntry,
        position: int,
        reader: Iterator[bytes],
        written: list[tuple[Member, int, int, int]],
        index: int | None = None,
    ) -> Iterator[bytes]:
        """An entry's local header, data and descriptor; what its central record needs goes to
        ``written``. ``index``: where it is in ``entries`` (the listing of skipped ones is not)."""
        header = member(
            entry,
            position,
            zip64=self.zip64,
            data_descriptors=self.data_descriptors,
            deflated=bool(self.compression_level),
        )
        expected = None
        if not header.descriptor and entry.size:  # the CRC-32 goes first, in the local header
            assert entry.file is not None
            expected = self._file_crc(entry.arcname, entry.file)
        known = entry.size if entry.size is not None and not header.method else 0
        yield local_header(header, expected or 0, known, known)
        self._readers.append(reader)
        compressor = compression.compressobj(self.compression_level) if header.method else None
        crc = size = compressed = 0
        try:
            for piece in reader:
                crc = compression.crc32(piece, crc)
                size += len(piece)
                if compressor is not None:
                    piece = compressor.compress(piece)
                    if not piece:
                        continue
                compressed += len(piece)
                yield piece
        except Exception as exc:  # a StreamError, or whatever a plain iterable raised
            attempts = self.fetcher.attempts_of(index)
            self.report.entry(entry.arcname, FAILED, size, attempts, failure_reason(exc))
            raise
        if compressor is not None:
            tail = compressor.flush()
            compressed += len(tail)
            if tail:
                yield tail
        if not header.zip64 and compressed > ZIP64_LIMIT:
            raise StreamError(f"{entry.arcname!r}: compressed to more than {ZIP64_LIMIT} bytes")
        if entry.file is not None:
            self._learnt[entry.file.key] = crc
        if expected is not None and crc != expected:
            raise StreamError(f"{entry.arcname!r}: its data no longer gives the CRC-32 its header holds")
        if header.descriptor:
            yield data_descriptor(header, crc, compressed, size)
        written.append((header, crc, compressed, size))
        self.report.entry(entry.arcname, DONE, size, self.fetcher.attempts_of(index))

    def _file_crc(self, arcname: str, file: FileSnapshot) -> int:
        """A file's CRC-32 before it is sent: from the cache, else by reading it once."""
        if self._cached is None:  # one lookup for every file of the archive (a store may be remote)
            keys = {entry.file.key for entry in self.entries if entry.file is not None and entry.size}
            self._cached = self.crc_cache.get_many(keys) if self.crc_cache is not None else {}
        if file.key in self._cached:
            return self._cached[file.key]
        crc = 0
        for piece in read_file(arcname, file, self.chunk_size):
            crc = compression.crc32(piece, crc)
        return crc

    def _remember_crcs(self) -> None:
        """Give the cache the CRC-32 of every file entry read whole."""
        learnt, self._learnt = self._learnt, {}
        if learnt and self.crc_cache is not None:
            self.crc_cache.put_many(learnt)

    def close(self) -> None:
        """Close the output, every reader (and so every file), every fetch and every source."""
        close_all([self._output, *self._readers, self.fetcher])
        self._remember_crcs()  # when iteration never started or was cut short


# The entry that lists what was left out under on_error = "skip", unless the setting names another.
SKIPPED_LIST = "SKIPPED FILES.txt"


def skipped_listing(
    entries: tuple[PlannedEntry, ...], skipped: list[tuple[str, str]], name: str
) -> tuple[PlannedEntry, bytes]:
    """The last entry of an archive whose failing sources were left out: what and why, one per
    line, under ``name`` (made unique among the entries' names)."""
    names = NameTable()
    for entry in entries:
        names.add(entry.arcname)
    lines = ["These files could not be included in this download:", ""]
    lines += [f"{arcname}: {reason}" for arcname, reason in skipped]
    text = ("\r\n".join(lines) + "\r\n").encode("utf-8")  # CRLF: Notepad too shows the lines
    # Dated as the newest entry, as an archive's bytes never depend on the clock.
    newest = max((entry.mtime for entry in entries), default=DOS_MIN)
    return PlannedEntry(names.add(name), newest, size=len(text)), text


# -- layout and ranges of stored archives ----------------------------------------------

# Stored entries of known size say their sizes in their local header even when a descriptor
# follows: stream-unzip (and others that read the local headers in order) then find where
# the data ends; central-directory readers ignore them; 7-Zip checks them against the
# directory. False writes zeros there instead (the tests compare both with every reader).
SIZES_IN_LOCAL_HEADERS = True


class Layout:
    """Where every byte of a stored archive lies, from names and sizes alone.

    Per entry (n = the UTF-8 name's length; :mod:`.zipformat` packs the records):

    - its local header, ``30 + n`` bytes, plus 20 for a ZIP64 extra when the entry passes
      ZIP64_LIMIT, plus 9 for the extended timestamp;
    - its data;
    - its data descriptor, if it has one: 16 bytes, or 24 with a ZIP64 extra;
    - its central record, ``46 + n + 9``, plus ``4 + 8`` per ZIP64 field (sizes, offset).

    Then the end record, 22 bytes, after a ZIP64 end record and locator (56 + 20) when
    there are 65,535 entries or more, or the directory starts or grows past 2 GiB - 1.
    """

    def __init__(
        self, entries: tuple[PlannedEntry, ...], zip64: bool = True, data_descriptors: bool = True
    ) -> None:
        self.entries = entries
        self.zip64 = zip64
        self.data_descriptors = data_descriptors
        self.offsets: list[int] = []  # of each local header
        self.data_offsets: list[int] = []
        self.descriptor_offsets: list[int] = []  # where the data ends (and a descriptor starts)
        self.records: list[int] = []  # of each central record, from the directory's start
        position = directory = 0
        big = False
        for entry in entries:
            if entry.size is None:
                raise ValueError(f"{entry.arcname!r}: a layout needs every size")
            header = self._member(entry, position)
            big = big or header.version > 20
            self.offsets.append(position)
            self.records.append(directory)
            self.data_offsets.append(position + header.header_size)
            self.descriptor_offsets.append(self.data_offsets[-1] + entry.size)
            position = self.descriptor_offsets[-1] + header.descriptor_size
            directory += header.record_size
        self.directory_offset = position
        self.directory_size = directory
        self.zip64_end = needs_zip64_end(len(entries), position, directory)
        self.length = position + directory + end_records_size(len(entries), position, directory)
        self.needs_zip64 = self.zip64_end or big or any(entry.size > ZIP64_LIMIT for entry in entries)  # type: ignore[operator]

    def _member(self, entry: PlannedEntry, offset: int) -> Member:
        return member(entry, offset, zip64=self.zip64, data_descriptors=self.data_descriptors, deflated=False)

    def member(self, index: int) -> Member:
        """The header fields of entry ``index``."""
        return self._member(self.entries[index], self.offsets[index])

    def entry_end(self, index: int) -> int:
        """Where entry ``index`` (its descriptor, if it has one) ends."""
        return self.offsets[index + 1] if index + 1 < len(self.offsets) else self.directory_offset

    def has_descriptor(self, index: int) -> bool:
        """Whether a data descriptor follows entry ``index``'s data (else its local header has
        its CRC-32)."""
        return self.descriptor_offsets[index] < self.entry_end(index)

    def record_span(self, index: int) -> tuple[int, int]:
        """Where entry ``index``'s central record lies in the archive."""
        start = self.directory_offset + self.records[index]
        following = self.records[index + 1] if index + 1 < len(self.records) else self.directory_size
        return start, self.directory_offset + following

    def local_header(self, index: int, crc: int) -> bytes:
        header = self.member(index)
        size = self.entries[index].size or 0
        if header.descriptor and not SIZES_IN_LOCAL_HEADERS:
            size = 0
        return local_header(header, crc, size, size)

    def descriptor(self, index: int, crc: int) -> bytes:
        size = self.entries[index].size or 0
        return data_descriptor(self.member(index), crc, size, size)

    def central_record(self, index: int, crc: int) -> bytes:
        size = self.entries[index].size or 0
        return central_record(self.member(index), crc, size, size)

    def end_records(self) -> bytes:
        return end_records(len(self.entries), self.directory_offset, self.directory_size)


def archive_validators(
    entries: tuple[PlannedEntry, ...], compression_level: int, zip64: bool, data_descriptors: bool = True
) -> tuple[str, float] | None:
    """A strong ETag and the newest mtime for an archive of stable entries (see
    ``PlannedEntry.stable``); None if any entry is another source.

    The ETag covers everything that decides the bytes, and nothing else, so that every host
    with copies of the same files gives the same: each entry's name, date, mode and content
    (a file's size and mtime in ns; a versioned source's name, version and size), the
    settings that shape the archive, the compressor's name and version when deflating (its
    bytes are its own), and the format.
    """
    if not entries or not all(entry.stable for entry in entries):
        return None
    digest = hashlib.sha256(repr((FORMAT, compression_level, zip64, data_descriptors)).encode())
    if compression_level:
        digest.update(compression.COMPRESSOR.encode())
    newest = 0.0
    for entry in entries:
        file = entry.file
        if file is not None:
            content: tuple[object, ...] = (file.executable, file.size, file.mtime_ns)
            newest = max(newest, file.mtime)
        else:
            source = cast(VersionedSource, entry.source)  # stable: versioned
            content = (source.name, source.version, source.size)
            newest = max(newest, float(entry.mtime))
        digest.update(repr((entry.arcname, entry.mtime, content)).encode() + b"\0")
    return "zip-" + digest.hexdigest()[:40], newest


class ZipRange(Body):
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
        fetcher: Fetcher | None = None,
        report: Report | None = None,
    ) -> None:
        if not 0 <= start < stop <= layout.length:
            raise ValueError(f"range {start}-{stop} outside an archive of {layout.length} bytes")
        whole = (start, stop) == (0, layout.length)
        if not whole and not all(entry.stable for entry in layout.entries):
            raise ValueError("a range of an archive needs files and versioned sources only")
        self.layout = layout
        self.start = start
        self.stop = stop
        self.chunk_size = chunk_size
        self.crc_cache = crc_cache
        self.cold_work = cold_work or ColdCrcWork(crc_cache)
        self.present = present
        # Sends file data with sendfile where it can (see zerocopy.py); None: all through the server.
        self.zero_copy = zero_copy
        self.fetcher = fetcher or Fetcher(layout.entries, Policy())
        self.report = report or Report()
        # Versioned sources are read like files: a part, CRC-32s cached (sources: whole, once).
        self._versioned = {i for i, e in enumerate(layout.entries) if e.source is not None and e.stable}
        if not whole:  # only the parts of the sources the range sends are fetched
            spans = {index: self._read_span(index) for index in self._versioned}
            self.fetcher.limit_to({index: span for index, span in spans.items() if span is not None})
        # Admitted by cold_work.reserve(): released once the cold work is done (or at close).
        self.reserved = False
        self._cold_pending: set[int] = set()  # entries whose CRC-32 needs reading without sending
        self._crcs: dict[int, int] | None = None  # entry index -> CRC-32, once looked up
        self._cached: dict[int, int] = {}  # what the cache said, until checked against data
        self._sent: dict[int, int] = {}  # CRC-32s that went out before their data was read here
        self._checkpoints: dict[int, list[Checkpoint]] = {}
        self._keys: dict[int, Key] = {}  # entry index -> its cache key, once made
        self._learnt: dict[Key, int] = {}  # computed here, not yet given to the cache
        self._progress: tuple[Key, RunningCrc] | None = None  # the file being read from its start
        self._pieces: Iterator[bytes | int] | None = None
        self._output: Iterator[bytes] | None = None

    def _chunks(self) -> Iterator[bytes]:
        self._pieces = self._generate()
        length = self.stop - self.start
        pieces = self._pieces if self.zero_copy is None else self.zero_copy.counted(self._pieces, length)
        return merged(pieces, self.chunk_size, length)

    def close(self) -> None:
        """Close the output, every file, every fetch and every source (read or not), keep what
        was learnt."""
        close_all([self._output, self._pieces, self.fetcher])
        self._cold_done()
        if self._progress is not None:  # cut inside a file: keep what was learnt of its head
            key, running = self._progress
            self._progress = None
            self.cold_work.keep_checkpoints(key, running.points)
        self._flush()

    # -- what the range needs ------------------------------------------------------------

    @functools.cached_property
    def _needed(self) -> list[int]:
        """The entries whose CRC-32 the range sends: in a descriptor, a local header (without
        descriptors) or a central record (worked out when first asked: never for a HEAD,
        whose body is not iterated). Each kind lies in order, so each is one run of entries,
        found by bisection. Entries without descriptors (all of a layout without them but
        for sources, which are only ever in the whole archive) hold it in their local header."""
        layout, start, stop = self.layout, self.start, self.stop
        if layout.data_descriptors:
            # Entry i's descriptor runs from descriptor_offsets[i] to offsets[i + 1] (or the directory).
            first = max(bisect.bisect_right(layout.offsets, start) - 1, 0)
            descriptors = range(first, bisect.bisect_left(layout.descriptor_offsets, stop))
        else:  # entry i's local header runs from offsets[i] to data_offsets[i]
            first = bisect.bisect_right(layout.data_offsets, start)
            descriptors = range(first, bisect.bisect_left(layout.offsets, stop))
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
                elif entry.file is not None or index in self._versioned:
                    keys[index] = self._key(index)
            if keys and self.crc_cache is not None:
                found = self.crc_cache.get_many(set(keys.values()))
                self._cached = {index: found[key] for index, key in keys.items() if key in found}
                self._crcs.update(self._cached)
                self.report.metrics.crc_lookups(len(self._cached), len(keys) - len(self._cached))
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

    def _header_first(self, index: int) -> bool:
        """Whether the range sends entry ``index``'s CRC-32 in its local header, before its data."""
        layout = self.layout
        return (
            not layout.has_descriptor(index)
            and self.start < layout.data_offsets[index]
            and self.stop > layout.offsets[index]
        )

    def _cold_start(self, index: int) -> int:
        """How far into entry ``index``'s file its CRC-32 needs reading without sending."""
        low = None if self._header_first(index) else self._reads_to_end(index)
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
                span = self._read_span(index)
                if span is not None and self._header_first(index):  # read twice, but all of it sent
                    cost = max(cost - (span[1] - span[0]), 0)
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
        self.fetcher.warm()
        try:
            yield from self._entries()
            if self.stop > self.layout.directory_offset:
                yield from self._directory()
        except StreamError as exc:
            # A client that went away is no error of the server's (and may be frequent).
            level = logging.INFO if isinstance(exc, ClientGoneError) else logging.ERROR
            whole = (self.start, self.stop) == (0, self.layout.length)
            what = "download" if whole else f"range {self.start}-{self.stop - 1}"
            logger.log(level, "%s aborted: %s", what, exc)
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
            if start < data:
                crc = self._crc(index) if entry.size and self._header_first(index) else 0
                yield self._window(offset, layout.local_header(index, crc))
            span = self._read_span(index)
            if entry.source is not None and index not in self._versioned:
                yield from self._source(index)  # the whole archive: read in full, CRC-32 on the way
            elif entry.size and span is not None:
                low, high = span
                crcs = self._look_up()
                cold = index in self._needed_set and index not in crcs
                # A file read whole checks its cached CRC-32 on the way. The zero-copy path, whose
                # point is not to read what it sends, does so only until this process has seen
                # the data give that value (so a forged row is still corrected once per process).
                trusted = index in crcs and self.cold_work.confirmed(self._seen(index), crcs[index])
                check = low == 0 and (self.zero_copy is None or entry.file is None or not trusted)
                if high == entry.size and (check or cold):
                    yield from self._read_learning(index, low)
                else:  # the CRC-32 is cached, or not needed here
                    yield from self._data(index, low, high)
                if high == entry.size:
                    self.report.entry(entry.arcname, DONE, high - low)
            if layout.has_descriptor(index) and start < layout.entry_end(index) and stop > descriptor:
                yield self._window(descriptor, layout.descriptor(index, self._crc(index)))
            self._flush(every=FLUSH_EVERY)

    def _source(self, index: int) -> Iterator[bytes]:
        """A source's data (only ever in the whole archive), its CRC-32 learnt on the way."""
        running = RunningCrc()
        yield from self._fetched(index, 0, running)
        self._look_up()[index] = running.crc
        attempts = self.fetcher.attempts_of(index)
        self.report.entry(self.layout.entries[index].arcname, DONE, running.offset, attempts)

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
            yield self._window(record_start, layout.central_record(index, crcs[index]))
        end = layout.directory_offset + layout.directory_size
        if self.stop > end:
            yield self._window(end, layout.end_records())

    # -- CRC-32s -----------------------------------------------------------------------

    def _key(self, index: int) -> Key:
        """What entry ``index``'s content is known by in the cache (a file or versioned source);
        made once per entry (a body asks for it as it looks up, learns and confirms)."""
        key = self._keys.get(index)
        if key is None:
            entry = self.layout.entries[index]
            if entry.file is not None:
                key = entry.file.key
            else:
                source = entry.source
                assert is_versioned(source)
                key = Key(storable_name(source.name), source.size, storable_name(source.version))
            self._keys[index] = key
        return key

    def _seen(self, index: int) -> Hashable:
        """What this process confirms a CRC-32 for (see ColdCrcWork.confirm): a file's very
        inode and ctime, which a rewrite that keeps its size and mtime (and so its key) still
        moves; a versioned source's key."""
        file = self.layout.entries[index].file
        return self._key(index) if file is None else file.identity

    def _reader(self, index: int) -> Callable[[int, int], Iterator[bytes]]:
        entry = self.layout.entries[index]
        file = entry.file
        if file is None:  # a versioned source
            return lambda low, high: self.fetcher.read(index, low, high)
        return lambda low, high: read_file(entry.arcname, file, self.chunk_size, low, high)

    def _crc(self, index: int) -> int:
        """Entry ``index``'s CRC-32, going out now: learnt without sending if need be."""
        crcs = self._look_up()
        if index not in crcs:
            entry = self.layout.entries[index]
            assert entry.size is not None
            start = self._best_checkpoint(index, entry.size)
            key = self._key(index)
            crcs[index] = self.cold_work.prefix(key, entry.size, self._reader(index), start, self.present)
            # Read from this very file (the store lacked it when this body looked it up).
            self.cold_work.confirm(self._seen(index), crcs[index])
            self._cold_done(index)
        self._sent.setdefault(index, crcs[index])
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
        assert entry.size is not None
        key = self._key(index)
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
        head = self.cold_work.prefix(self._key(index), low, self._reader(index), nearest, self.present)
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
        if entry.file is None:  # a versioned source: its part, fetched
            yield from self._fetched(index, low, running)
            return
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

    def _fetched(self, index: int, low: int, running: RunningCrc | None) -> Iterator[bytes]:
        """Entry ``index``'s source from ``low`` (a versioned one's part: to where the range
        stops), given to ``running`` on the way; a failure is reported and aborts."""
        entry = self.layout.entries[index]
        try:
            pieces = self.fetcher.begin(index)
        except EntryFailed as exc:  # a sized archive cannot leave an entry out
            self.report.entry(entry.arcname, FAILED, 0, exc.attempts, exc.reason)
            raise UpstreamError(str(exc)) from exc
        received = 0
        try:
            for piece in pieces:
                received += len(piece)
                if running is not None:
                    running.update(piece)
                yield piece
        except StreamError as exc:
            attempts = self.fetcher.attempts_of(index)
            self.report.entry(entry.arcname, FAILED, low + received, attempts, failure_reason(exc))
            raise

    def _learn(self, index: int, crc: int) -> None:
        """A CRC-32 computed from the data: it wins over the cache's."""
        entry = self.layout.entries[index]
        key = self._key(index)
        cached = self._cached.pop(index, None)
        self._look_up()[index] = crc
        self.cold_work.confirm(self._seen(index), crc)
        sent = self._sent.get(index, crc)
        if cached != crc:
            self._learnt[key] = crc
            if (entry.size or 0) >= CHECKPOINT_EVERY:  # a big file: worth a write of its own at once
                self._flush()
            if cached is not None:
                logger.error(
                    "CRC-32 cache: %r had %08x, its data gives %08x; corrected", entry.arcname, cached, crc
                )
        if sent != crc:  # a wrong cached value, or a file changed unseen between two reads
            raise StreamError(f"{entry.arcname!r}: a CRC-32 that its data does not give was already sent")

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
