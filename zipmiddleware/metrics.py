"""Optional Prometheus metrics (``metrics = true``; needs ``pip install 'zipmiddleware[metrics]'``).

The middleware holds a :class:`Metrics` and calls it as downloads go: the base class does
nothing (metrics off); :class:`PrometheusMetrics` counts with ``prometheus_client``, which is
imported only when metrics are turned on, so ``import zipmiddleware`` never needs it.

Under gunicorn (several worker processes) set ``PROMETHEUS_MULTIPROC_DIR`` to an empty folder
in the environment gunicorn starts with (prometheus_client reads it when it is first imported);
call :func:`mark_process_dead` from gunicorn's ``child_exit`` hook; and serve
:func:`metrics_app`, which adds up the files of every worker, past and present.

No method of a :class:`Metrics` raises: a metrics problem is logged (the first time for
each method at warning level, then at debug level) and never breaks a download.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING

from .errors import ConfigError
from .types import StartResponse, WSGIApplication, WSGIEnvironment

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = ["Metrics", "PrometheusMetrics", "get_metrics", "mark_process_dead", "metrics_app"]

logger = logging.getLogger("zipmiddleware")

MISSING = "metrics = true needs prometheus_client: pip install 'zipmiddleware[metrics]'"
MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"
PREFIX = "zipmiddleware_"
DOWNLOAD_OUTCOMES = ("complete", "aborted", "client_gone")
# Time to first byte of a download: from a few milliseconds (a file) to tens of seconds (an
# archive whose plan needs many remote sources opened or many CRC-32s computed first).
FIRST_BYTE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Does nothing: what the middleware uses when metrics are off."""

    def download_started(self) -> None:
        """A download body (200/206 with a body) starts being served."""

    def download_ended(self, outcome: str, sent: int) -> None:
        """A download body ended: ``outcome`` is ``"complete"``, ``"aborted"`` (the server gave
        up, e.g. a source failed after the first byte) or ``"client_gone"``; ``sent`` is the
        number of body bytes sent."""

    def first_byte(self, seconds: float) -> None:
        """Time from the request reaching the middleware to its first body byte."""

    def entry_retried(self) -> None:
        """A remote source was reopened after a failure."""

    def entry_failed(self, skipped: bool) -> None:
        """An entry failed for good (``skipped``: it was left out of the archive)."""

    def crc_lookups(self, hits: int, misses: int) -> None:
        """The CRC-32 cache lookups of one response."""


class PrometheusMetrics(Metrics):
    """Counts with ``prometheus_client`` in ``registry`` (default: its default registry).

    A registry refuses a metric name it already holds, so create one per registry: the
    middleware gets the process's one instance from :func:`get_metrics`.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        try:
            from prometheus_client import REGISTRY, Counter, Gauge, Histogram
        except ImportError as exc:
            raise ImportError(MISSING) from exc
        if registry is None:
            registry = REGISTRY  # prometheus_client's registry=None would mean "register nowhere"
        self._warned: set[str] = set()
        self._in_flight = Gauge(
            PREFIX + "downloads_in_flight",
            "Download bodies being sent now.",
            registry=registry,
            multiprocess_mode="livesum",  # a worker that died sends nothing any more
        )
        self._bytes_sent = Counter(PREFIX + "bytes_sent", "Body bytes sent by downloads.", registry=registry)
        downloads = Counter(
            PREFIX + "downloads",
            "Download bodies served, by how they ended.",
            ["outcome"],
            registry=registry,
        )
        # Resolved once: a method then costs one increment, and every series exists from the start at 0.
        self._downloads = {outcome: downloads.labels(outcome=outcome) for outcome in DOWNLOAD_OUTCOMES}
        self._retries = Counter(
            PREFIX + "entry_retries", "Remote sources reopened after a failure.", registry=registry
        )
        failures = Counter(
            PREFIX + "entry_failures",
            "Archive entries that failed for good: failed (the download failed) or skipped (left out).",
            ["outcome"],
            registry=registry,
        )
        self._failed = failures.labels(outcome="failed")
        self._skipped = failures.labels(outcome="skipped")
        crc = Counter(PREFIX + "crc_cache_lookups", "CRC-32 cache lookups.", ["result"], registry=registry)
        self._crc_hits = crc.labels(result="hit")
        self._crc_misses = crc.labels(result="miss")
        self._first_byte = Histogram(
            PREFIX + "time_to_first_byte_seconds",
            "Time from the request reaching the middleware to the first body byte.",
            buckets=FIRST_BYTE_BUCKETS,
            registry=registry,
        )

    def download_started(self) -> None:
        try:
            self._in_flight.inc()
        except Exception:
            self._report("download_started")

    def download_ended(self, outcome: str, sent: int) -> None:
        try:
            self._in_flight.dec()
            if sent > 0:
                self._bytes_sent.inc(sent)
            self._downloads[outcome].inc()
        except Exception:
            self._report("download_ended")

    def first_byte(self, seconds: float) -> None:
        try:
            self._first_byte.observe(max(0.0, seconds))
        except Exception:
            self._report("first_byte")

    def entry_retried(self) -> None:
        try:
            self._retries.inc()
        except Exception:
            self._report("entry_retried")

    def entry_failed(self, skipped: bool) -> None:
        try:
            (self._skipped if skipped else self._failed).inc()
        except Exception:
            self._report("entry_failed")

    def crc_lookups(self, hits: int, misses: int) -> None:
        try:
            if hits > 0:
                self._crc_hits.inc(hits)
            if misses > 0:
                self._crc_misses.inc(misses)
        except Exception:
            self._report("crc_lookups")

    def _report(self, method: str) -> None:
        """Log the exception being handled: with a warning the first time for ``method``, then
        at debug level only (a broken metrics folder must not flood the log)."""
        try:
            level = logging.DEBUG if method in self._warned else logging.WARNING
            self._warned.add(method)
            logger.log(level, "metrics: %s failed; the download goes on", method, exc_info=True)
        except Exception:  # pragma: no cover - logging itself broke
            pass


_lock = threading.Lock()
_instance: PrometheusMetrics | None = None


def get_metrics(enabled: bool) -> Metrics:
    """``Metrics()`` when not enabled; else the process's one :class:`PrometheusMetrics`
    (created once per process: prometheus_client refuses to register the same names twice).

    Raises ImportError when prometheus_client is missing, and :class:`ConfigError` (key
    ``metrics``) when ``PROMETHEUS_MULTIPROC_DIR`` is set but is not a folder this process can
    write its metrics files in.
    """
    global _instance
    if not enabled:
        return Metrics()
    with _lock:
        if _instance is None:
            try:
                import prometheus_client.values
            except ImportError as exc:
                raise ImportError(MISSING) from exc
            folder = _multiprocess_dir()
            if folder is not None:
                if not os.path.isdir(folder):
                    raise ConfigError("metrics", f"{MULTIPROC_DIR}={folder!r} is not a folder")
                if not getattr(prometheus_client.values.ValueClass, "_multiprocess", False):
                    logger.warning(
                        "metrics: %s was set after prometheus_client was imported; this process "
                        "keeps its metrics in memory, where the other workers' scrapes do not see them",
                        MULTIPROC_DIR,
                    )
            try:
                _instance = PrometheusMetrics()
            except OSError as exc:  # multiprocess mode: the first metrics files could not be made
                raise ConfigError("metrics", f"cannot write metrics files in {MULTIPROC_DIR}: {exc}") from exc
        return _instance


def _multiprocess_dir() -> str | None:
    """The multiprocess folder if prometheus_client's multiprocess mode is asked for."""
    return os.environ.get(MULTIPROC_DIR) or os.environ.get(MULTIPROC_DIR.lower()) or None


def metrics_app(registry: CollectorRegistry | None = None) -> WSGIApplication:
    """A WSGI app that answers GET with the metrics in Prometheus' text format (or
    OpenMetrics, gzip, ``?name[]=`` filters: whatever prometheus_client's WSGI app does).

    Given a ``registry``, it serves that one. Otherwise, in multiprocess mode
    (``PROMETHEUS_MULTIPROC_DIR`` set), each request collects the files of every worker with a
    ``MultiProcessCollector`` into a fresh ``CollectorRegistry``, so whichever worker answers
    gives the totals; without it, prometheus_client's default registry (this process only).
    """
    try:
        from prometheus_client import REGISTRY, CollectorRegistry, make_wsgi_app, multiprocess
    except ImportError as exc:
        raise ImportError(MISSING) from exc
    if registry is not None:
        return make_wsgi_app(registry)
    single = make_wsgi_app(REGISTRY)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if _multiprocess_dir() is None:
            body: Iterable[bytes] = single(environ, start_response)
            return body
        try:
            # support_collectors_without_names: a MultiProcessCollector names no metrics up
            # front, and ?name[]= filters would otherwise find nothing.
            fresh = CollectorRegistry(support_collectors_without_names=True)
            multiprocess.MultiProcessCollector(fresh)  # type: ignore[no-untyped-call]
            body = make_wsgi_app(fresh)(environ, start_response)
        except Exception:
            logger.exception("metrics: cannot collect the workers' metrics files")
            message = b"metrics unavailable: see the server log\n"
            start_response(
                "500 Internal Server Error",
                [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(message)))],
            )
            return [message]
        return body

    return app


def mark_process_dead(pid: int) -> None:
    """For gunicorn's ``child_exit`` hook: forget the ``livesum`` gauge files of worker
    ``pid`` (its downloads in flight), so a worker that died does not count forever. Its
    counters stay. Does nothing outside multiprocess mode; never raises."""
    if _multiprocess_dir() is None:
        return
    try:
        from prometheus_client import multiprocess
    except ImportError:
        return  # without prometheus_client no worker wrote metrics files
    try:
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
    except Exception:
        logger.warning("metrics: cannot remove the metrics files of worker %d", pid, exc_info=True)
