"""The request flow in-process: routing, every resolver result, headers, methods, cleanup."""

from __future__ import annotations

import gc
import hashlib
import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from webtest import TestApp
from werkzeug.test import EnvironBuilder

from zipmiddleware import Failed, FileTarget, Pending, ZipEntry, ZipMiddleware, ZipTarget

from .conftest import plain_app, read_zip

QUAKE_ENTRIES = {"id1/config.cfg", "id1/pak0.pak", "quake.exe"}


# -- pass-through -------------------------------------------------------------------


class ClosingBody:
    def __init__(self) -> None:
        self.closed = False

    def __iter__(self):
        yield b"streamed by the app"

    def close(self) -> None:
        self.closed = True


def test_unmatched_requests_reach_the_app_untouched(make_client) -> None:
    client = make_client(lambda request, name: None)
    for path in ["/", "/download", "/download/a/b", "/other/download/x"]:
        response = client.get(path)
        assert response.status_int == 200
        assert response.headers["X-App"] == "yes"
        assert response.body == b"from the app: " + path.encode()
    assert client.post("/elsewhere", "data").body == b"from the app: /elsewhere"


def test_unmatched_app_iterable_is_returned_itself_so_close_is_called() -> None:
    body = ClosingBody()

    def app(environ, start_response):
        start_response("418 I'm a teapot", [("Content-Type", "text/plain")])
        return body

    middleware = ZipMiddleware(app, routes={"/download/<name>": lambda request, name: None})
    response = TestApp(middleware).get("/anything", status=418)
    assert response.body == b"streamed by the app"
    assert body.closed


def test_routes_match_under_script_name(make_client, games: Path) -> None:
    client = make_client(lambda request, name: FileTarget(games / "doom" / name))
    client.extra_environ = {"SCRIPT_NAME": "/shop"}
    response = client.get("/download/doom.wad")  # PATH_INFO below the mount point
    assert response.body == (games / "doom" / "doom.wad").read_bytes()


def test_rule_converters_reach_the_resolver(make_client, games: Path) -> None:
    seen: list[dict[str, Any]] = []

    def resolve(request, game_id: int):
        seen.append({"game_id": game_id, "user": request.remote_user})
        return FileTarget(games / "doom" / "doom.wad")

    client = make_client(resolve, rule="/download/<int:game_id>")
    client.get("/download/42", extra_environ={"REMOTE_USER": "ada"})
    assert seen == [{"game_id": 42, "user": "ada"}]
    assert client.get("/download/not-a-number").headers["X-App"] == "yes"


def test_string_resolvers_are_imported(games: Path) -> None:
    middleware = ZipMiddleware(
        plain_app, routes={"/d/<name>": "tests.test_middleware:resolve_by_environ"}, roots=[games]
    )
    response = TestApp(middleware, extra_environ={"test.games": str(games)}).get("/d/doom.wad")
    assert response.body == (games / "doom" / "doom.wad").read_bytes()


def resolve_by_environ(request, name):
    return FileTarget(Path(request.environ["test.games"]) / "doom" / name)


# -- resolver results -----------------------------------------------------------------


def test_directory_zip_applies_exclude_and_ignore(make_client, games: Path) -> None:
    client = make_client(lambda request, name: ZipTarget.from_directory(games / name))
    response = client.get("/download/quake")
    assert response.content_type == "application/zip"
    assert (
        response.headers["Content-Disposition"]
        == "attachment; filename=quake.zip; filename*=UTF-8''quake.zip"
    )
    assert response.headers["X-Accel-Buffering"] == "no"
    assert "Transfer-Encoding" not in response.headers
    entries = read_zip(response.body)
    assert set(entries) == QUAKE_ENTRIES
    for name, data in entries.items():
        assert data == (games / "quake" / name).read_bytes()


def test_folder_with_one_file_left_is_sent_directly(make_client, games: Path) -> None:
    client = make_client(lambda request, name: ZipTarget.from_directory(games / name, "Doom.zip"))
    response = client.get("/download/doom")
    assert response.body == (games / "doom" / "doom.wad").read_bytes()
    assert "filename=doom.wad" in response.headers["Content-Disposition"]


def test_empty_folder_is_404(make_client, games: Path) -> None:
    (games / "empty" / "sub").mkdir(parents=True)
    client = make_client(lambda request, name: ZipTarget.from_directory(games / name))
    assert client.get("/download/empty", status=404).content_type == "text/plain"


def test_explicit_entries_in_their_order(make_client, games: Path) -> None:
    def resolve(request, name):
        return ZipTarget(
            [
                ZipEntry("z-first.wad", path=games / "doom" / "doom.wad"),
                ZipEntry("notes/readme.txt", source=[b"hello ", b"", b"world"], size=11),
                ZipEntry("a-last.bin", source=b"\x00\x01"),
            ],
            download_name="Bundle ü.zip",
        )

    response = make_client(resolve).get("/download/x")
    entries = read_zip(response.body)
    assert list(entries) == ["z-first.wad", "notes/readme.txt", "a-last.bin"]
    assert entries["notes/readme.txt"] == b"hello world"
    assert entries["a-last.bin"] == b"\x00\x01"
    assert "filename*=UTF-8''Bundle%20%C3%BC.zip" in response.headers["Content-Disposition"]
    assert 'filename="Bundle u.zip"' in response.headers["Content-Disposition"]


def test_pending_is_202_with_retry_after(make_client) -> None:
    client = make_client(lambda request, name: Pending(retry_after=12, message="Packing your game..."))
    response = client.get("/download/x", status=202)
    assert response.headers["Retry-After"] == "12"
    assert response.text == "Packing your game...\n"
    assert response.headers["Cache-Control"] == "no-store"


def test_failed_uses_its_status_and_message(make_client) -> None:
    response = make_client(lambda request, name: Failed("Gone for good.", status=410)).get(
        "/download/x", status=410
    )
    assert response.text == "Gone for good.\n"


def test_none_is_404(make_client) -> None:
    assert make_client(lambda request, name: None).get("/download/x", status=404).text.startswith("Not Found")


def test_resolver_exception_is_500_with_generic_body_and_logged_traceback(make_client, caplog) -> None:
    def resolve(request, name):
        raise RuntimeError("database at /var/secret/db.sqlite is down")

    with caplog.at_level(logging.ERROR, logger="zipmiddleware"):
        response = make_client(resolve).get("/download/x", status=500)
    assert "secret" not in response.text and "RuntimeError" not in response.text
    assert any(record.exc_info and "secret" in str(record.exc_info[1]) for record in caplog.records)


@pytest.mark.parametrize(
    ("row", "status"),
    [
        ({"status": "pending"}, 202),
        ({"status": "processing", "path": "quake"}, 202),
        ({"status": "failed", "error": "Traceback: /srv/x exploded"}, 500),
        ({"status": "available"}, 500),
        ({"status": "archived", "path": "quake"}, 500),
        ({"status": "available", "path": "missing"}, 404),
    ],
    ids=["pending", "processing", "failed", "no-path", "unknown-status", "missing-path"],
)
def test_status_rows(make_client, row: dict[str, str], status: int) -> None:
    response = make_client(lambda request, name: row).get("/download/x", status=status)
    assert "/srv" not in response.text and "Traceback" not in response.text


@pytest.mark.parametrize("status", ["available", "streaming_ready", "AVAILABLE"])
def test_ready_rows_serve_folder_or_file(make_client, games: Path, status: str) -> None:
    rows = {
        "quake": {"status": status, "path": str(games / "quake")},
        "doom": {"status": status, "path": "doom/doom.wad", "download_name": "DOOM.WAD"},
    }
    client = make_client(lambda request, name: rows[name])
    assert set(read_zip(client.get("/download/quake").body)) == QUAKE_ENTRIES
    response = client.get("/download/doom")
    assert response.body == (games / "doom" / "doom.wad").read_bytes()
    assert "filename=DOOM.WAD" in response.headers["Content-Disposition"]


def test_sqlite_rows_are_status_rows(make_client, games: Path) -> None:
    db = sqlite3.connect(":memory:")
    db.row_factory = sqlite3.Row
    db.execute("CREATE TABLE requests (id INTEGER, status TEXT, path TEXT)")
    db.execute("INSERT INTO requests VALUES (1, 'streaming_ready', ?)", (str(games / "quake"),))

    def resolve(request, name):
        return db.execute("SELECT status, path FROM requests WHERE id = ?", (int(name),)).fetchone()

    client = make_client(resolve)
    assert set(read_zip(client.get("/download/1").body)) == QUAKE_ENTRIES
    assert client.get("/download/2", status=404)


def test_unsupported_result_is_500(make_client) -> None:
    make_client(lambda request, name: "quake").get("/download/x", status=500)


# -- methods --------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_other_methods_are_405_with_allow(make_client, games: Path, method: str) -> None:
    calls = []
    client = make_client(lambda request, name: calls.append(1) or FileTarget(games / "doom/doom.wad"))
    response = client.request("/download/x", method=method, status=405)
    assert response.headers["Allow"] == "GET, HEAD"
    assert calls == []


def test_head_zip_sends_headers_only_and_reads_nothing(make_client, games: Path) -> None:
    closed = []

    class Source:
        def __iter__(self):
            raise AssertionError("HEAD must not read the source")

        def close(self):
            closed.append(True)

    def resolve(request, name):
        return ZipTarget([ZipEntry("a.wad", path=games / "doom/doom.wad"), ZipEntry("b", source=Source())])

    response = make_client(resolve).head("/download/x")
    assert response.status_int == 200 and response.body == b""
    assert response.content_type == "application/zip"
    assert closed == [True]


# -- direct files ---------------------------------------------------------------------


@pytest.fixture
def doom_client(make_client, games: Path) -> TestApp:
    return make_client(lambda request, name: FileTarget(games / "doom" / "doom.wad", download_name=name))


def test_direct_file_headers(doom_client: TestApp, games: Path) -> None:
    data = (games / "doom" / "doom.wad").read_bytes()
    response = doom_client.get("/download/D%C3%B4%C3%B4m.wad")
    assert response.body == data
    assert response.headers["Content-Length"] == str(len(data))
    assert response.headers["Content-Disposition"] == (
        "attachment; filename=Doom.wad; filename*=UTF-8''D%C3%B4%C3%B4m.wad"
    )
    assert response.headers["ETag"].startswith('"')
    assert response.headers["Last-Modified"].endswith("GMT")
    assert response.headers["Accept-Ranges"] == "bytes"
    assert hashlib.sha256(response.body).digest() == hashlib.sha256(data).digest()


def test_direct_file_content_type_is_guessed(make_client, games: Path) -> None:
    (games / "manual.pdf").write_bytes(b"%PDF-1.4")
    client = make_client(lambda request, name: FileTarget(games / name))
    assert client.get("/download/manual.pdf").content_type == "application/pdf"
    client = make_client(lambda request, name: FileTarget(games / name, mimetype="text/x-nfo"))
    assert client.get("/download/manual.pdf").content_type == "text/x-nfo"


def test_direct_file_conditional_get(doom_client: TestApp) -> None:
    first = doom_client.get("/download/d.wad")
    etag, modified = first.headers["ETag"], first.headers["Last-Modified"]
    assert doom_client.get("/download/d.wad", headers={"If-None-Match": etag}, status=304).body == b""
    assert doom_client.get("/download/d.wad", headers={"If-Modified-Since": modified}, status=304)
    assert doom_client.get("/download/d.wad", headers={"If-None-Match": '"other"'}).status_int == 200


@pytest.mark.parametrize(
    ("range_", "status", "content_range", "slice_"),
    [
        ("bytes=0-99", 206, "bytes 0-99/9004", slice(0, 100)),
        ("bytes=9000-", 206, "bytes 9000-9003/9004", slice(9000, None)),
        ("bytes=-4", 206, "bytes 9000-9003/9004", slice(-4, None)),
        ("bytes=10000-", 416, "bytes */9004", None),
    ],
)
def test_direct_file_single_ranges(doom_client: TestApp, games: Path, range_, status, content_range, slice_):
    response = doom_client.get("/download/d.wad", headers={"Range": range_}, status=status)
    assert response.headers["Content-Range"] == content_range
    if slice_ is not None:
        assert response.body == (games / "doom" / "doom.wad").read_bytes()[slice_]


def test_direct_file_head_has_length_and_no_body(doom_client: TestApp) -> None:
    response = doom_client.head("/download/d.wad")
    assert response.headers["Content-Length"] == "9004" and response.body == b""


def test_direct_file_body_is_the_servers_file_wrapper(games: Path) -> None:
    class FileWrapper:
        def __init__(self, file, block_size=8192):
            self.file, self.block_size = file, block_size

        def __iter__(self):
            return iter(lambda: self.file.read(self.block_size), b"")

        def close(self):
            self.file.close()

    middleware = ZipMiddleware(
        plain_app,
        routes={"/d/<name>": lambda request, name: FileTarget(games / "doom/doom.wad")},
        roots=[games],
    )
    environ = EnvironBuilder(path="/d/x").get_environ()
    environ["wsgi.file_wrapper"] = FileWrapper
    body = middleware(environ, lambda status, headers, exc_info=None: None)
    assert type(body) is FileWrapper  # not wrapped again, so gunicorn can sendfile it
    assert body.block_size == 262144  # chunk_size
    assert b"".join(body) == (games / "doom/doom.wad").read_bytes()
    body.close()
    assert body.file.closed


# -- cleanup --------------------------------------------------------------------------


class RecordingSource:
    def __init__(self, chunks: list[bytes], fail_after: int | None = None) -> None:
        self.chunks, self.fail_after, self.closed = chunks, fail_after, False

    def __iter__(self):
        for index, chunk in enumerate(self.chunks):
            if index == self.fail_after:
                raise OSError("upstream died")
            yield chunk

    def close(self) -> None:
        self.closed = True


def call(middleware: ZipMiddleware, path: str = "/d/x", method: str = "GET"):
    environ = EnvironBuilder(path=path, method=method).get_environ()
    statuses: list[str] = []
    body = middleware(environ, lambda status, headers, exc_info=None: statuses.append(status))
    return statuses, body


def open_fds() -> int:
    return len(list(Path("/proc/self/fd").iterdir()))


def test_everything_is_closed_on_early_disconnect(games: Path) -> None:
    sources: list[RecordingSource] = []

    def resolve(request, name):
        sources[:] = [RecordingSource([b"x" * 70000] * 3), RecordingSource([b"y"])]
        return ZipTarget(
            [
                ZipEntry("a.pak", path=games / "quake/id1/pak0.pak"),
                ZipEntry("b", source=sources[0]),
                ZipEntry("c.wad", path=games / "doom/doom.wad"),
                ZipEntry("d", source=sources[1]),
            ]
        )

    # In memory: a CRC-32 store's connection is the process's, opened once, not the download's.
    middleware = ZipMiddleware(
        plain_app, routes={"/d/<name>": resolve}, roots=[games], chunk_size=4096, crc_cache=":memory:"
    )
    gc.collect()  # files other tests left to the garbage collector must not close mid-count
    baseline = open_fds()
    for stop_after in range(0, 8):
        statuses, body = call(middleware)
        iterator = iter(body)
        for _ in range(stop_after):
            next(iterator)
        body.close()  # the server's reaction to a client that went away
        assert all(source.closed for source in sources)
        assert open_fds() == baseline


@pytest.mark.parametrize("chunk_size", [4096, 262144], ids=["after-the-first-chunk", "within-it"])
def test_everything_is_closed_when_a_source_fails(games: Path, chunk_size: int) -> None:
    source = RecordingSource([b"a" * 100000, b"b" * 100000], fail_after=1)
    resolve = lambda request, name: ZipTarget(  # noqa: E731
        [ZipEntry("a.pak", path=games / "quake/id1/pak0.pak"), ZipEntry("b", source=source)]
    )
    middleware = ZipMiddleware(
        plain_app, routes={"/d/<name>": resolve}, roots=[games], crc_cache=":memory:", chunk_size=chunk_size
    )
    gc.collect()
    baseline = open_fds()
    statuses, body = call(middleware)
    if chunk_size == 4096:  # the 200 went out with the first chunk: the download is aborted
        assert statuses == ["200 OK"]
        with pytest.raises(Exception, match="upstream died"):
            for _ in body:
                pass
    else:  # found before the status line: a short error instead of the 200
        assert statuses == ["500 INTERNAL SERVER ERROR"]
        assert b"".join(body).startswith(b"Internal Server Error")
    body.close()
    assert source.closed and open_fds() == baseline


def test_every_file_is_closed_when_a_stored_archive_is_cut_anywhere(games: Path, tmp_path: Path) -> None:
    """A stored archive of files is sent as a range of its layout (the full download is
    [0, length)); cut after any chunk, and as ranges, it leaves no file open."""
    cache = tmp_path / "crc.sqlite"
    middleware = ZipMiddleware(
        plain_app,
        routes={"/d/<name>": lambda request, name: ZipTarget.from_directory(games / "quake")},
        roots=[games],
        chunk_size=1024,
        crc_cache=str(cache),
        exclude=["updates"],
    )
    statuses, body = call(middleware)  # once whole: the store's connection is opened now
    whole = b"".join(body)
    body.close()
    gc.collect()  # files other tests left to the garbage collector must not close mid-count
    baseline = open_fds()
    for ranged in (None, "bytes=3000-", "bytes=-600"):
        for stop_after in range(0, 12):
            environ = EnvironBuilder(path="/d/x", headers={"Range": ranged} if ranged else {}).get_environ()
            body = middleware(environ, lambda *args, **kwargs: None)
            iterator = iter(body)
            for _ in range(stop_after):
                next(iterator, None)
            body.close()
            assert open_fds() == baseline, (ranged, stop_after)
    assert read_zip(whole)


def test_sources_are_closed_when_the_download_is_refused(games: Path) -> None:
    source = RecordingSource([b"never read"])
    resolve = lambda request, name: ZipTarget(  # noqa: E731
        [ZipEntry("b", source=source), ZipEntry("missing", path=games / "nope.bin")]
    )
    middleware = ZipMiddleware(plain_app, routes={"/d/<name>": resolve}, roots=[games])
    response = TestApp(middleware).get("/d/x", status=404)
    assert "nope.bin" not in response.text
    assert source.closed


def test_an_unexpected_error_before_the_first_byte_is_a_500_and_closes_everything(
    games: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error that is no StreamError (an I/O error such as EIO) while the first chunk is made:
    a 500 text, the body closed here (the server never sees it), the download reported."""
    from zipmiddleware import zipengine

    def failing_read(*args: object, **kwargs: object) -> Iterator[bytes]:
        raise OSError(5, "Input/output error")
        yield b""

    monkeypatch.setattr(zipengine, "read_file", failing_read)
    events: list[object] = []
    middleware = ZipMiddleware(
        plain_app,
        routes={"/d/<name>": lambda request, name: ZipTarget.from_directory(games / "quake")},
        roots=[games],
        crc_cache=":memory:",
        on_download=events.append,
    )
    gc.collect()
    baseline = open_fds()
    statuses, body = call(middleware)
    assert statuses == ["500 INTERNAL SERVER ERROR"]
    assert b"".join(body).startswith(b"Internal Server Error")
    assert open_fds() == baseline
    [event] = events
    assert (event.status, event.http_status, event.bytes_sent) == ("aborted", 500, 0)  # type: ignore[attr-defined]
