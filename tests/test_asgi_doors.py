"""The ASGI doors as users meet them: the Quart extension reading ``ZIPSTREAM_*`` keys from a
Quart app's config, and the FastAPI example configured by settings alone, each under uvicorn."""

from __future__ import annotations

import json
import shutil
import urllib.request
from pathlib import Path

import pytest

from zipmiddleware import ConfigError
from zipmiddleware.asgi import ZipMiddleware

from .clients import assert_good_zip, require_module, run
from .servers import PROJECT, AsgiServer

FILES = {"readme.txt": b"read me\n", "data/level1.dat": bytes(range(256)) * 400}


def write_game(folder: Path) -> None:
    for name, data in FILES.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def fetch(url: str) -> tuple[int, dict[str, str], bytes]:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()


def test_quart_app_under_uvicorn(tmp_path: Path) -> None:
    require_module("quart")
    write_game(tmp_path / "games" / "doom")
    env = {"ZM_QUART_ROOT": str(tmp_path / "games"), "ZM_QUART_CRC": str(tmp_path / "crc.sqlite")}
    with AsgiServer("tests.quart_app:app", env=env, ready_path="/api/hello") as server:
        assert json.loads(fetch(server.url + "/api/hello")[2]) == {"hello": "quart"}
        status, headers, body = fetch(server.url + "/downloads/doom")
        assert status == 200 and headers["content-type"] == "application/zip"
        assert headers["content-length"] == str(len(body)) and headers["etag"].startswith('"zip-')
        archive = tmp_path / "doom.zip"
        archive.write_bytes(body)
        assert_good_zip(archive, FILES)
        assert fetch(server.url + "/downloads/doom/readme.txt")[2] == b"read me\n"
        request = urllib.request.Request(server.url + "/downloads/doom", headers={"Range": "bytes=10-99"})
        status, headers, part = fetch_request(request)
        assert status == 206 and part == body[10:100]


def fetch_request(request: urllib.request.Request) -> tuple[int, dict[str, str], bytes]:
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, dict(response.getheaders()), response.read()


def test_quart_config_errors_name_the_key() -> None:
    require_module("quart")
    from quart import Quart

    from zipmiddleware.quart import Downloads

    app = Quart(__name__)
    app.config["ZIPSTREAM_CHUNK_SISE"] = 1
    with pytest.raises(ConfigError, match="ZIPSTREAM_CHUNK_SISE"):
        Downloads(app)
    app = Quart(__name__)
    app.config["ZIPSTREAM_ROUTES"] = {}
    middleware = Downloads(app).middleware(app)
    assert isinstance(middleware, ZipMiddleware) and app.asgi_app is middleware  # type: ignore[comparison-overlap]
    with pytest.raises(RuntimeError, match="already set up"):
        Downloads(app)


def test_fastapi_example_under_uvicorn(tmp_path: Path) -> None:
    """As its docstring says: ``uvicorn fastapi_app:app`` in examples/, ZM_GAMES naming the games."""
    require_module("fastapi")
    write_game(tmp_path / "games" / "quake")
    (tmp_path / "games" / "quake" / "scratch.tmp").write_bytes(b"left out by exclude")
    with AsgiServer(
        "fastapi_app:app",
        env={"ZM_GAMES": str(tmp_path / "games")},
        chdir=PROJECT / "examples",
        pythonpath=[PROJECT / "examples", PROJECT],
        ready_path="/api/games",
    ) as server:
        assert json.loads(fetch(server.url + "/api/games")[2]) == {"games": ["quake"]}
        status, headers, body = fetch(server.url + "/files/quake")
        assert status == 200 and headers["content-disposition"].startswith("attachment; filename=quake.zip")
        archive = tmp_path / "quake.zip"
        archive.write_bytes(body)
        assert_good_zip(archive, FILES)  # scratch.tmp is ignored
        if shutil.which("curl"):
            result = run(
                [
                    "curl",
                    "-sS",
                    "--fail",
                    "-o",
                    tmp_path / "one.dat",
                    server.url + "/files/quake/data/level1.dat",
                ]
            )
            assert result.returncode == 0 and (tmp_path / "one.dat").read_bytes() == FILES["data/level1.dat"]
