"""The ``s3`` resolver and :class:`~zipmiddleware.s3.S3Object`, against a real S3 API: moto's
server over HTTP, real boto3, and (for failures moto cannot make) the fault-injecting proxy of
tests/origin.py in front of it. Nothing of zipmiddleware is replaced.

* S3Object: whole and ranged reads, If-Match on every request, a changed or missing object,
  refusals and failures, and ``close()`` from another thread ending a blocked read (or a
  wait for the answer) at once.
* The resolver called directly: an object, a folder with the middleware's rules, unsafe paths,
  a missing bucket, 403, a store that is down, listings of more than one page.
* The configuration doors, and downloads through the middleware: in process (werkzeug's test
  client) and under a real gunicorn with curl, wget, unzip and 7z.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import re
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from werkzeug.test import Client, EnvironBuilder
from werkzeug.wrappers import Request

from zipmiddleware import SourceTarget, ZipMiddleware, ZipTarget
from zipmiddleware import s3 as s3module
from zipmiddleware.config import build_settings
from zipmiddleware.errors import ConfigError
from zipmiddleware.s3 import S3Object, S3Resolver, s3_client
from zipmiddleware.sources import SourceError, is_versioned
from zipmiddleware.targets import Failed

from .clients import (
    assert_good_zip,
    connect,
    kill_part_way,
    read_head,
    read_headers,
    read_to_end,
    require_module,
    run,
    send_get,
    sha256_file,
    size_of,
    wait_for,
)
from .clients import wsgi_get as get
from .origin import Fault, FaultProxy
from .s3 import (
    access_denied,
    client,
    denied_client,
    down_endpoint,
    make_bucket,
    moto_endpoint_fixture,  # noqa: F401  (the fixture "moto_endpoint")
    put_objects,
    unique_bucket,
)
from .servers import PROJECT, AsgiServer, GunicornServer

MIB = 1024 * 1024
ROUTE = "/s3/<path:subpath>"


def random_bytes(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


# The bucket most tests read: a "games/" folder of keys like the directory tests' games.
GAMES = {
    "games/doom/doom.wad": b"IWAD" + b"d" * 9000,
    "games/doom/file_id.diz": b"doom",
    "games/quake/quake.exe": b"MZ" + b"q" * 5000,
    "games/quake/id1/": b"",  # a folder marker, as consoles make them
    "games/quake/id1/pak0.pak": bytes(range(256)) * 400,
    "games/quake/id1/config.cfg": b"bind w +forward\n",
    "games/quake/readme.nfo": b"cracked by nobody",
    "games/quake/updates/patch.exe": b"patch",
    "games/quake/Extras/manual.pdf": b"%PDF",
    "games/quake/maps/UPDATES/e1m1.bsp": b"excluded at any depth, whatever its case",
    "games/quake-demo/demo.exe": b"a sibling whose name starts like the folder's",
    "games/heretic/heretic.wad": b"HWAD" + b"h" * 3000,
    "games/heretic/heretic.nfo": b"ignored: the folder is left with one file",
    "games/empty/": b"",
    "games/single.bin": random_bytes(1, 300_000),
    "games/readme.txt": b"read me\n",
    "games/big/a.bin": random_bytes(2, 1_500_000),
    "games/big/b.bin": random_bytes(3, 700_001),
    "games/big/sub/c.bin": random_bytes(4, 2 * MIB + 3),
    "games/big/empty.dat": b"",
    "other/secret.txt": b"outside the prefix",
}
CONTENT_TYPES = {"games/readme.txt": "text/plain"}
EXCLUDE = ["updates", "extras"]
IGNORE = ["*.nfo", "file_id.diz"]
QUAKE = {  # games/quake as archived: the rules applied, names relative to the folder
    "id1/config.cfg": GAMES["games/quake/id1/config.cfg"],
    "id1/pak0.pak": GAMES["games/quake/id1/pak0.pak"],
    "quake.exe": GAMES["games/quake/quake.exe"],
}
BIG = {name.removeprefix("games/big/"): data for name, data in GAMES.items() if name.startswith("games/big/")}


@pytest.fixture(scope="module")
def games(moto_endpoint: str) -> str:
    """The name of a bucket holding :data:`GAMES`."""
    return make_bucket(moto_endpoint, GAMES, CONTENT_TYPES)


@pytest.fixture
def proxy(moto_endpoint: str) -> Iterator[FaultProxy]:
    """The fault-injecting proxy in front of moto."""
    with FaultProxy(moto_endpoint) as running:
        yield running


def resolver(endpoint: str, bucket: str, prefix: str = "games/", **options: Any) -> S3Resolver:
    made = S3Resolver(bucket, prefix, endpoint_url=endpoint, **options)
    made.use_rules(EXCLUDE, IGNORE)
    return made


def resolve(made: S3Resolver, subpath: str) -> Any:
    return made(Request(EnvironBuilder(path="/s3/x").get_environ()), subpath=subpath)


# -- S3Object -------------------------------------------------------------------------------------


def test_an_object_is_a_versioned_source(moto_endpoint: str, games: str) -> None:
    before = time.time()
    found = S3Object.head(s3_client(moto_endpoint), games, "games/single.bin")
    etag = client(moto_endpoint).head_object(Bucket=games, Key="games/single.bin")["ETag"]
    assert is_versioned(found)
    assert found.name == f"s3://{games}/games/single.bin"
    assert (found.bucket, found.key, found.size) == (games, "games/single.bin", 300_000)
    assert found.version == etag and etag.startswith('"') and etag.endswith('"')
    assert before - 3600 < found.mtime <= time.time()  # LastModified: the PUT's, in whole seconds
    assert b"".join(found.open()) == GAMES["games/single.bin"]


def test_reads_whole_and_ranged_always_ask_for_the_version_listed(proxy: FaultProxy, games: str) -> None:
    data = GAMES["games/big/sub/c.bin"]
    found = S3Object.head(s3_client(proxy.url), games, "games/big/sub/c.bin")
    proxy.reset_counters()
    pieces = list(found.open())
    assert b"".join(pieces) == data
    assert max(map(len, pieces)) <= 256 * 1024
    assert b"".join(found.open(1000)) == data[1000:]
    assert b"".join(found.open(1000, 200_000)) == data[1000:200_000]
    assert b"".join(found.open(0, found.size)) == data
    assert b"".join(found.open(len(data) - 1)) == data[-1:]
    assert b"".join(found.open(len(data))) == b""  # nothing left: nothing asked
    requests = proxy.requests
    assert [record.headers.get("range") for record in requests] == [
        None,
        f"bytes=1000-{len(data) - 1}",
        "bytes=1000-199999",
        None,
        f"bytes={len(data) - 1}-{len(data) - 1}",
    ]
    assert all(record.headers["if-match"] == found.version for record in requests)
    assert [record.status for record in requests] == [200, 206, 206, 200, 206]


def test_an_empty_object_reads_as_nothing(moto_endpoint: str, games: str) -> None:
    found = S3Object.head(s3_client(moto_endpoint), games, "games/big/empty.dat")
    assert found.size == 0
    assert list(found.open()) == []


def test_a_read_outside_the_object_is_refused(moto_endpoint: str, games: str) -> None:
    found = S3Object.head(s3_client(moto_endpoint), games, "games/readme.txt")
    for offset, stop in [(-1, None), (0, found.size + 1), (5, 4)]:
        with pytest.raises(ValueError):
            found.open(offset, stop)


def test_a_changed_object_is_never_read(moto_endpoint: str) -> None:
    bucket = make_bucket(moto_endpoint, {"x.bin": random_bytes(5, 100_000)})
    found = S3Object.head(s3_client(moto_endpoint), bucket, "x.bin")
    put_objects(moto_endpoint, bucket, {"x.bin": random_bytes(6, 100_000)})  # same size, another version
    for offset, stop in [(0, None), (500, None), (500, 1000)]:
        with pytest.raises(SourceError) as failed:
            found.open(offset, stop)
        assert "changed at its origin" in failed.value.reason
        assert not failed.value.transient
        assert bucket not in failed.value.reason and bucket in failed.value.detail


def test_a_missing_object_or_bucket_is_not_found_for_good(moto_endpoint: str) -> None:
    bucket = make_bucket(moto_endpoint, {"x.bin": b"x" * 100})
    found = S3Object.head(s3_client(moto_endpoint), bucket, "x.bin")
    client(moto_endpoint).delete_object(Bucket=bucket, Key="x.bin")
    gone = S3Object(s3_client(moto_endpoint), "zm-no-such-bucket", "x.bin", found.version, 100, 0.0)
    for source in (found, gone):
        with pytest.raises(SourceError) as failed:
            source.open()
        assert failed.value.reason == "not found at its origin"
        assert not failed.value.transient
        assert "x.bin" not in failed.value.reason


def test_access_denied_is_for_good(moto_endpoint: str, games: str) -> None:
    denied = denied_client(moto_endpoint)
    listed = S3Object.head(s3_client(moto_endpoint), games, "games/readme.txt")
    found = S3Object(denied, games, listed.key, listed.version, listed.size, listed.mtime)
    with access_denied(moto_endpoint), pytest.raises(SourceError) as failed:
        found.open()
    assert failed.value.reason == "access denied by its origin"
    assert "AccessDenied" in failed.value.detail
    assert not failed.value.transient
    assert b"".join(listed.open()) == GAMES["games/readme.txt"]  # authentication is off again


def test_transient_statuses_and_a_store_that_is_down_are_worth_another_try(
    proxy: FaultProxy, games: str
) -> None:
    found = S3Object.head(s3_client(proxy.url), games, "games/readme.txt")
    for status in (500, 503):
        proxy.default_fault = Fault(fail_first=1, status=status)
        with pytest.raises(SourceError) as failed:
            found.open()
        assert failed.value.transient
        assert failed.value.reason == f"its origin is unavailable (HTTP {status})"
        assert b"".join(found.open()) == GAMES["games/readme.txt"]  # the next attempt is answered
    with down_endpoint() as down:
        unreachable = S3Object(s3_client(down), games, found.key, found.version, found.size, found.mtime)
        with pytest.raises(SourceError) as failed:
            unreachable.open()
    assert failed.value.transient
    assert failed.value.reason == "the connection to its origin failed"
    assert "127.0.0.1" not in failed.value.reason


def test_a_connection_cut_part_way_fails_the_read_as_transient(proxy: FaultProxy, games: str) -> None:
    found = S3Object.head(s3_client(proxy.url), games, "games/big/a.bin")
    proxy.default_fault = Fault(drop_after=300_000)
    received = bytearray()
    with pytest.raises(SourceError) as failed:
        for piece in found.open():
            received += piece
    assert failed.value.transient
    assert 0 < len(received) <= 300_000
    assert bytes(received) == GAMES["games/big/a.bin"][: len(received)]
    # Resumed where it broke: the rest of that very version.
    assert bytes(received) + b"".join(found.open(len(received))) == GAMES["games/big/a.bin"]


def read_in_thread(work: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    outcome: list[object] = []

    def run_it() -> None:
        try:
            outcome.append(work())
        except BaseException as exc:  # noqa: BLE001  (what the test looks at)
            outcome.append(exc)

    thread = threading.Thread(target=run_it, daemon=True)
    thread.start()
    return thread, outcome


def test_close_from_another_thread_ends_a_blocked_read_at_once(proxy: FaultProxy, games: str) -> None:
    found = S3Object.head(s3_client(proxy.url), games, "games/big/sub/c.bin")
    proxy.default_fault = Fault(rate=64 * 1024)  # a read of 256 KiB waits 4 s for its bytes
    stream = found.open()
    thread, outcome = read_in_thread(lambda: b"".join(stream))
    time.sleep(0.5)
    assert thread.is_alive()
    closed = time.monotonic()
    stream.close()
    thread.join(5)
    assert not thread.is_alive()
    assert time.monotonic() - closed < 1.0
    [error] = outcome
    assert isinstance(error, SourceError) and error.reason == "the download ended" and not error.transient
    # The store sees the connection closed; the next read gets a connection of its own.
    proxy.default_fault = Fault()
    assert b"".join(found.open(0, 1000)) == GAMES["games/big/sub/c.bin"][:1000]
    [first] = [
        record for record in proxy.requests if record.method == "GET" and "range" not in record.headers
    ]
    assert first.status == 200 and first.bytes_sent < found.size


def test_closing_the_object_ends_a_request_still_waiting_for_its_answer(
    proxy: FaultProxy, games: str
) -> None:
    found = S3Object.head(s3_client(proxy.url), games, "games/single.bin")
    proxy.default_fault = Fault(first_byte_delay=20)
    thread, outcome = read_in_thread(lambda: found.open(100))
    time.sleep(0.5)
    assert thread.is_alive() and proxy.in_flight == 1
    closed = time.monotonic()
    found.close()  # what the fetcher does as its download ends
    thread.join(5)
    assert not thread.is_alive()
    assert time.monotonic() - closed < 1.0
    [error] = outcome
    assert isinstance(error, SourceError) and error.reason == "the download ended"


def test_connections_read_to_their_end_are_kept_and_abandoned_ones_dropped(
    proxy: FaultProxy, games: str
) -> None:
    """The proxy keeps connections alive (moto itself closes each one), so the pool shows."""
    found = S3Object.head(s3_client(proxy.url), games, "games/big/a.bin")
    assert b"".join(found.open()) == GAMES["games/big/a.bin"]
    assert b"".join(found.open(10)) == GAMES["games/big/a.bin"][10:]
    stream = found.open(20)
    next(iter(stream))
    stream.close()  # half-read: dropped, never reused
    assert b"".join(found.open(30)) == GAMES["games/big/a.bin"][30:]
    gets = [record for record in proxy.requests if record.method == "GET"]
    ports = [record.client_port for record in gets]
    assert ports[1] == ports[0]  # the first was read to its end and its connection reused
    assert ports[3] != ports[2]  # the abandoned one was not


def test_one_client_per_process_and_endpoint_without_retries(moto_endpoint: str) -> None:
    first = s3_client(moto_endpoint)
    assert s3_client(moto_endpoint) is first
    assert s3_client(moto_endpoint, "eu-west-1") is not first
    config = first.meta.config
    assert config.retries["total_max_attempts"] == 1
    assert (config.connect_timeout, config.read_timeout) == (10.0, 30.0)
    assert config.max_pool_connections == 32
    assert config.s3["addressing_style"] == "path"


# -- the resolver ---------------------------------------------------------------------------------


def test_an_object_is_sent_as_it_is(moto_endpoint: str, games: str) -> None:
    target = resolve(resolver(moto_endpoint, games), "single.bin")
    assert isinstance(target, SourceTarget)
    assert isinstance(target.source, S3Object)
    head = client(moto_endpoint).head_object(Bucket=games, Key="games/single.bin")
    assert (target.source.key, target.source.size, target.source.version) == (
        "games/single.bin",
        300_000,
        head["ETag"],
    )
    assert target.source.mtime == head["LastModified"].timestamp()
    assert target.download_name == "single.bin"
    assert target.mimetype is None  # moto's "binary/octet-stream": better guessed from the name
    text = resolve(resolver(moto_endpoint, games), "readme.txt")
    assert (text.download_name, text.mimetype) == ("readme.txt", "text/plain")


def test_a_folder_is_a_zip_of_what_the_rules_keep_in_name_order(moto_endpoint: str, games: str) -> None:
    target = resolve(resolver(moto_endpoint, games), "quake")
    assert isinstance(target, ZipTarget)
    assert target.download_name == "quake.zip"
    assert [entry.arcname for entry in target.entries] == sorted(QUAKE)
    for entry in target.entries:
        source = entry.source
        assert isinstance(source, S3Object)
        assert source.key == "games/quake/" + entry.arcname
        assert entry.size == source.size == len(QUAKE[entry.arcname])
        assert entry.mtime == source.mtime > 0
        assert source.version.startswith('"')
    # A trailing slash asks for the folder too.
    again = resolve(resolver(moto_endpoint, games), "quake/")
    assert [entry.arcname for entry in again.entries] == sorted(QUAKE)


def test_a_folder_left_with_one_object_sends_that_object(moto_endpoint: str, games: str) -> None:
    target = resolve(resolver(moto_endpoint, games), "heretic")
    assert isinstance(target, SourceTarget)
    assert target.source.key == "games/heretic/heretic.wad"
    assert target.download_name == "heretic.wad"


def test_the_whole_prefix_or_bucket_is_one_zip(moto_endpoint: str, games: str) -> None:
    target = resolve(resolver(moto_endpoint, games), "")
    assert isinstance(target, ZipTarget) and target.download_name == "games.zip"
    names = [entry.arcname for entry in target.entries]
    assert names == sorted(names)
    assert "quake/quake.exe" in names and "quake-demo/demo.exe" in names
    assert not any("updates" in name.casefold() or name.endswith((".nfo", "/")) for name in names)
    assert "doom/file_id.diz" not in names
    # "games" without its slash is the same folder.
    assert [e.arcname for e in resolve(resolver(moto_endpoint, games, prefix="games"), "").entries] == names
    whole = resolve(resolver(moto_endpoint, games, prefix=""), "")
    assert whole.download_name == f"{games}.zip"
    assert "other/secret.txt" in [entry.arcname for entry in whole.entries]


@pytest.mark.parametrize(
    "path",
    ["../other/secret.txt", "quake/../../other/secret.txt", "./single.bin", "quake//quake.exe", "/single.bin",
     "quake\\quake.exe", "single.bin\0", "..", "quake/..", "nothing-here", "nothing/here/", "empty", "empty/"],
)  # fmt: skip
def test_unsafe_or_unknown_paths_are_not_found(moto_endpoint: str, games: str, path: str) -> None:
    assert resolve(resolver(moto_endpoint, games), path) is None


def test_a_missing_bucket_is_not_found(moto_endpoint: str) -> None:
    made = resolver(moto_endpoint, "zm-no-such-bucket")
    assert resolve(made, "x.bin") is None
    assert resolve(made, "") is None


def test_a_missing_bucket_is_logged_as_a_warning(
    moto_endpoint: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Every request of the route fails alike: the log says so louder than a missing key."""
    with caplog.at_level(logging.WARNING, "zipmiddleware"):
        assert resolve(resolver(moto_endpoint, "zm-no-such-bucket"), "") is None
    assert any("bucket does not exist" in record.getMessage() for record in caplog.records)


def test_no_credentials_is_a_500_with_one_clear_log_line(
    moto_endpoint: str, games: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    # A region of its own: a client of its own, made now, without credentials.
    made = S3Resolver(games, "games/", moto_endpoint, "eu-west-3")
    with caplog.at_level(logging.WARNING, "zipmiddleware"):
        target = resolve(made, "quake")
    assert target == Failed("Internal Server Error: this download cannot be served right now.", 500)
    [record] = [record for record in caplog.records if record.name == "zipmiddleware"]
    assert "no credentials" in record.getMessage() and games in record.getMessage()
    assert record.exc_info is None


def test_a_refusal_is_a_403_and_its_details_only_logged(
    moto_endpoint: str, games: str, caplog: pytest.LogCaptureFixture
) -> None:
    made = resolver(moto_endpoint, games)
    with caplog.at_level(logging.WARNING, "zipmiddleware"), access_denied(moto_endpoint):
        for path in ("single.bin", "quake", ""):
            target = resolve(made, path)
            assert target == Failed("Forbidden: this download is not available.", 403), path
            assert games not in target.message
    logged = [record.getMessage() for record in caplog.records if record.name == "zipmiddleware"]
    assert any(games in message and "access denied" in message for message in logged)


def test_a_store_that_is_down_or_failing_is_a_503(
    proxy: FaultProxy, games: str, caplog: pytest.LogCaptureFixture
) -> None:
    unavailable = Failed(
        "Service Unavailable: the storage holding this download cannot be reached; try again later.", 503
    )
    with caplog.at_level(logging.WARNING, "zipmiddleware"):
        with down_endpoint() as down:
            assert resolve(resolver(down, games), "quake") == unavailable
        proxy.default_fault = Fault(fail_first=10, status=503)
        assert resolve(resolver(proxy.url, games), "quake") == unavailable
    assert any(games in record.getMessage() for record in caplog.records)
    # One 503 (S3's SlowDown) is tried again at once, and answered.
    proxy.default_fault = Fault(fail_first=1, status=503)
    assert isinstance(resolve(resolver(proxy.url, games), "quake"), ZipTarget)


def test_a_burst_of_requests_for_a_folder_lists_it_once(
    proxy: FaultProxy, games: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests at once share one listing, and one is used again for LISTING_SECONDS; every
    request gets objects of its own (closing one download's must not stop another's reads)."""
    monkeypatch.setattr(s3module, "LISTING_SECONDS", 0.5)
    made = resolver(proxy.url, games)
    proxy.default_fault = Fault(first_byte_delay=0.3)  # so that the requests overlap

    def listings() -> int:
        return sum("list-type=2" in record.target for record in proxy.requests)

    with ThreadPoolExecutor(6) as pool:
        targets = list(pool.map(lambda _: resolve(made, "quake"), range(6)))
    assert listings() == 1
    assert all(isinstance(target, ZipTarget) for target in targets)
    sources = [entry.source for target in targets for entry in target.entries]
    assert len({id(source) for source in sources}) == len(sources)
    resolve(made, "quake")
    assert listings() == 1  # within LISTING_SECONDS
    time.sleep(0.6)
    resolve(made, "quake")
    assert listings() == 2


def test_listings_of_many_pages_are_read_to_their_end(moto_endpoint: str, proxy: FaultProxy) -> None:
    files = {f"many/{index // 100:02d}/{index:04d}.txt": b"%d" % index for index in range(1100)}
    files["many/00/ignored.nfo"] = b"x"
    bucket = make_bucket(moto_endpoint, files)
    proxy.reset_counters()
    target = resolve(resolver(proxy.url, bucket, prefix=""), "many")
    assert isinstance(target, ZipTarget)
    names = [entry.arcname for entry in target.entries]
    assert len(names) == 1100 and names == sorted(names)
    assert names[0] == "00/0000.txt" and names[-1] == "10/1099.txt"
    listings = [record for record in proxy.requests if "list-type=2" in record.target]
    assert len(listings) == 2 and "continuation-token=" in listings[1].target


def test_a_folder_of_too_many_objects_is_refused(
    moto_endpoint: str, games: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(s3module, "MAX_OBJECTS", 5)
    target = resolve(resolver(moto_endpoint, games), "")
    assert isinstance(target, Failed) and target.status == 500
    assert isinstance(resolve(resolver(moto_endpoint, games), "quake"), Failed)  # 8 listed, 3 kept: too many
    assert isinstance(resolve(resolver(moto_endpoint, games), "big"), ZipTarget)  # 4 listed


def test_the_route_argument_holding_the_path(moto_endpoint: str, games: str) -> None:
    made = S3Resolver(games, "games/", endpoint_url=moto_endpoint, argument="name")
    made.check_arguments({"name", "user"})
    with pytest.raises(ConfigError, match="argument"):
        made.check_arguments({"subpath"})
    with pytest.raises(ConfigError, match="say which argument"):
        S3Resolver(games).check_arguments({"a", "b"})
    target = made(Request(EnvironBuilder().get_environ()), name="single.bin", user="x")
    assert isinstance(target, SourceTarget)


# -- configuration --------------------------------------------------------------------------------


def test_a_route_table_configures_it_with_the_middlewares_rules(moto_endpoint: str, games: str) -> None:
    settings = build_settings(
        {
            "routes": {
                ROUTE: {"resolver": "s3", "bucket": games, "prefix": "games/", "endpoint_url": moto_endpoint}
            },
            "exclude": EXCLUDE,
            "ignore": IGNORE,
        }
    )
    [(rule, made)] = settings.routes
    assert rule == ROUTE and isinstance(made, S3Resolver)
    assert made.rules.excluded("Updates") and made.rules.ignored("x.NFO")
    assert [entry.arcname for entry in resolve(made, "quake").entries] == sorted(QUAKE)


def test_a_toml_file_configures_it(moto_endpoint: str, games: str, tmp_path: Path) -> None:
    config = tmp_path / "zipmiddleware.toml"
    config.write_text(
        "[zipmiddleware]\n"
        'exclude = ["updates", "extras"]\n'
        "[zipmiddleware.routes]\n"
        f'"/s3/<path:subpath>" = {{ resolver = "s3", bucket = "{games}", prefix = "games", '
        f'endpoint_url = "{moto_endpoint}" }}\n'
    )
    app = ZipMiddleware.from_config(lambda environ, start_response: [], config)
    [(_, made)] = app.settings.routes
    assert isinstance(made, S3Resolver) and made.prefix == "games/"


@pytest.mark.parametrize(
    ("parameter", "value"),
    [
        ("bucket", "b"),
        ("bucket", "my bucket"),
        ("bucket", "a/b"),
        ("bucket", 42),
        ("prefix", 7),
        ("prefix", "/games/"),
        ("endpoint_url", "localhost:9000"),
        ("endpoint_url", "ftp://example.com"),
        ("endpoint_url", "http://"),
        ("endpoint_url", "http://example.com:99999"),
        ("region_name", "EU West"),
    ],
)
def test_bad_parameters_are_refused_naming_their_key(parameter: str, value: object) -> None:
    route = {"resolver": "s3", "bucket": "my-games", parameter: value}
    with pytest.raises(ConfigError) as refused:
        build_settings({"routes": {ROUTE: route}})
    assert refused.value.key == f"routes[{ROUTE!r}].{parameter}"


def test_an_unknown_parameter_is_refused() -> None:
    with pytest.raises(ConfigError, match="profile"):
        build_settings({"routes": {ROUTE: {"resolver": "s3", "bucket": "my-games", "profile": "x"}}})


def test_without_boto3_the_resolver_says_what_to_install() -> None:
    script = (
        "import sys; sys.modules['boto3'] = None\n"
        "from zipmiddleware.config import build_settings\n"
        "from zipmiddleware.errors import ConfigError\n"
        "try:\n"
        "    build_settings({'routes': {'/s3/<path:p>': {'resolver': 's3', 'bucket': 'my-games'}}})\n"
        "except ConfigError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=PROJECT, check=True
    )
    assert "pip install 'zipmiddleware[s3]'" in result.stdout
    assert result.stdout.startswith("routes['/s3/<path:p>'].resolver:")


# -- through the middleware, in process -------------------------------------------------------------


def plain_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"plain"]


def middleware(endpoint: str, bucket: str, **settings: Any) -> ZipMiddleware:
    route = {"resolver": "s3", "bucket": bucket, "prefix": "games/", "endpoint_url": endpoint}
    settings.setdefault("crc_cache", ":memory:")
    return ZipMiddleware(plain_app, routes={ROUTE: route}, exclude=EXCLUDE, ignore=IGNORE, **settings)


def entries_of(body: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        assert archive.testzip() is None
        return {info.filename: archive.read(info) for info in archive.infolist() if not info.is_dir()}


def test_a_folder_downloads_as_a_zip_of_its_objects(moto_endpoint: str, games: str, tmp_path: Path) -> None:
    response, body = get(middleware(moto_endpoint, games), "/s3/quake")
    assert response.status_code == 200
    assert response.mimetype == "application/zip"
    assert "quake.zip" in response.headers["Content-Disposition"]
    assert entries_of(body) == QUAKE
    saved = tmp_path / "quake.zip"
    saved.write_bytes(body)
    assert_good_zip(saved, QUAKE)
    seven = run(["7z", "t", saved])
    assert seven.returncode == 0 and b"Everything is Ok" in seven.stdout, seven.stdout


def test_a_zip_of_objects_is_sized_with_a_strong_etag_and_ranges(moto_endpoint: str, games: str) -> None:
    app = middleware(moto_endpoint, games)
    response, full = get(app, "/s3/big")
    assert response.status_code == 200
    assert entries_of(full) == BIG
    assert response.headers.get("Content-Length") == str(len(full))
    assert response.headers.get("Accept-Ranges") == "bytes"
    etag = response.headers.get("ETag", "")
    assert etag.startswith('"') and not etag.startswith("W/")
    for header, start, stop in [
        ("bytes=0-99", 0, 100),
        ("bytes=1000000-2999999", 1_000_000, 3_000_000),
        ("bytes=-300", len(full) - 300, len(full)),
        (f"bytes={len(full) // 2}-", len(full) // 2, len(full)),
    ]:
        part, body = get(app, "/s3/big", Range=header, If_Range=etag)
        assert part.status_code == 206, header
        assert part.headers["Content-Range"] == f"bytes {start}-{stop - 1}/{len(full)}", header
        assert body == full[start:stop], header
    assert get(app, "/s3/big", If_None_Match=etag)[0].status_code == 304
    head, body = get(app, "/s3/big", method="HEAD")
    assert head.status_code == 200 and body == b"" and head.headers.get("Content-Length") == str(len(full))
    # A stale If-Range gets the whole archive.
    stale, body = get(app, "/s3/big", Range="bytes=10-", If_Range='"zip-stale"')
    assert stale.status_code == 200 and body == full


def test_a_single_object_downloads_as_it_is_with_validators_and_ranges(
    moto_endpoint: str, games: str
) -> None:
    app = middleware(moto_endpoint, games)
    data = GAMES["games/single.bin"]
    response, body = get(app, "/s3/single.bin")
    assert response.status_code == 200
    assert body == data
    assert response.headers.get("Content-Length") == str(len(data))
    assert response.headers.get("Accept-Ranges") == "bytes"
    assert "single.bin" in response.headers["Content-Disposition"]
    etag, modified = response.headers.get("ETag"), response.headers.get("Last-Modified")
    assert etag and modified
    part, body = get(app, "/s3/single.bin", Range="bytes=1000-1999", If_Range=etag)
    assert part.status_code == 206 and body == data[1000:2000]
    assert part.headers["Content-Range"] == f"bytes 1000-1999/{len(data)}"
    assert get(app, "/s3/single.bin", If_None_Match=etag)[0].status_code == 304
    head, body = get(app, "/s3/single.bin", method="HEAD")
    assert head.status_code == 200 and body == b"" and head.headers.get("Content-Length") == str(len(data))
    text, body = get(app, "/s3/readme.txt")
    assert text.mimetype == "text/plain" and body == GAMES["games/readme.txt"]
    assert get(app, "/s3/heretic")[1] == GAMES["games/heretic/heretic.wad"]


def test_an_objects_own_content_type_is_sent_only_when_it_is_a_plain_media_type(moto_endpoint: str) -> None:
    """Whoever stored an object chose its Content-Type: parameters, odd characters or a very long
    type are left out (the name decides), and no browser may sniff another type."""
    bucket = unique_bucket()
    client(moto_endpoint).create_bucket(Bucket=bucket)
    stored = {
        "page.html": "text/html",
        "notes.txt": 'text/plain; charset="x"; evil=1',
        "tool.bin": "application/x-" + "a" * 200,
        "image.png": "image/png",
    }
    for name, media_type in stored.items():
        client(moto_endpoint).put_object(Bucket=bucket, Key=name, Body=b"x" * 10, ContentType=media_type)
    route = {"resolver": "s3", "bucket": bucket, "endpoint_url": moto_endpoint}
    app = ZipMiddleware(plain_app, routes={ROUTE: route}, crc_cache=":memory:")
    types = {}
    for name in stored:
        response, _ = get(app, f"/s3/{name}")
        assert response.status_code == 200 and response.headers["X-Content-Type-Options"] == "nosniff"
        types[name] = response.headers["Content-Type"]
    assert types == {
        "page.html": "text/html; charset=utf-8",
        "notes.txt": "text/plain; charset=utf-8",  # guessed from the name
        "tool.bin": "application/octet-stream",
        "image.png": "image/png",
    }


def test_refusals_reach_the_client_without_details(moto_endpoint: str, games: str) -> None:
    app = middleware(moto_endpoint, games)
    assert get(app, "/s3/../other/secret.txt")[0].status_code == 404
    assert get(app, "/s3/nothing-here")[0].status_code == 404
    with access_denied(moto_endpoint):
        response, body = get(app, "/s3/quake")
    assert response.status_code == 403 and games.encode() not in body
    with down_endpoint() as down:
        response, body = get(middleware(down, games), "/s3/quake")
    assert response.status_code == 503 and b"127.0.0.1" not in body


def test_the_archive_is_the_same_on_every_download(moto_endpoint: str, games: str) -> None:
    first = get(middleware(moto_endpoint, games), "/s3/quake")
    second = get(middleware(moto_endpoint, games), "/s3/quake")
    assert hashlib.sha256(first[1]).digest() == hashlib.sha256(second[1]).digest()
    assert first[0].headers.get("ETag") == second[0].headers.get("ETag")


def test_a_zip_resumes_a_dropped_connection_with_if_match(
    proxy: FaultProxy, moto_endpoint: str, games: str
) -> None:
    expected = get(middleware(moto_endpoint, games), "/s3/big")[1]
    path = f"/{games}/games/big/sub/c.bin"
    proxy.faults[path] = Fault(drop_after=1_200_000)  # after some of it went into the archive
    response, body = get(middleware(proxy.url, games, retry_backoff=0), "/s3/big")
    assert response.status_code == 200
    assert body == expected
    first, again = proxy.requests_for(path)
    assert first.dropped and again.status == 206
    start, _, end = again.headers["range"].removeprefix("bytes=").partition("-")
    assert 0 < int(start) <= 1_200_000 and int(end) == len(GAMES["games/big/sub/c.bin"]) - 1
    assert first.headers["if-match"] == again.headers["if-match"]


def test_an_object_changed_after_the_first_byte_aborts_the_zip(moto_endpoint: str) -> None:
    files = {"games/pair/a.bin": random_bytes(7, 2 * MIB), "games/pair/b.bin": random_bytes(8, 500_000)}
    bucket = make_bucket(moto_endpoint, files)
    response = Client(middleware(moto_endpoint, bucket, prefetch=0)).get("/s3/pair", buffered=False)
    try:
        assert response.status_code == 200
        chunks = iter(response.response)
        received = next(chunks)
        put_objects(moto_endpoint, bucket, {"games/pair/b.bin": random_bytes(9, 500_000)})
        with pytest.raises(Exception, match="changed at its origin"):
            for chunk in chunks:
                received += chunk
        assert len(received) < int(response.headers["Content-Length"])
    finally:
        response.close()


def test_an_object_changed_while_it_is_sent_is_never_spliced(proxy: FaultProxy, moto_endpoint: str) -> None:
    bucket = make_bucket(moto_endpoint, {"games/movie.bin": random_bytes(10, 3 * MIB)})
    proxy.default_fault = Fault(drop_after=MIB)  # the connection breaks after 1 MiB...
    response = Client(middleware(proxy.url, bucket, retry_backoff=0)).get("/s3/movie.bin", buffered=False)
    try:
        assert response.status_code == 200
        chunks = iter(response.response)
        received = next(chunks)
        # ...and the object is replaced before that.
        put_objects(moto_endpoint, bucket, {"games/movie.bin": random_bytes(11, 3 * MIB)})
        with pytest.raises(Exception, match="changed at its origin"):
            for chunk in chunks:
                received += chunk
        assert len(received) < 3 * MIB
    finally:
        response.close()
    assert [record.status for record in proxy.requests][-1] == 412


def test_an_object_changed_before_its_first_byte_is_a_502(moto_endpoint: str) -> None:
    bucket = make_bucket(moto_endpoint, {"games/x.bin": b"x" * 5000})
    listed = resolve(resolver(moto_endpoint, bucket), "x.bin")  # what the resolver said before the change
    put_objects(moto_endpoint, bucket, {"games/x.bin": b"y" * 5000})
    app = ZipMiddleware(plain_app, routes={"/x.bin": lambda request: listed}, crc_cache=":memory:")
    response, body = get(app, "/x.bin")
    assert response.status_code == 502
    assert bucket.encode() not in body


# -- under gunicorn, with real clients ------------------------------------------------------------


@pytest.fixture(scope="module")
def big_bucket(moto_endpoint: str) -> tuple[str, dict[str, bytes]]:
    """A bucket with about 24 MB in a "games/big/" folder: big enough that a rate-limited client
    can be killed part-way."""
    files = {
        "games/big/part-1.bin": random_bytes(21, 7 * MIB + 123),
        "games/big/part-2.bin": random_bytes(22, 11 * MIB + 45),
        "games/big/sub/part-3.bin": random_bytes(23, 6 * MIB + 7),
        "games/big/readme.txt": b"Random data for resumed downloads.\n",
        "games/big/empty.dat": b"",
    }
    bucket = make_bucket(moto_endpoint, files)
    return bucket, {name.removeprefix("games/big/"): data for name, data in files.items()}


def s3_server(endpoint: str, bucket: str, **settings: Any) -> GunicornServer:
    env = {
        "ZM_TEST_S3_ENDPOINT": endpoint,
        "ZM_TEST_S3_BUCKET": bucket,
        "ZM_TEST_S3_PREFIX": "games/",
        "ZM_TEST_SETTINGS": json.dumps({"crc_cache": ":memory:", **settings}),
    }
    return GunicornServer("tests.s3:gunicorn_app()", pythonpath=[PROJECT], env=env, threads=4)


@pytest.fixture(scope="module")
def s3_gunicorn(moto_endpoint: str, big_bucket: tuple[str, dict[str, bytes]]) -> Iterator[GunicornServer]:
    with s3_server(moto_endpoint, big_bucket[0]) as server:
        yield server


def curl(*args: Any, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    return run(["curl", "-sS", "--max-time", str(int(timeout)), *args], timeout=timeout + 5)


@pytest.mark.server
def test_gunicorn_serves_a_folder_as_a_zip_and_an_object_as_it_is(
    s3_gunicorn: GunicornServer, big_bucket: tuple[str, dict[str, bytes]], tmp_path: Path
) -> None:
    _, files = big_bucket
    output, headers = tmp_path / "big.zip", tmp_path / "big.headers"
    result = curl("--fail", "-D", headers, "-o", output, s3_gunicorn.url + "/s3/big")
    assert result.returncode == 0, result.stderr
    assert_good_zip(output, files)
    seven = run(["7z", "t", output])
    assert seven.returncode == 0 and b"Everything is Ok" in seven.stdout, seven.stdout
    status, answer = read_headers(headers)
    assert status == 200
    assert answer.get("content-length") == [str(size_of(output))]
    assert answer.get("accept-ranges") == ["bytes"]

    single, single_headers = tmp_path / "part-2.bin", tmp_path / "part-2.headers"
    result = curl("--fail", "-D", single_headers, "-o", single, s3_gunicorn.url + "/s3/big/part-2.bin")
    assert result.returncode == 0, result.stderr
    assert single.read_bytes() == files["part-2.bin"]
    status, answer = read_headers(single_headers)
    assert status == 200 and answer.get("content-length") == [str(len(files["part-2.bin"]))]
    assert answer.get("etag") and answer.get("last-modified")

    ranged, ranged_headers = tmp_path / "slice.bin", tmp_path / "slice.headers"
    url = s3_gunicorn.url + "/s3/big/part-2.bin"
    result = curl("--fail", "-r", "5000000-5999999", "-D", ranged_headers, "-o", ranged, url)
    assert result.returncode == 0, result.stderr
    assert read_headers(ranged_headers)[0] == 206
    assert ranged.read_bytes() == files["part-2.bin"][5_000_000:6_000_000]


@pytest.mark.server
def test_curl_and_wget_resume_a_killed_zip_download(s3_gunicorn: GunicornServer, tmp_path: Path) -> None:
    url = s3_gunicorn.url + "/s3/big"
    full, full_headers = tmp_path / "full.zip", tmp_path / "full.headers"
    assert curl("--fail", "-D", full_headers, "-o", full, url).returncode == 0
    etag = read_headers(full_headers)[1].get("etag", [""])[0]
    assert etag, "a ZIP of S3 objects has an ETag"
    total, digest = size_of(full), sha256_file(full)

    # curl, killed part-way, resumed with -C - (and If-Range: the version it began with).
    output = tmp_path / "curl.zip"
    command = ["curl", "-sS", "--limit-rate", "8M", "-o", output, url]
    partial = kill_part_way(command, output, 2 * MIB, tmp_path / "curl.log")
    assert 0 < partial < total
    resume_headers = tmp_path / "resume.headers"
    result = curl("--fail", "-C", "-", "-H", f"If-Range: {etag}", "-D", resume_headers, "-o", output, url)
    assert result.returncode == 0, result.stderr
    status, answer = read_headers(resume_headers)
    assert status == 206
    assert answer["content-range"] == [f"bytes {partial}-{total - 1}/{total}"]
    assert sha256_file(output) == digest

    # wget, killed part-way, resumed with -c.
    output = tmp_path / "wget.zip"
    command = ["wget", "-q", "--tries=1", "--timeout=20", "--limit-rate=8m", "-O", output, url]
    partial = kill_part_way(command, output, 3 * MIB, tmp_path / "wget.log")
    assert 0 < partial < total
    result = run(["wget", "-c", "-S", "--tries=1", "--timeout=20", "-O", output, url], timeout=60)
    assert result.returncode == 0, result.stderr
    log = result.stderr.decode("latin-1")
    assert re.findall(r"^\s*HTTP/1\.[01] (\d{3})", log, re.MULTILINE) == ["206"], log
    assert sha256_file(output) == digest


@pytest.mark.server
def test_a_change_during_a_download_under_gunicorn_aborts_it(moto_endpoint: str) -> None:
    files = {"games/pair/a.bin": random_bytes(31, 12 * MIB), "games/pair/b.bin": random_bytes(32, MIB)}
    bucket = make_bucket(moto_endpoint, files)
    with s3_server(moto_endpoint, bucket, prefetch=0) as server:
        # A client that reads the head and a little, then waits: the worker is held inside a.bin.
        sock = connect(server.host, server.port, receive_buffer=64 * 1024)
        with sock:
            send_get(sock, "/s3/pair")
            head = read_head(sock)
            assert head.status == 200
            time.sleep(0.5)
            put_objects(moto_endpoint, bucket, {"games/pair/b.bin": random_bytes(33, MIB)})
            rest, ended = read_to_end(sock, timeout=30)
        assert ended in ("eof", "reset")
        assert len(head.body) + len(rest) < head.length  # cut short: the client knows it failed
        assert wait_for(lambda: "changed at its origin" in server.log(), 5), server.log()


@pytest.mark.server
def test_a_store_that_goes_down_mid_download_aborts_it_and_later_requests_get_a_503(
    moto_endpoint: str,
) -> None:
    files = {"games/pair/a.bin": random_bytes(34, 12 * MIB), "games/pair/b.bin": random_bytes(35, MIB)}
    bucket = make_bucket(moto_endpoint, files)
    with (
        FaultProxy(moto_endpoint) as proxy,
        s3_server(proxy.url, bucket, prefetch=0, retries=2, retry_backoff=0.1) as server,
    ):
        sock = connect(server.host, server.port, receive_buffer=64 * 1024)
        with sock:
            send_get(sock, "/s3/pair")
            head = read_head(sock)
            assert head.status == 200
            time.sleep(0.5)  # the worker is held inside a.bin by the slow reader
            proxy.stop()  # the store's address now refuses every connection
            rest, ended = read_to_end(sock, timeout=30)
        assert ended in ("eof", "reset")
        assert len(head.body) + len(rest) < head.length  # cut short: the client knows it failed
        assert wait_for(lambda: "a.bin': the connection to its origin failed" in server.log(), 5), (
            server.log()
        )
        time.sleep(2.5)  # past the reuse of the folder's listing
        result = curl("-o", "/dev/null", "-w", "%{http_code}", server.url + "/s3/pair")
        assert result.stdout == b"503", result


@pytest.mark.server
def test_uvicorn_serves_the_same_archive_and_stops_reading_s3_when_the_client_leaves(
    moto_endpoint: str,
    big_bucket: tuple[str, dict[str, bytes]],
    s3_gunicorn: GunicornServer,
    tmp_path: Path,
) -> None:
    """The ASGI middleware under uvicorn, with the s3 resolver behind the counting proxy: the
    archive has gunicorn's bytes and ETag, an object's range is read from S3 as a range, and a
    client that goes away mid-archive ends every read of S3 at once."""
    require_module("uvicorn")
    bucket, files = big_bucket
    with FaultProxy(moto_endpoint) as proxy:
        env = {
            "ZM_TEST_S3_ENDPOINT": proxy.url,
            "ZM_TEST_S3_BUCKET": bucket,
            "ZM_TEST_S3_PREFIX": "games/",
            "ZM_TEST_SETTINGS": json.dumps({"crc_cache": ":memory:"}),
        }
        with AsgiServer("tests.s3:asgi_app", args=["--factory"], env=env) as server:
            outputs = {}
            for name, base in (("wsgi", s3_gunicorn.url), ("asgi", server.url)):
                output, headers = tmp_path / f"{name}.zip", tmp_path / f"{name}.headers"
                result = curl("--fail", "-D", headers, "-o", output, base + "/s3/big")
                assert result.returncode == 0, result.stderr
                outputs[name] = (sha256_file(output), read_headers(headers)[1]["etag"])
            assert outputs["asgi"] == outputs["wsgi"]
            assert_good_zip(tmp_path / "asgi.zip", files)

            proxy.reset_counters()
            ranged = tmp_path / "slice.bin"
            result = curl("--fail", "-r", "5000000-5999999", "-o", ranged, server.url + "/s3/big/part-2.bin")
            assert result.returncode == 0, result.stderr
            assert ranged.read_bytes() == files["part-2.bin"][5_000_000:6_000_000]
            gets = [
                record
                for record in proxy.requests
                if record.method == "GET" and "list-type" not in record.target
            ]
            assert [record.headers.get("range") for record in gets] == ["bytes=5000000-5999999"]

            proxy.reset_counters()
            sock = connect("127.0.0.1", server.port, receive_buffer=64 * 1024)
            send_get(sock, "/s3/big")
            assert read_head(sock).status == 200
            assert wait_for(lambda: proxy.in_flight > 0, 5)  # the archive's objects are being read
            sock.close()
            assert wait_for(lambda: proxy.in_flight == 0, 5), proxy.requests
            sent = proxy.bytes_sent
            time.sleep(1)
            assert proxy.bytes_sent == sent  # nothing more is read from S3 for it
            assert curl("--fail", "-o", "/dev/null", server.url + "/s3/big/readme.txt").returncode == 0
