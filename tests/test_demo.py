"""The demo: the Flask game library of examples/flask_app.py, in process and as ``make demo`` serves it.

A download request is created as 'processing', prepared by a background thread and then served
by the middleware's built-in ``sql`` resolver from the request's row alone.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import shlex
import shutil
import sqlite3
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from email.message import Message
from html.parser import HTMLParser
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import quote

import pytest
from webtest import TestApp

from .clients import read_headers, run, unavailable, wait_for
from .clients import request as http_request
from .demo_server import DemoServer
from .servers import PROJECT
from .test_examples import EXAMPLES, EXCLUDED_DIRS, download_paths, expected_entries, read_zip, sha256
from .test_zip64 import crc32_of_zeros

FOUR_GIB = 1 << 32
WAITING = {"pending", "processing"}
PREPARE_SECONDS = 0.5  # in process; long enough to see 'processing', short enough to wait for
POLL_SECONDS = 0.25

# What the page must show, written out by hand: sizes and file counts after the exclude and
# ignore rules (Doom's .nfo, Keen's file_id.diz, updates/ and extras/ are not downloaded).
LISTING = {
    "Commander Keen": ("400.0 KiB", 4),
    "Doom (1993)": ("3.0 MiB", 1),
    "Megalith": ("5.0 GiB", 3),
    "Quake": ("2.0 MiB", 1),
    "Ōkami Fan Edition": ("1.9 MiB", 3),
}

# -- helpers -----------------------------------------------------------------------------------


def import_flask_example(data: Path, **env: str) -> ModuleType:
    """Import examples/flask_app.py afresh, with its data (games + database) under ``data``.

    ``env`` sets more ``ZM_DEMO_*`` variables for the import; preparing a download takes
    PREPARE_SECONDS unless it says otherwise.
    """
    settings = {
        "ZM_DEMO_DATA": str(data),
        "ZM_DEMO_PREPARE_SECONDS": str(PREPARE_SECONDS),
        "ZM_DEMO_POLL_SECONDS": str(POLL_SECONDS),
        "ZM_DEMO_BIG_GAME_GIB": "5",
        **env,
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in settings.items():
            patch.setenv(name, value)
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


def as_user(user: str | None) -> dict[str, str]:
    return {} if user is None else {"REMOTE_USER": user}


def game_id(module: ModuleType, name: str) -> int:
    with contextlib.closing(sqlite3.connect(module.DATABASE)) as db:
        (number,) = db.execute("SELECT id FROM games WHERE name = ?", (name,)).fetchone()
    return int(number)


def request_row(module: ModuleType, request_id: int) -> dict[str, Any]:
    with contextlib.closing(sqlite3.connect(module.DATABASE)) as db:
        db.row_factory = sqlite3.Row
        return dict(db.execute("SELECT * FROM download_requests WHERE id = ?", (request_id,)).fetchone())


def insert_request(
    module: ModuleType,
    status: str,
    path: str | None,
    download_name: str | None = None,
    error: str | None = None,
) -> int:
    """A download_requests row as a background job would leave it."""
    with contextlib.closing(sqlite3.connect(module.DATABASE)) as db, db:
        cursor = db.execute(
            "INSERT INTO download_requests (game_id, user_name, status, path, download_name, error)"
            " VALUES (1, 'guest', ?, ?, ?, ?)",
            (status, path, download_name, error),
        )
    assert cursor.lastrowid is not None
    return cursor.lastrowid


def check_request_json(body: dict[str, Any], game: str) -> None:
    """The JSON of a request names its game and URLs, never a path or an error text."""
    assert set(body) == {"id", "game", "status", "download_name", "status_url", "download_url"}
    assert body["game"] == game
    assert body["status_url"] == f"/requests/{body['id']}"
    assert body["download_url"] == f"/download/{body['id']}"


def create_request(client: TestApp, module: ModuleType, name: str, user: str | None = None) -> dict[str, Any]:
    """POST /games/<id>/requests: a new request, 'processing' until the background step is done."""
    created = client.post(f"/games/{game_id(module, name)}/requests", extra_environ=as_user(user), status=201)
    body = created.json
    check_request_json(body, name)
    assert body["status"] == "processing"
    assert body["download_name"] is None
    assert created.headers["Location"].endswith(body["status_url"])
    return dict(body)


def wait_until_prepared(
    client: TestApp, created: dict[str, Any], user: str | None = None, timeout: float = 20
) -> dict[str, Any]:
    """Poll the request's status URL, as the page does, until it leaves pending/processing."""
    deadline = time.monotonic() + timeout
    while True:
        polled = client.get(created["status_url"], extra_environ=as_user(user)).json
        check_request_json(polled, created["game"])
        if polled["status"] not in WAITING:
            return dict(polled)
        assert time.monotonic() < deadline, f"request {created['id']} still {polled['status']!r}"
        time.sleep(0.05)


def download_files(folder: Path) -> dict[str, int]:
    """The files a download of ``folder`` must hold, and their sizes, from the disk (no reading)."""
    return {name: path.stat().st_size for name, path in download_paths(folder).items()}


class GameRows(HTMLParser):
    """The rows of the index page: data-game -> its attributes and the text of its cells."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.rows: dict[str, dict[str, Any]] = {}
        self._row: dict[str, Any] | None = None
        self._cell: str | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        classes = (attributes.get("class") or "").split()
        if tag == "tr" and "data-game" in attributes:
            self._row = {"attrs": attributes, "cells": {}, "buttons": []}
            self.rows[str(attributes["data-game"])] = self._row
        elif self._row is not None and tag == "td" and classes:
            self._cell = classes[0]
            self._row["cells"][self._cell] = ""
            self._row["attrs"].update({f"{self._cell}:{k}": v for k, v in attributes.items()})
        elif self._row is not None and tag == "button":
            self._row["buttons"].append(classes)

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._cell = None
        elif tag == "tr":
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._row is not None and self._cell is not None:
            self._row["cells"][self._cell] += data


def zip64_tail(tail: bytes, total: int) -> dict[str, int]:
    """Check the last 98 bytes of a ZIP64 archive (ZIP64 end record, locator, end record)."""
    assert len(tail) == 98
    (
        signature,
        record_size,
        _made_by,
        _needed,
        _disk,
        _cd_disk,
        entries_here,
        entries,
        cd_size,
        cd_offset,
    ) = struct.unpack("<4sQHHIIQQQQ", tail[:56])
    assert signature == b"PK\x06\x06", tail[:4]
    assert record_size == 44
    assert entries_here == entries
    assert cd_offset + cd_size == total - 98  # the central directory ends where the end records begin
    signature, _disk, record_at, disks = struct.unpack("<4sIQI", tail[56:76])
    assert signature == b"PK\x06\x07"
    assert (record_at, disks) == (total - 98, 1)
    signature, *_, end_cd_offset, comment_size = struct.unpack("<4sHHHHIIH", tail[76:])
    assert signature == b"PK\x05\x06"
    assert end_cd_offset == 0xFFFFFFFF  # too big for the old field: only the ZIP64 record holds it
    assert comment_size == 0
    return {"entries": entries, "cd_size": cd_size, "cd_offset": cd_offset}


# -- the page ----------------------------------------------------------------------------------


def test_index_lists_every_game_with_size_and_file_count(
    flask_client: TestApp, flask_example: ModuleType
) -> None:
    page = flask_client.get("/")
    assert page.content_type == "text/html"
    rows = GameRows(page.text).rows
    assert list(rows) == sorted(LISTING)  # every game, in name order
    assert set(rows) == set(flask_example.SAMPLE_GAMES)
    for name, (size, count) in LISTING.items():
        row = rows[name]
        files = download_files(flask_example.GAMES / name)
        assert (row["cells"]["size"], int(row["cells"]["files"])) == (size, count), name
        assert len(files) == count, name
        assert int(row["attrs"]["size:data-bytes"]) == sum(files.values()), name
        assert row["attrs"]["data-request-url"] == f"/games/{game_id(flask_example, name)}/requests"
        assert row["buttons"] == [["download"]], name
        assert row["cells"]["status"].strip() == ""
    assert sum(download_files(flask_example.GAMES / "Megalith").values()) > 5 << 30
    # Self-contained: inline style and script, nothing fetched from elsewhere.
    for outside in ("http://", "https://", "<script src", '<link rel="stylesheet"', "@import"):
        assert outside not in page.text
    assert f"const POLL_MS = {round(POLL_SECONDS * 1000)};" in page.text
    assert "Megalith is mostly sparse files" in page.text


@pytest.mark.parametrize(
    ("size", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (400 << 10, "400.0 KiB"), ((1 << 20) - 1, "1.0 MiB"),
     (3 << 20, "3.0 MiB"), (1966080, "1.9 MiB"), (5 << 30, "5.0 GiB"), (3 << 40, "3.0 TiB")],
)  # fmt: skip
def test_human_size(flask_example: ModuleType, size: int, text: str) -> None:
    assert flask_example.human_size(size) == text


def test_sample_library_is_the_same_on_every_start(flask_example: ModuleType, tmp_path: Path) -> None:
    def fingerprint(games: Path) -> dict[str, tuple[int, int, str]]:
        found = {}
        for path in games.rglob("*"):
            if path.is_file():
                stat = path.stat()
                # Sparse files hold zeros; reading 5 GiB of them would say nothing more.
                digest = "sparse" if stat.st_size >= flask_example.SPARSE_FROM else sha256(path.read_bytes())
                found[path.relative_to(games).as_posix()] = (stat.st_size, int(stat.st_mtime), digest)
        return found

    again = import_flask_example(tmp_path)
    first = fingerprint(flask_example.GAMES)
    assert first == fingerprint(again.GAMES)
    assert {mtime for _, mtime, _ in first.values()} == {flask_example.SAMPLE_MTIME}
    assert not list(tmp_path.glob(".game*"))  # no staging folder left behind
    # A second start of the same data folder writes back a missing game and changes nothing else.
    shutil.rmtree(again.GAMES / "Quake")
    again.create_sample_library()
    assert fingerprint(again.GAMES) == first
    with contextlib.closing(sqlite3.connect(again.DATABASE)) as db:
        assert db.execute("SELECT count(*) FROM games").fetchone()[0] == len(again.SAMPLE_GAMES)


def test_big_game_is_sparse(flask_example: ModuleType) -> None:
    data = flask_example.GAMES / "Megalith" / "data"
    sizes = {path.name: path.stat().st_size for path in data.iterdir()}
    assert sizes == {"world.pak": (9 << 30) // 2, "movies.pak": 1 << 29}
    for path in data.iterdir():
        assert path.stat().st_blocks * 512 < 1 << 20, f"{path.name} takes disk space"


def test_big_game_can_be_left_out(tmp_path: Path) -> None:
    small = import_flask_example(tmp_path, ZM_DEMO_BIG_GAME_GIB="0")
    assert "Megalith" not in small.SAMPLE_GAMES
    assert not (small.GAMES / "Megalith").exists()
    page = TestApp(small.app).get("/")
    assert set(GameRows(page.text).rows) == set(LISTING) - {"Megalith"}
    assert "Megalith" not in page.text


def test_database_of_an_earlier_demo_gets_the_error_column(tmp_path: Path) -> None:
    with contextlib.closing(sqlite3.connect(tmp_path / "library.db")) as db, db:
        db.executescript(
            """
            CREATE TABLE games (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, path TEXT NOT NULL);
            CREATE TABLE download_requests (
                id INTEGER PRIMARY KEY AUTOINCREMENT, game_id INTEGER NOT NULL REFERENCES games (id),
                user_name TEXT NOT NULL, status TEXT NOT NULL, path TEXT, download_name TEXT,
                created_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP);
            INSERT INTO games VALUES (1, 'Doom (1993)', 'Doom (1993)');
            INSERT INTO download_requests (game_id, user_name, status) VALUES (1, 'guest', 'pending');
            """
        )
    module = import_flask_example(tmp_path)
    row = request_row(module, 1)
    assert (row["status"], row["error"]) == ("pending", None)
    TestApp(module.app).get("/download/1", status=202)


# -- the download flow -------------------------------------------------------------------------


def test_single_file_game_is_prepared_then_sent_as_the_file(
    flask_client: TestApp, flask_example: ModuleType
) -> None:
    created = create_request(flask_client, flask_example, "Doom (1993)")
    # The background step has not finished yet: the request and its download say so.
    assert flask_client.get(created["status_url"]).json["status"] == "processing"
    waiting = flask_client.get(created["download_url"], status=202)
    assert int(waiting.headers["Retry-After"]) > 0
    ready = wait_until_prepared(flask_client, created)
    assert (ready["status"], ready["download_name"]) == ("available", "DOOM.ZIP")
    source = flask_example.GAMES / "Doom (1993)" / "DOOM.ZIP"
    assert request_row(flask_example, created["id"])["path"] == str(source)
    response = flask_client.get(created["download_url"])
    assert response.headers["Content-Length"] == str(source.stat().st_size)
    assert "attachment; filename=DOOM.ZIP" in response.headers["Content-Disposition"]
    assert sha256(response.body) == sha256(source.read_bytes())


@pytest.mark.parametrize("name", ["Ōkami Fan Edition", "Commander Keen"])
def test_multi_file_game_is_prepared_then_zipped(
    flask_client: TestApp, flask_example: ModuleType, name: str
) -> None:
    created = create_request(flask_client, flask_example, name)
    flask_client.get(created["download_url"], status=202)
    ready = wait_until_prepared(flask_client, created)
    assert (ready["status"], ready["download_name"]) == ("streaming_ready", f"{name}.zip")
    assert request_row(flask_example, created["id"])["path"] == str(flask_example.GAMES / name)
    response = flask_client.get(created["download_url"])
    assert response.content_type == "application/zip"
    assert f"filename*=UTF-8''{quote(name)}.zip" in response.headers["Content-Disposition"]
    entries = read_zip(response.body)
    expected = expected_entries(flask_example.GAMES / name)
    assert sorted(entries) == sorted(expected)
    assert {k: sha256(v) for k, v in entries.items()} == {k: sha256(v) for k, v in expected.items()}
    assert len(entries) == LISTING[name][1]
    for entry in entries:
        assert not EXCLUDED_DIRS & set(entry.lower().split("/"))
        assert not entry.lower().endswith((".nfo", ".sfv", "file_id.diz"))


def test_big_sparse_game_is_a_zip64_archive(flask_client: TestApp, flask_example: ModuleType) -> None:
    created = create_request(flask_client, flask_example, "Megalith")
    ready = wait_until_prepared(flask_client, created)
    assert (ready["status"], ready["download_name"]) == ("streaming_ready", "Megalith.zip")
    files = download_files(flask_example.GAMES / "Megalith")
    head = flask_client.head(created["download_url"])
    total = int(head.headers["Content-Length"])
    assert head.content_type == "application/zip"
    assert head.headers["Accept-Ranges"] == "bytes"
    assert sum(files.values()) < total < sum(files.values()) + 4096
    assert total > FOUR_GIB
    # The end records only: the middleware reads no file data for them.
    tail = flask_client.get(created["download_url"], headers={"Range": "bytes=-98"}, status=206)
    assert tail.headers["Content-Range"] == f"bytes {total - 98}-{total - 1}/{total}"
    assert tail.headers["ETag"] == head.headers["ETag"]
    end = zip64_tail(tail.body, total)
    assert end["entries"] == len(files) == 3
    assert end["cd_offset"] > sum(files.values())


@pytest.mark.parametrize("status", ["pending", "processing"])
def test_request_still_being_prepared_is_202(
    flask_client: TestApp, flask_example: ModuleType, status: str
) -> None:
    request_id = insert_request(flask_example, status, None)
    response = flask_client.get(f"/download/{request_id}", status=202)
    assert int(response.headers["Retry-After"]) > 0
    assert response.headers["Cache-Control"] == "no-store"
    assert "Content-Disposition" not in response.headers
    assert flask_client.get(f"/requests/{request_id}").json["status"] == status


def test_failed_request_is_an_error_without_internals(
    flask_client: TestApp, flask_example: ModuleType
) -> None:
    request_id = insert_request(
        flask_example,
        "failed",
        "/srv/internal/staging-7f3a",
        "INTERNAL-NAME.zip",
        "Traceback (most recent call last): OSError: /srv/internal/staging-7f3a is gone",
    )
    response = flask_client.get(f"/download/{request_id}", status=500)
    assert "could not be prepared" in response.text
    for secret in ("staging-7f3a", "/srv/internal", "INTERNAL-NAME", "Traceback", "OSError"):
        assert secret not in response.text
    assert "Content-Disposition" not in response.headers
    polled = flask_client.get(f"/requests/{request_id}")
    assert polled.json["status"] == "failed"
    assert polled.json["download_name"] is None
    for secret in ("staging-7f3a", "INTERNAL-NAME", "Traceback"):
        assert secret not in polled.text


def test_background_failure_is_recorded_and_not_shown(
    flask_client: TestApp, flask_example: ModuleType
) -> None:
    """A game whose folder is gone: the background step fails, keeps why, and users see a generic text."""
    with contextlib.closing(sqlite3.connect(flask_example.DATABASE)) as db, db:
        db.execute("INSERT OR IGNORE INTO games (name, path) VALUES ('The Lost Vikings', 'The Lost Vikings')")
    created = create_request(flask_client, flask_example, "The Lost Vikings")
    failed = wait_until_prepared(flask_client, created)
    assert (failed["status"], failed["download_name"]) == ("failed", None)
    row = request_row(flask_example, created["id"])
    assert row["error"].startswith("FileNotFoundError: ") and "The Lost Vikings" in row["error"]
    response = flask_client.get(created["download_url"], status=500)
    assert "The Lost Vikings" not in response.text and "FileNotFoundError" not in response.text
    assert "The Lost Vikings" not in flask_client.get("/").text  # not a game of the library


def test_request_of_another_user_is_404(flask_client: TestApp, flask_example: ModuleType) -> None:
    created = create_request(flask_client, flask_example, "Quake", user="alice")
    assert request_row(flask_example, created["id"])["user_name"] == "alice"
    flask_client.get(created["status_url"], status=404)  # guest
    flask_client.get(created["status_url"], extra_environ=as_user("mallory"), status=404)
    ready = wait_until_prepared(flask_client, created, user="alice")
    assert ready["status"] == "available"
    flask_client.get(created["download_url"], status=404)
    flask_client.get(created["download_url"], extra_environ=as_user("mallory"), status=404)
    response = flask_client.get(created["download_url"], extra_environ=as_user("alice"))
    assert response.body == (flask_example.GAMES / "Quake" / "quake.iso").read_bytes()
    # And the other way round: alice cannot see a guest's request.
    mine = create_request(flask_client, flask_example, "Quake")
    flask_client.get(mine["status_url"], extra_environ=as_user("alice"), status=404)
    flask_client.get(mine["download_url"], extra_environ=as_user("alice"), status=404)


def test_unknown_ids_are_404(flask_client: TestApp) -> None:
    flask_client.get("/download/999999", status=404)
    flask_client.get("/requests/999999", status=404)
    flask_client.post("/games/999999/requests", status=404)


def test_app_pages_still_reach_flask(flask_client: TestApp) -> None:
    flask_client.get("/no-such-page", status=404)  # Flask's own 404, not the middleware's
    flask_client.post("/download/1", status=405)  # download routes answer GET and HEAD only
    flask_client.get("/games/1/requests", status=405)  # a request is made with POST only


# -- as `make demo` runs it: gunicorn, gthread, 2 workers, preload_app -------------------------


def call(demo: DemoServer, path: str, method: str = "GET", **headers: str) -> tuple[int, Message, bytes]:
    """One request with urllib: status, headers, body (error statuses included)."""
    prepared = urllib.request.Request(demo.url + path, method=method, headers=headers)
    try:
        with urllib.request.urlopen(prepared, timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers, error.read()


def prepare_over_http(demo: DemoServer, request_url: str, game: str) -> dict[str, Any]:
    """POST the request, see it 'processing' (its download a 202), poll until it is done."""
    status, headers, body = call(demo, request_url, "POST")
    assert status == 201, body
    created = json.loads(body)
    check_request_json(created, game)
    assert created["status"] == "processing"
    assert headers["Location"].endswith(created["status_url"])
    status, headers, _ = call(demo, created["download_url"])
    assert status == 202 and int(headers["Retry-After"]) > 0
    deadline = time.monotonic() + 30
    while True:
        status, _, body = call(demo, created["status_url"])
        assert status == 200
        polled = json.loads(body)
        if polled["status"] not in WAITING:
            return dict(polled)
        assert time.monotonic() < deadline, f"{game}: still {polled['status']!r}"
        time.sleep(0.1)


@pytest.fixture
def tools() -> None:
    for tool in ("curl", "unzip"):
        if shutil.which(tool) is None:
            unavailable(f"{tool} is not installed")


def make_demo_words(*arguments: str, env: dict[str, str] | None = None) -> list[str]:
    """The command ``make -n demo`` prints (a dry run: nothing starts), split into words."""
    if shutil.which("make") is None:
        unavailable("make is not installed")
    # Neither a PORT of this shell nor the flags of a `make test` running these tests may leak in.
    environment = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PORT", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")
    }
    environment.update(env or {})
    result = subprocess.run(
        ["make", "-n", "demo", *arguments],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        env=environment,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    # Only the demo's own line: a stale .venv would add the lines that rebuild it.
    (line,) = [line for line in result.stdout.splitlines() if "gunicorn.conf.py" in line]
    return shlex.split(line)


@pytest.mark.parametrize(
    ("arguments", "env", "port"),
    [((), {}, 8000), (("PORT=8123",), {}, 8123), ((), {"PORT": "8124"}, 8124)],
    ids=["default", "make-variable", "environment"],
)
def test_make_demo_binds_the_chosen_port(arguments: tuple[str, ...], env: dict[str, str], port: int) -> None:
    """`make demo PORT=8123` (or PORT in the environment) is the way round a busy port 8000.
    DemoServer runs this very command on a free port, so the tests start the demo as users do."""
    words = make_demo_words(*arguments, env=env)
    assert words[:3] == ["cd", "examples", "&&"]
    assert Path(words[3]).name == "gunicorn"
    assert words[4:] == ["-c", "gunicorn.conf.py", "-b", f"127.0.0.1:{port}", "flask_app:app"]
    demo = DemoServer(Path("unused"))
    demo.port = port
    assert words[4:] == demo.command[1:]


def test_readme_lists_the_packages_ci_installs() -> None:
    """The README's Quick start names the system packages the tests need: those of .ci/run."""
    readme = (PROJECT / "README.md").read_text(encoding="utf-8")
    quick_start = readme[readme.index("## Quick start") : readme.index("## Set-ups")]
    (documented,) = re.findall(r"`apt-get install ([^`]*)`", quick_start)
    ci = (PROJECT / ".ci" / "run").read_text(encoding="utf-8").replace("\\\n", " ")
    (installed,) = re.findall(r"apt-get install (.*)", ci)
    assert documented.split() == [word for word in installed.split() if not word.startswith("-")]


@pytest.mark.server
@pytest.mark.usefixtures("tools")
def test_demo_under_gunicorn_as_make_demo_runs_it(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with DemoServer(data, prepare_seconds=1) as demo:
        assert wait_for(lambda: len(demo.worker_pids()) == 2, timeout=15)  # gunicorn.conf.py was read
        # -b replaced the config file's bind (127.0.0.1:8000) rather than adding to it.
        assert re.findall(r"Listening at: (\S+)", demo.log()) == [demo.url]
        status, headers, body = call(demo, "/")
        assert status == 200 and headers.get_content_type() == "text/html"
        rows = GameRows(body.decode()).rows
        assert {
            name: (row["cells"]["size"], int(row["cells"]["files"])) for name, row in rows.items()
        } == LISTING

        keen = prepare_over_http(demo, rows["Commander Keen"]["attrs"]["data-request-url"], "Commander Keen")
        assert (keen["status"], keen["download_name"]) == ("streaming_ready", "Commander Keen.zip")
        archive = tmp_path / "keen.zip"
        fetched = run(
            ["curl", "-sS", "-f", "-D", tmp_path / "headers", "-o", archive, demo.url + keen["download_url"]]
        )
        assert fetched.returncode == 0, fetched.stderr
        status, fields = read_headers(tmp_path / "headers")
        assert status == 200
        assert fields["content-length"] == [str(archive.stat().st_size)]
        assert fields["content-type"] == ["application/zip"]
        tested = run(["unzip", "-t", archive])
        assert tested.returncode == 0, tested.stdout + tested.stderr
        assert b"No errors detected" in tested.stdout
        expected = expected_entries(data / "games" / "Commander Keen")
        assert read_zip(archive.read_bytes()) == expected
        assert len(expected) == 4

        doom = prepare_over_http(demo, rows["Doom (1993)"]["attrs"]["data-request-url"], "Doom (1993)")
        assert (doom["status"], doom["download_name"]) == ("available", "DOOM.ZIP")
        status, headers, body = call(demo, doom["download_url"])
        assert status == 200 and "filename=DOOM.ZIP" in headers["Content-Disposition"]
        assert body == (data / "games" / "Doom (1993)" / "DOOM.ZIP").read_bytes()

        # on_download recorded both completed downloads in the demo's database.
        def completed() -> list[tuple[Any, ...]]:
            with contextlib.closing(sqlite3.connect(data / "library.db")) as db:
                query = "SELECT request_id, user_name, download_name, bytes FROM completed_downloads"
                return db.execute(query + " ORDER BY id").fetchall()

        assert wait_for(lambda: len(completed()) == 2, timeout=5), completed()
        assert completed() == [
            (keen["id"], "guest", "Commander Keen.zip", archive.stat().st_size),
            (doom["id"], "guest", "DOOM.ZIP", len(body)),
        ]

        big = prepare_over_http(demo, rows["Megalith"]["attrs"]["data-request-url"], "Megalith")
        response, _ = http_request(demo, "HEAD", big["download_url"])
        total = int(response.headers["Content-Length"])
        assert response.status == 200 and total > FOUR_GIB
        response, tail = http_request(demo, "GET", big["download_url"], {"Range": "bytes=-98"})
        assert response.status == 206
        assert zip64_tail(tail, total)["entries"] == 3

        status, _, _ = call(demo, "/requests/999999")
        assert status == 404
    assert "Traceback" not in demo.log()


class SparseWriter:
    """Write a download to disk, leaving holes where it is all zeros: 5 GiB take a few KiB."""

    def __init__(self, path: Path) -> None:
        self.file = path.open("wb")
        self.size = 0

    def write(self, chunk: bytes) -> None:
        if chunk.count(0) == len(chunk):
            self.file.seek(len(chunk), 1)
        else:
            self.file.write(chunk)
        self.size += len(chunk)

    def close(self) -> None:
        self.file.truncate(self.size)
        self.file.close()


@pytest.mark.server
@pytest.mark.slow
def test_demo_streams_the_big_game_whole(tmp_path: Path) -> None:
    """The whole 5 GiB ZIP64 archive of Megalith through gunicorn: every byte promised arrives,
    and the central directory holds every file with the CRC-32 of what was sent."""
    data = tmp_path / "data"
    with DemoServer(data, prepare_seconds=0.2) as demo:
        status, _, body = call(demo, "/")
        request_url = GameRows(body.decode()).rows["Megalith"]["attrs"]["data-request-url"]
        big = prepare_over_http(demo, request_url, "Megalith")
        output = tmp_path / "Megalith.zip"
        writer = SparseWriter(output)
        started = time.monotonic()
        with urllib.request.urlopen(demo.url + big["download_url"], timeout=60) as response:
            total = int(response.headers["Content-Length"])
            while chunk := response.read(1 << 20):
                writer.write(chunk)
        writer.close()
        elapsed = time.monotonic() - started
    assert writer.size == total > FOUR_GIB, f"{writer.size} of {total} bytes in {elapsed:.1f} s"
    exe = (data / "games" / "Megalith" / "megalith.exe").read_bytes()
    with zipfile.ZipFile(output) as archive:
        found = {info.filename: (info.file_size, info.CRC) for info in archive.infolist()}
        assert archive.read("megalith.exe") == exe
    assert found == {
        "data/movies.pak": (1 << 29, crc32_of_zeros(1 << 29)),
        "data/world.pak": ((9 << 30) // 2, crc32_of_zeros((9 << 30) // 2)),
        "megalith.exe": (len(exe), zlib.crc32(exe)),
    }
