"""Flask: ``Downloads(app)`` wraps ``app.wsgi_app`` with settings from ``app.config``.

::

    app.config.update(
        ZIPSTREAM_ROUTES={"/files/<path:subpath>": {"resolver": "directory", "root": "/srv/games"}},
        ZIPSTREAM_CHUNK_SIZE=262144,
        ZIPSTREAM_COMPRESSION_LEVEL=0,
        ZIPSTREAM_ENABLE_ZIP64=True,
    )
    downloads = Downloads(app)          # or: downloads = Downloads(); downloads.init_app(app)

Every ``ZIPSTREAM_*`` key is read once, in ``init_app``; an unknown one or a bad
value raises :class:`~zipmiddleware.ConfigError` naming it. The middleware is kept
in ``app.extensions["zipmiddleware"]``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import flask_settings
from .middleware import ZipMiddleware

if TYPE_CHECKING:
    from flask import Flask

EXTENSION = "zipmiddleware"


class Downloads:
    """The Flask extension. One instance may serve several apps (the app-factory pattern)."""

    # What wraps which of the app's attributes (the Quart extension changes both).
    door: type[Any] = ZipMiddleware
    wrapped = "wsgi_app"

    def __init__(self, app: Flask | None = None) -> None:
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> Any:
        """Read ``app.config``, wrap the app and record the middleware in ``app.extensions``."""
        if EXTENSION in app.extensions:
            raise RuntimeError("zipmiddleware is already set up on this app; call init_app once per app")
        middleware = self.door.from_settings(getattr(app, self.wrapped), flask_settings(app.config))
        setattr(app, self.wrapped, middleware)
        app.extensions[EXTENSION] = middleware
        return middleware

    @staticmethod
    def middleware(app: Flask) -> Any:
        """The middleware ``init_app`` put on ``app``."""
        try:
            return app.extensions[EXTENSION]
        except KeyError:
            raise RuntimeError("zipmiddleware is not set up on this app: call Downloads(app) first") from None
