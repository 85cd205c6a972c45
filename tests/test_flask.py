"""The Flask extension: ``Downloads(app)`` / ``init_app`` reads ``ZIPSTREAM_*`` and wraps ``app.wsgi_app``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flask import Flask, url_for
from webtest import TestApp

from zipmiddleware import ConfigError, FileTarget, ZipMiddleware
from zipmiddleware.flask import Downloads

from .conftest import read_zip


def make_app(games: Path, **config: Any) -> Flask:
    app = Flask(__name__)
    app.config.update(
        ZIPSTREAM_ROUTES={"/games/<path:subpath>": {"resolver": "directory", "root": str(games)}},
        ZIPSTREAM_EXCLUDE=["updates", "extras"],
        ZIPSTREAM_IGNORE=["*.nfo", "file_id.diz"],
        **config,
    )

    @app.get("/")
    def index() -> str:
        return "the app itself"

    return app


def test_init_app_wraps_wsgi_app_and_records_the_middleware(games: Path) -> None:
    app = make_app(games)
    original = app.wsgi_app
    downloads = Downloads(app)
    middleware = app.extensions["zipmiddleware"]
    assert isinstance(middleware, ZipMiddleware)
    assert app.wsgi_app is middleware and middleware.app == original
    assert Downloads.middleware(app) is middleware
    assert downloads.middleware(app).settings.exclude == ("updates", "extras")

    client = TestApp(app, lint=True)
    assert client.get("/").text == "the app itself"  # everything else is Flask's
    archive = client.get("/games/quake")
    assert archive.content_type == "application/zip"
    assert sorted(read_zip(archive.body)) == ["id1/config.cfg", "id1/pak0.pak", "quake.exe"]
    single = client.get("/games/doom")  # one file left after file_id.diz is ignored
    assert single.body == (games / "doom" / "doom.wad").read_bytes()
    client.get("/games/../secret.txt", status=404)


def test_app_factory_pattern_one_extension_many_apps(games: Path, tmp_path: Path) -> None:
    downloads = Downloads()
    first = make_app(games, ZIPSTREAM_CHUNK_SIZE=4096)
    second = make_app(games, ZIPSTREAM_CHUNK_SIZE="8192", ZIPSTREAM_COMPRESSION_LEVEL="6")
    downloads.init_app(first)
    downloads.init_app(second)
    assert Downloads.middleware(first).settings.chunk_size == 4096
    assert Downloads.middleware(second).settings.chunk_size == 8192
    assert Downloads.middleware(second).settings.compression_level == 6
    assert Downloads.middleware(first) is not Downloads.middleware(second)


def test_init_app_twice_is_an_error_not_a_double_wrap(games: Path) -> None:
    app = make_app(games)
    Downloads(app)
    wrapped = app.wsgi_app
    with pytest.raises(RuntimeError, match="already set up"):
        Downloads().init_app(app)
    assert app.wsgi_app is wrapped


def test_middleware_of_an_app_without_the_extension() -> None:
    with pytest.raises(RuntimeError, match="not set up"):
        Downloads.middleware(Flask(__name__))


def test_bad_config_fails_at_init_and_leaves_the_app_alone(games: Path) -> None:
    app = make_app(games, ZIPSTREAM_COMPRESSION_LEVEL=11)
    original = app.wsgi_app
    with pytest.raises(
        ConfigError, match="^ZIPSTREAM_COMPRESSION_LEVEL: expected a number from 0 to 9, got 11"
    ):
        Downloads(app)
    assert app.wsgi_app == original
    assert "zipmiddleware" not in app.extensions


def test_resolver_sees_the_flask_request_environ(games: Path) -> None:
    """A Python resolver under Flask gets REMOTE_USER and the route arguments."""
    seen: dict[str, Any] = {}

    def resolve(request: Any, game: str) -> FileTarget:
        seen.update(user=request.remote_user, game=game)
        return FileTarget(games / game / "doom.wad", download_name="DOOM.WAD")

    app = Flask(__name__)
    app.config.update(ZIPSTREAM_ROUTES={"/wad/<game>": resolve}, ZIPSTREAM_ROOTS=[str(games)])
    Downloads(app)
    response = TestApp(app, lint=True).get("/wad/doom", extra_environ={"REMOTE_USER": "alice"})
    assert seen == {"user": "alice", "game": "doom"}
    assert "filename=DOOM.WAD" in response.headers["Content-Disposition"]


def test_url_for_builds_download_urls_with_a_build_only_rule(games: Path) -> None:
    app = make_app(games)
    app.add_url_rule("/games/<path:subpath>", "game_download", build_only=True)
    Downloads(app)
    with app.test_request_context():
        assert url_for("game_download", subpath="Commander Keen") == "/games/Commander%20Keen"
