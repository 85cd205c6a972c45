"""Quart: ``Downloads(app)`` wraps ``app.asgi_app`` with settings from ``app.config``.

Quart is Flask's API on ASGI, and this is the Flask extension (:mod:`.flask`) on the ASGI
middleware (:mod:`.asgi`): the same ``ZIPSTREAM_*`` keys, read once in ``init_app``, an
unknown key or a bad value raising :class:`~zipmiddleware.ConfigError` naming it::

    app = Quart(__name__)
    app.config.update(
        ZIPSTREAM_ROUTES={"/files/<path:subpath>": {"resolver": "directory", "root": "/srv/games"}},
    )
    downloads = Downloads(app)          # or: downloads = Downloads(); downloads.init_app(app)

The middleware is kept in ``app.extensions["zipmiddleware"]``.
"""

from __future__ import annotations

from typing import Any

from . import flask
from .asgi import ZipMiddleware

__all__ = ["Downloads"]


class Downloads(flask.Downloads):
    """The Quart extension. One instance may serve several apps (the app-factory pattern)."""

    door: type[Any] = ZipMiddleware
    wrapped = "asgi_app"
