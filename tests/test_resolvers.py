"""The built-in resolvers: ``directory`` and ``sql`` (SQLite, and a real PostgreSQL server).

Each is used as a callable and as a route table (``{resolver = "directory", root = ...}``),
in process (webtest with its WSGI lint on) and under a real gunicorn (``tests/directory_app.py``).
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import sys
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from webtest import TestApp
from werkzeug.test import EnvironBuilder
from werkzeug.wrappers import Request

from zipmiddleware import ConfigError, ZipMiddleware
from zipmiddleware.planning import NOT_FOUND, SERVER_ERROR
from zipmiddleware.resolvers import directory, sql

from .clients import read_headers, run, unavailable, wait_for
from .conftest import plain_app, read_zip, write_tree
from .postgres import DOWNLOADS_TABLE, postgresql_url_fixture  # noqa: F401  (the fixture "postgresql_url")
from .servers import PROJECT, GunicornServer

RULE = "/files/<path:subpath>"
KEY = f"routes[{RULE!r}]"
LIBRARY = {
    "top.txt": b"at the top\n",
    "quake/quake.exe": b"MZ" + b"q" * 5000,
    "quake/id1/pak0.pak": bytes(range(256)) * 40,
    "quake/readme.nfo": b"ignored by the middleware's ignore",
    "quake/updates/patch.exe": b"excluded by the middleware's exclude",
    "doom/doom.wad": b"IWAD" + b"d" * 9000,
    "doom/doom.nfo": b"ignored: the folder is left with one file",
}
QUAKE_ENTRIES = {"quake.exe", "id1/pak0.pak"}
SECRET = b"root:x:0:0 a secret outside the root\n"


def body_reveals_nothing(text: str, *paths: Path | str) -> bool:
    return not any(marker in text for marker in ("Traceback", "root:", "secret", *map(str, paths)))


# -- directory: in process ---------------------------------------------------------------------


@pytest.fixture
def library(tmp_path: Path) -> Path:
    """A root to serve, with a secret file and folder next to it (and one whose name extends the root's)."""
    root = write_tree(tmp_path / "library", LIBRARY)
    write_tree(tmp_path / "outside", {"secret.txt": SECRET, "more.txt": SECRET})
    write_tree(tmp_path / "library-private", {"secret.txt": SECRET})
    return root


def files_app(routes: dict[str, Any], **options: Any) -> TestApp:
    options.setdefault("exclude", ["updates"])
    options.setdefault("ignore", ["*.nfo"])
    return TestApp(ZipMiddleware(plain_app, routes=routes, **options), lint=True)


@pytest.fixture(params=["callable", "table"])
def route(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """A directory route as Python gives it (``directory(...)``) or as configuration does (a table)."""
    if request.param == "callable":
        return lambda **parameters: directory(**parameters)
    return lambda **parameters: {"resolver": "directory", **{k: os.fspath(v) for k, v in parameters.items()}}


@pytest.fixture
def files(library: Path, route: Callable[..., Any]) -> TestApp:
    return files_app({RULE: route(root=library)})


def test_a_file_is_served_as_it_is(files: TestApp, library: Path) -> None:
    for rel in ("top.txt", "quake/quake.exe", "quake/id1/pak0.pak"):
        response = files.get(f"/files/{rel}")
        assert response.body == LIBRARY[rel]
        assert response.content_length == len(LIBRARY[rel])
        name = rel.rsplit("/", 1)[-1]
        assert (
            response.headers["Content-Disposition"] == f"attachment; filename={name}; filename*=UTF-8''{name}"
        )
        assert response.content_type != "application/zip"


def test_a_folder_is_a_zip_with_exclude_and_ignore_applied(files: TestApp, library: Path) -> None:
    response = files.get("/files/quake")
    assert response.content_type == "application/zip"
    assert "filename=quake.zip" in response.headers["Content-Disposition"]
    entries = read_zip(response.body)
    assert set(entries) == QUAKE_ENTRIES
    assert all(entries[name] == LIBRARY[f"quake/{name}"] for name in entries)


def test_a_folder_left_with_one_file_is_sent_as_that_file(files: TestApp) -> None:
    response = files.get("/files/doom")
    assert response.body == LIBRARY["doom/doom.wad"]
    assert "filename=doom.wad" in response.headers["Content-Disposition"]


def test_a_rule_without_argument_serves_the_whole_root(library: Path, route: Callable[..., Any]) -> None:
    response = files_app({"/everything": route(root=library)}).get("/everything")
    assert "filename=library.zip" in response.headers["Content-Disposition"]
    assert read_zip(response.body) == {
        "doom/doom.wad": LIBRARY["doom/doom.wad"],
        "quake/id1/pak0.pak": LIBRARY["quake/id1/pak0.pak"],
        "quake/quake.exe": LIBRARY["quake/quake.exe"],
        "top.txt": LIBRARY["top.txt"],
    }


def test_argument_picks_the_route_argument(library: Path, route: Callable[..., Any]) -> None:
    app = files_app(
        {
            "/shelf/<shelf>/<path:item>": route(root=library, argument="item"),
            "/by/<game>/<int:copy>": route(root=library, argument="game"),
            "/default/<int:n>/<path:path>": route(root=library),  # "path" is a known name
            "/only/<name>": route(root=library),  # the rule's only argument
        }
    )
    assert app.get("/shelf/anything/doom/doom.wad").body == LIBRARY["doom/doom.wad"]
    assert set(read_zip(app.get("/by/quake/3").body)) == QUAKE_ENTRIES
    assert app.get("/default/7/top.txt").body == LIBRARY["top.txt"]
    assert set(read_zip(app.get("/only/quake").body)) == QUAKE_ENTRIES
    app.get("/shelf/quake/nothing", status=404)  # the shelf is not part of the path


def test_the_resolver_root_becomes_a_root_of_the_middleware(
    library: Path, tmp_path: Path, route: Callable[..., Any]
) -> None:
    (tmp_path / "via-link").symlink_to(library)
    middleware = ZipMiddleware(plain_app, routes={RULE: route(root=tmp_path / "via-link")})
    assert middleware.settings.roots == (str(library),)
    assert TestApp(middleware).get("/files/top.txt").body == LIBRARY["top.txt"]
    other = tmp_path / "outside"
    middleware = ZipMiddleware(plain_app, routes={RULE: route(root=library)}, roots=[other])
    assert middleware.settings.roots == (str(other), str(library))


def test_the_same_root_twice_is_one_root(library: Path) -> None:
    middleware = ZipMiddleware(
        plain_app,
        routes={RULE: directory(root=library), "/all": {"resolver": "directory", "root": str(library)}},
        roots=[library],
    )
    assert middleware.settings.roots == (str(library),)


def test_a_directory_table_from_a_toml_file(library: Path, tmp_path: Path) -> None:
    config = tmp_path / "downloads.toml"
    config.write_text(
        f'[zipmiddleware]\nignore = ["*.nfo"]\nexclude = ["updates"]\n\n'
        f'[zipmiddleware.routes]\n"{RULE}" = {{ resolver = "directory", root = "{library}" }}\n'
    )
    app = TestApp(ZipMiddleware.from_config(plain_app, config), lint=True)
    assert set(read_zip(app.get("/files/quake").body)) == QUAKE_ENTRIES


@pytest.mark.parametrize(
    ("rule", "parameters", "expected"),
    [
        (RULE, {"root": "{tmp}/nowhere"}, KEY + ".root: '{tmp}/nowhere' is not an existing directory"),
        (RULE, {"root": "{tmp}/library/top.txt"}, KEY + ".root: '{tmp}/library/top.txt' is not an existing directory"),
        (RULE, {"root": 42}, KEY + ".root: expected a folder path, got 42"),
        (RULE, {"root": ""}, KEY + ".root: expected a folder path, got ''"),
        (RULE, {"rot": "{tmp}/library"}, KEY + ".rot: directory takes no such parameter (did you mean 'root'? root, argument)"),
        (RULE, {}, KEY + ": directory takes root, argument: missing a required argument: 'root'"),
        (RULE, {"root": "{tmp}/library", "argument": "name"}, KEY + ".argument: the rule has no argument 'name'"),
        (RULE, {"root": "{tmp}/library", "argument": 3}, KEY + ".argument: expected the name of a route argument, got 3"),
        (
            "/a/<x>/<int:y>",
            {"root": "{tmp}/library"},
            "routes['/a/<x>/<int:y>'].argument: say which argument holds the path: ['x', 'y']",
        ),
    ],
    ids=["missing root", "root is a file", "root not a path", "empty root", "rot=", "no root",
         "unknown argument", "argument not a name", "several arguments"],
)  # fmt: skip
def test_directory_table_errors_name_the_key(
    library: Path, tmp_path: Path, rule: str, parameters: dict[str, Any], expected: str
) -> None:
    table = {"resolver": "directory"}
    table.update({k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in parameters.items()})
    with pytest.raises(ConfigError) as info:
        ZipMiddleware(plain_app, routes={rule: table})
    assert str(info.value) == expected.format(tmp=tmp_path)
    assert info.value.key == expected.format(tmp=tmp_path).split(": ", 1)[0]


def test_directory_errors_in_python(library: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^root: '.*/nowhere' is not an existing directory$"):
        directory(root=tmp_path / "nowhere")
    with pytest.raises(ConfigError) as info:
        ZipMiddleware(plain_app, routes={"/a/<x>/<y>": directory(root=library)})
    assert info.value.key == "routes['/a/<x>/<y>'].argument"
    with pytest.raises(ConfigError) as info:
        ZipMiddleware(plain_app, routes={RULE: directory(root=library, argument="sub")})
    assert str(info.value) == KEY + ".argument: the rule has no argument 'sub'"


def test_one_directory_resolver_serves_several_rules(library: Path) -> None:
    files = directory(root=library)
    app = files_app({RULE: files, "/everything": files, "/by-name/<path:name>": files})
    assert app.get("/files/top.txt").body == LIBRARY["top.txt"]
    assert app.get("/by-name/doom/doom.wad").body == LIBRARY["doom/doom.wad"]
    assert "top.txt" in read_zip(app.get("/everything").body)


@pytest.mark.parametrize(
    "path",
    [
        "/files/nothing.bin",
        "/files/quake/nothing",
        "/files/quake/quake.exe/more",
        "/files/../outside/secret.txt",
        "/files/quake/../../outside/secret.txt",
        "/files/%2e%2e/outside/secret.txt",
        "/files/..%2f..%2f..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
        "/files/../../../../../../../../etc/passwd",
        "/files/../library-private/secret.txt",  # a sibling whose name starts with the root's
        "/files/..",
        "/files/../outside",
        "/files/quake%00.exe",
        "/files/%00",
        "/files/top.txt%00.zip",
    ],
)
def test_paths_not_under_the_root_are_404(files: TestApp, path: str) -> None:
    response = files.get(path, status=404)
    assert response.text == NOT_FOUND + "\n"
    assert response.headers["Cache-Control"] == "no-store"


def test_a_path_with_a_leading_slash_is_no_download(files: TestApp) -> None:
    """``<path:...>`` cannot start with ``/``: ``/files//etc/passwd`` is not a route, so the app answers."""
    response = files.get("/files//etc/passwd")
    assert response.text == "from the app: /files//etc/passwd"


@pytest.mark.parametrize(
    "subpath", ["/etc/passwd", "/etc", "/", "a\x00b", "top.txt\x00", "../outside/secret.txt"]
)
def test_the_resolver_refuses_absolute_and_nul_paths(library: Path, subpath: str) -> None:
    resolver = directory(root=library)
    resolver.check_arguments({"subpath"})
    assert resolver(Request(EnvironBuilder("/x").get_environ()), subpath=subpath) is None


def test_symlinks_leaving_the_root_are_404(files: TestApp, library: Path, tmp_path: Path, caplog) -> None:
    (library / "link-out.txt").symlink_to(tmp_path / "outside" / "secret.txt")
    (library / "outdir").symlink_to(tmp_path / "outside")
    (library / "quake" / "relative-out").symlink_to("../../outside")
    (library / "private").symlink_to(tmp_path / "library-private")
    (library / "passwd").symlink_to("/etc/passwd")
    for path in [
        "link-out.txt",
        "outdir",
        "outdir/secret.txt",
        "quake/relative-out",
        "quake/relative-out/more.txt",
        "private/secret.txt",
        "private",
        "passwd",
    ]:
        response = files.get(f"/files/{path}", status=404)
        assert body_reveals_nothing(response.text, tmp_path), path
    # The folder that holds those links is still served, without them (the walk skips and logs them).
    with caplog.at_level(logging.WARNING, logger="zipmiddleware"):
        entries = read_zip(files.get("/files/quake").body)
    assert set(entries) == QUAKE_ENTRIES
    assert "resolves outside the roots" in caplog.text


def test_symlinks_staying_in_the_root_are_followed(files: TestApp, library: Path) -> None:
    (library / "latest.wad").symlink_to(library / "doom" / "doom.wad")
    (library / "quake-link").symlink_to("quake")
    assert files.get("/files/latest.wad").body == LIBRARY["doom/doom.wad"]
    assert files.get("/files/quake-link/quake.exe").body == LIBRARY["quake/quake.exe"]
    assert set(read_zip(files.get("/files/quake-link").body)) == QUAKE_ENTRIES


# -- directory: a real gunicorn ------------------------------------------------------------------


def require(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        unavailable(f"needs {', '.join(missing)} on PATH (Debian: curl unzip)")


def curl(url_path: str, server: GunicornServer, out: Path) -> tuple[int, bytes]:
    """GET with curl, the path sent exactly as written: status and body."""
    done = run(
        [
            "curl",
            "-sS",
            "--path-as-is",
            "--max-time",
            "20",
            "-o",
            out,
            "-w",
            "%{http_code}",
            server.url + url_path,
        ]
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout), out.read_bytes()


@pytest.mark.server
def test_directory_route_under_gunicorn_refuses_traversal(library: Path, tmp_path: Path) -> None:
    require("curl", "unzip")
    routes = f'{RULE} = {{ resolver = "directory", root = "{library}" }}'
    with GunicornServer(
        "tests.directory_app:app", pythonpath=[PROJECT], env={"ZM_TEST_ROUTES": routes}
    ) as server:
        for path in [
            "/files/../../etc/passwd",
            "/files/%2e%2e/%2e%2e/etc/passwd",
            "/files//etc/passwd",
            "/files/..%2f..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
            "/files/quake/../../../../../../../etc/passwd",
            "/files/../outside/secret.txt",
            "/files/%2e%2e/library-private/secret.txt",
            "/files/top.txt%00",
        ]:
            status, body = curl(path, server, tmp_path / "body")
            assert status == 404, (path, body)
            assert body_reveals_nothing(body.decode("latin-1"), tmp_path, library), (path, body)
            assert body in (NOT_FOUND.encode() + b"\n", b"not a download\n"), (path, body)
        # The routes do work: a file, and a folder that unzip accepts.
        status, body = curl("/files/doom/doom.wad", server, tmp_path / "doom.wad")
        assert (status, body) == (200, LIBRARY["doom/doom.wad"])
        status, body = curl("/files/quake", server, tmp_path / "quake.zip")
        assert status == 200
        tested = run(["unzip", "-t", tmp_path / "quake.zip"])
        assert tested.returncode == 0, tested.stdout + tested.stderr
        assert set(read_zip(body)) == QUAKE_ENTRIES
        log = server.log()
    assert "Traceback" not in log, log


# -- sql: a database of download requests ----------------------------------------------------------

DATA = {
    "alice/report.pdf": b"%PDF alice's report",
    "alice/album/a.jpg": b"\xff\xd8 first photo",
    "alice/album/sub/b.jpg": b"\xff\xd8 second photo",
    "alice/album/info.nfo": b"ignored",
    "bob/secret.txt": b"bob's secret",
    "public/readme.txt": b"for everyone\n",
    "public/bundle/one.bin": os.urandom(3000),
    "public/bundle/two/three.bin": os.urandom(70000),
}
FAILED_ERROR = "disk quota exceeded on /srv/internal/volume7 (job 4711)"
# id -> (user_name, status, path, download_name, error, retry_after); "{data}" is the data folder.
ROWS: dict[int, tuple[str | None, str, str | None, str | None, str | None, int | None]] = {
    1: ("alice", "available", "{data}/alice/report.pdf", None, None, None),
    2: ("alice", "streaming_ready", "{data}/alice/album", "Holiday Photos ü.zip", None, None),
    3: ("bob", "available", "{data}/bob/secret.txt", None, None, None),
    4: ("alice", "pending", None, None, None, 12),
    5: ("alice", "processing", None, None, None, None),
    6: ("alice", "failed", None, None, FAILED_ERROR, None),
    7: ("alice", "archived", "{data}/alice/report.pdf", None, None, None),
    8: ("alice", "available", "alice/report.pdf", "Report.pdf", None, None),
    9: ("guest", "available", "public/readme.txt", None, None, None),
    10: ("alice", "available", "../outside.txt", None, None, None),
    11: ("alice", "AVAILABLE ", None, None, None, None),
    12: ("guest", "streaming_ready", "public/bundle", "Bundle.zip", None, None),
    13: ("guest", "pending", None, None, None, 3),
}
QUERY = (
    "SELECT status, path, download_name, error, retry_after FROM downloads "
    "WHERE id = :id AND user_name = :remote_user"
)
GUEST_QUERY = (
    "SELECT status, path, download_name, retry_after FROM downloads "
    "WHERE id = :id AND user_name = COALESCE(:remote_user, 'guest')"
)
ALICE = {"REMOTE_USER": "alice"}
BOB = {"REMOTE_USER": "bob"}


@dataclass
class Database:
    kind: str
    url: str
    data: Path
    engine: Any

    def count(self, where: str = "1 = 1") -> int:
        with self.engine.connect() as connection:
            return int(
                connection.execute(sqlalchemy.text(f"SELECT count(*) FROM downloads WHERE {where}")).scalar()
            )


@pytest.fixture
def data(tmp_path: Path) -> Path:
    (tmp_path / "outside.txt").write_bytes(SECRET)
    return write_tree(tmp_path / "data", DATA)


def fill(url: str, data: Path) -> Any:
    """The table ``downloads`` (created if missing) holding exactly ROWS; an engine on it."""
    engine = sqlalchemy.create_engine(url)
    with engine.begin() as connection:
        connection.execute(sqlalchemy.text(DOWNLOADS_TABLE))
        connection.execute(sqlalchemy.text("DELETE FROM downloads"))
        connection.execute(
            sqlalchemy.text(
                "INSERT INTO downloads (id, user_name, status, path, download_name, error, retry_after) "
                "VALUES (:id, :user, :status, :path, :name, :error, :retry)"
            ),
            [
                {
                    "id": id,
                    "user": user,
                    "status": status,
                    "path": path.format(data=data) if path else None,
                    "name": name,
                    "error": error,
                    "retry": retry,
                }
                for id, (user, status, path, name, error, retry) in ROWS.items()
            ],
        )
    return engine


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.server)])
def database(request: pytest.FixtureRequest, tmp_path: Path, data: Path) -> Iterator[Database]:
    """The same table of download requests in an SQLite file and in a real PostgreSQL database."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'downloads.db'}"
    else:
        url = request.getfixturevalue("postgresql_url")
    engine = fill(url, data)
    yield Database(request.param, url, data, engine)
    engine.dispose()


@pytest.fixture
def sql_app(database: Database) -> Iterator[Callable[..., TestApp]]:
    """``sql_app(query=QUERY, rule=..., **table)``: a TestApp with one route configured as an sql
    table, whose ``root`` is the data folder unless the table gives one (None: no root)."""
    made: list[ZipMiddleware] = []

    def make(
        query: str = QUERY, rule: str = "/requests/<int:id>", roots: tuple[Path, ...] = (), **parameters: Any
    ) -> TestApp:
        parameters.setdefault("root", str(database.data))
        if parameters["root"] is None:
            del parameters["root"]
        table = {"resolver": "sql", "url": database.url, "query": query, **parameters}
        middleware = ZipMiddleware(plain_app, routes={rule: table}, roots=roots, ignore=["*.nfo"])
        made.append(middleware)
        return TestApp(middleware, lint=True)

    yield make
    for middleware in made:  # close every pool, so PostgreSQL is not left with idle connections
        for _rule, resolver in middleware.settings.routes:
            engine = getattr(resolver, "_engine", None)
            if engine is not None:
                engine.dispose()


def test_a_user_gets_only_their_own_rows(sql_app, database: Database) -> None:
    app = sql_app()
    response = app.get("/requests/1", extra_environ=ALICE)
    assert response.body == DATA["alice/report.pdf"]
    assert "filename=report.pdf" in response.headers["Content-Disposition"]
    assert app.get("/requests/3", extra_environ=BOB).body == DATA["bob/secret.txt"]
    for path, user in [
        ("/requests/3", ALICE),
        ("/requests/1", BOB),
        ("/requests/2", BOB),
        ("/requests/1", {}),
    ]:
        response = app.get(path, extra_environ=user, status=404)
        assert response.text == NOT_FOUND + "\n"


def test_a_route_argument_cannot_stand_in_for_the_user(sql_app) -> None:
    """A rule that captures ``remote_user`` does not let the URL choose it: REMOTE_USER is bound."""
    app = sql_app(rule="/users/<remote_user>/<int:id>")
    assert app.get("/users/bob/3", extra_environ=BOB).body == DATA["bob/secret.txt"]
    app.get("/users/bob/3", extra_environ=ALICE, status=404)
    app.get("/users/bob/3", status=404)


def test_a_ready_folder_is_a_zip_named_by_the_row(sql_app) -> None:
    response = sql_app().get("/requests/2", extra_environ=ALICE)
    assert response.content_type == "application/zip"
    disposition = response.headers["Content-Disposition"]
    assert "filename*=UTF-8''Holiday%20Photos%20%C3%BC.zip" in disposition
    assert read_zip(response.body) == {
        "a.jpg": DATA["alice/album/a.jpg"],
        "sub/b.jpg": DATA["alice/album/sub/b.jpg"],
    }


def test_pending_and_processing_are_202_with_retry_after(sql_app) -> None:
    app = sql_app()
    for id, retry_after in [(4, "12"), (5, "5")]:
        response = app.get(f"/requests/{id}", extra_environ=ALICE, status=202)
        assert response.headers["Retry-After"] == retry_after
        assert response.headers["Cache-Control"] == "no-store"
        assert response.text.startswith("Accepted")


def test_failed_is_a_generic_500_and_the_row_error_stays_in_the_log(sql_app, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="zipmiddleware"):
        response = sql_app().get("/requests/6", extra_environ=ALICE, status=500)
    assert response.text == "This download could not be prepared.\n"
    assert "quota" not in response.text and "/srv" not in response.text
    assert FAILED_ERROR in caplog.text


@pytest.mark.parametrize("id", [7, 11])  # an unknown status; a ready status without a path
def test_a_row_that_cannot_be_served_is_500(sql_app, caplog, id: int) -> None:
    with caplog.at_level(logging.ERROR, logger="zipmiddleware"):
        response = sql_app().get(f"/requests/{id}", extra_environ=ALICE, status=500)
    assert response.text == SERVER_ERROR + "\n"
    assert "unknown status 'archived'" in caplog.text or "has no 'path'" in caplog.text


def test_no_row_is_404(sql_app) -> None:
    app = sql_app()
    for path in ["/requests/999", "/requests/0"]:
        assert app.get(path, extra_environ=ALICE, status=404).text == NOT_FOUND + "\n"


def test_relative_paths_in_rows_are_under_root(sql_app, database: Database, tmp_path: Path) -> None:
    # Another root comes first: a relative path must still be taken below the resolver's root.
    elsewhere = write_tree(tmp_path / "elsewhere", {"alice/report.pdf": b"the wrong report"})
    app = sql_app(roots=(elsewhere,))
    assert app.app.settings.roots == (str(elsewhere), str(database.data))
    response = app.get("/requests/8", extra_environ=ALICE)
    assert response.body == DATA["alice/report.pdf"]
    assert "filename=Report.pdf" in response.headers["Content-Disposition"]
    assert app.get("/requests/1", extra_environ=ALICE).body == DATA["alice/report.pdf"]  # absolute, in root
    # A relative path leading out of root is refused by the middleware's roots, as not found.
    response = app.get("/requests/10", extra_environ=ALICE, status=404)
    assert response.text == NOT_FOUND + "\n"
    # Absolute paths outside root: refused too (bob's row is fine, the root below is not his).
    app = sql_app(root=str(database.data / "alice"))
    app.get("/requests/3", extra_environ=BOB, status=404)


def test_coalesce_of_remote_user_picks_the_guest_rows(sql_app, database: Database) -> None:
    app = sql_app(query=GUEST_QUERY)
    assert app.get("/requests/9").body == DATA["public/readme.txt"]
    assert read_zip(app.get("/requests/12").body) == {
        "one.bin": DATA["public/bundle/one.bin"],
        "two/three.bin": DATA["public/bundle/two/three.bin"],
    }
    app.get("/requests/9", extra_environ=ALICE, status=404)
    assert app.get("/requests/1", extra_environ=ALICE).body == DATA["alice/report.pdf"]


def test_without_root_or_roots_no_path_is_served(sql_app, caplog) -> None:
    app = sql_app(root=None)
    assert app.app.settings.roots == ()
    with caplog.at_level(logging.ERROR, logger="zipmiddleware"):
        assert app.get("/requests/1", extra_environ=ALICE, status=500).text == SERVER_ERROR + "\n"
    assert "no 'roots' configured" in caplog.text
    assert app.get("/requests/4", extra_environ=ALICE, status=202)  # rows without a path still work


def test_remote_user_can_be_tested_for_null(sql_app, database: Database) -> None:
    """``:remote_user IS NULL`` is the plain way to give anonymous requests the public rows."""
    query = (
        "SELECT status, path FROM downloads WHERE id = :id "
        "AND ((:remote_user IS NULL AND user_name = 'guest') OR user_name = :remote_user)"
    )
    app = sql_app(query=query)
    assert app.get("/requests/9").body == DATA["public/readme.txt"]
    assert app.get("/requests/1", extra_environ=ALICE).body == DATA["alice/report.pdf"]
    app.get("/requests/1", status=404)
    app.get("/requests/9", extra_environ=ALICE, status=404)


def test_the_query_runs_in_a_transaction_that_is_rolled_back(sql_app, database: Database) -> None:
    query = (
        "INSERT INTO downloads (id, user_name, status, path) "
        "VALUES (:id, :remote_user, 'available', 'alice/report.pdf') RETURNING status, path"
    )
    app = sql_app(query=query)
    assert app.get("/requests/100", extra_environ=ALICE).body == DATA["alice/report.pdf"]
    assert app.get("/requests/100", extra_environ=ALICE).body == DATA["alice/report.pdf"]  # no duplicate key
    assert database.count("id = 100") == 0
    assert database.count() == len(ROWS)


def test_a_database_error_is_a_generic_500_and_a_logged_traceback(
    sql_app, database: Database, caplog
) -> None:
    app = sql_app()
    assert app.get("/requests/1", extra_environ=ALICE).body == DATA["alice/report.pdf"]
    with database.engine.begin() as connection:
        connection.execute(sqlalchemy.text("DROP TABLE downloads"))
    with caplog.at_level(logging.ERROR, logger="zipmiddleware"):
        response = app.get("/requests/1", extra_environ=ALICE, status=500)
    assert response.text == SERVER_ERROR + "\n"
    assert response.headers["Cache-Control"] == "no-store"
    errors = [record for record in caplog.records if record.exc_info]
    assert errors and "resolver for /requests/<int:id> failed" in errors[0].getMessage()
    assert "Traceback" in caplog.text and "downloads" in caplog.text  # the table's name, in the log only
    assert "downloads" not in response.text and "Traceback" not in response.text


def test_the_sql_resolver_as_a_python_callable(database: Database) -> None:
    resolver = sql(database.url, QUERY, root=database.data)
    assert repr(resolver).startswith("sql(url=")
    middleware = ZipMiddleware(plain_app, routes={"/r/<int:id>": resolver})
    assert middleware.settings.roots == (str(database.data),)
    try:
        assert TestApp(middleware).get("/r/8", extra_environ=ALICE).body == DATA["alice/report.pdf"]
    finally:
        resolver.engine().dispose()


def test_the_engine_is_made_again_after_a_fork(database: Database) -> None:
    resolver = sql(database.url, "SELECT count(*) AS n FROM downloads WHERE id < :id")
    parent = resolver.engine()
    assert resolver.engine() is parent
    with parent.connect() as connection:
        assert connection.execute(resolver.statement, {"id": 4}).scalar() == 3
        pooled = connection.connection.dbapi_connection
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: report through the exit code only, and never return into pytest
        code = 70
        try:
            child = resolver.engine()
            if child is parent or child.pool is parent.pool:
                code = 71
            elif resolver.engine() is not child:
                code = 72
            else:
                with child.connect() as connection:
                    if connection.connection.dbapi_connection is pooled:
                        code = 73
                    elif connection.execute(resolver.statement, {"id": 4}).scalar() != 3:
                        code = 74
                    else:
                        code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, (
        "child: 70 raised, 71 kept the parent's engine, 72 engine not kept, 73 reused the parent's "
        "connection, 74 wrong answer"
    )
    # The parent keeps its engine, and its pooled connection is still alive after the child's exit.
    assert resolver.engine() is parent
    try:
        with parent.connect() as connection:
            assert connection.connection.dbapi_connection is pooled
            assert connection.execute(resolver.statement, {"id": 100}).scalar() == len(ROWS)
    finally:
        parent.dispose()


# -- sql: configuration errors, all raised when the middleware is built ----------------------------

SQL_KEY = "routes['/requests/<int:id>']"


@pytest.mark.parametrize(
    ("parameters", "expected"),
    [
        ({"url": "not a url"}, SQL_KEY + ".url: cannot use '<database URL>': Could not parse"),
        ({"url": ""}, SQL_KEY + ".url: expected a database URL, got ''"),
        ({"url": 5}, SQL_KEY + ".url: expected a database URL, got 5"),
        (
            {"url": "mysql+nosuchdriver://app:s3cret@db.example/app"},
            SQL_KEY + ".url: cannot use 'mysql+nosuchdriver://app:***@db.example/app': Can't load plugin",
        ),
        ({"url": "nosuchdb://host/db"}, SQL_KEY + ".url: cannot use 'nosuchdb://host/db': Can't load plugin"),
        ({"query": ""}, SQL_KEY + ".query: expected an SQL query, got ''"),
        ({"query": " \n "}, SQL_KEY + ".query: expected an SQL query, got ' \\n '"),
        ({"query": None}, SQL_KEY + ".query: expected an SQL query, got None"),
        (
            {"query": "SELECT status FROM downloads WHERE id = :id AND user_name = :user"},
            SQL_KEY + ".query: binds user, which the request does not give (it gives: id, remote_user)",
        ),
        (
            {"query": "SELECT status FROM downloads WHERE id = :ident AND owner = :owner"},
            SQL_KEY + ".query: binds ident, owner, which the request does not give",
        ),
        ({"root": "/no/such/folder"}, SQL_KEY + ".root: '/no/such/folder' is not an existing directory"),
        (
            {"uri": "sqlite://"},
            SQL_KEY + ".uri: sql takes no such parameter (did you mean 'url'? url, query, root)",
        ),
    ],
    ids=lambda value: str(value)[:40],
)
def test_sql_table_errors_are_raised_at_construction(
    tmp_path: Path, parameters: dict[str, Any], expected: str
) -> None:
    table = {"resolver": "sql", "url": f"sqlite:///{tmp_path / 'x.db'}", "query": QUERY, **parameters}
    with pytest.raises(ConfigError) as info:
        ZipMiddleware(plain_app, routes={"/requests/<int:id>": table})
    assert str(info.value).startswith(expected)
    assert info.value.key == expected.split(": ", 1)[0]
    assert "s3cret" not in str(info.value)
    assert not (tmp_path / "x.db").exists()  # nothing was opened to find out


def test_an_unknown_bind_is_caught_for_a_python_resolver_too(tmp_path: Path) -> None:
    resolver = sql(f"sqlite:///{tmp_path / 'x.db'}", "SELECT status FROM downloads WHERE id = :game")
    with pytest.raises(ConfigError) as info:
        ZipMiddleware(plain_app, routes={"/requests/<int:id>": resolver})
    assert (
        str(info.value)
        == SQL_KEY + ".query: binds game, which the request does not give (it gives: id, remote_user)"
    )


def test_a_missing_driver_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pymysql", None)  # as if PyMySQL were not installed
    table = {"resolver": "sql", "url": "mysql+pymysql://app:s3cret@127.0.0.1:9/app", "query": QUERY}
    with pytest.raises(ConfigError) as info:
        ZipMiddleware(plain_app, routes={"/requests/<int:id>": table})
    assert info.value.key == SQL_KEY + ".url"
    assert "pymysql" in str(info.value) and "s3cret" not in str(info.value)


def test_an_unreachable_database_fails_requests_not_start_up(tmp_path: Path, caplog) -> None:
    """Nothing connects at start-up, so an app starts while its database is down; requests get 500."""
    url = f"sqlite:///{tmp_path / 'no-such-folder' / 'x.db'}"
    middleware = ZipMiddleware(
        plain_app, routes={"/requests/<int:id>": {"resolver": "sql", "url": url, "query": QUERY}}
    )
    with caplog.at_level(logging.ERROR, logger="zipmiddleware"):
        response = TestApp(middleware, lint=True).get("/requests/1", extra_environ=ALICE, status=500)
    assert response.text == SERVER_ERROR + "\n"
    assert "no-such-folder" not in response.text and "unable to open database file" in caplog.text


# -- sql on PostgreSQL under a real gunicorn, two forked workers ------------------------------------------


@pytest.mark.server
def test_sql_route_on_postgresql_under_gunicorn_with_two_workers(
    postgresql_url: str, data: Path, tmp_path: Path
) -> None:
    require("curl", "unzip")
    engine = fill(postgresql_url, data)
    engine.dispose()
    table = f'{{ resolver = "sql", url = "{postgresql_url}", query = "{GUEST_QUERY}", root = "{data}" }}'
    env = {
        "ZM_TEST_ROUTES": f"/requests/<int:id> = {table}",
        # --preload: the master builds the app and answers this once, so its engine holds a pooled
        # connection when it forks; each worker must make its own.
        "ZM_TEST_WARM_UP": "/requests/12",
    }
    args = ["--workers", "2", "--preload"]
    with GunicornServer("tests.directory_app:app", pythonpath=[PROJECT], env=env, args=args) as server:
        assert wait_for(lambda: len(server.worker_pids()) == 2, timeout=15), server.log()
        workers = server.worker_pids()

        def download(index: int) -> tuple[int, Path, Path]:
            archive, headers = tmp_path / f"bundle-{index}.zip", tmp_path / f"headers-{index}"
            done = run(
                [
                    "curl",
                    "-sS",
                    "--fail",
                    "--max-time",
                    "20",
                    "-D",
                    headers,
                    "-o",
                    archive,
                    f"{server.url}/requests/12",
                ]
            )
            return done.returncode, archive, headers

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(download, range(16)))
        for returncode, archive, headers in results:
            assert returncode == 0, server.log()
            status, header_values = read_headers(headers)
            assert status == 200
            assert header_values["content-disposition"] == [
                "attachment; filename=Bundle.zip; filename*=UTF-8''Bundle.zip"
            ]
            tested = run(["unzip", "-t", archive])
            assert tested.returncode == 0, tested.stdout + tested.stderr
            with zipfile.ZipFile(io.BytesIO(archive.read_bytes())) as opened:
                assert {info.filename: opened.read(info) for info in opened.infolist()} == {
                    "one.bin": DATA["public/bundle/one.bin"],
                    "two/three.bin": DATA["public/bundle/two/three.bin"],
                }
        assert curl("/requests/9", server, tmp_path / "file") == (200, DATA["public/readme.txt"])
        done = run(
            ["curl", "-sS", "--max-time", "20", "-D", "-", "-o", "/dev/null", f"{server.url}/requests/13"]
        )
        assert b" 202 " in done.stdout and b"Retry-After: 3" in done.stdout
        # alice's row: no REMOTE_USER here, so the query looks for 'guest'
        assert curl("/requests/1", server, tmp_path / "missing")[0] == 404
        assert server.worker_pids() == workers  # no worker died (and was replaced) on the way
        log = server.log()
    assert "Traceback" not in log and "resolver for" not in log, log
