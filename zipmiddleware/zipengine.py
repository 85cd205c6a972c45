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
"""

from __future__ import annotations

import logging
import os
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from typing import Any

from .errors import StreamError
from .planning import FileSnapshot, PlannedEntry, reopen

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

# stdlib's limit (2 GiB - 1) that zipstream-new compares sizes and offsets with.
ZIP64_LIMIT: int = zipfile.ZIP64_LIMIT
ZIP_FILECOUNT_LIMIT: int = zipfile.ZIP_FILECOUNT_LIMIT


class DeflateLevel(int):
    """``ZIP_DEFLATED`` that carries a compression level.

    zipstream-new builds every compressor with ``zlib.Z_DEFAULT_COMPRESSION``
    (level 6), from its module function ``_get_compressor(compress_type)``. The
    entry's ``compress_type`` reaches that function untouched, so an ``int``
    equal to ``ZIP_DEFLATED`` that also knows its level is enough: it packs into
    headers as 8, and the wrapped function below reads the level from it. Plain
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
            return zlib.compressobj(compress_type.level, zlib.DEFLATED, -15)
        return original(compress_type)

    get_compressor.honours_deflate_level = True  # type: ignore[attr-defined]
    zipstream._get_compressor = get_compressor


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
    lookup and type checks (measurable at 64 KiB chunks: see bench/).
    """

    __slots__ = ("position",)

    def __init__(self) -> None:
        self.position = 0

    def write(self, data: bytes) -> bytes:
        self.position += len(data)
        return data

    def tell(self) -> int:
        return self.position

    def flush(self) -> None:
        pass


class ZipStream:
    """A WSGI body: iterate for the archive's bytes; ``close()`` releases everything.

    Nothing is opened until iteration starts, so a HEAD request or a response
    that is never iterated reads no file data.
    """

    def __init__(
        self,
        entries: tuple[PlannedEntry, ...],
        *,
        chunk_size: int = 65536,
        compression_level: int = 0,
        zip64: bool = True,
    ) -> None:
        self.entries = entries
        self.chunk_size = chunk_size
        self.compression_level = compression_level
        self.zip64 = zip64
        self._readers: list[Iterator[bytes]] = []
        self._output: Iterator[bytes] | None = None

    def __iter__(self) -> Iterator[bytes]:
        if self._output is None:
            self._output = self._merged(self._archive())
        return self._output

    def _archive(self) -> Iterator[bytes]:
        archive = zipstream.ZipFile(Output(), mode="w", compression=zipfile.ZIP_STORED, allowZip64=self.zip64)
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

    def _merged(self, pieces: Iterator[bytes]) -> Iterator[bytes]:
        """Merge zipstream's small pieces into chunks of at least ``chunk_size``."""
        chunk_size = self.chunk_size
        buffer = bytearray()
        for piece in pieces:
            if buffer:
                buffer += piece
                if len(buffer) >= chunk_size:
                    yield bytes(buffer)
                    buffer.clear()
            elif len(piece) >= chunk_size:  # file data: passed on without a copy
                yield piece
            else:
                buffer += piece
        if buffer:
            yield bytes(buffer)

    def _reader(self, entry: PlannedEntry) -> Iterator[bytes]:
        if entry.file is not None:
            return read_file(entry.arcname, entry.file, self.chunk_size)
        assert entry.source is not None
        return read_source(entry.arcname, entry.source, entry.size)

    def close(self) -> None:
        """Close the output, every reader (and so every file) and every user iterable."""
        closables = [self._output, *self._readers, *(entry.source for entry in self.entries)]
        for closable in closables:
            close = getattr(closable, "close", None)
            if callable(close):
                try:
                    close()
                except Exception:  # keep closing the rest
                    logger.exception("error while closing a download")


def read_file(arcname: str, file: FileSnapshot, chunk_size: int) -> Iterator[bytes]:
    """Exactly ``file.size`` bytes of the checked file, or :class:`StreamError`.

    The file is reopened and must be the one that was checked (same device,
    inode, size and mtime); a file that is shorter or longer than that when
    read aborts the download rather than producing a damaged archive.
    """
    try:
        fd = reopen(file)
    except OSError as exc:
        raise StreamError(f"{arcname!r}: cannot be opened any more: {exc}") from exc
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        remaining = file.size
        while remaining:
            data = os.read(fd, min(chunk_size, remaining))
            if not data:
                raise StreamError(f"{arcname!r}: shorter than its {file.size} bytes")
            remaining -= len(data)
            yield data
        if os.read(fd, 1):
            raise StreamError(f"{arcname!r}: longer than its {file.size} bytes")
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
