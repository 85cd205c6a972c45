"""Target -> checked plan. Every file is found, confined, stat'ed and opened here,
before the first byte, so that any problem is still a proper HTTP error.
"""

from __future__ import annotations

import calendar
import fnmatch
import logging
import os
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from .config import Settings
from .errors import RefusedError
from .names import NameTable, display_name, safe_arcname
from .targets import FileTarget, PathTarget, StrPath, ZipEntry, ZipTarget

logger = logging.getLogger("zipmiddleware")

# The DOS date range of a ZIP header. Entry times are UTC, so that archives are
# identical whatever the server's time zone; outside the range they are clamped.
DOS_MIN = calendar.timegm((1980, 1, 1, 0, 0, 0))
DOS_MAX = calendar.timegm((2107, 12, 31, 23, 59, 58))
DateTime = tuple[int, int, int, int, int, int]

# O_NONBLOCK: opening a FIFO swapped in for a file must not hang the worker.
# O_NOFOLLOW: the path is already resolved; a symlink appearing now is a race.
OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)

NOT_FOUND = "Not Found: this download does not exist."
FORBIDDEN = "Forbidden: this download is not available."
SERVER_ERROR = "Internal Server Error: this download cannot be served right now."


def dos_date_time(mtime: float) -> DateTime:
    """A POSIX time as a ZIP date, in UTC, clamped to 1980-01-01 .. 2107-12-31."""
    t = time.gmtime(int(min(max(mtime, DOS_MIN), DOS_MAX)))
    return (t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec)


@dataclass(frozen=True)
class FileSnapshot:
    """A file as it was checked; reading it later must find the same file."""

    path: str  # real path, inside a root
    size: int
    mtime: float
    identity: tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns

    @classmethod
    def of(cls, path: str, st: os.stat_result) -> FileSnapshot:
        return cls(path, st.st_size, st.st_mtime, (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))


def reopen(file: FileSnapshot) -> int:
    """Open a checked file again: ``OSError`` unless it is still the very file that was checked."""
    fd = os.open(file.path, OPEN_FLAGS)
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != file.identity:
        os.close(fd)
        raise OSError(f"{file.path!r} changed since it was checked")
    return fd


@dataclass(frozen=True)
class FilePlan:
    file: FileSnapshot
    download_name: str
    mimetype: str | None = None


@dataclass(frozen=True)
class PlannedEntry:
    """One archive member: a checked file, or a source with an optional size."""

    arcname: str
    date_time: DateTime
    file: FileSnapshot | None = None
    source: Iterable[bytes] | None = None
    size: int | None = None


@dataclass(frozen=True)
class ZipPlan:
    entries: tuple[PlannedEntry, ...]
    download_name: str


Plan = FilePlan | ZipPlan


def close_sources(target: object) -> None:
    """Close the user iterables of a target that will not be streamed."""
    for entry in getattr(target, "entries", ()):
        close = getattr(entry.source, "close", None)
        if callable(close):
            close()


def is_inside(real: str, root: str) -> bool:
    """Whether the resolved path ``real`` is ``root`` or lies below it."""
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


class Planner:
    """Checks targets against one middleware's settings."""

    def __init__(self, settings: Settings) -> None:
        self.roots = settings.roots
        self.exclude = frozenset(name.casefold() for name in settings.exclude)
        self.ignore = tuple(pattern.casefold() for pattern in settings.ignore)

    # -- entry point -------------------------------------------------------------

    def plan(self, target: FileTarget | ZipTarget | PathTarget) -> Plan:
        if isinstance(target, ZipTarget) and target.directory is None:
            return ZipPlan(self.plan_entries(target.entries), target.download_name or "download.zip")
        path = target.directory if isinstance(target, ZipTarget) else target.path
        assert path is not None
        real = self.confine(path)
        if not isinstance(target, FileTarget) and os.path.isdir(real):
            return self.plan_directory(real, target.download_name)
        name = target.download_name or os.path.basename(os.fspath(path).rstrip(os.sep))
        mimetype = target.mimetype if isinstance(target, FileTarget) else None
        return FilePlan(self.snapshot(real), display_name(name), mimetype)

    # -- confinement and checks ----------------------------------------------------

    def confine(self, path: StrPath) -> str:
        """The real path of ``path``, refused unless it is inside a configured root."""
        if not self.roots:
            raise RefusedError(500, SERVER_ERROR, "no 'roots' configured: refusing to serve a path")
        path = os.fspath(path)
        if not os.path.isabs(path):  # relative paths are relative to the first root
            path = os.path.join(self.roots[0], path)
        real = os.path.realpath(path)
        if not self.inside_roots(real):
            raise RefusedError(403, FORBIDDEN, f"{path!r} resolves outside the roots to {real!r}")
        return real

    def inside_roots(self, real: str) -> bool:
        return any(is_inside(real, root) for root in self.roots)

    def check_file(self, path: StrPath) -> FileSnapshot:
        """Confine, open and fstat a file; the open proves it is readable now."""
        return self.snapshot(self.confine(path))

    @staticmethod
    def snapshot(real: str) -> FileSnapshot:
        """Open and fstat an already confined real path."""
        try:
            fd = os.open(real, OPEN_FLAGS)
        except (FileNotFoundError, NotADirectoryError):
            raise RefusedError(404, NOT_FOUND, f"{real!r} does not exist") from None
        except PermissionError:
            raise RefusedError(403, FORBIDDEN, f"{real!r} is not readable") from None
        except OSError as exc:
            raise RefusedError(500, SERVER_ERROR, f"{real!r} cannot be opened: {exc}") from None
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RefusedError(404, NOT_FOUND, f"{real!r} is not a regular file")
        return FileSnapshot.of(real, st)

    # -- explicit entries ------------------------------------------------------------

    def plan_entries(self, entries: Iterable[ZipEntry]) -> tuple[PlannedEntry, ...]:
        names = NameTable()
        planned = []
        for entry in entries:
            arcname = safe_arcname(entry.arcname)
            if not arcname:
                raise RefusedError(500, SERVER_ERROR, f"entry name {entry.arcname!r} is empty once made safe")
            arcname = names.add(arcname)
            if entry.path is not None:
                file = self.check_file(entry.path)
                mtime = file.mtime if entry.mtime is None else _timestamp(entry.mtime)
                planned.append(PlannedEntry(arcname, dos_date_time(mtime), file=file, size=file.size))
            else:
                source, size = entry.source, entry.size
                if isinstance(source, (bytes, bytearray, memoryview)):
                    source, size = (bytes(source),), len(source)
                assert source is not None
                mtime = DOS_MIN if entry.mtime is None else _timestamp(entry.mtime)
                planned.append(PlannedEntry(arcname, dos_date_time(mtime), source=source, size=size))
        return tuple(planned)

    # -- folders ---------------------------------------------------------------------

    def plan_directory(self, real: str, download_name: str | None) -> Plan:
        found = self.walk(real)
        if not found:
            raise RefusedError(404, NOT_FOUND, f"{real!r} holds no file to download")
        if len(found) == 1:  # one file: send it as it is, under its own name
            rel, file = found[0]
            return FilePlan(file, display_name(os.path.basename(rel)))
        names = NameTable()
        entries = tuple(
            PlannedEntry(names.add(safe_arcname(rel)), dos_date_time(file.mtime), file=file, size=file.size)
            for rel, file in found
        )
        return ZipPlan(entries, download_name or display_name(os.path.basename(real)) + ".zip")

    def walk(self, top: str) -> list[tuple[str, FileSnapshot]]:
        """Files under ``top`` sorted by relative path, after exclude/ignore and confinement.

        Symlinks are followed only where they resolve inside a root; others are
        skipped and logged. A folder reached twice (a symlink loop) is walked once.
        """
        found: list[tuple[str, FileSnapshot]] = []
        seen = {top}
        pending = [(top, "")]
        while pending:
            folder, prefix = pending.pop()
            try:
                with os.scandir(folder) as scan:
                    children = list(scan)
            except PermissionError:
                raise RefusedError(403, FORBIDDEN, f"folder {folder!r} is not readable") from None
            except OSError as exc:
                raise RefusedError(500, SERVER_ERROR, f"folder {folder!r} cannot be listed: {exc}") from None
            for child in children:
                rel = prefix + child.name
                # ``folder`` is a real path, so only a symlink child needs resolving.
                real = os.path.realpath(child.path) if child.is_symlink() else child.path
                if child.is_dir():
                    if child.name.casefold() in self.exclude:
                        continue
                    if not self.inside_roots(real):
                        logger.warning("skipping folder %r: it resolves outside the roots", child.path)
                    elif real in seen:
                        logger.warning("skipping folder %r: already walked (symlink loop?)", child.path)
                    else:
                        seen.add(real)
                        pending.append((real, rel + "/"))
                elif child.is_file():
                    if self.ignored(child.name):
                        continue
                    if not self.inside_roots(real):
                        logger.warning("skipping file %r: it resolves outside the roots", child.path)
                        continue
                    try:
                        found.append((rel, self.snapshot(real)))
                    except RefusedError as exc:
                        if exc.status != 404:
                            raise
                        logger.info("skipping file %r: it vanished during the walk", child.path)
                else:
                    logger.info("skipping %r: not a regular file or folder", child.path)
        found.sort(key=lambda item: item[0])
        return found

    def ignored(self, name: str) -> bool:
        folded = name.casefold()
        return any(fnmatch.fnmatchcase(folded, pattern) for pattern in self.ignore)


def _timestamp(value: float | datetime) -> float:
    if isinstance(value, datetime):
        if value.tzinfo is None:  # naive datetimes are taken as UTC, never as local time
            value = value.replace(tzinfo=UTC)
        return value.timestamp()
    return float(value)
