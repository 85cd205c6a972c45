"""Target -> checked plan. Every file is found, confined, stat'ed and opened here,
before the first byte, so that any problem is still a proper HTTP error.
"""

from __future__ import annotations

import calendar
import errno
import fnmatch
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from .config import Settings
from .confinement import Opened, OutsideRootsError, WrongKindError, open_inside
from .errors import RefusedError
from .names import NameTable, display_name, safe_arcname
from .targets import FileTarget, PathTarget, StrPath, ZipEntry, ZipTarget

logger = logging.getLogger("zipmiddleware")

# The DOS date range of a ZIP header. Entry times are UTC, so that archives are
# identical whatever the server's time zone; outside the range they are clamped.
DOS_MIN = calendar.timegm((1980, 1, 1, 0, 0, 0))
DOS_MAX = calendar.timegm((2107, 12, 31, 23, 59, 58))
DateTime = tuple[int, int, int, int, int, int]

# Folders walked at once per process (others wait): a walk of 50,000 files takes a few seconds
# of CPU (under the GIL: more at once is not faster) and tens of MB until its plan is dropped.
WALKS_AT_ONCE = 2

# Where a file that was confined once may be reopened: anywhere, since ``reopen`` then
# demands the very inode (device and inode number) that was found inside a root.
ANYWHERE = (os.sep,)

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
    # st_dev, st_ino, st_size, st_ctime_ns: the file's content as far as caches and ETags know.
    # The ctime, not the mtime: a rewrite that sets the mtime back (rsync --inplace --times,
    # cp -p over the file, touch -r) still moves the ctime, which nothing can set back.
    identity: tuple[int, int, int, int]
    mtime_ns: int = 0
    links: int = 1

    @classmethod
    def of(cls, path: str, st: os.stat_result) -> FileSnapshot:
        identity = (st.st_dev, st.st_ino, st.st_size, st.st_ctime_ns)
        return cls(path, st.st_size, st.st_mtime, identity, st.st_mtime_ns, st.st_nlink)

    def same(self, st: os.stat_result) -> bool:
        """Whether ``st`` (a reopened file's) is this very file, unchanged since it was checked."""
        return (st.st_dev, st.st_ino, st.st_size, st.st_ctime_ns) == self.identity

    def unchanged(self, st: os.stat_result) -> bool:
        """Whether ``st`` (an fstat of this file, taken after reading) shows the same content.

        Size and mtime catch ordinary writes, the ctime one that set the mtime back. Unlinking
        the file, when a new version is renamed over it, moves the ctime too but leaves this
        inode's data as they were: a ctime that moved with the link count is no change of
        content. (A chmod, chown or rename of the file while it is sent aborts it too.)
        """
        if (st.st_size, st.st_mtime_ns) != (self.size, self.mtime_ns):
            return False
        return st.st_ctime_ns == self.identity[3] or st.st_nlink != self.links


def reopen(file: FileSnapshot) -> int:
    """Open a checked file again: ``OSError`` unless it is still the very file that was checked.

    The snapshot's device and inode were read from a descriptor proven to lie inside a
    root (see :mod:`.confinement`); whatever the path leads to now, only that inode, with
    the same size and mtime, is accepted.
    """
    opened = open_inside(file.path, ANYWHERE, folder=False)
    st = opened.st
    if not file.same(st):
        os.close(opened.fd)
        raise OSError(f"{file.path!r} changed since it was checked")
    return opened.fd


@dataclass(frozen=True)
class FilePlan:
    file: FileSnapshot
    download_name: str
    mimetype: str | None = None
    # The descriptor the file was checked through, handed to the response (which closes it):
    # nothing can be swapped between the check and the read. None: the response reopens it.
    opened: int | None = field(default=None, compare=False, repr=False)


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
    # What responses derive from the entries (layout, validators), computed once per plan:
    # concurrent requests for the same folder share the plan, and so these too.
    derived: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)

    def memo(self, name: str, compute: Callable[[], Any]) -> Any:
        with self.lock:
            if name not in self.derived:
                self.derived[name] = compute()
            return self.derived[name]


Plan = FilePlan | ZipPlan


def close_sources(target: object) -> None:
    """Close the user iterables of a target that will not be streamed."""
    for entry in getattr(target, "entries", ()):
        close = getattr(entry.source, "close", None)
        if callable(close):
            close()


T = TypeVar("T")


class _Call(Generic[T]):
    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: T | None = None
        self.error: BaseException | None = None


class SharedWork(Generic[T]):
    """Concurrent calls with the same key share one computation, its result or its error.

    A folder of 50,000 files takes seconds to walk and tens of MB to hold; sixteen
    requests for it at once must not walk it sixteen times.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[Hashable, _Call[T]] = {}

    def run(self, key: Hashable, compute: Callable[[], T]) -> T:
        with self._lock:
            call = self._running.get(key)
            leader = call is None
            if call is None:
                call = self._running[key] = _Call()
        if not leader:
            call.done.wait()
            if call.error is not None:
                raise call.error
            return call.result  # type: ignore[return-value]
        try:
            call.result = compute()
            return call.result
        except BaseException as exc:
            call.error = exc
            raise
        finally:
            with self._lock:
                del self._running[key]
            call.done.set()


def refusal(exc: OSError, what: str) -> RefusedError:
    """The HTTP answer to a file or folder that cannot be opened inside the roots."""
    if isinstance(exc, OutsideRootsError):
        # 404, like a path that does not exist: a 403 would tell any client which paths exist
        # outside the roots (/etc/shadow: 403, /etc/no-such-file: 404).
        return RefusedError(404, NOT_FOUND, f"{what} resolves outside the roots ({exc})")
    if isinstance(exc, (WrongKindError, FileNotFoundError, NotADirectoryError)) or exc.errno == errno.ELOOP:
        return RefusedError(404, NOT_FOUND, f"{what} is not a file or folder to serve ({exc})")
    if isinstance(exc, PermissionError):
        return RefusedError(403, FORBIDDEN, f"{what} is not readable")
    return RefusedError(500, SERVER_ERROR, f"{what} cannot be opened: {exc}")


class Planner:
    """Checks targets against one middleware's settings.

    Every file and folder is opened first and judged by where its descriptor really lies
    (:func:`.confinement.open_inside`), never by a path checked beforehand.
    """

    def __init__(self, settings: Settings) -> None:
        self.roots = settings.roots
        self.exclude = frozenset(name.casefold() for name in settings.exclude)
        self.ignore = tuple(pattern.casefold() for pattern in settings.ignore)
        self.shared: SharedWork[Plan] = SharedWork()
        self.walks = threading.BoundedSemaphore(WALKS_AT_ONCE)

    # -- entry point -------------------------------------------------------------

    def plan(self, target: FileTarget | ZipTarget | PathTarget, roots: tuple[str, ...] | None = None) -> Plan:
        """Check ``target``; ``roots`` narrows the middleware's roots (a resolver's own root)."""
        roots = roots or self.roots
        if isinstance(target, ZipTarget) and target.directory is None:
            return ZipPlan(self.plan_entries(target.entries, roots), target.download_name or "download.zip")
        given = target.directory if isinstance(target, ZipTarget) else target.path
        assert given is not None
        path = self.absolute(given, roots)
        only_file = isinstance(target, FileTarget)
        mimetype = target.mimetype if isinstance(target, FileTarget) else None
        name = target.download_name or os.path.basename(path.rstrip(os.sep))
        opened = self.open(path, roots, folder=False if only_file else None)
        if not stat.S_ISDIR(opened.st.st_mode):  # a file: nothing to share; the response reads it
            return FilePlan(FileSnapshot.of(opened.real, opened.st), display_name(name), mimetype, opened.fd)
        try:
            # Keyed by what was opened, not by how its path is spelled ("x", "./x", "x/."):
            # concurrent requests for one folder share one walk whatever they asked for.
            key = (opened.st.st_dev, opened.st.st_ino, target.download_name, roots)
            return self.shared.run(key, lambda: self.plan_directory(opened, target.download_name, roots))
        finally:
            os.close(opened.fd)

    @staticmethod
    def absolute(path: StrPath, roots: tuple[str, ...]) -> str:
        """Relative paths are relative to the first root."""
        if not roots:
            raise RefusedError(500, SERVER_ERROR, "no 'roots' configured: refusing to serve a path")
        path = os.fspath(path)
        return path if os.path.isabs(path) else os.path.join(roots[0], path)

    # -- confinement and checks ----------------------------------------------------

    @staticmethod
    def open(path: str, roots: tuple[str, ...], folder: bool | None = False) -> Opened:
        """Open ``path`` inside ``roots``, or the :class:`RefusedError` that answers the request."""
        try:
            return open_inside(path, roots, folder=folder)
        except ValueError:  # a NUL byte in the path
            raise RefusedError(404, NOT_FOUND, f"{path!r} is not a valid path") from None
        except OSError as exc:
            raise refusal(exc, repr(path)) from None

    def check_file(self, path: StrPath, roots: tuple[str, ...] | None = None) -> FileSnapshot:
        """Open and fstat a file inside the roots; the open proves it is readable now."""
        roots = roots or self.roots
        opened = self.open(self.absolute(path, roots), roots)
        os.close(opened.fd)
        return FileSnapshot.of(opened.real, opened.st)

    # -- explicit entries ------------------------------------------------------------

    def plan_entries(self, entries: Iterable[ZipEntry], roots: tuple[str, ...]) -> tuple[PlannedEntry, ...]:
        names = NameTable()
        planned = []
        for entry in entries:
            arcname = safe_arcname(entry.arcname)
            if not arcname:
                raise RefusedError(500, SERVER_ERROR, f"entry name {entry.arcname!r} is empty once made safe")
            arcname = names.add(arcname)
            if entry.path is not None:
                file = self.check_file(entry.path, roots)
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

    def plan_directory(self, top: Opened, download_name: str | None, roots: tuple[str, ...]) -> Plan:
        with self.walks:  # a few at a time: each holds a whole folder's list in memory
            found = self.walk(top, roots)
        if not found:
            raise RefusedError(404, NOT_FOUND, f"{top.real!r} holds no file to download")
        if len(found) == 1:  # one file: send it as it is, under its own name
            rel, file = found[0]
            return FilePlan(file, display_name(os.path.basename(rel)))
        names = NameTable()
        entries = tuple(
            PlannedEntry(names.add(safe_arcname(rel)), dos_date_time(file.mtime), file=file, size=file.size)
            for rel, file in found
        )
        return ZipPlan(entries, download_name or display_name(os.path.basename(top.real)) + ".zip")

    def walk(self, top: Opened, roots: tuple[str, ...]) -> list[tuple[str, FileSnapshot]]:
        """Files under the open folder ``top`` sorted by relative path, after exclude/ignore.

        Folders are listed through their descriptors. An entry that is no symlink is judged
        by its ``fstatat`` relative to that descriptor (it lies in a folder already proven to
        be inside a root, so it is too); a symlink is opened and judged by where it really
        leads: followed only where it resolves inside a root. A folder reached twice (a
        symlink loop) is walked once. Anything that cannot be served (a link outside or in a
        loop, a dangling link, a FIFO, socket or device, an unreadable subfolder) is skipped
        and logged; only an unreadable file or an unreadable ``top`` refuses the download.
        """
        walk = _Walk(self, roots, top)
        folder: tuple[int, str, str] | None = (top.fd, top.real, "")
        while True:
            if folder is not None:
                fd, real, prefix = folder
                try:
                    walk.list(fd, real, prefix)
                finally:
                    if fd != top.fd:
                        os.close(fd)
            if not walk.pending:
                break
            real, st, prefix = walk.pending.pop()
            folder = self.reopen_folder(real, st, roots, prefix)
        walk.found.sort(key=lambda item: item[0])
        return walk.found

    @staticmethod
    def reopen_folder(
        real: str, st: os.stat_result, roots: tuple[str, ...], prefix: str
    ) -> tuple[int, str, str] | None:
        """A queued subfolder's descriptor and real path, if it is still the folder that was found."""
        try:
            opened = open_inside(real, roots, folder=True)
        except OSError as exc:
            _log_skipped(prefix, exc)
            return None
        if (opened.st.st_dev, opened.st.st_ino) != (st.st_dev, st.st_ino):
            os.close(opened.fd)
            logger.warning("skipping folder %r: it was replaced during the walk", prefix)
            return None
        return opened.fd, opened.real, prefix

    def ignored(self, name: str) -> bool:
        folded = name.casefold()
        return any(fnmatch.fnmatchcase(folded, pattern) for pattern in self.ignore)


class _Walk:
    """What one walk has found so far, and the judging of one folder's entries."""

    def __init__(self, planner: Planner, roots: tuple[str, ...], top: Opened) -> None:
        self.planner, self.roots, self.top = planner, roots, top
        self.found: list[tuple[str, FileSnapshot]] = []
        self.seen = {(top.st.st_dev, top.st.st_ino)}
        self.pending: list[tuple[str, os.stat_result, str]] = []  # (real path, its stat, prefix)

    def list(self, fd: int, real: str, prefix: str) -> None:
        try:
            with os.scandir(fd) as scan:
                children = list(scan)
        except OSError as exc:
            if fd == self.top.fd:
                raise refusal(exc, f"folder {self.top.real!r}") from None
            logger.warning("skipping folder %r: it cannot be listed (%s)", prefix, exc)
            return
        for child in children:
            try:
                self.visit(child, fd, real, prefix)
            except OSError as exc:
                if isinstance(exc, PermissionError) and _is_file(child):
                    raise self.unreadable(prefix + child.name) from None
                _log_skipped(prefix + child.name, exc)

    def visit(self, child: os.DirEntry[str], fd: int, folder: str, prefix: str) -> None:
        """Queue a subfolder, record a file, or skip and log one folder entry (OSError: skip it)."""
        name, rel = child.name, prefix + child.name
        if child.is_symlink():  # follow it, and judge by where it leads
            opened = open_inside(name, self.roots, folder=None, dir_fd=fd)
            os.close(opened.fd)
            st, real = opened.st, opened.real
        else:  # fstatat: no symlink is followed, so it lies in ``folder``, inside a root
            st, real = child.stat(follow_symlinks=False), os.path.join(folder, name)
        if stat.S_ISDIR(st.st_mode):
            if name.casefold() in self.planner.exclude:
                return
            if (st.st_dev, st.st_ino) in self.seen:
                logger.warning("skipping folder %r: already walked (symlink loop?)", rel)
                return
            self.seen.add((st.st_dev, st.st_ino))
            self.pending.append((real, st, rel + "/"))
        elif not stat.S_ISREG(st.st_mode):
            logger.info("skipping %r: not a regular file or folder", rel)
        elif not self.planner.ignored(name):
            # Readable now, as a single file's open proves it (a symlink was opened above).
            readable = child.is_symlink() or os.access(
                name, os.R_OK, dir_fd=fd, effective_ids=True, follow_symlinks=False
            )
            if not readable:
                raise self.unreadable(rel)
            self.found.append((rel, FileSnapshot.of(real, st)))

    @staticmethod
    def unreadable(rel: str) -> RefusedError:
        # A file the archive should hold but cannot: refuse the download rather than send
        # one that silently lacks it (an unreadable subfolder is only skipped).
        return refusal(PermissionError(errno.EACCES, "not readable"), repr(rel))


def _is_file(child: os.DirEntry[str]) -> bool:
    try:
        return child.is_file()
    except OSError:
        return False


def _log_skipped(rel: str, exc: OSError) -> None:
    """Why a folder entry is left out of an archive, at the level it deserves."""
    if isinstance(exc, OutsideRootsError):
        logger.warning("skipping %r: it resolves outside the roots", rel)
    elif isinstance(exc, WrongKindError):
        logger.info("skipping %r: not a regular file or folder", rel)
    elif isinstance(exc, FileNotFoundError):
        logger.info("skipping %r: it vanished during the walk, or is a dangling link", rel)
    elif exc.errno == errno.ELOOP:
        logger.warning("skipping %r: a symlink loop", rel)
    elif isinstance(exc, PermissionError):
        logger.warning("skipping %r: not readable", rel)
    else:
        logger.warning("skipping %r: %s", rel, exc)


def _timestamp(value: float | datetime) -> float:
    if isinstance(value, datetime):
        if value.tzinfo is None:  # naive datetimes are taken as UTC, never as local time
            value = value.replace(tzinfo=UTC)
        return value.timestamp()
    return float(value)
