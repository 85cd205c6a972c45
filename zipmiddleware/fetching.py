"""Reading an archive's sources: prefetch in the background, retries, skips and cancellation.

One :class:`Fetcher` per download owns every source of its archive from the moment the body
exists: the archive writers ask it for each entry's bytes, in entry order, and its ``close()``
(called by the body's, however the download ends) stops everything at once.

- **Prefetch.** While entry *i* is sent, the next ``prefetch`` restartable sources are opened
  by threads of a pool shared by the process (:data:`FETCH_THREADS`, however many downloads
  run), each reading at most :data:`PREFETCH_BUFFER` bytes and keeping its connection open.
  The entry being sent is read by the download's own thread, so the memory a download holds
  for prefetching is at most ``prefetch x PREFETCH_BUFFER``; output stays in entry order. A
  task that no pool thread has started when its entry comes up is withdrawn and the entry is
  opened directly: downloads never wait for each other's fetches.
- **Retries.** A restartable source that fails with a transient error (a dropped connection,
  a 503) is opened again after ``retry_backoff x n`` seconds, for the ``n``-th failure in a
  row; from the byte it failed at when some of it was already read. ``retries`` is how many
  failures in a row an entry may have: any progress starts the count again, so a 4 GB object
  may lose its connection many times. A refusal (404, 403), a change at the origin or a wrong
  size is never retried; a plain iterable cannot be reopened at all.
- **Failures.** An entry that fails before anything of it was sent raises :class:`EntryFailed`
  (the archive decides: abort, or skip it under ``on_error = "skip"``); after that,
  :class:`~zipmiddleware.errors.StreamError`, which aborts the download.
- **Cancellation.** ``close()`` withdraws every prefetch task, wakes every backoff wait and
  closes every open upstream response from this thread (a :class:`~.sources.UrlStream` shuts
  its socket down, so a blocked read or a wait for the answer ends at once and the origin
  sees the connection closed); nothing of the download runs after it.
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import cast

from .closing import close_all
from .errors import StreamError, UpstreamError
from .perprocess import PerProcess
from .planning import PlannedEntry
from .sources import SourceError, is_restartable, is_transient, public_reason
from .zipformat import ZIP64_LIMIT

logger = logging.getLogger("zipmiddleware")

# Threads that open sources ahead, per process, whatever the number of downloads.
FETCH_THREADS = 16
# What one prefetched entry may hold in memory before the download reaches it.
PREFETCH_BUFFER = 1024 * 1024


class EntryFailed(Exception):
    """An entry failed before any of its bytes went out because of ``error``; ``reason`` is
    what may be shown (the message, for the log, says more)."""

    def __init__(self, arcname: str, error: BaseException, attempts: int) -> None:
        super().__init__(f"{arcname!r}: {error} (attempts: {attempts})")
        self.arcname, self.reason, self.attempts = arcname, public_reason(error), attempts


class _Cancelled(Exception):
    """The download ended while a source was being opened."""


# Threads that open sources ahead: FETCH_THREADS per process, whatever the number of downloads.
fetch_pool = PerProcess(lambda: ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="zipmiddleware-fetch"))


@dataclass
class _Opened:
    """A source opened from ``offset``: the bytes read ahead, and its stream to go on with."""

    stream: Iterator[bytes] | None
    closer: object  # what close() is called on: the iterable open() returned
    low: int = 0  # the part of the source read: [low, high), high None: to its end
    high: int | None = None
    buffered: deque[bytes] = field(default_factory=deque)
    received: int = 0  # bytes of the part read so far (buffered or handed on): where to resume
    handed: bool = False  # some of it went to the archive: it can only be resumed, not restarted
    ended: bool = False  # the stream gave its last byte while buffering
    attempts: int = 1  # failures in a row so far, plus one
    error: BaseException | None = None


@dataclass(frozen=True)
class Policy:
    """The settings a fetcher follows."""

    prefetch: int = 0
    retries: int = 3
    retry_backoff: float = 0.4
    # Called once per reopen: (arcname, attempt number, error); for logs and metrics.
    on_retry: Callable[[str, int, BaseException], None] | None = None


class Fetcher:
    """The sources of one archive's ``entries``, read in order."""

    def __init__(self, entries: tuple[PlannedEntry, ...], policy: Policy) -> None:
        self.entries = entries
        self.policy = policy
        self._order = [index for index, entry in enumerate(entries) if entry.source is not None]
        self._restartable = {index for index in self._order if is_restartable(entries[index].source)}
        self._next = 0  # position in _order of the next entry the download will read
        self._spans: dict[int, tuple[int, int]] = {}  # the parts read of versioned sources
        self._ahead: dict[int, Future[_Opened]] = {}
        self._closers: dict[int, object] = {}  # what every stream open now is closed with, by id
        self._lock = threading.Lock()
        self._cancelled = threading.Event()
        self.attempts: dict[int, int] = {}  # entry index -> times its source was opened (or read)

    # -- what the archive writers call ------------------------------------------------------

    def size(self, index: int) -> int | None:
        """Entry ``index``'s size as far as it is known now (a source may have learnt it)."""
        entry = self.entries[index]
        if entry.size is not None:
            return entry.size
        size = getattr(entry.source, "size", None)
        return size if isinstance(size, int) else None

    def limit_to(self, spans: dict[int, tuple[int, int]]) -> None:
        """Read only these parts ``[low, high)`` of versioned sources (see sources.py), and no
        other source: for a range of an archive of files and such sources."""
        self._spans = spans
        self._order = sorted(spans)

    def read(self, index: int, low: int, high: int) -> Iterator[bytes]:
        """Bytes ``[low, high)`` of entry ``index``'s versioned source, opened now (never ahead),
        retried and cancelled like the rest; any failure raises :class:`UpstreamError`."""
        entry = self.entries[index]
        opened = self._fill(index, self._open_at(index, low, high, 0), 1)
        if opened.error is not None:
            raise UpstreamError(f"{entry.arcname!r}: {opened.error}") from opened.error
        return checked(entry.arcname, self._rest(index, opened), high - low)

    def warm(self) -> None:
        """Start prefetching the first sources (an archive calls it as it starts); not the
        first entry when it is a source, which the archive opens itself at once."""
        self._fill_window(skip=int(self._order[:1] == [0]))

    def begin(self, index: int) -> Iterator[bytes]:
        """Entry ``index``'s bytes, checked against its size, with at least its first piece
        already read (so that a failure before it is :class:`EntryFailed`, and :meth:`size`
        knows what the source learnt); later failures raise :class:`StreamError`."""
        entry = self.entries[index]
        assert entry.source is not None
        self._next = bisect.bisect_right(self._order, index)  # the window starts after it
        self._fill_window()
        if index not in self._restartable:  # a plain iterable
            self.attempts[index] = 1
            return self._begin_plain(entry.arcname, cast("Iterable[bytes]", entry.source), entry.size)
        opened = self._fill(index, self._take(index), 1)  # its first piece, if none is read ahead
        if opened.error is not None:
            raise EntryFailed(entry.arcname, opened.error, opened.attempts) from opened.error
        return checked(entry.arcname, self._rest(index, opened), self._expected(index, opened))

    def attempts_of(self, index: int | None) -> int:
        """How many times entry ``index``'s source was opened (1 for anything else)."""
        return 1 if index is None else self.attempts.get(index, 1)

    def close(self) -> None:
        """Stop every fetch of this download now and close every source (see the module doc)."""
        self._cancelled.set()
        with self._lock:
            futures, self._ahead = list(self._ahead.values()), {}
            closers = list(self._closers.values())
        for future in futures:
            if not future.cancel():
                future.add_done_callback(_close_result)
        close_all(closers, "a source")
        close_all((entry.source for entry in self.entries), "a source")

    # -- plain iterables ----------------------------------------------------------------------

    def _begin_plain(self, arcname: str, source: Iterable[bytes], size: int | None) -> Iterator[bytes]:
        """A plain iterable, read once: its first piece is read here, failing as EntryFailed."""
        pieces = checked(arcname, source, size)
        try:
            first = next(pieces, None)
        except StreamError:
            raise
        except Exception as exc:
            raise EntryFailed(arcname, exc, 1) from exc
        return _chain(first, pieces)

    # -- restartable sources ------------------------------------------------------------------

    def _fill_window(self, skip: int = 0) -> None:
        """Have the next ``prefetch`` restartable sources (after ``skip`` more) opened ahead by
        the pool."""
        if self.policy.prefetch <= 0 or self._cancelled.is_set():
            return
        first = self._next + skip
        window = self._order[first : first + self.policy.prefetch]
        with self._lock:
            for index in window:
                if index not in self._ahead and index in self._restartable:
                    self._ahead[index] = fetch_pool().submit(self._prefetch, index)

    def _prefetch(self, index: int) -> _Opened:
        opened = self._open_at(index, *self._part(index), 0)
        return self._fill(index, opened, PREFETCH_BUFFER)

    def _part(self, index: int) -> tuple[int, int | None]:
        """The part of entry ``index``'s source the download reads: all, unless limited."""
        return self._spans.get(index, (0, None))

    def _expected(self, index: int, opened: _Opened) -> int | None:
        """How many bytes ``opened`` must give, if known."""
        end = self.size(index) if opened.high is None else opened.high
        return None if end is None else end - opened.low

    def _take(self, index: int) -> _Opened:
        """Entry ``index`` opened: by the pool if it got to it, else now."""
        with self._lock:
            future = self._ahead.pop(index, None)
        if future is None or future.cancel():
            return self._open_at(index, *self._part(index), 0)
        opened = future.result()  # started already: it ends soon (close() cuts it short too)
        if opened.stream is not None and not getattr(self.entries[index].source, "resumable", True):
            # Its connection waited idle and may have been cut meanwhile, which such a source
            # (no validators) notices only after handing on what was read ahead and could not
            # resume from: it starts again, at its turn.
            self._end(opened, _Cancelled())
            return self._open_at(index, *self._part(index), opened.attempts - 1)
        return opened

    def _open_at(self, index: int, low: int, high: int | None, failures: int, received: int = 0) -> _Opened:
        """Open the part ``[low, high)`` of entry ``index``'s source at ``received`` bytes into
        it, after ``failures`` failures in a row, retrying transient errors; the result holds
        the error if it still failed."""
        entry = self.entries[index]
        source = entry.source
        assert is_restartable(source)
        while True:
            if self._cancelled.is_set():
                return _Opened(None, None, low, high, attempts=failures + 1, error=_Cancelled())
            closer = None
            self.attempts[index] = self.attempts.get(index, 0) + 1
            try:
                # Only a versioned source is ever given an end (see limit_to and read).
                offset = low + received
                closer = source.open(offset) if high is None else source.open(offset, high)  # type: ignore[call-arg]
                self._track(closer)
                return _Opened(iter(closer), closer, low, high, attempts=failures + 1)
            except Exception as exc:
                if closer is not None:
                    self._untrack(closer)
                failures += 1
                if not self._may_retry(entry.arcname, exc, failures):
                    return _Opened(None, None, low, high, attempts=failures, error=exc)

    def _may_retry(self, arcname: str, exc: BaseException, failures: int) -> bool:
        """After the ``failures``-th failure in a row: wait and say yes, or say no."""
        if self._cancelled.is_set() or not is_transient(exc) or failures > self.policy.retries:
            return False
        logger.info("%r: attempt %d failed (%s); trying again", arcname, failures, exc)
        if self.policy.on_retry is not None:
            self.policy.on_retry(arcname, failures + 1, exc)
        # The download's end wakes the wait at once.
        return not self._cancelled.wait(self.policy.retry_backoff * failures)

    def _fill(self, index: int, opened: _Opened, limit: int) -> _Opened:
        """Read ahead into ``opened.buffered`` until ``limit`` bytes (and at least one piece),
        the stream's end, or a failure, which is retried from the byte reached."""
        total = sum(len(piece) for piece in opened.buffered)
        while opened.error is None and not opened.ended and (total < limit or not opened.buffered):
            if self._cancelled.is_set():  # the download ended: read no more of it
                opened = self._end(opened, _Cancelled())
                continue
            stream = opened.stream
            assert stream is not None
            try:
                piece = next(stream, None)
            except Exception as exc:
                if opened.received and opened.received == self._expected(index, opened):  # cut after its end
                    opened.ended = True
                    continue
                opened = self._reopen(index, opened, _Cancelled() if self._cancelled.is_set() else exc)
                continue
            if piece is None:
                opened.ended = True
            elif not isinstance(piece, (bytes, bytearray, memoryview)):
                wrong = SourceError(f"its source yielded {type(piece).__name__}, not bytes", transient=False)
                opened = self._end(opened, wrong)
            elif piece:
                opened.buffered.append(bytes(piece))
                total += len(piece)
                opened.received += len(piece)
                opened.attempts = 1
        return opened

    def _end(self, opened: _Opened, error: BaseException) -> _Opened:
        """``opened`` failed for good with ``error``: its stream is closed."""
        self._untrack(opened.closer)
        close_all([opened.closer], "a source")
        opened.error, opened.stream = error, None
        return opened

    def _reopen(self, index: int, opened: _Opened, exc: BaseException) -> _Opened:
        """After ``opened`` failed with ``exc``: the source opened again at the byte it reached,
        or (``error`` set) the failure that ends it. While none of it was handed on, it is read
        again from its start instead: that needs no resume (which an origin without validators
        cannot give), so a connection opened ahead and cut while it waited costs nothing."""
        if not self._may_retry(self.entries[index].arcname, exc, opened.attempts):
            return self._end(opened, exc)
        self._untrack(opened.closer)
        close_all([opened.closer], "a source")
        if not opened.handed:
            opened.buffered, opened.received = deque(), 0
        again = self._open_at(index, opened.low, opened.high, opened.attempts, opened.received)
        again.buffered, again.received, again.handed = opened.buffered, opened.received, opened.handed
        return again

    def _rest(self, index: int, opened: _Opened) -> Iterator[bytes]:
        """What was read ahead, then the rest, resumed where a transient failure left it."""
        entry = self.entries[index]
        try:
            while True:
                while opened.buffered:
                    opened.handed = True
                    yield opened.buffered.popleft()
                if opened.ended:
                    break
                opened = self._fill(index, opened, 1)
                if opened.error is not None:
                    raise UpstreamError(f"{entry.arcname!r}: {opened.error}") from opened.error
        finally:
            self._untrack(opened.closer)
            close_all([opened.closer], "a source")

    def _track(self, closer: object) -> None:
        with self._lock:
            self._closers[id(closer)] = closer
        if self._cancelled.is_set():  # close() may have run before it was tracked
            close_all([closer], "a source")

    def _untrack(self, closer: object) -> None:
        with self._lock:
            self._closers.pop(id(closer), None)


def failure_reason(exc: BaseException) -> str:
    """What may be shown of an entry that failed part-way with ``exc``."""
    if isinstance(exc, StreamError):
        if exc.__cause__ is None:
            return "it could not be read to its end"
        exc = exc.__cause__
    return public_reason(exc)


def checked(arcname: str, source: Iterable[bytes], size: int | None) -> Iterator[bytes]:
    """The source's bytes, checked against ``size``; empty pieces are dropped."""
    # Without a size the local header is written without ZIP64, so the entry
    # cannot pass ZIP64_LIMIT; stop at once rather than at the end.
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


def _chain(first: bytes | None, rest: Iterator[bytes]) -> Iterator[bytes]:
    if first is not None:
        yield first
    yield from rest


def _close_result(future: Future[_Opened]) -> None:
    """A prefetch that was running when its download ended: close what it opened."""
    if not future.cancelled() and future.exception() is None:
        close_all([future.result().closer], "a source")
