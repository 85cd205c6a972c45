"""PasteDeploy entry point: ``[filter:downloads] use = egg:zipmiddleware#main``.

Every key of the filter section is a setting, as a string (see README):
lists one item per line, routes as lines of ``RULE = package.module:function``.
"""

from __future__ import annotations

from typing import Any

from .middleware import ZipMiddleware
from .types import WSGIApplication


def filter_app_factory(app: WSGIApplication, global_conf: dict[str, Any], **local_conf: str) -> ZipMiddleware:
    """``paste.filter_app_factory``: wrap ``app`` with the section's settings."""
    return ZipMiddleware(app, **local_conf)
