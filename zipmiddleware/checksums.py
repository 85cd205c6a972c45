"""CRC-32 work that a range request does without sending it: shared, bounded, abandoned
when nobody waits for it any more.

A range of a stored ZIP needs the CRC-32 of every entry whose data descriptor or
central record it holds. What the cache lacks must be computed by reading files,
which may cost far more than the range sends (the last 100 bytes of a 2 GiB archive
need the CRC-32 of its last file). Left alone, that is a lever for an attacker:
ask for 100 bytes, make the server read gigabytes, hang up, repeat in parallel.
So here, per process:

- requests that need the same CRC-32 at the same time share one computation;
- at most ``concurrency`` computations run at once (the rest wait their turn), and at
  most ``MAX_TAKING_PART`` requests with much cold work are admitted at once
  (:meth:`ColdCrcWork.reserve`: the middleware sends the others the whole archive
  instead), so cold work cannot starve the requests that send data;
- a computation stops as soon as no request waiting for it still has its client
  (checked every few MiB), and what it learnt so far is kept as checkpoints, so the
  next attempt starts from there.

The middleware also refuses, per request, cold work above ``cold_range_limit``
(see responses.py): such a range gets the whole archive instead.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
from collections.abc import Callable, Hashable, Iterable
from typing import Any

from .compression import crc32
from .connection import client_socket
from .crccache import CHECKPOINT_EVERY, Checkpoint, CrcCache, Key
from .errors import StreamError
from .types import WSGIEnvironment

logger = logging.getLogger("zipmiddleware")

# How often a waiting or computing request looks whether its client is still there: one
# poll(2) each time, so often enough that an abandoned computation reads little more.
POLL_SECONDS = 0.05
LOOK_EVERY = 1024 * 1024  # bytes read between two looks: what an abandoned computation costs
# Requests of one process that may take part in cold work at once (computing or waiting for
# it). Each holds a request thread meanwhile; beyond this, a range needing more than one
# checkpoint interval of cold work is answered with the whole archive rather than wait, so
# cold work ties up few threads (honest resumes, which need less, always wait their turn).
MAX_TAKING_PART = 4


class ClientGoneError(StreamError):
    """The client went away while its request waited for (or did) cold CRC-32 work."""


Present = Callable[[], bool]

# Where a door that knows whether its client is still there puts a Present for the request.
PRESENCE_KEY = "zipmiddleware.present"


def always_present() -> bool:
    return True


def client_presence(environ: WSGIEnvironment) -> Present:
    """Whether the request's client is still connected, asked without sending anything.

    Servers that hand the application the connection (gunicorn's sync and gthread
    workers: ``gunicorn.socket``; werkzeug's dev server: ``werkzeug.socket``) let us
    look: a closed connection polls readable and reads as end of file (or fails),
    while a live one has nothing to read or holds a pipelined request. Elsewhere the
    client is taken as present; the per-request limit still bounds the work. A door that
    learns of a departure its own way (the ASGI one) says so under :data:`PRESENCE_KEY`.
    """
    told = environ.get(PRESENCE_KEY)
    if callable(told):
        return told  # type: ignore[no-any-return]
    sock = client_socket(environ)
    if sock is None:
        return always_present
    poller = select.poll()
    try:
        poller.register(sock.fileno(), select.POLLIN | select.POLLPRI)
    except (OSError, ValueError):
        return always_present

    def present() -> bool:
        try:
            events = poller.poll(0)
        except (OSError, ValueError):
            return False
        if not events:
            return True
        if events[0][1] & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
            return False
        try:
            # The TCP socket's own recv: an SSLSocket refuses flags, and what matters is
            # whether the connection has ended (EOF), not what its next TLS record holds.
            return bool(socket.socket.recv(sock, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except BlockingIOError:
            return True
        except OSError:
            return False
        except Exception:  # anything else: take the client as present, never fail its request
            return True

    return present


class RunningCrc:
    """The CRC-32 of a file's bytes from offset 0 (or from ``start``) up to ``offset``.

    It notes a checkpoint at every multiple of CHECKPOINT_EVERY it passes, exactly there
    (a piece that crosses one is split), so that checkpoints lie on one grid: a file keeps at
    most one per 16 MiB, whatever ranges are asked for. Started at ``(low, 0)`` it holds the
    CRC-32 of ``[low, offset)`` instead, whose points are no checkpoints (see ``points``' use).
    """

    __slots__ = ("offset", "crc", "points")

    def __init__(self, start: Checkpoint = (0, 0)) -> None:
        self.offset, self.crc = start
        self.points: list[Checkpoint] = []

    def update(self, piece: bytes | bytearray | memoryview) -> None:
        offset, crc, end = self.offset, self.crc, self.offset + len(piece)
        boundary = (offset // CHECKPOINT_EVERY + 1) * CHECKPOINT_EVERY
        if boundary <= end:
            view, done = memoryview(piece), 0
            while boundary <= end:
                crc = crc32(view[done : boundary - offset], crc)
                done = boundary - offset
                self.points.append((boundary, crc))
                boundary += CHECKPOINT_EVERY
            crc = crc32(view[done:], crc)
        else:
            crc = crc32(piece, crc)
        self.offset, self.crc = end, crc


def _gf2_times(matrix: list[int], vector: int) -> int:
    total = 0
    row = 0
    while vector:
        if vector & 1:
            total ^= matrix[row]
        vector >>= 1
        row += 1
    return total


def crc32_combine(crc1: int, crc2: int, length2: int) -> int:
    """The CRC-32 of A + B from those of A and B and B's length (zlib's crc32_combine)."""
    if length2 <= 0:
        return crc1
    odd = [0xEDB88320] + [1 << n for n in range(31)]  # the operator for one zero bit
    even = [_gf2_times(odd, row) for row in odd]  # two zero bits
    odd = [_gf2_times(even, row) for row in even]  # four zero bits
    while length2:  # apply len2 zero bytes to crc1, one bit of length at a time
        even = [_gf2_times(odd, row) for row in odd]
        if length2 & 1:
            crc1 = _gf2_times(even, crc1)
        length2 >>= 1
        if not length2:
            break
        odd = [_gf2_times(even, row) for row in even]
        if length2 & 1:
            crc1 = _gf2_times(odd, crc1)
        length2 >>= 1
    return crc1 ^ crc2


class _Job:
    def __init__(self) -> None:
        self.waiters = 1
        self.done = threading.Event()
        self.result: int | None = None
        self.error: BaseException | None = None


# About 100 bytes each: at most ~10 MB per process.
MAX_CONFIRMED = 100_000


class ColdCrcWork:
    """Per-process registry of cold CRC-32 computations (see the module's docstring)."""

    def __init__(
        self, crc_cache: CrcCache | None, concurrency: int = 1, max_taking_part: int = MAX_TAKING_PART
    ) -> None:
        self.crc_cache = crc_cache
        self.max_taking_part = max_taking_part
        self.taking_part = 0  # admitted requests whose cold work is not done yet
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(concurrency)
        self._jobs: dict[tuple[Key, int], _Job] = {}
        # Whole-file CRC-32s this process computed from the data (hash of the key -> CRC-32):
        # a cached value that agrees may be sent without reading the file (the zero-copy path).
        self._confirmed: dict[int, int] = {}

    def confirm(self, key: Hashable, crc: int) -> None:
        """The data of file ``key`` gave ``crc``. Bounded: forgotten all at once when full."""
        if len(self._confirmed) >= MAX_CONFIRMED:
            self._confirmed.clear()  # each is then confirmed again, by one more read
        self._confirmed[hash(key)] = crc

    def confirmed(self, key: Hashable, crc: int) -> bool:
        """Whether this process has seen the data of file ``key`` give ``crc``."""
        return self._confirmed.get(hash(key)) == crc

    def prefix(
        self,
        key: Key,
        stop: int,
        read: Callable[[int, int], Iterable[bytes]],
        start: Checkpoint = (0, 0),
        present: Present = always_present,
    ) -> int:
        """The CRC-32 of bytes ``[0, stop)`` of the file ``key``, reading ``[start[0], stop)``
        with ``read(a, b)`` and continuing ``start[1]``; ``stop`` = the size for the whole file.

        Raises :class:`ClientGoneError` when this request's client goes away first, or the
        reader's :class:`StreamError` (shared by every request waiting for it).
        """
        if not present():  # gone already (a request that waited in the server's queue)
            raise ClientGoneError("the client went away before its CRC-32s were computed")
        return self._share((key, stop), read, start, present)

    def reserve(self, much: bool) -> bool:
        """Admit a request that has cold work to do; False if it has ``much`` (more than one
        checkpoint interval) and as many requests as allowed are admitted already. Small work
        is always admitted (it is an honest resume's). Each admission needs :meth:`release`."""
        with self._lock:
            if much and self.taking_part >= self.max_taking_part:
                return False
            self.taking_part += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.taking_part -= 1

    def _share(
        self,
        job_key: tuple[Key, int],
        read: Callable[[int, int], Iterable[bytes]],
        start: Checkpoint,
        present: Present,
    ) -> int:
        with self._lock:
            job = self._jobs.get(job_key)
            leader = job is None
            if job is None:
                job = self._jobs[job_key] = _Job()
            else:
                job.waiters += 1
        if not leader:
            return self._follow(job, present)
        try:
            job.result = self._lead(job, job_key, read, start, present)
            return job.result
        except BaseException as exc:
            job.error = exc
            raise
        finally:
            with self._lock:
                if self._jobs.get(job_key) is job:
                    del self._jobs[job_key]
            job.done.set()

    def _follow(self, job: _Job, present: Present) -> int:
        while not job.done.wait(POLL_SECONDS):
            if not present():
                with self._lock:
                    job.waiters -= 1
                raise ClientGoneError("the client went away while its CRC-32s were being computed")
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    def _lead(
        self,
        job: _Job,
        job_key: tuple[Key, int],
        read: Callable[[int, int], Iterable[bytes]],
        start: Checkpoint,
        present: Present,
    ) -> int:
        mine = [True]  # whether this request's own client still wants the result

        def wanted() -> bool:
            """False once no waiting request has its client: the job is then withdrawn."""
            if mine[0] and not present():
                mine[0] = False
                with self._lock:
                    job.waiters -= 1
            with self._lock:
                if job.waiters > 0:
                    return True
                if self._jobs.get(job_key) is job:
                    del self._jobs[job_key]  # a request arriving now starts afresh
                return False

        while not self._slots.acquire(timeout=POLL_SECONDS):
            if not wanted():
                raise ClientGoneError("the client went away while waiting to compute CRC-32s")
        if not wanted():
            self._slots.release()
            raise ClientGoneError("the client went away while waiting to compute CRC-32s")
        key, stop = job_key
        if stop == key.size and self.crc_cache is not None:  # learnt meanwhile (by a full download)?
            known = self.crc_cache.get_many([key])
            if key in known:
                self._slots.release()
                return known[key]
        running = RunningCrc(start)
        try:
            looked = start[0]
            for piece in read(start[0], stop):
                running.update(piece)
                if running.offset - looked >= LOOK_EVERY:
                    looked = running.offset
                    if not wanted():
                        raise ClientGoneError("nobody waits for these CRC-32s any more")
        except ClientGoneError:
            self.keep_checkpoints(key, running.points)
            raise
        finally:
            self._slots.release()
        if stop == key.size:
            if self.crc_cache is not None:
                self.crc_cache.put_many({key: running.crc})
        else:
            self.keep_checkpoints(key, running.points)
        return running.crc

    def keep_checkpoints(self, key: Key, points: list[Checkpoint]) -> None:
        """Store checkpoints, if the cache keeps them, so the work is not lost."""
        keep: Any = getattr(self.crc_cache, "put_checkpoints", None)
        if points and callable(keep):
            keep(key, points)
