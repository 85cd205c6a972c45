"""Warn, once, about a server set-up that breaks long downloads.

gunicorn's default *sync* worker tells the arbiter it is alive only between
requests, so the arbiter kills any worker whose request takes longer than
``--timeout`` (30 s by default): every download longer than that is cut off.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from .types import WSGIEnvironment

logger = logging.getLogger("zipmiddleware")

SYNC_WORKER_WARNING = (
    "gunicorn's sync worker kills every download that lasts longer than --timeout (%s): "
    "run gunicorn with the gthread worker instead, e.g. --worker-class gthread --threads 8 "
    "(or worker_class = 'gthread' and threads = 8 in gunicorn.conf.py); see the README's Deployment section"
)


def gunicorn_config() -> Any:
    """The config of the gunicorn arbiter or worker that is loading the app, if any.

    gunicorn keeps no global handle on it, but it is ``self.cfg`` in the frame that
    loads the app: ``Arbiter.setup`` (with ``preload_app``) or ``Worker.load_wsgi``.
    """
    if "gunicorn" not in sys.modules:
        return None
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if type(owner).__module__.startswith("gunicorn."):
            cfg = getattr(owner, "cfg", None)
            if type(cfg).__module__ == "gunicorn.config":
                return cfg
        frame = frame.f_back  # type: ignore[assignment]
    return None


def uses_sync_worker(cfg: Any) -> bool:
    """gunicorn runs "sync" as gthread when ``threads`` > 1 (gunicorn.config.Config.worker_class)."""
    uri = cfg.settings["worker_class"].get()
    is_sync = isinstance(uri, str) and (uri == "sync" or uri.endswith("SyncWorker"))
    return is_sync and cfg.threads <= 1


def check_server_at_startup() -> bool:
    """Log a warning if gunicorn is loading this app into sync workers; True if it did."""
    try:
        cfg = gunicorn_config()
        if cfg is None or not uses_sync_worker(cfg):
            return False
        timeout = cfg.timeout
    except Exception:  # a gunicorn we do not know: say nothing rather than fail start-up
        logger.debug("could not inspect the gunicorn configuration", exc_info=True)
        return False
    logger.warning(SYNC_WORKER_WARNING, f"{timeout} s here")
    return True


METRICS_WARNING = (
    "metrics = true under gunicorn with %d workers, but PROMETHEUS_MULTIPROC_DIR is not set: each "
    "worker counts on its own and every scrape sees whichever answers; see the README's Metrics section"
)


def check_metrics_at_startup() -> None:
    """Log a warning if gunicorn runs several workers without prometheus_client's multiprocess mode."""
    try:
        cfg = gunicorn_config()
        workers = cfg.workers if cfg is not None else 1
    except Exception:
        logger.debug("could not inspect the gunicorn configuration", exc_info=True)
        return
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        logger.warning(METRICS_WARNING, workers)


def is_sync_worker_request(environ: WSGIEnvironment) -> bool:
    """A request served by gunicorn's sync worker: the only gunicorn worker that is not multithread."""
    software = str(environ.get("SERVER_SOFTWARE", ""))
    return software.startswith("gunicorn") and not environ.get("wsgi.multithread", True)
