"""A Pyramid app with nothing download-specific in it: ``[filter:downloads]`` serves /files/..."""

from __future__ import annotations

import os
from html import escape

from pyramid.config import Configurator
from pyramid.request import Request
from pyramid.response import Response


def home(request: Request) -> Response:
    data_dir = request.registry.settings["data_dir"]
    items = "".join(
        f'<li><a href="{escape(request.route_path("files", name=name))}">{escape(name)}</a>'
        for name in sorted(os.listdir(data_dir))
    )
    return Response(
        f"<!doctype html><meta charset='utf-8'><title>Files</title><h1>Files</h1><ul>{items}</ul>"
    )


def main(global_config: dict[str, str], **settings: str) -> object:
    """``[app:library]``: PasteDeploy builds this app, then wraps it in the filter."""
    with Configurator(settings=settings) as config:
        config.add_route("home", "/")
        config.add_view(home, route_name="home")
        # The downloads filter answers /files/... before Pyramid sees it; this route only builds URLs.
        config.add_route("files", "/files/{name}", static=True)
        return config.make_wsgi_app()
