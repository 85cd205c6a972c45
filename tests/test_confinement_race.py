"""Nothing outside the roots is served while a folder or file is being swapped for a symlink.

A folder inside the root and a symlink to a folder outside every root trade places
atomically (``renameat2(RENAME_EXCHANGE)``), over and over, while clients download
through them under a real gunicorn. Checking a path as a string (``realpath``) and
then opening it by name again cannot keep the outside out: the name may lead
elsewhere by the time it is opened, and ``O_NOFOLLOW`` only guards its last
component. The outside files are full of a marker that must never reach a client,
in a body, a partial body, a ZIP member or a header.

Both kinds of resolver are raced: the README's plain resolver (``os.path.join`` plus
``isdir``/``isfile``, run from ``examples/plain_app.py`` itself) and the built-in
``directory`` resolver. Each downloads single files (sent directly) and folders (ZIPs),
while a folder on the way is swapped, and while the requested file itself is.

The race must really have been run: the swapper must have made many exchanges, and
a good share of the downloads must have come back whole, from inside.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import itertools
import threading
import time
import urllib.parse
import zipfile
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .clients import unavailable
from .gunicorn_hooks import this_checkout_runs
from .servers import PROJECT, TESTS, GunicornServer
from .swap import Swapper, exchange_unsupported

pytestmark = pytest.mark.server

MARKER = b"OUTSIDE-SECRET"  # in every outside file, name and folder; never in a response
# Requests per (resolver, swap): 10,000 in all. Checked by path, the folder swap served the
# outside in 3 to 12% of the downloads of each kind, so a few thousand show it every time.
REQUESTS = {"folder": 3000, "file": 2000}
CLIENTS = 6  # keep-alive connections at once
SERVER_THREADS = 8
MIN_SWAPS = 10_000  # per variant: the swapper must have raced, not idled
# Of each kind of download (file, zip): a 200 with inside content. Half the time the name
# leads outside and must be refused, and a name changing under a walk may fail a download, so
# a fifth to two thirds come back whole; far fewer would mean the race was not really run.
MIN_INSIDE_SHARE = 0.10


def inside_content(rel: str) -> bytes:
    return f"inside the root: {rel}\n".encode() * 40


def outside_content(rel: str) -> bytes:
    return (MARKER + f": outside every root: {rel}\n".encode()) * 40  # the marker on every line


@dataclass(frozen=True)
class Scene:
    """The data root, the outside folder, and what each swap exchanges and requests.

    ``games/g/d`` (a folder) is exchanged with ``games/g/d-swap``, a symlink to the
    outside folder holding files of the same names (and one more); ``games/h/f.txt``
    (a file) is exchanged with ``games/h/f.txt-swap``, a symlink to an outside file.
    """

    root: Path
    outside: Path
    swaps: dict[str, tuple[Path, Path]]
    direct: dict[str, tuple[str, ...]]  # swap -> file paths below root, sent directly
    zipped: dict[str, tuple[str, ...]]  # swap -> folder paths below root, sent as ZIPs
    inside: frozenset[bytes]  # every inside file's content


def make_scene(top: Path) -> Scene:
    root, outside = top / "root", top / f"{MARKER.decode()}-place"
    inside_files = ["games/g/readme.txt", "games/g/d/a.txt", "games/g/d/b.txt", "games/g/d/sub/c.txt"]
    inside_files += ["games/h/f.txt", "games/h/other.txt"]
    outside_files = ["d/a.txt", "d/b.txt", "d/sub/c.txt", f"d/{MARKER.decode()}-only.txt", "f.txt"]
    for rel in inside_files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(inside_content(rel))
    for rel in outside_files:
        (outside / rel).parent.mkdir(parents=True, exist_ok=True)
        (outside / rel).write_bytes(outside_content(rel))
    games = root / "games"
    (games / "g" / "d-swap").symlink_to(outside / "d", target_is_directory=True)
    (games / "h" / "f.txt-swap").symlink_to(outside / "f.txt")
    return Scene(
        root=root,
        outside=outside,
        swaps={
            "folder": (games / "g" / "d", games / "g" / "d-swap"),
            "file": (games / "h" / "f.txt", games / "h" / "f.txt-swap"),
        },
        # The folder swap is raced through a folder on the way to a file, and by zipping
        # the swapped folder itself and its parent (where the walk meets it as a child).
        direct={"folder": ("games/g/d/a.txt", "games/g/d/sub/c.txt"), "file": ("games/h/f.txt",)},
        zipped={"folder": ("games/g/d", "games/g"), "file": ("games/h",)},
        inside=frozenset(inside_content(rel) for rel in inside_files),
    )


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Scene:
    top = tmp_path_factory.mktemp("race")
    reason = exchange_unsupported(top)
    if reason is not None:
        unavailable(reason)
    return make_scene(top)


@contextlib.contextmanager
def running(server: GunicornServer) -> Iterator[GunicornServer]:
    """Run ``server`` and check that its worker runs the zipmiddleware beside these tests
    (not the copy installed in the virtualenv, when the tests run from another checkout)."""
    with server:
        found = this_checkout_runs(server.log)
        print(f"\n{server.label}: worker imported zipmiddleware from {found[0]}")
        yield server


def served(app_spec: str, pythonpath: str, env: dict[str, str]) -> GunicornServer:
    return GunicornServer(
        app_spec,
        pythonpath=[pythonpath],  # gunicorn keeps only its last --pythonpath: one comma-separated list
        env=env,
        threads=SERVER_THREADS,
        args=["-c", str(TESTS / "gunicorn_hooks.py")],
    )


@pytest.fixture(scope="module")
def servers(scene: Scene) -> Iterator[dict[str, GunicornServer]]:
    """Both resolvers, each under /files/<path:subpath> with ``scene.root`` as the only root."""
    plain = served(
        "plain_app:application", f"{PROJECT},{PROJECT / 'examples'}", {"FILES_ROOT": str(scene.root)}
    )
    routes = f'/files/<path:subpath> = {{ resolver = "directory", root = "{scene.root}" }}'
    builtin = served("tests.directory_app:app", str(PROJECT), {"ZM_TEST_ROUTES": routes})
    with running(plain), running(builtin):
        yield {"plain": plain, "directory": builtin}


# -- one download, judged --------------------------------------------------------------------------


@dataclass
class Outcome:
    path: str
    kind: str  # "file" or "zip"
    status: str  # "200", "403", ... or "aborted" (the connection failed before the body's end)
    headers: list[tuple[str, str]]
    body: bytes  # what arrived, if only part of it


def fetch(connection: http.client.HTTPConnection, path: str, kind: str) -> Outcome:
    """GET /files/<path> on a keep-alive connection; a failure closes it (the next request reopens)."""
    status, headers, body = "aborted", [], b""
    try:
        connection.request("GET", "/files/" + urllib.parse.quote(path))
        response = connection.getresponse()
        status, headers = str(response.status), response.getheaders()
        body = response.read()
    except http.client.IncompleteRead as exc:
        body, status = exc.partial, "aborted"
        connection.close()
    except (OSError, http.client.HTTPException):
        status = "aborted"
        connection.close()
    return Outcome(path, kind, status, headers, body)


def leaks(outcome: Outcome) -> str | None:
    """What of the outside reached the client, if anything."""
    for name, value in outcome.headers:
        if MARKER in name.encode("latin-1") or MARKER in value.encode("latin-1"):
            return f"header {name}: {value}"
    if MARKER in outcome.body:
        at = outcome.body.index(MARKER)
        return f"body ({len(outcome.body)} bytes): {outcome.body[max(0, at - 40) : at + 60]!r}"
    if outcome.kind == "zip" and outcome.status == "200" and zipfile.is_zipfile(io.BytesIO(outcome.body)):
        with zipfile.ZipFile(io.BytesIO(outcome.body)) as archive:
            for info in archive.infolist():
                if MARKER in info.filename.encode() or MARKER in archive.read(info):
                    return f"ZIP member {info.filename!r}"
    return None


def zip_contents(body: bytes) -> list[bytes] | None:
    """The members of a ZIP that passes its CRC checks, else None."""
    try:
        with zipfile.ZipFile(io.BytesIO(body)) as archive:
            if archive.testzip() is not None:
                return None
            return [archive.read(info) for info in archive.infolist()]
    except (zipfile.BadZipFile, OSError):
        return None


def whole(outcome: Outcome) -> bool:
    """Whether a 200 arrived complete: its Content-Length, and for a ZIP, a readable archive."""
    length = {name.lower(): value for name, value in outcome.headers}.get("content-length")
    if length is not None and int(length) != len(outcome.body):
        return False
    if outcome.kind == "zip" and outcome.body.startswith(b"PK"):  # not a folder sent as its one file
        return zip_contents(outcome.body) is not None
    return True


def from_inside(outcome: Outcome, scene: Scene) -> bool:
    """A whole 200 of inside content: the very file asked for; for a folder, a valid ZIP of
    inside files only, or the one inside file it held when it was listed (sent directly)."""
    if outcome.status != "200":
        return False
    if outcome.kind == "file":
        return outcome.body == inside_content(outcome.path)
    if outcome.body in scene.inside:
        return True
    contents = zip_contents(outcome.body)
    return bool(contents) and all(content in scene.inside for content in contents or ())


@dataclass
class Tally:
    """Every download of one kind in one variant: statuses, inside and outside hits."""

    requests: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    inside: int = 0
    other_200: int = 0  # a 200 neither whole-inside nor leaking (say, a ZIP missing a file)
    outside: int = 0
    outside_whole: int = 0  # of which a complete 200 (for a ZIP: one that passes its CRC checks)
    samples: list[str] = field(default_factory=list)

    def add(self, outcome: Outcome, scene: Scene) -> None:
        self.requests += 1
        self.statuses[outcome.status] += 1
        leaked = leaks(outcome)
        if leaked is not None:
            self.outside += 1
            if outcome.status == "200" and whole(outcome):
                self.outside_whole += 1
            if len(self.samples) < 3:
                self.samples.append(f"{outcome.status} /files/{outcome.path}: {leaked}")
        elif from_inside(outcome, scene):
            self.inside += 1
        elif outcome.status == "200":
            self.other_200 += 1

    def line(self, label: str) -> str:
        statuses = " ".join(f"{status}={count}" for status, count in sorted(self.statuses.items()))
        return (
            f"{label:<22} requests={self.requests:>5} inside={self.inside:>5} "
            f"OUTSIDE={self.outside:>3} (whole {self.outside_whole:>3}) other200={self.other_200:>3}  [{statuses}]"
        )


def hammer(server: GunicornServer, scene: Scene, swap: str, total: int) -> dict[str, Tally]:
    """``total`` downloads over ``CLIENTS`` keep-alive connections, alternating files and ZIPs."""
    plan = [("file", path) for path in scene.direct[swap]] + [("zip", path) for path in scene.zipped[swap]]
    # Interleave so that files and ZIPs get the same number of requests whatever the counts.
    files = itertools.cycle([item for item in plan if item[0] == "file"])
    zips = itertools.cycle([item for item in plan if item[0] == "zip"])
    work = [next(files) if i % 2 == 0 else next(zips) for i in range(total)]
    tallies = {"file": Tally(), "zip": Tally()}
    lock = threading.Lock()

    def client(index: int) -> None:
        connection = http.client.HTTPConnection(server.host, server.port, timeout=30)
        try:
            for kind, path in work[index::CLIENTS]:
                outcome = fetch(connection, path, kind)
                with lock:
                    tallies[kind].add(outcome, scene)
        finally:
            connection.close()

    with ThreadPoolExecutor(CLIENTS) as pool:
        for done in [pool.submit(client, index) for index in range(CLIENTS)]:
            done.result()
    return tallies


def check_without_race(server: GunicornServer, scene: Scene, swap: str) -> None:
    """Before racing: every path serves inside content, and the symlink out is refused."""
    connection = http.client.HTTPConnection(server.host, server.port, timeout=30)
    try:
        for kind, paths in (("file", scene.direct[swap]), ("zip", scene.zipped[swap])):
            for path in paths:
                outcome = fetch(connection, path, kind)
                assert from_inside(outcome, scene), (outcome.path, outcome.status, outcome.body[:200])
        link = scene.swaps[swap][1].relative_to(scene.root).as_posix()
        for path in (link, f"{link}/a.txt") if swap == "folder" else (link,):
            outcome = fetch(connection, path, "file")
            assert outcome.status in ("403", "404") and leaks(outcome) is None, (path, outcome.status)
    finally:
        connection.close()


@pytest.mark.parametrize("swap", ["folder", "file"])
@pytest.mark.parametrize("resolver", ["plain", "directory"])
def test_symlink_swap_race_serves_nothing_outside(
    servers: dict[str, GunicornServer], scene: Scene, resolver: str, swap: str
) -> None:
    server = servers[resolver]
    check_without_race(server, scene, swap)
    started = time.monotonic()
    with Swapper(*scene.swaps[swap]) as swapper:
        tallies = hammer(server, scene, swap, REQUESTS[swap])
    elapsed = time.monotonic() - started
    requests = sum(tally.requests for tally in tallies.values())
    print(
        f"\n{resolver} resolver, {swap} swap: {requests} requests in {elapsed:.1f} s "
        f"({requests / elapsed:.0f}/s), {swapper.swaps} swaps"
    )
    for kind, tally in tallies.items():
        print("  " + tally.line(f"{resolver}/{swap}/{kind}"))
        for sample in tally.samples:
            print(f"    leaked: {sample}")
    leaked = {kind: tally.outside for kind, tally in tallies.items()}
    assert sum(leaked.values()) == 0, (
        f"{resolver} resolver, {swap} swap: outside content served in {leaked} of "
        f"{ {kind: tally.requests for kind, tally in tallies.items()} } downloads: "
        + "; ".join(sample for tally in tallies.values() for sample in tally.samples)
    )
    # The race was run: many exchanges, and downloads that came back whole from inside.
    assert swapper.swaps >= MIN_SWAPS, swapper.swaps
    for kind, tally in tallies.items():
        assert tally.inside >= MIN_INSIDE_SHARE * tally.requests, (kind, tally.line(kind))
