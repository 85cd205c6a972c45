"""Opening files so that what was opened is provably inside a root, even under races.

A path checked as a string and then opened by path can be swapped in between: rename a
folder inside a root for a symlink to ``/etc`` at the right moment and the open follows
it. ``O_NOFOLLOW`` guards only the last component. So nothing here trusts a path: a file
or folder is opened first, and then the *descriptor* is asked where it really lies
(``/proc/self/fd/N`` on Linux, ``F_GETPATH`` on macOS). The answer is the kernel's, for
the very inode that will be read, so a swap before, during or after the open cannot
change it.

On Linux the first open is ``O_PATH``: it follows symlinks but opens nothing for reading,
so a symlink swapped to a device file (``/dev/watchdog``, a tape) never has its driver's
``open`` run. Only once the descriptor is known to be a regular file or folder inside a
root is it reopened for reading, through its own ``/proc`` link, which reaches the same
inode whatever happens to the path meanwhile.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import sys
from dataclasses import dataclass

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger("zipmiddleware")

# O_NONBLOCK: should a FIFO ever get this far, opening it must not hang the worker.
READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
O_PATH: int = getattr(os, "O_PATH", 0)
PROC_FD = "/proc/self/fd"
HAS_PROC_FD = sys.platform.startswith("linux") and os.path.isdir(PROC_FD)
F_GETPATH: int | None = getattr(fcntl, "F_GETPATH", None)


class OutsideRootsError(OSError):
    """What was opened lies outside every root (or cannot be located at all)."""


class WrongKindError(OSError):
    """What was opened is not the kind asked for (a folder, a device, a FIFO ...)."""


@dataclass(frozen=True)
class Opened:
    """An open, readable descriptor, where it really lies, and its ``fstat``."""

    fd: int
    real: str
    st: os.stat_result


def is_inside(real: str, root: str) -> bool:
    """Whether the resolved path ``real`` is ``root`` or lies below it."""
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def descriptor_path(fd: int) -> str | None:
    """Where the file open on ``fd`` lies now, as the kernel knows it; None if it cannot tell."""
    if HAS_PROC_FD:
        try:
            return os.readlink(f"{PROC_FD}/{fd}")
        except OSError:
            return None
    if F_GETPATH is not None:  # macOS
        try:
            found = fcntl.fcntl(fd, F_GETPATH, bytes(1024))
        except OSError:
            return None
        return os.fsdecode(found.rstrip(b"\0"))
    return None


_warned_unverifiable = False


def _warn_unverifiable() -> None:
    global _warned_unverifiable  # once per process: the platform cannot change
    if not _warned_unverifiable:
        _warned_unverifiable = True
        logger.warning(
            "this platform cannot tell where an open file lies (no /proc/self/fd, no F_GETPATH): "
            "files are confined to the roots by their resolved path, which a symlink swapped in "
            "at the right moment can defeat"
        )


def open_inside(
    path: str, roots: tuple[str, ...], *, folder: bool | None = False, dir_fd: int | None = None
) -> Opened:
    """Open ``path`` (symlinks followed) for reading; it must lie inside one of ``roots``.

    ``folder`` True asks for a directory, False for a regular file, None for either. ``dir_fd`` makes a
    relative ``path`` relative to that folder. Raises ``OutsideRootsError`` or
    ``WrongKindError`` (both ``OSError``), or the ``OSError`` of the open itself
    (``ENOENT``, ``EACCES``, ``ELOOP`` for a symlink loop ...). Never a descriptor of a
    device, FIFO or socket is opened for reading.
    """
    if O_PATH and HAS_PROC_FD:
        probe = os.open(path, O_PATH | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            st = os.fstat(probe)
            real = _check(probe, st, roots, folder)
            directory = os.O_DIRECTORY if stat.S_ISDIR(st.st_mode) else 0
            fd = os.open(f"{PROC_FD}/{probe}", READ_FLAGS | directory)
        finally:
            os.close(probe)
        return _same_inode(fd, real, st)
    # No O_PATH: look before opening, so that a device is at least never opened by its name.
    kind = os.stat(path, dir_fd=dir_fd).st_mode
    if not (stat.S_ISREG(kind) or stat.S_ISDIR(kind)):
        raise WrongKindError(errno.EINVAL, "not a regular file or folder", path)
    fd = os.open(path, READ_FLAGS | (os.O_DIRECTORY if stat.S_ISDIR(kind) else 0), dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        real = _check(fd, st, roots, folder, path if dir_fd is None else None)
    except BaseException:
        os.close(fd)
        raise
    return Opened(fd, real, st)


def _check(
    fd: int, st: os.stat_result, roots: tuple[str, ...], folder: bool | None, path: str | None = None
) -> str:
    """The descriptor's real path, after checking its kind and that it lies inside a root."""
    is_folder, is_file = stat.S_ISDIR(st.st_mode), stat.S_ISREG(st.st_mode)
    if folder is True and not is_folder:
        raise WrongKindError(errno.ENOTDIR, "not a folder", path)
    if folder is False and not is_file:
        raise WrongKindError(errno.EINVAL, "not a regular file", path)
    if not (is_folder or is_file):
        raise WrongKindError(errno.EINVAL, "not a regular file or folder", path)
    real = descriptor_path(fd)
    if real is None:
        if path is None:
            raise OutsideRootsError(errno.EPERM, "cannot tell where an open file lies")
        _warn_unverifiable()
        real = os.path.realpath(path)
    # A deleted file still has a descriptor, but no place inside a root (its /proc link
    # reads "PATH (deleted)", which a real name could imitate: ask the link count).
    if st.st_nlink == 0 or not any(is_inside(real, root) for root in roots):
        raise OutsideRootsError(errno.EPERM, "outside the roots", real)
    return real


def _same_inode(fd: int, real: str, st: os.stat_result) -> Opened:
    """The reopened descriptor must be the inode that was checked (it always is, through /proc)."""
    reopened = os.fstat(fd)
    if (reopened.st_dev, reopened.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise OutsideRootsError(errno.EPERM, "changed while being opened", real)
    return Opened(fd, real, reopened)
