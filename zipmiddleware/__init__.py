"""zipmiddleware: WSGI downloads served as the file itself or a streamed ZIP archive.

>>> from zipmiddleware import ZipMiddleware, FileTarget, ZipTarget
>>> application = ZipMiddleware(app, routes={"/download/<int:game_id>": resolve},
...                             roots=["/srv/games"])
"""

from __future__ import annotations

from .crccache import CrcCache, SQLiteCrcCache
from .errors import ConfigError, ZipMiddlewareError
from .middleware import ZipMiddleware
from .targets import Failed, FileTarget, Pending, SourceTarget, ZipEntry, ZipTarget

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "CrcCache",
    "Failed",
    "FileTarget",
    "Pending",
    "SQLiteCrcCache",
    "SourceTarget",
    "ZipEntry",
    "ZipMiddleware",
    "ZipMiddlewareError",
    "ZipTarget",
    "__version__",
]
