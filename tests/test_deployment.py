"""gunicorn's sync worker cuts every download longer than --timeout: say so at start-up."""

from __future__ import annotations

import logging
import urllib.request
from pathlib import Path

import pytest
from werkzeug.test import Client

from zipmiddleware import FileTarget, ZipMiddleware

from .conftest import plain_app, write_tree
from .servers import PROJECT, GunicornServer

WARNING = "gunicorn's sync worker kills every download"


def serve(data: Path, *args: str) -> str:
    """Start tests/server_app.py under gunicorn with ``args``, fetch one download, return the log."""
    write_tree(data, {"a.bin": b"a" * 1000})
    with GunicornServer(
        "tests.server_app:app", pythonpath=[PROJECT], env={"ZM_TEST_DATA": str(data)}, args=args
    ) as server:
        with urllib.request.urlopen(server.url + "/file/a.bin", timeout=10) as response:
            assert response.read() == b"a" * 1000
        return server.log()


@pytest.mark.server
@pytest.mark.parametrize("preload", [False, True], ids=["in-worker", "preloaded"])
def test_sync_worker_is_warned_about_at_startup(tmp_path: Path, preload: bool) -> None:
    args = ["--worker-class", "sync", "--threads", "1", "--timeout", "45"]
    log = serve(tmp_path, *args, *(["--preload"] if preload else []))
    warnings = [line for line in log.splitlines() if WARNING in line]
    assert len(warnings) == 1, log  # once: at start-up, not again at the first download
    assert "--timeout (45 s here)" in warnings[0]
    assert "--worker-class gthread --threads 8" in warnings[0]


@pytest.mark.server
@pytest.mark.parametrize(
    "args",
    [["--worker-class", "gthread", "--threads", "2"], ["--worker-class", "sync", "--threads", "4"]],
    ids=["gthread", "sync-with-threads-is-gthread"],
)
def test_threaded_workers_are_not_warned_about(tmp_path: Path, args: list[str]) -> None:
    log = serve(tmp_path, *args)
    assert WARNING not in log
    assert "Booting worker" in log


def test_first_download_under_a_sync_worker_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Where start-up could not tell (the app was built outside gunicorn's loading), the first request does."""
    (tmp_path / "a.txt").write_bytes(b"a")
    middleware = ZipMiddleware(
        plain_app, routes={"/f": lambda request: FileTarget(tmp_path / "a.txt")}, roots=[str(tmp_path)]
    )
    client = Client(middleware)
    sync = {"SERVER_SOFTWARE": "gunicorn/27.0.1", "wsgi.multithread": False}
    with caplog.at_level(logging.WARNING, logger="zipmiddleware"):
        client.get("/other", environ_overrides=sync)  # not a download: not checked
        assert WARNING not in caplog.text
        for _ in range(3):
            assert client.get("/f", environ_overrides=sync).data == b"a"
    assert caplog.text.count(WARNING) == 1


@pytest.mark.parametrize(
    "environ",
    [
        {"SERVER_SOFTWARE": "gunicorn/27.0.1", "wsgi.multithread": True},  # gthread, gevent, eventlet
        {"SERVER_SOFTWARE": "waitress", "wsgi.multithread": False},
    ],
)
def test_other_servers_are_not_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, environ: dict[str, object]
) -> None:
    (tmp_path / "a.txt").write_bytes(b"a")
    middleware = ZipMiddleware(
        plain_app, routes={"/f": lambda request: FileTarget(tmp_path / "a.txt")}, roots=[str(tmp_path)]
    )
    with caplog.at_level(logging.WARNING, logger="zipmiddleware"):
        Client(middleware).get("/f", environ_overrides=environ)
    assert WARNING not in caplog.text
