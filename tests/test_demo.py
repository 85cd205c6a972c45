"""The demo: the Flask game library of examples/flask_app.py, as ``make demo`` serves it."""

from __future__ import annotations

import contextlib
import importlib
import sqlite3
import sys
from pathlib import Path
from types import ModuleType
from urllib.parse import quote

import pytest
from webtest import TestApp

from .test_examples import EXAMPLES, EXCLUDED_DIRS, expected_entries, read_zip, sha256

# -- the Flask game library --------------------------------------------------------------------


def import_flask_example(data: Path) -> ModuleType:
    """Import examples/flask_app.py afresh, with its data (games + database) under ``data``."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ZM_DEMO_DATA", str(data))
        patch.syspath_prepend(str(EXAMPLES))
        sys.modules.pop("flask_app", None)
        try:
            return importlib.import_module("flask_app")
        finally:
            sys.modules.pop("flask_app", None)


@pytest.fixture(scope="module")
def flask_example(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    return import_flask_example(tmp_path_factory.mktemp("flask-demo"))


@pytest.fixture
def flask_client(flask_example: ModuleType) -> TestApp:
    return TestApp(flask_example.app, lint=True)


def game_id(module: ModuleType, name: str) -> int:
    with contextlib.closing(sqlite3.connect(module.DATABASE)) as db:
        (number,) = db.execute("SELECT id FROM games WHERE name = ?", (name,)).fetchone()
    return int(number)


def insert_request(
    module: ModuleType, status: str, path: str | None, download_name: str | None = None
) -> int:
    """A download_requests row as a background job would leave it."""
    with contextlib.closing(sqlite3.connect(module.DATABASE)) as db, db:
        cursor = db.execute(
            "INSERT INTO download_requests (game_id, user_name, status, path, download_name)"
            " VALUES (1, 'guest', ?, ?, ?)",
            (status, path, download_name),
        )
    assert cursor.lastrowid is not None
    return cursor.lastrowid


def request_download(client: TestApp, module: ModuleType, name: str, status: str) -> str:
    """POST /games/<id>/request and check the JSON answers; return the download URL."""
    created = client.post(f"/games/{game_id(module, name)}/request", status=201)
    assert created.json["status"] == status
    assert created.json["download_url"] == f"/download/{created.json['id']}"
    polled = client.get(f"/requests/{created.json['id']}")
    assert polled.json["status"] == status
    assert polled.json["download_url"] == created.json["download_url"]
    return str(created.json["download_url"])


def test_flask_index_lists_every_game(flask_client: TestApp, flask_example: ModuleType) -> None:
    page = flask_client.get("/")
    assert page.content_type == "text/html"
    for name in flask_example.SAMPLE_GAMES:
        assert name in page.text
    assert page.text.count("Download</button>") == len(flask_example.SAMPLE_GAMES)


def test_flask_sample_library_is_the_same_on_every_start(flask_example: ModuleType, tmp_path: Path) -> None:
    again = import_flask_example(tmp_path)
    first = {
        p.relative_to(flask_example.GAMES): sha256(p.read_bytes())
        for p in flask_example.GAMES.rglob("*")
        if p.is_file()
    }
    second = {
        p.relative_to(again.GAMES): sha256(p.read_bytes()) for p in again.GAMES.rglob("*") if p.is_file()
    }
    assert first == second
    assert not list(tmp_path.glob(".games-*"))  # no staging folder left behind
    again.create_sample_library()  # a second start of the same data folder changes nothing
    with contextlib.closing(sqlite3.connect(again.DATABASE)) as db:
        assert db.execute("SELECT count(*) FROM games").fetchone()[0] == len(again.SAMPLE_GAMES)


def test_flask_single_file_game_is_sent_as_the_file(flask_client: TestApp, flask_example: ModuleType) -> None:
    url = request_download(flask_client, flask_example, "Doom (1993)", "available")
    source = (flask_example.GAMES / "Doom (1993)" / "DOOM.ZIP").read_bytes()
    response = flask_client.get(url)
    assert response.headers["Content-Length"] == str(len(source))
    assert "filename=DOOM.ZIP" in response.headers["Content-Disposition"]
    assert sha256(response.body) == sha256(source)


@pytest.mark.parametrize("name", ["Ōkami Fan Edition", "Commander Keen"])
def test_flask_multi_file_game_is_a_zip(flask_client: TestApp, flask_example: ModuleType, name: str) -> None:
    url = request_download(flask_client, flask_example, name, "streaming_ready")
    response = flask_client.get(url)
    assert response.content_type == "application/zip"
    assert f"filename*=UTF-8''{quote(name)}.zip" in response.headers["Content-Disposition"]
    entries = read_zip(response.body)
    expected = expected_entries(flask_example.GAMES / name)
    assert sorted(entries) == sorted(expected)
    assert {k: sha256(v) for k, v in entries.items()} == {k: sha256(v) for k, v in expected.items()}
    for entry in entries:
        assert not EXCLUDED_DIRS & set(entry.lower().split("/"))
        assert not entry.lower().endswith((".nfo", ".sfv", "file_id.diz"))


@pytest.mark.parametrize("status", ["pending", "processing"])
def test_flask_request_still_being_prepared_is_202(
    flask_client: TestApp, flask_example: ModuleType, status: str
) -> None:
    request_id = insert_request(flask_example, status, None)
    response = flask_client.get(f"/download/{request_id}", status=202)
    assert int(response.headers["Retry-After"]) > 0
    assert response.headers["Cache-Control"] == "no-store"


def test_flask_failed_request_is_an_error_without_internals(
    flask_client: TestApp, flask_example: ModuleType
) -> None:
    request_id = insert_request(flask_example, "failed", "/srv/internal/staging-7f3a", "INTERNAL-NAME.zip")
    response = flask_client.get(f"/download/{request_id}", expect_errors=True)
    assert 400 <= response.status_int < 600
    for secret in ("staging-7f3a", "/srv/internal", "INTERNAL-NAME", "Traceback"):
        assert secret not in response.text
    assert "Content-Disposition" not in response.headers


def test_flask_unknown_ids_are_404(flask_client: TestApp) -> None:
    flask_client.get("/download/999999", status=404)
    flask_client.get("/requests/999999", status=404)
    flask_client.post("/games/999999/request", status=404)


def test_flask_request_of_another_user_is_404(flask_client: TestApp, flask_example: ModuleType) -> None:
    url = request_download(flask_client, flask_example, "Quake", "available")
    flask_client.get(url, extra_environ={"REMOTE_USER": "mallory"}, status=404)


def test_flask_app_pages_still_reach_flask(flask_client: TestApp) -> None:
    flask_client.get("/no-such-page", status=404)  # Flask's own 404, not the middleware's
    flask_client.post("/download/1", status=405)  # download routes answer GET and HEAD only
