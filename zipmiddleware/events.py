"""What happened to each entry and each download: the ``on_entry`` and ``on_download``
callbacks, and the metrics (see :mod:`.metrics`).

A callback gets one frozen event. Whatever it raises is logged and dropped: a callback never
breaks a download. It runs in the thread that serves the download, so a slow one slows that
download (hand long work to a queue).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from .checksums import ClientGoneError
from .metrics import Metrics

logger = logging.getLogger("zipmiddleware")

# Outcomes of an entry.
DONE, FAILED, SKIPPED = "done", "failed", "skipped"
# Outcomes of a download.
COMPLETE, ABORTED, CLIENT_GONE = "complete", "aborted", "client_gone"


@dataclass(frozen=True)
class EntryEvent:
    """One archive entry: sent whole (``done``), or lost (``failed``: the download aborts;
    ``skipped``: left out under ``on_error = "skip"``).

    ``bytes`` is what of its data this response sent; ``attempts`` how many times its source
    was opened (1 for a file); ``error`` a reason safe to show (no URL, path or host), or None.
    """

    arcname: str
    status: str
    bytes: int
    attempts: int = 1
    error: str | None = None


@dataclass(frozen=True)
class DownloadEvent:
    """One download response with a body (200 or 206), once it has ended.

    ``status``: ``complete`` (every byte went out), ``aborted`` (the server stopped it: a
    source or file failed or changed), or ``client_gone`` (the client went away first).
    ``entries``: archive entries sent whole by this response (1 for a whole file).
    ``route``, ``route_args``: the rule that matched and what it captured (``{"game_id": 7}``).
    ``bytes_sent``: what was handed to the server and the kernel for the client; when the
    server aborts a download, the client may have received less. ``http_status``: what the
    client got, 502 where the first source failed before anything was sent.
    """

    status: str
    bytes_sent: int
    entries: int
    duration: float
    route: str
    remote_user: str | None
    download_name: str
    http_status: int
    range: tuple[int, int] | None = None  # [start, stop) of a 206
    total: int | None = None  # the whole download's length, where it is known in advance
    route_args: Mapping[str, Any] = field(default_factory=dict)  # what the route's rule captured
    skipped: int = 0  # entries left out under on_error = "skip" (and listed in the archive)


Callback = Callable[[Any], object]


def safely(callback: Callback | None, event: object) -> None:
    """Call ``callback(event)``; anything it raises is logged, never passed on."""
    if callback is None:
        return
    try:
        callback(event)
    except Exception:
        logger.exception("the %s callback raised on %r", getattr(callback, "__name__", "event"), event)


class Report:
    """Where one download's bodies tell what happens: the callbacks and the metrics."""

    def __init__(
        self,
        on_entry: Callback | None = None,
        on_download: Callback | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.on_entry = on_entry
        self.on_download = on_download
        self.metrics = metrics or Metrics()
        self.entries_done = 0
        self.entries_skipped = 0

    def entry(
        self, arcname: str, status: str, sent: int, attempts: int = 1, error: str | None = None
    ) -> None:
        if status == DONE:
            self.entries_done += 1
        else:
            self.entries_skipped += status == SKIPPED
            self.metrics.entry_failed(skipped=status == SKIPPED)
        if self.on_entry is not None:
            safely(self.on_entry, EntryEvent(arcname, status, sent, attempts, error))

    def retried(self, arcname: str, attempt: int, error: BaseException) -> None:
        self.metrics.entry_retried()


class Watched:
    """A download body that reports how it ended: ``on_download`` and the metrics.

    It counts what goes out (the chunks it passes on, or what ``produced`` says: the server's
    own count, with what went around it, see :mod:`.zerocopy`), the time to the first
    chunk, and tells a complete body from one that failed (``aborted``) or that the server
    stopped iterating because the client went away (``client_gone``).
    """

    def __init__(
        self,
        body: Iterable[bytes],
        report: Report,
        describe: Callable[[str, int, float, int], DownloadEvent],
        started: float,
        http_status: int,
        produced: Callable[[], int] | None = None,
    ) -> None:
        self.body = body
        self.report = report
        self.describe = describe
        self.started = started
        self.http_status = http_status
        self.produced = produced
        self.sent = 0
        self.outcome: str | None = None
        self._first = True
        self._reported = False
        report.metrics.download_started()

    def refused(self, http_status: int, outcome: str = ABORTED) -> None:
        """Nothing of it went out: the client got an error response of ``http_status`` instead
        (or had gone: ``outcome``). Entries made for its first chunk never went out either."""
        self.outcome, self.http_status = outcome, http_status
        self.report.entries_done = 0

    def __iter__(self) -> Iterator[bytes]:
        try:
            for chunk in self.body:
                if self._first:
                    self._first = False
                    self.report.metrics.first_byte(time.monotonic() - self.started)
                self.sent += len(chunk)
                yield chunk
        except ClientGoneError:
            self.outcome = CLIENT_GONE
            raise
        except BaseException as exc:
            self.outcome = CLIENT_GONE if isinstance(exc, GeneratorExit) else ABORTED
            raise
        self.outcome = COMPLETE

    def close(self) -> None:
        try:
            close = getattr(self.body, "close", None)
            if close is not None:
                close()
        finally:
            if not self._reported:
                self._reported = True
                outcome = self.outcome or CLIENT_GONE  # closed before its end: the client left
                sent = self.sent if self.produced is None else self.produced()
                self.report.metrics.download_ended(outcome, sent)
                event = self.describe(outcome, sent, time.monotonic() - self.started, self.http_status)
                safely(self.report.on_download, event)
