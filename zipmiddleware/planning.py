"""Target -> checked plan. Every file is found, confined, stat'ed and opened here,
before the first byte, so that any problem is still a proper HTTP error.
"""

from __future__ import annotations

import errno
import fnmatch
import logging
import os
import re
import stat
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from .closing import close_all
from .config import Settings
from .confinement import Opened, OutsideRootsError, WrongKindError, is_inside, open_inside
from .crccache import Key, storable_name
from .errors import RefusedError
from .names import NameTable, display_name, plain_names, safe_arcname
from .sources import RestartableSource, VersionedSource, is_restartable, is_versioned
from .targets import FileTarget, PathTarget, SourceTarget, StrPath, ZipEntry, ZipTarget
from .zipformat import DOS_MAX, DOS_MIN

logger = logging.getLogger("zipmiddleware")

# Folders walked at once per process (others wait): a walk of 50,000 files takes a few seconds
# of CPU (under the GIL: more at once is not faster) and tens of MB until its plan is dropped.
WALKS_AT_ONCE = 2

# Where a file that was confined once may be reopened: anywhere, since ``reopen`` then
# demands the very inode (device and inode number) that was found inside a root.
ANYWHERE = (os.sep,)

# A folder's plan is kept for later requests (see PlanCache) only if every folder, file and
# symlink target it saw had a ctime older than the walk's start minus this margin. A change
# made after the walk looked at something must move its ctime, or the cached plan would
# never learn of it; but the kernel stamps times from a clock that ticks coarsely (a jiffy,
# up to 10 ms, behind the clock read here), some file systems keep only whole seconds
# (ext3, HFS+) or two (FAT), and a network file system stamps with its server's clock. So
# a ctime within 3 s of the walk could be shared by a change made just after it ("racy
# git"), and such a plan is not kept: 3 s covers FAT's 2 s plus a tick and a second of
# clock skew. The cost is small: a folder changed in the last 3 s is walked once more.
RACY_MARGIN_NS = 3_000_000_000

# How a cached plan's folders are opened to be checked: by their real path, never through a
# symlink (a folder replaced by one no longer matches), not for reading (O_PATH where there
# is one: the check only stats).
_CHECK_FOLDER = (getattr(os, "O_PATH", 0) or os.O_RDONLY) | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

NOT_FOUND = "Not Found: this download does not exist."
FORBIDDEN = "Forbidden: this download is not available."
SERVER_ERROR = "Internal Server Error: this download cannot be served right now."
UPSTREAM_FAILED = "Bad Gateway: a file of this download could not be fetched from where it is kept."


def zip_second(mtime: float) -> int:
    """A POSIX time as an entry's date: whole seconds, clamped to the DOS range 1980-01-01 ..
    2107-12-31 (its DOS fields are that moment in UTC, its extended timestamp the same)."""
    return int(min(max(mtime, DOS_MIN), DOS_MAX))


def is_executable(mode: int) -> bool:
    """Whether a file's owner may execute it: its entry then gets 0755, else 0644 (archives
    carry no owners, so the owner's bit says what the file is: a program, a script)."""
    return bool(mode & stat.S_IXUSR)


@dataclass(frozen=True, slots=True)
class FileSnapshot:
    """A file as it was checked; reading it later must find the same file.

    Lean, since a plan holds one per file and the plan cache keeps plans: the real path is
    kept in two parts, a folder string shared by many files and the rest (for a walk, the very
    string that is the file's relative path and most often its entry name); the size only in
    ``identity``, the mtime only in nanoseconds (``mtime`` gives the float ``st_mtime`` gave).
    """

    folder: str  # a real folder, inside a root, ending with a separator
    name: str  # the file's path from there (its name, or its path below the walked folder)
    # st_dev, st_ino, st_size, st_ctime_ns: the file's content as far as caches and ETags know.
    # The ctime, not the mtime: a rewrite that sets the mtime back (rsync --inplace --times,
    # cp -p over the file, touch -r) still moves the ctime, which nothing can set back.
    identity: tuple[int, int, int, int]
    mtime_ns: int = 0
    links: int = 1
    # Its owner may execute it: its entry gets mode 0755, else 0644. A chmod
    # moves the ctime, so the identity (and with it the reopen check) follows.
    executable: bool = False
    # Where the file's name for other hosts starts in its path: after the folder that holds
    # its root (see :attr:`key`).
    base: int = 0

    @classmethod
    def of(cls, path: str, st: os.stat_result, base: int = 0) -> FileSnapshot:
        cut = path.rfind(os.sep) + 1
        identity = (st.st_dev, st.st_ino, st.st_size, st.st_ctime_ns)
        executable = is_executable(st.st_mode)
        return cls(path[:cut], path[cut:], identity, st.st_mtime_ns, st.st_nlink, executable, base)

    @property
    def key(self) -> Key:
        """What this file's content is known by on every host with a copy of it (in the CRC-32
        store, and for the validators): its path from its root's name on ("games/doom/x.wad"
        for /srv/games/doom/x.wad under the root /srv/games), its size and mtime in ns. Never
        the device, inode or ctime, which differ between copies."""
        return Key(storable_name(self.path[self.base :]), self.identity[2], str(self.mtime_ns))

    @property
    def size(self) -> int:
        return self.identity[2]

    @property
    def path(self) -> str:
        """The real path, inside a root."""
        return self.folder + self.name

    @property
    def mtime(self) -> float:
        """The mtime in seconds, the very float of ``os.stat_result.st_mtime``."""
        seconds, nanoseconds = divmod(self.mtime_ns, 1_000_000_000)
        return seconds + nanoseconds * 1e-9  # as CPython computes it from the timespec

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


def key_base(real: str, roots: Iterable[str]) -> int:
    """Where a file's name for other hosts starts in its real path ``real`` (see
    :attr:`FileSnapshot.key`): after the folder holding the innermost root it lies in."""
    root = max((root for root in roots if is_inside(real, root)), key=len, default=os.sep)
    return len(os.path.join(os.path.dirname(root.rstrip(os.sep)), "")) if root != os.sep else 0


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


@dataclass(frozen=True, slots=True)
class FilePlan:
    file: FileSnapshot
    download_name: str
    mimetype: str | None = None
    # The descriptor the file was checked through, handed to the response (which closes it):
    # nothing can be swapped between the check and the read. None: the response reopens it.
    opened: int | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class SourcePlan:
    """One versioned source (an object kept elsewhere) to send as it is."""

    source: VersionedSource
    download_name: str
    mimetype: str | None = None


@dataclass(frozen=True, slots=True)
class PlannedEntry:
    """One archive member: a checked file, or a source with an optional size."""

    arcname: str
    mtime: int  # whole seconds in the DOS range (see zip_second)
    file: FileSnapshot | None = None
    source: Iterable[bytes] | RestartableSource | None = None
    size: int | None = None
    # Whether the bytes are decided before any of them is read: a file, or a versioned source
    # (see sources.py) of its own size. An archive of such entries has validators and ranges;
    # one with any other source is written once, from start to end.
    stable: bool = field(init=False, compare=False)

    def __post_init__(self) -> None:
        source = self.source
        stable = source is None or (is_versioned(source) and self.size == source.size)
        object.__setattr__(self, "stable", stable)


@dataclass(frozen=True, slots=True)
class ZipPlan:
    entries: tuple[PlannedEntry, ...]
    download_name: str
    # What responses derive from the entries (layout, validators), computed once per plan:
    # concurrent requests for the same folder share the plan, later ones find it in the
    # PlanCache while it is valid, and so these come along.
    derived: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)

    def memo(self, name: str, compute: Callable[[], Any]) -> Any:
        with self.lock:
            if name not in self.derived:
                self.derived[name] = compute()
            return self.derived[name]


Plan = FilePlan | ZipPlan | SourcePlan


def close_sources(target: object) -> None:
    """Close the sources of a target or plan that will not be streamed (an archive's entries',
    a SourceTarget's own)."""
    sources = [entry.source for entry in getattr(target, "entries", ())]
    close_all([*sources, getattr(target, "source", None)], "a source")


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


# -- the plan cache ------------------------------------------------------------------------

# What a symlink led to when it was walked: (real path, device, inode, size, mtime_ns,
# ctime_ns, mode) of what it resolved to inside a root, or (error class, errno) if it was
# skipped (outside the roots, dangling, a loop, a device ...).
LinkOutcome = tuple[Any, ...]


def link_outcome(name: str, roots: tuple[str, ...], fd: int) -> LinkOutcome:
    """Where the symlink ``name`` in the folder open on ``fd`` leads now, confined as a walk does."""
    try:
        opened = open_inside(name, roots, folder=None, dir_fd=fd)
    except OSError as exc:
        return _failure(exc)
    os.close(opened.fd)
    return _target(opened)


def _target(opened: Opened) -> LinkOutcome:
    st = opened.st
    return (opened.real, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode)


def _failure(exc: OSError) -> LinkOutcome:
    return (type(exc).__name__, exc.errno)


class Folder:
    """A folder as a walk listed it, and what a cached plan's check needs of it.

    ``stamp`` is its (device, inode, mtime_ns, ctime_ns), read from its descriptor before it
    was listed: adding, removing or renaming an entry moves the mtime. ``files`` are the files
    found directly in it (not through a symlink), whose names start at ``cut`` in their
    snapshots; ``links`` are its symlinks and what each led to.
    """

    __slots__ = ("real", "stamp", "cut", "files", "links")

    def __init__(self, real: str, st: os.stat_result, cut: int = 0) -> None:
        self.real = real
        self.stamp = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
        self.cut = cut  # where a file's name starts in its FileSnapshot.name
        self.files: list[FileSnapshot] = []
        self.links: list[tuple[str, LinkOutcome]] = []

    def unchanged(self, roots: tuple[str, ...]) -> bool:
        """Whether this folder, its files and its symlinks are still as the walk found them.

        Each is stat'ed again, the files relative to the folder's descriptor; no name is
        judged again, since nothing was added, removed or renamed (the folder's mtime) and
        every later read demands the very inode that was found (see :func:`reopen`). Only
        symlinks are resolved and confined again: what one leads to may change while the link
        and its folder do not.
        """
        try:
            fd = os.open(self.real, _CHECK_FOLDER)
        except OSError:
            return False
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns) != self.stamp:
                return False
            cut, lstat = self.cut, os.lstat
            for file in self.files:
                st = lstat(file.name[cut:], dir_fd=fd)
                dev, ino, size, ctime_ns = file.identity
                if (
                    st.st_ctime_ns != ctime_ns
                    or st.st_mtime_ns != file.mtime_ns
                    or st.st_ino != ino
                    or st.st_size != size
                    or st.st_dev != dev
                ):
                    return False
            return all(link_outcome(name, roots, fd) == outcome for name, outcome in self.links)
        except OSError:
            return False
        finally:
            os.close(fd)


class FreshCheck:
    """Runs a check for concurrent callers, sharing only a run that starts after they call.

    A caller never takes the answer of a check already under way (it may have looked at a
    file before the caller's change was made): it waits for the next run, which all callers
    that came meanwhile share. Sixteen requests at once cost two checks, not sixteen.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards _next
        self._running = threading.Lock()  # one run at a time
        self._next: _Call[bool] | None = None

    def run(self, check: Callable[[], bool]) -> bool:
        with self._lock:
            call = self._next
            leader = call is None
            if call is None:
                call = self._next = _Call()
        if leader:
            with self._running:
                with self._lock:
                    self._next = None  # whoever comes from now on waits for the next run
                try:
                    call.result = check()
                except BaseException as exc:
                    call.error = exc
                finally:
                    call.done.set()
        else:
            call.done.wait()
        if call.error is not None:
            raise call.error
        return bool(call.result)


class CachedPlan:
    """A folder's plan, the folders its walk listed (the top first), and its size in entries."""

    __slots__ = ("plan", "folders", "cost", "checks")

    def __init__(self, plan: Plan, folders: tuple[Folder, ...], cost: int) -> None:
        self.plan, self.folders, self.cost = plan, folders, cost
        self.checks = FreshCheck()

    def still_valid(self, top: os.stat_result, roots: tuple[str, ...]) -> bool:
        """Whether a walk now would find what this plan's walk found (``top``: the folder's
        fstat, just taken by the request)."""
        if (top.st_dev, top.st_ino, top.st_mtime_ns, top.st_ctime_ns) != self.folders[0].stamp:
            return False
        return self.checks.run(lambda: all(folder.unchanged(roots) for folder in self.folders))


class PlanCache:
    """Plans of folders by key, least recently used first out, at most ``limit`` entries in all
    (a plan costs one entry per file and per folder it lists); ``limit`` 0 keeps nothing.

    Per process: a child made by ``fork`` (a gunicorn worker) starts empty, with new locks,
    since a plan made by its parent may have judged readability as another user.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._reset()
        _caches.add(self)

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._plans: OrderedDict[Hashable, CachedPlan] = OrderedDict()
        self.size = 0

    def _here(self) -> None:
        if self._pid != os.getpid():  # forked without Python's fork hooks (see _after_fork)
            self._reset()

    def __len__(self) -> int:
        return len(self._plans)

    def get(self, key: Hashable) -> CachedPlan | None:
        if not self.limit:
            return None
        self._here()
        with self._lock:
            cached = self._plans.get(key)
            if cached is not None:
                self._plans.move_to_end(key)
            return cached

    def put(self, key: Hashable, cached: CachedPlan) -> None:
        if cached.cost > self.limit:
            return
        self._here()
        with self._lock:
            old = self._plans.pop(key, None)
            if old is not None:
                self.size -= old.cost
            self._plans[key] = cached
            self.size += cached.cost
            while self.size > self.limit:
                _, evicted = self._plans.popitem(last=False)
                self.size -= evicted.cost

    def drop(self, key: Hashable, cached: CachedPlan) -> None:
        """Forget ``cached`` (found stale), unless another plan has replaced it meanwhile."""
        self._here()
        with self._lock:
            if self._plans.get(key) is cached:
                del self._plans[key]
                self.size -= cached.cost

    def clear(self) -> None:
        with self._lock:
            self._plans.clear()
            self.size = 0


_caches: weakref.WeakSet[PlanCache] = weakref.WeakSet()


def _after_fork() -> None:
    for cache in list(_caches):
        cache._reset()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


# -- entry names and dates of a walk -------------------------------------------------------


# Paths checked at once by arcnames: few enough that one name to change sends few plain ones the
# slower way with it, many enough that the cost of each check is spread thin.
PLAIN_CHUNK = 32


def _utf8(name: str) -> bool:
    """Whether a name from disk was valid UTF-8 (else ``safe_arcname`` decodes its whole path)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _safe_folder(folder: str) -> str | None:
    """The safe form of a folder's relative path, or None if its names must be made safe
    whole (a name that is not UTF-8 is decoded with the rest of its path)."""
    return safe_arcname(folder) if _utf8(folder) else None


def _safe_names(rels: list[str], folders: dict[str, str | None], blank: Callable[[str], str]) -> list[str]:
    """``safe_arcname(rel) or blank(rel)`` for each path: each folder made safe once (in ``folders``),
    a plain file name kept, any other made safe within its folder's safe form (or with its whole
    path, if either is not UTF-8)."""
    split = [rel.rpartition("/") for rel in rels]
    all_plain = plain_names([leaf for _, _, leaf in split])  # most often: only folders change
    names = []
    for rel, (folder, _, leaf) in zip(rels, split, strict=True):
        safe = folders.get(folder, "")
        if folder not in folders:
            safe = folders[folder] = _safe_folder(folder)
        # A plain file name has no ":", so no drive letter.
        if safe is not None and (all_plain or plain_names([leaf])):
            names.append((rel if safe == folder else f"{safe}/{leaf}") if safe else leaf)  # "/a" too
        elif safe is not None and _utf8(leaf):
            names.append(safe_arcname(leaf, within=safe) or blank(rel))
        else:
            names.append(safe_arcname(rel) or blank(rel))
    return names


def _underscore(rel: str) -> str:
    return "_"  # a file found in a folder has a name: one that was only a drive ("C:") is "_"


def arcnames(rels: Iterable[str], blank: Callable[[str], str] = _underscore) -> list[str]:
    """``NameTable().add(safe_arcname(rel) or blank(rel))`` for each path in turn, computed faster
    (``blank`` may raise instead).

    Most names are plain (no rule changes them), and most folders have no clash (the same name
    ignoring case and normalization, a file named as a folder). So paths are checked
    PLAIN_CHUNK at a time by a few scans in C (:func:`.names.plain_names`) and kept as they are
    if plain; in a chunk that is not, each path is checked alone and made safe if need be, with
    each folder made safe once. The keys that clashes
    are found by are computed a chunk at a time too, and the name table is used only if some
    clash needs renaming.
    """
    rels = list(rels)
    folders: dict[str, str | None] = {}  # made safe: None if the whole path must be
    names: list[str] = []
    files: set[str] = set()  # their NameTable keys
    for start in range(0, len(rels), PLAIN_CHUNK):
        chunk = rels[start : start + PLAIN_CHUNK]
        folder = chunk[0].rpartition("/")[0]
        # (in a folder known to change, no use checking the chunk whole)
        if folders.get(folder, folder) != folder or not plain_names(chunk):
            chunk = _safe_names(chunk, folders, blank)
        names += chunk
        files.update(NameTable.keys(chunk))
    if len(files) == len(names):
        dirs: set[str] = set()
        for folder in {name.rpartition("/")[0] for name in names}:
            parts = NameTable.key(folder).split("/") if folder else []
            dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
        if files.isdisjoint(dirs):
            return names
    table = NameTable()
    return [table.add(name) for name in names]


class Rules:
    """The ``exclude`` and ``ignore`` settings: what an archive of a folder leaves out (also
    of a folder that is not on disk: see :mod:`.s3`)."""

    def __init__(self, exclude: Iterable[str], ignore: Iterable[str]) -> None:
        self.exclude = frozenset(name.casefold() for name in exclude)
        globs = [pattern.casefold() for pattern in ignore]
        # One expression for every pattern: a name is matched once, not once per pattern.
        pattern = "|".join(f"(?:{fnmatch.translate(glob)})" for glob in globs)
        self._ignored = re.compile(pattern).match if globs else None

    def ignored(self, name: str) -> bool:
        """Whether a file called ``name`` is left out."""
        return self._ignored is not None and self._ignored(name.casefold()) is not None

    def excluded(self, name: str) -> bool:
        """Whether a folder called ``name`` is left out, with all it holds."""
        return name.casefold() in self.exclude


class Planner:
    """Checks targets against one middleware's settings.

    Every file and folder is opened first and judged by where its descriptor really lies
    (:func:`.confinement.open_inside`), never by a path checked beforehand.

    A folder's plan is kept in :attr:`cache` and used again, for as long as a cheap check
    finds the folder unchanged (see :class:`CachedPlan`); the resolver still runs for every
    request, and the folder it names is still opened and confined each time.
    """

    def __init__(self, settings: Settings) -> None:
        self.roots = settings.roots
        self.rules = Rules(settings.exclude, settings.ignore)
        self.shared: SharedWork[Plan] = SharedWork()
        self.walks = threading.BoundedSemaphore(WALKS_AT_ONCE)
        self.cache = PlanCache(settings.plan_cache_entries)

    # -- entry point -------------------------------------------------------------

    def plan(
        self, target: FileTarget | SourceTarget | ZipTarget | PathTarget, roots: tuple[str, ...] | None = None
    ) -> Plan:
        """Check ``target``; ``roots`` narrows the middleware's roots (a resolver's own root)."""
        roots = roots or self.roots
        if isinstance(target, SourceTarget):
            source = target.source
            if not is_versioned(source):
                problem = "a SourceTarget needs a versioned source: see sources.py"
                raise RefusedError(500, SERVER_ERROR, problem)
            name = target.download_name or source.name.rstrip("/").rpartition("/")[2] or "download"
            return SourcePlan(source, display_name(name), target.mimetype)
        if isinstance(target, ZipTarget) and target.directory is None:
            return ZipPlan(self.plan_entries(target.entries, roots), target.download_name or "download.zip")
        given = target.directory if isinstance(target, ZipTarget) else target.path
        assert given is not None
        path = self.absolute(given, roots)
        only_file = isinstance(target, FileTarget)
        mimetype = target.mimetype if isinstance(target, FileTarget) else None
        name = target.download_name or os.path.basename(path.rstrip(os.sep))
        started = time.time_ns()  # before anything is looked at: see RACY_MARGIN_NS
        opened = self.open(path, roots, folder=False if only_file else None)
        if not stat.S_ISDIR(opened.st.st_mode):  # a file: nothing to share; the response reads it
            file = FileSnapshot.of(opened.real, opened.st, key_base(opened.real, roots))
            return FilePlan(file, display_name(name), mimetype, opened.fd)
        try:
            # Keyed by what was opened, not by how its path is spelled ("x", "./x", "x/."):
            # concurrent requests for one folder share one walk whatever they asked for, and
            # later ones its cached plan. With everything else that decides the plan (exclude
            # and ignore are this planner's own, as is its cache).
            key = (opened.st.st_dev, opened.st.st_ino, opened.real, target.download_name, roots)
            cached = self.cached(key, opened.st, roots)
            if cached is not None:
                return cached
            return self.shared.run(
                key, lambda: self.plan_directory(opened, target.download_name, roots, key, started)
            )
        finally:
            os.close(opened.fd)

    def cached(self, key: Hashable, top: os.stat_result, roots: tuple[str, ...]) -> Plan | None:
        """The cached plan of the folder ``key`` names if it is still valid, else None."""
        cached = self.cache.get(key)
        if cached is None:
            return None
        if cached.still_valid(top, roots):
            return cached.plan
        self.cache.drop(key, cached)
        return None

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
        return FileSnapshot.of(opened.real, opened.st, key_base(opened.real, roots))

    # -- explicit entries ------------------------------------------------------------

    def plan_entries(self, entries: Iterable[ZipEntry], roots: tuple[str, ...]) -> tuple[PlannedEntry, ...]:
        entries = list(entries)

        def blank(arcname: str) -> str:
            raise RefusedError(500, SERVER_ERROR, f"entry name {arcname!r} is empty once made safe")

        names = arcnames([entry.arcname for entry in entries], blank)
        planned = []
        for arcname, entry in zip(names, entries, strict=True):
            if entry.path is not None:
                file = self.check_file(entry.path, roots)
                mtime = file.mtime if entry.mtime is None else _timestamp(entry.mtime)
                planned.append(PlannedEntry(arcname, zip_second(mtime), file=file, size=file.size))
            else:
                source, size, date = entry.source, entry.size, entry.mtime
                if isinstance(source, (bytes, bytearray, memoryview)):
                    source, size = (bytes(source),), len(source)
                assert source is not None
                # A restartable source (see sources.py) may know its own size and date.
                restartable = is_restartable(source)
                known_size = getattr(source, "size", None) if restartable else None
                known_date = getattr(source, "mtime", None) if restartable else None
                if size is None and isinstance(known_size, int):
                    size = known_size
                if date is None and isinstance(known_date, (int, float, datetime)):
                    date = known_date
                mtime = DOS_MIN if date is None else _timestamp(date)
                planned.append(PlannedEntry(arcname, zip_second(mtime), source=source, size=size))
        return tuple(planned)

    # -- folders ---------------------------------------------------------------------

    def plan_directory(
        self,
        top: Opened,
        download_name: str | None,
        roots: tuple[str, ...],
        key: Hashable | None = None,
        started: int | None = None,
    ) -> Plan:
        """Walk the open folder ``top`` and plan it; with a ``key``, keep the plan in the cache
        if nothing it saw changed within RACY_MARGIN_NS of ``started`` (time.time_ns())."""
        with self.walks:  # a few at a time: each holds a whole folder's list in memory
            walk = self.walk(top, roots)
        found = walk.found
        if not found:
            raise RefusedError(404, NOT_FOUND, f"{top.real!r} holds no file to download")
        plan: Plan
        if len(found) == 1:  # one file: send it as it is, under its own name
            rel, file = found[0]
            plan = FilePlan(file, display_name(os.path.basename(rel)))
        else:
            seconds: dict[int, int] = {}  # one int object per second, shared by the entries
            entries = []
            for arcname, (_, file) in zip(arcnames([rel for rel, _ in found]), found, strict=True):
                second = zip_second(file.mtime)
                second = seconds.setdefault(second, second)
                entries.append(PlannedEntry(arcname, second, file, None, file.size))
            name = download_name or display_name(os.path.basename(top.real)) + ".zip"
            plan = ZipPlan(tuple(entries), name)
        fresh = started is not None and walk.newest >= started - RACY_MARGIN_NS
        if key is not None and self.cache.limit and walk.cacheable and not fresh:
            folders = tuple(walk.folders)
            self.cache.put(key, CachedPlan(plan, folders, len(found) + len(folders)))
        return plan

    def walk(self, top: Opened, roots: tuple[str, ...]) -> _Walk:
        """Files under the open folder ``top`` sorted by relative path, after exclude/ignore
        (``found``), and what was listed to find them (``folders``).

        Folders are listed through their descriptors. An entry that is no symlink is judged
        by its ``fstatat`` relative to that descriptor (it lies in a folder already proven to
        be inside a root, so it is too); a symlink is opened and judged by where it really
        leads: followed only where it resolves inside a root. A folder reached twice (a
        symlink loop) is walked once. Anything that cannot be served (a link outside or in a
        loop, a dangling link, a FIFO, socket or device, an unreadable subfolder) is skipped
        and logged; only an unreadable file or an unreadable ``top`` refuses the download.
        """
        walk = _Walk(self, roots, top)
        folder: tuple[int, str, str, os.stat_result] | None = (top.fd, top.real, "", top.st)
        while True:
            if folder is None:
                walk.cacheable = False  # a subfolder skipped for a reason no check would see
            else:
                fd, real, prefix, st = folder
                try:
                    walk.list(fd, real, prefix, st)
                finally:
                    if fd != top.fd:
                        os.close(fd)
            if not walk.pending:
                break
            real, st, prefix = walk.pending.pop()
            folder = self.reopen_folder(real, st, roots, prefix)
        walk.found.sort(key=lambda item: item[0])
        return walk

    @staticmethod
    def reopen_folder(
        real: str, st: os.stat_result, roots: tuple[str, ...], prefix: str
    ) -> tuple[int, str, str, os.stat_result] | None:
        """A queued subfolder's descriptor, real path, prefix and fstat, if it is still the
        folder that was found."""
        try:
            opened = open_inside(real, roots, folder=True)
        except OSError as exc:
            _log_skipped(prefix, exc)
            return None
        if (opened.st.st_dev, opened.st.st_ino) != (st.st_dev, st.st_ino):
            os.close(opened.fd)
            logger.warning("skipping folder %r: it was replaced during the walk", prefix)
            return None
        return opened.fd, opened.real, prefix, opened.st


class _Walk:
    """What one walk has found so far, and the judging of one folder's entries.

    Besides the files, it keeps what a cached plan's check needs (``folders``), the newest
    ctime it saw (``newest``), and whether anything was skipped for a reason that a check
    would not see again (``cacheable`` False: such a plan is not kept).
    """

    def __init__(self, planner: Planner, roots: tuple[str, ...], top: Opened) -> None:
        self.planner, self.roots, self.top = planner, roots, top
        self.found: list[tuple[str, FileSnapshot]] = []
        self.seen = {(top.st.st_dev, top.st.st_ino)}
        self.pending: list[tuple[str, os.stat_result, str]] = []  # (real path, its stat, prefix)
        self.folders: list[Folder] = []
        self.folder = Folder(top.real, top.st)  # the one being listed
        self.newest = 0
        self.cacheable = True
        self.ints: dict[int, int] = {}  # one int object per value, shared by the snapshots
        self.base = os.path.join(top.real, "")
        self.key_base = key_base(top.real, roots)  # of every file found below the top, but through links

    def list(self, fd: int, real: str, prefix: str, st: os.stat_result) -> None:
        try:
            with os.scandir(fd) as scan:
                children = list(scan)
        except OSError as exc:
            if fd == self.top.fd:
                raise refusal(exc, f"folder {self.top.real!r}") from None
            logger.warning("skipping folder %r: it cannot be listed (%s)", prefix, exc)
            self.cacheable = False
            return
        base = os.path.join(real, "")
        # Reached from the top without a symlink: its files' snapshots keep the top's path and
        # their relative paths (the strings that are also their entry names), not their names.
        plain = base == self.base + prefix
        self.folder = Folder(real, st, len(prefix) if plain else 0)
        self.folders.append(self.folder)
        self.newest = max(self.newest, st.st_ctime_ns)
        for child in children:
            try:
                self.visit(child, fd, base, prefix, plain)
            except OSError as exc:
                if isinstance(exc, PermissionError) and _is_file(child):
                    raise self.unreadable(prefix + child.name) from None
                if not _is_link(child):  # a symlink's failure is noted in ``links``, and checked
                    self.cacheable = False
                _log_skipped(prefix + child.name, exc)

    def follow(self, name: str, fd: int) -> Opened:
        """Open what the symlink ``name`` leads to inside a root, noting the outcome."""
        try:
            opened = open_inside(name, self.roots, folder=None, dir_fd=fd)
        except OSError as exc:
            self.folder.links.append((name, _failure(exc)))
            raise
        os.close(opened.fd)
        self.folder.links.append((name, _target(opened)))
        self.newest = max(self.newest, opened.st.st_ctime_ns)
        return opened

    def visit(self, child: os.DirEntry[str], fd: int, base: str, prefix: str, plain: bool) -> None:
        """Queue a subfolder, record a file, or skip and log one folder entry (OSError: skip it).

        ``base`` is the real path of the folder listed on ``fd``, ending with a separator;
        ``prefix`` its path from the top; ``plain`` whether ``base`` is the top's plus ``prefix``."""
        name = child.name
        rel = prefix + name
        if child.is_symlink():  # follow it, and judge by where it leads
            opened = self.follow(name, fd)
            st, real = opened.st, opened.real
        else:  # fstatat: no symlink is followed, so it lies in the folder, inside a root
            st, real = child.stat(follow_symlinks=False), None
        if stat.S_ISDIR(st.st_mode):
            if self.planner.rules.excluded(name):
                return
            if (st.st_dev, st.st_ino) in self.seen:
                logger.warning("skipping folder %r: already walked (symlink loop?)", rel)
                return
            self.seen.add((st.st_dev, st.st_ino))
            self.pending.append((base + name if real is None else real, st, rel + "/"))
        elif not stat.S_ISREG(st.st_mode):
            logger.info("skipping %r: not a regular file or folder", rel)
        elif not self.planner.rules.ignored(name):
            if real is not None:  # through a symlink, opened above: readable
                file = FileSnapshot.of(real, st, key_base(real, self.roots))
            elif os.access(name, os.R_OK, dir_fd=fd, effective_ids=True, follow_symlinks=False):
                # Shared by many files: the folder's path (the top's, where it is plain), and
                # one int object per value of the device, size and times (files written in bulk
                # share their times: a clock tick stamps many).
                ints = self.ints
                ctime_ns = ints.setdefault(st.st_ctime_ns, st.st_ctime_ns)
                identity = (
                    ints.setdefault(st.st_dev, st.st_dev),
                    st.st_ino,
                    ints.setdefault(st.st_size, st.st_size),
                    ctime_ns,
                )
                folder, rest = (self.base, rel) if plain else (base, name)
                mtime_ns = ints.setdefault(st.st_mtime_ns, st.st_mtime_ns)
                executable = is_executable(st.st_mode)
                file = FileSnapshot(folder, rest, identity, mtime_ns, st.st_nlink, executable, self.key_base)
                self.folder.files.append(file)
            else:  # readable now, as a single file's open proves it
                raise self.unreadable(rel)
            self.found.append((rel, file))
            if file.identity[3] > self.newest:
                self.newest = file.identity[3]

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


def _is_link(child: os.DirEntry[str]) -> bool:
    try:
        return child.is_symlink()
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
