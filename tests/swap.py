"""Swap two paths back and forth, atomically and as fast as possible, in a separate process.

A symlink-swap race: a folder (or file) inside a root and a symlink to something
outside every root trade places with ``renameat2(RENAME_EXCHANGE)``, so that at
no instant is either name missing. A server that checks a path as a string and
then opens it by name again may open the outside one; a server that resolves and
opens every component itself cannot.

    with Swapper(root / "d", root / "d-swap") as swapper:
        ...  # request paths through root/d
    assert swapper.swaps > 1000

Run as a script (``python swap.py A B``) it is the swapping process itself: it
prints ``ready`` after its first exchange, exchanges until SIGTERM, puts A and B
back where they started and prints how many exchanges it made.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import subprocess
import sys
from types import TracebackType
from typing import Self

AT_FDCWD = -100
RENAME_EXCHANGE = 2  # <linux/fs.h>


def _renameat2() -> ctypes._CFuncPtr:  # type: ignore[name-defined]
    """glibc's ``renameat2`` (2.28 and later); AttributeError where the C library lacks it."""
    function = ctypes.CDLL(None, use_errno=True).renameat2
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def exchange(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> None:
    """Atomically exchange the directory entries ``a`` and ``b`` (any types, symlinks not followed)."""
    if _renameat2()(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"renameat2(RENAME_EXCHANGE): {os.strerror(code)}", os.fspath(a))


def exchange_unsupported(folder: str | os.PathLike[str]) -> str | None:
    """Why ``exchange`` cannot work in ``folder`` (no renameat2, or a file system without
    RENAME_EXCHANGE), or None when it does: it is tried on two scratch files."""
    a, b = os.path.join(folder, ".swap-probe-a"), os.path.join(folder, ".swap-probe-b")
    try:
        with open(a, "wb") as file:
            file.write(b"a")
        os.symlink("nowhere", b)
        try:
            exchange(a, b)
            if not (os.path.islink(a) and os.path.isfile(b)):
                return "renameat2(RENAME_EXCHANGE) did not exchange the two names"
        except AttributeError:
            return "the C library has no renameat2 (glibc 2.28 or later needed)"
        except OSError as exc:
            if exc.errno in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                return f"renameat2(RENAME_EXCHANGE) is not supported here: {exc}"
            raise
        return None
    finally:
        for path in (a, b):
            if os.path.lexists(path):
                os.unlink(path)


class Swapper:
    """A process exchanging ``a`` and ``b`` in a tight loop for the duration of a ``with`` block.

    A process of its own, not a thread: it must not wait for the test's GIL, and
    it keeps one CPU busy swapping while the server and the clients share the rest.
    On leaving the block both names are back where they started and ``swaps`` holds
    how many exchanges were made.
    """

    def __init__(self, a: str | os.PathLike[str], b: str | os.PathLike[str]) -> None:
        self.a, self.b = os.fspath(a), os.fspath(b)
        self.swaps = 0
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), self.a, self.b],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self.process.stdout is not None
        if self.process.stdout.readline() != b"ready\n":
            _, err = self.process.communicate(timeout=10)
            raise RuntimeError(f"the swapper did not start: {err.decode(errors='replace')}")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        process = self.process
        if process is None:
            return
        self.process = None
        process.send_signal(signal.SIGTERM)
        try:
            out, err = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise
        if process.returncode != 0:
            raise RuntimeError(f"the swapper failed ({process.returncode}): {err.decode(errors='replace')}")
        self.swaps = int(out.split()[-1])


def _swap_until_terminated(a: str, b: str) -> int:
    """The swapping process: exchange ``a`` and ``b`` until SIGTERM; an even count leaves them as found."""
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    renameat2 = _renameat2()
    old, new = os.fsencode(a), os.fsencode(b)
    exchange(a, b)
    swaps = 1
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while not stopping:
        for _ in range(1000):
            if renameat2(AT_FDCWD, old, AT_FDCWD, new, RENAME_EXCHANGE) != 0:
                code = ctypes.get_errno()
                raise OSError(code, f"renameat2(RENAME_EXCHANGE): {os.strerror(code)}", a)
        swaps += 1000
    if swaps % 2:
        exchange(a, b)
        swaps += 1
    return swaps


if __name__ == "__main__":
    print(_swap_until_terminated(sys.argv[1], sys.argv[2]))
