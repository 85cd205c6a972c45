"""Closing what a download holds: everything is closed, whatever one ``close()`` raises."""

from __future__ import annotations

import logging
from collections.abc import Iterable

logger = logging.getLogger("zipmiddleware")


def close_all(closables: Iterable[object], what: str = "a download") -> None:
    """Call ``close()`` on each of ``closables`` that has one; what one raises is logged."""
    for closable in closables:
        close = getattr(closable, "close", None)
        if callable(close):
            try:
                close()
            except ValueError as exc:  # a generator still running in a fetch thread: it stops
                logger.debug("closing %s: %s", what, exc)  # at its next piece (see fetching.py)
            except Exception:  # keep closing the rest
                logger.exception("error while closing %s", what)
