"""The plan cache: a folder's plan is used again while a cheap check finds the folder unchanged.

Unit tests against :class:`Planner` (walks counted by wrapping ``Planner.walk``), then the same
promises through a real gunicorn: the second request for an unchanged folder does not walk it,
and every change (a file added, removed, renamed or rewritten in place with its mtime set back,
a subfolder added or removed, a symlink swapped) is seen by the very next request.
"""

from __future__ import annotations

import http.client
import io
import os
import shutil
import textwrap
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zipmiddleware import ConfigError, ZipMiddleware, ZipTarget, planning
from zipmiddleware.config import build_settings, flask_settings
from zipmiddleware.errors import RefusedError
from zipmiddleware.names import NameTable, safe_arcname
from zipmiddleware.planning import FilePlan, FreshCheck, Planner, ZipPlan, arcnames

from .conftest import plain_app, write_tree
from .servers import PROJECT, GunicornServer

# A margin for tests: far above a kernel tick (<= 10 ms), far below the real one (3 s), so that
# a tree written by a test may be cached after a short sleep.
TEST_MARGIN_NS = 50_000_000


def settle() -> None:
    """Wait until what was just written is older than the test margin."""
    time.sleep(3 * TEST_MARGIN_NS / 1e9)


@pytest.fixture
def margin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(planning, "RACY_MARGIN_NS", TEST_MARGIN_NS)


@pytest.fixture
def walks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every walk a Planner makes appends 1 to this list."""
    counted: list[int] = []
    walk = Planner.walk

    def counting(self: Planner, *args: Any) -> Any:
        counted.append(1)
        return walk(self, *args)

    monkeypatch.setattr(Planner, "walk", counting)
    return counted


def make_planner(root: Path, **options: Any) -> Planner:
    options.setdefault("exclude", ["updates"])
    options.setdefault("ignore", ["*.nfo"])
    return Planner(build_settings({"roots": [str(root)], **options}))


def listing(plan: object) -> list[tuple[str, int | None]]:
    assert isinstance(plan, ZipPlan)
    return [(entry.arcname, entry.size) for entry in plan.entries]


def folder(root: Path, name: str = "game") -> ZipTarget:
    return ZipTarget.from_directory(root / name)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    write_tree(
        root,
        {
            "game/a.txt": b"alpha",
            "game/b.txt": b"bravo!",
            "game/sub/c.txt": b"charlie",
            "game/readme.nfo": b"ignored",
            "game/updates/patch.bin": b"excluded",
            "other/x.txt": b"x-ray",
            "other/y.txt": b"yankee",
            "third/p.txt": b"papa",
            "third/q.txt": b"quebec",
            "targets/v1/one.txt": b"version one",
            "targets/v2/two.txt": b"version two!",
        },
    )
    return root


# -- names: the fast way gives exactly the name table's names ------------------------------------

NAME_PARTS = st.sampled_from(
    ["a", "A", "b.txt", "B.TXT", "c:", "C:x", " sp ", ".", "..", "x\\y", "tab\t", "é", "É", "\udce9", "a (1)"]
)


@given(st.lists(st.lists(NAME_PARTS, min_size=1, max_size=4).map("/".join), max_size=12))
def test_arcnames_are_the_name_tables(rels: list[str]) -> None:
    table = NameTable()
    assert arcnames(rels) == [table.add(safe_arcname(rel) or "_") for rel in rels]


def test_arcnames_of_a_plain_tree_and_of_clashes() -> None:
    assert arcnames(["d/a.txt", "d/b.txt", "e.txt"]) == ["d/a.txt", "d/b.txt", "e.txt"]
    assert arcnames(["D/a.txt", "d/A.TXT"]) == ["D/a.txt", "d/A (1).TXT"]
    assert arcnames(["d", "d/x"]) == ["d", "d (1)/x"]
    assert arcnames(["C:evil/x", "ok/C:x"]) == ["evil/x", "ok/C_x"]


@pytest.mark.parametrize(
    "mtime_ns",
    [0, 1, 999_999_999, 1_700_000_000_999_999_999, 1_700_000_000_123_456_789, -1, -1_500_000_001, 2**40 + 7],
)
def test_a_lean_snapshot_gives_what_stat_gave(tmp_path: Path, mtime_ns: int) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"data")
    os.utime(path, ns=(0, mtime_ns))
    st = os.stat(path)
    snapshot = planning.FileSnapshot.of(str(path), st)
    assert (snapshot.path, snapshot.size, snapshot.mtime, snapshot.mtime_ns) == (
        str(path),
        st.st_size,
        st.st_mtime,
        st.st_mtime_ns,
    )
    assert snapshot.same(st) and snapshot.unchanged(st)


# -- Planner: what is cached, and when it is used again --------------------------------------------


def test_an_unchanged_folder_is_walked_once(tree: Path, margin: None, walks: list[int]) -> None:
    planner = make_planner(tree)
    settle()
    first = planner.plan(folder(tree))
    assert listing(first) == [("a.txt", 5), ("b.txt", 6), ("sub/c.txt", 7)]
    for _ in range(3):
        assert planner.plan(folder(tree)) is first  # the same plan: its layout and ETag come along
    # However the path is spelled.
    assert planner.plan(ZipTarget.from_directory(f"{tree}/game/./")) is first
    assert len(walks) == 1
    assert planner.cache.size == 3 + 2  # three files, two folders


def change_added(root: Path) -> None:
    (root / "game" / "new.txt").write_bytes(b"new")


def change_removed(root: Path) -> None:
    (root / "game" / "a.txt").unlink()


def change_renamed(root: Path) -> None:
    (root / "game" / "a.txt").rename(root / "game" / "z.txt")


def change_rewritten_in_place(root: Path) -> None:
    """Same size, same mtime (set back): only the ctime tells (the plan cache looks at it; the
    ETag, by design, does not)."""
    path = root / "game" / "sub" / "c.txt"
    before = path.stat()
    with open(path, "r+b") as file:
        file.write(b"CHARLIE")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def change_subfolder_added(root: Path) -> None:
    write_tree(root, {"game/more/d.txt": b"delta"})


def change_subfolder_removed(root: Path) -> None:
    shutil.rmtree(root / "game" / "sub")


def change_renamed_in_subfolder(root: Path) -> None:
    (root / "game" / "sub" / "c.txt").rename(root / "game" / "sub" / "c2.txt")


def change_file_touched(root: Path) -> None:
    os.utime(root / "game" / "b.txt", (1_000_000_000, 1_000_000_000))


CHANGES: dict[str, Callable[[Path], None]] = {
    "added": change_added,
    "removed": change_removed,
    "renamed": change_renamed,
    "rewritten in place": change_rewritten_in_place,
    "subfolder added": change_subfolder_added,
    "subfolder removed": change_subfolder_removed,
    "renamed in a subfolder": change_renamed_in_subfolder,
    "mtime changed": change_file_touched,
}


@pytest.mark.parametrize("change", CHANGES)
def test_a_change_is_seen_by_the_next_plan(tree: Path, margin: None, walks: list[int], change: str) -> None:
    planner = make_planner(tree)
    settle()
    first = planner.plan(folder(tree))
    assert planner.plan(folder(tree)) is first
    CHANGES[change](tree)  # at once: no settling between the change and the next request
    second = planner.plan(folder(tree))
    assert second is not first
    assert len(walks) == 2
    fresh = make_planner(tree).plan(folder(tree))  # what an uncached planner makes of it now
    assert isinstance(second, ZipPlan) and isinstance(fresh, ZipPlan)
    assert [(e.arcname, e.file) for e in second.entries] == [(e.arcname, e.file) for e in fresh.entries]


def test_changes_in_excluded_and_ignored_names_keep_nothing_wrong(tree: Path, margin: None) -> None:
    planner = make_planner(tree)
    settle()
    first = planner.plan(folder(tree))
    (tree / "game" / "updates" / "patch.bin").write_bytes(b"changed, but excluded")
    assert planner.plan(folder(tree)) is first  # nothing the plan depends on changed
    (tree / "game" / "readme.nfo").write_bytes(b"changed, but ignored")
    assert planner.plan(folder(tree)) is first
    (tree / "game" / "new.nfo").write_bytes(b"added, and ignored")
    assert listing(planner.plan(folder(tree))) == listing(first)  # walked again: the folder changed


def test_symlinks_are_followed_again_by_the_check(tree: Path, margin: None, walks: list[int]) -> None:
    """A symlink's target may change while neither the link nor its folder does."""
    game = tree / "game"
    (tree / "targets" / "live").symlink_to("v1")  # swapped below, outside the walked folder
    (game / "current").symlink_to("../targets/live", target_is_directory=True)
    (game / "file-link.txt").symlink_to("../other/x.txt")
    (game / "dangling.txt").symlink_to("../other/not-yet.txt")
    settle()
    planner = make_planner(tree)
    names = [name for name, _ in listing(planner.plan(folder(tree)))]
    assert "current/one.txt" in names and "file-link.txt" in names and "dangling.txt" not in names
    assert len(walks) == 1

    swap = tree / "targets" / "live-new"
    swap.symlink_to("v2")
    swap.replace(tree / "targets" / "live")  # only what `current` leads to changes
    assert "current/two.txt" in [name for name, _ in listing(planner.plan(folder(tree)))]
    settle()
    planner.plan(folder(tree))
    (tree / "other" / "x.txt").write_bytes(b"x-ray, longer now")  # the linked file, elsewhere
    assert ("file-link.txt", 17) in listing(planner.plan(folder(tree)))
    settle()
    planner.plan(folder(tree))
    (tree / "other" / "not-yet.txt").write_bytes(b"here")  # the dangling link now leads somewhere
    assert ("dangling.txt", 4) in listing(planner.plan(folder(tree)))
    # 1, then one walk per change, and one for the plan after x.txt's change: made just after
    # it, that one was not kept.
    assert len(walks) == 5


def test_a_folder_swapped_for_a_symlink_outside_is_not_served_from_the_cache(
    tree: Path, tmp_path: Path, margin: None
) -> None:
    outside = tmp_path / "outside"
    write_tree(outside, {"c.txt": b"OUTSIDE", "secret.txt": b"OUTSIDE"})
    planner = make_planner(tree)
    settle()
    planner.plan(folder(tree))
    (tree / "game" / "sub").rename(tree / "sub-away")
    (tree / "game" / "sub").symlink_to(outside, target_is_directory=True)
    plan = planner.plan(folder(tree))
    assert listing(plan) == [("a.txt", 5), ("b.txt", 6)]  # the link leads outside: skipped
    # The whole folder swapped: the request's own open refuses it, cached or not.
    (tree / "game").rename(tree / "game-away")
    (tree / "game").symlink_to(outside, target_is_directory=True)
    with pytest.raises(RefusedError) as info:
        planner.plan(folder(tree))
    assert info.value.status == 404


def test_a_plan_made_right_after_a_change_is_not_trusted(tree: Path, walks: list[int]) -> None:
    """The real margin: what changed within it of the walk's start may change again in the
    same clock tick without its ctime moving, so such a plan is not kept."""
    planner = make_planner(tree)
    assert planning.RACY_MARGIN_NS >= 2_000_000_000  # FAT's 2 s times, at least
    (tree / "game" / "a.txt").write_bytes(b"ALPHA")
    planner.plan(folder(tree))
    planner.plan(folder(tree))
    assert len(walks) == 2 and len(planner.cache) == 0


def test_a_plan_is_kept_once_everything_is_older_than_the_margin(
    tree: Path, monkeypatch: pytest.MonkeyPatch, walks: list[int]
) -> None:
    monkeypatch.setattr(planning, "RACY_MARGIN_NS", 500_000_000)
    planner = make_planner(tree)
    time.sleep(0.6)
    os.utime(tree / "game" / "sub" / "c.txt")  # one file's ctime is new: the plan is not kept
    planner.plan(folder(tree))
    assert len(planner.cache) == 0
    time.sleep(0.6)
    planner.plan(folder(tree))
    planner.plan(folder(tree))
    assert len(walks) == 2 and len(planner.cache) == 1


def test_download_name_and_roots_are_part_of_the_key(tree: Path, margin: None, walks: list[int]) -> None:
    planner = make_planner(tree)
    settle()
    plain = planner.plan(folder(tree))
    named = planner.plan(ZipTarget.from_directory(tree / "game", download_name="Game.zip"))
    narrowed = planner.plan(folder(tree), roots=(str(tree / "game"),))
    assert (plain.download_name, named.download_name) == ("game.zip", "Game.zip")
    assert named is not plain and narrowed is not plain
    assert planner.plan(ZipTarget.from_directory(tree / "game", download_name="Game.zip")) is named
    assert len(walks) == 3


def test_direct_files_are_not_cached_but_a_folder_of_one_file_is(
    tree: Path, margin: None, walks: list[int]
) -> None:
    from zipmiddleware import FileTarget

    planner = make_planner(tree)
    write_tree(tree, {"single/only.txt": b"only"})
    settle()
    direct = planner.plan(FileTarget(tree / "other" / "x.txt"))
    assert isinstance(direct, FilePlan) and direct.opened is not None
    os.close(direct.opened)
    assert len(planner.cache) == 0  # a direct file's plan holds a descriptor: never kept
    one = planner.plan(folder(tree, "single"))
    assert isinstance(one, FilePlan) and one.opened is None
    assert planner.plan(folder(tree, "single")) is one
    assert len(walks) == 1


def test_least_recently_used_plans_go_first(tree: Path, margin: None, walks: list[int]) -> None:
    # game: 3 files + 2 folders = 5; other and third: 2 files + 1 folder = 3 each.
    planner = make_planner(tree, plan_cache_entries=8)
    settle()
    game = planner.plan(folder(tree))
    other = planner.plan(folder(tree, "other"))
    assert planner.cache.size == 8
    assert planner.plan(folder(tree)) is game  # game is now the most recently used
    planner.plan(folder(tree, "third"))  # 11 > 8: other goes
    assert planner.cache.size == 8
    assert planner.plan(folder(tree)) is game
    assert planner.plan(folder(tree, "other")) is not other  # walked again (and game evicted)
    assert len(walks) == 4
    assert planner.cache.size <= 8


def test_a_plan_bigger_than_the_bound_is_not_kept(tree: Path, margin: None, walks: list[int]) -> None:
    planner = make_planner(tree, plan_cache_entries=4)
    settle()
    planner.plan(folder(tree))  # 5 entries
    planner.plan(folder(tree))
    assert len(walks) == 2 and planner.cache.size == 0


def test_zero_turns_the_cache_off(tree: Path, margin: None, walks: list[int]) -> None:
    planner = make_planner(tree, plan_cache_entries=0)
    settle()
    for _ in range(3):
        planner.plan(folder(tree))
    assert len(walks) == 3 and len(planner.cache) == 0


def test_a_forked_child_starts_with_an_empty_cache(tree: Path, margin: None) -> None:
    planner = make_planner(tree)
    settle()
    planner.plan(folder(tree))
    assert len(planner.cache) == 1
    pid = os.fork()
    if pid == 0:  # the child: a gunicorn worker would be here
        try:
            empty = len(planner.cache) == 0 and planner.cache.size == 0
            planner.plan(folder(tree))  # its locks work: nothing held by the parent's threads
            os._exit(0 if empty and len(planner.cache) == 1 else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert len(planner.cache) == 1


# -- concurrency ----------------------------------------------------------------------------------


def test_a_check_under_way_is_not_shared_with_later_callers() -> None:
    """Callers share only a check that starts after they came: one under way may have looked at
    a file before their change."""
    fresh = FreshCheck()
    started, release = threading.Event(), threading.Event()
    results: dict[str, bool] = {}
    runs: list[str] = []

    def old() -> bool:
        started.set()
        release.wait(10)
        return False

    def new() -> bool:
        runs.append("new")
        return True

    def call(name: str, check: Callable[[], bool]) -> threading.Thread:
        thread = threading.Thread(target=lambda: results.__setitem__(name, fresh.run(check)))
        thread.start()
        return thread

    threads = [call("first", old)]
    assert started.wait(10)
    threads += [call(f"later {n}", new) for n in range(5)]
    time.sleep(0.2)  # all five wait for the next check
    assert runs == []  # none runs while the first does
    release.set()
    for thread in threads:
        thread.join(10)
    assert results == {"first": False, **{f"later {n}": True for n in range(5)}}
    assert runs == ["new"]  # the five shared one check
    assert fresh.run(new) and runs == ["new", "new"]  # and nothing was left behind


def test_concurrent_requests_share_checks(tree: Path, margin: None, monkeypatch: pytest.MonkeyPatch) -> None:
    planner = make_planner(tree)
    settle()
    first = planner.plan(folder(tree))
    checks: list[int] = []
    unchanged = planning.Folder.unchanged

    def slow(self: planning.Folder, roots: tuple[str, ...]) -> bool:
        checks.append(1)
        time.sleep(0.01)
        return unchanged(self, roots)

    monkeypatch.setattr(planning.Folder, "unchanged", slow)
    plans: list[object] = []
    threads = [threading.Thread(target=lambda: plans.append(planner.plan(folder(tree)))) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert plans == [first] * 16
    runs = len(checks) / 2  # two folders per check
    assert runs <= 8, "concurrent requests did not share checks"


# -- settings -------------------------------------------------------------------------------------


def test_the_setting(tmp_path: Path) -> None:
    assert build_settings({}).plan_cache_entries == 200_000
    assert build_settings({"plan_cache_entries": "0"}).plan_cache_entries == 0
    assert build_settings({"plan_cache_entries": 5000}).plan_cache_entries == 5000
    assert flask_settings({"ZIPSTREAM_PLAN_CACHE_ENTRIES": 7}).plan_cache_entries == 7
    middleware = ZipMiddleware(plain_app, roots=[str(tmp_path)], plan_cache_entries=12)
    assert middleware.planner.cache.limit == 12
    for bad, problem in [
        (-1, "expected a number from 0"),
        ("lots", "expected a whole number"),
        (True, "expected a whole number"),
        (1.5, "expected a whole number"),
    ]:
        with pytest.raises(ConfigError) as info:
            ZipMiddleware(plain_app, plan_cache_entries=bad)
        assert str(info.value).startswith(f"plan_cache_entries: {problem}")
    with pytest.raises(ConfigError) as info:
        flask_settings({"ZIPSTREAM_PLAN_CACHE_ENTRIES": "many"})
    assert str(info.value).startswith("ZIPSTREAM_PLAN_CACHE_ENTRIES: expected a whole number")


# -- a real gunicorn ------------------------------------------------------------------------------

APP = """
import os
import threading

from zipmiddleware import ZipMiddleware, ZipTarget, planning

planning.RACY_MARGIN_NS = int(os.environ["ZM_TEST_RACY_MARGIN_NS"])
DATA = os.environ["ZM_TEST_DATA"]
WALKS = [0]
LOCK = threading.Lock()
walk = planning.Planner.walk


def counting(self, *args):
    with LOCK:
        WALKS[0] += 1
    return walk(self, *args)


planning.Planner.walk = counting


def plain(environ, start_response):
    body = str(WALKS[0]).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def resolve(request, name):
    return ZipTarget.from_directory(os.path.join(DATA, name))


app = ZipMiddleware(
    plain,
    routes={"/folder/<path:name>": resolve},
    roots=[DATA],
    exclude=["updates"],
    ignore=["*.nfo"],
    crc_cache=":memory:",
    plan_cache_entries=os.environ["ZM_TEST_PLAN_CACHE_ENTRIES"],
)
"""


class Served:
    def __init__(self, server: GunicornServer) -> None:
        self.server = server

    def request(self, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection(self.server.host, self.server.port, timeout=30)
        try:
            connection.request(method, path)
            response = connection.getresponse()
            body = response.read()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, body
        finally:
            connection.close()

    def walks(self) -> int:
        return int(self.request("GET", "/walks")[2])

    def head(self, name: str) -> tuple[str, str]:
        status, headers, _ = self.request("HEAD", f"/folder/{name}")
        assert status == 200
        return headers["content-length"], headers["etag"]

    def entries(self, name: str) -> dict[str, tuple[tuple[int, ...], bytes]]:
        status, headers, body = self.request("GET", f"/folder/{name}")
        assert status == 200 and int(headers["content-length"]) == len(body)
        with zipfile.ZipFile(io.BytesIO(body)) as archive:
            return {info.filename: (info.date_time, archive.read(info)) for info in archive.infolist()}


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    app_folder = tmp_path / "app"
    app_folder.mkdir()
    (app_folder / "plan_cache_app.py").write_text(textwrap.dedent(APP))
    servers: list[GunicornServer] = []

    def start(data: Path, *, entries: int = 200_000, margin_ns: int = TEST_MARGIN_NS) -> Served:
        server = GunicornServer(
            "plan_cache_app:app",
            pythonpath=[f"{app_folder},{PROJECT}"],  # gunicorn keeps only its last --pythonpath
            env={
                "ZM_TEST_DATA": str(data),
                "ZM_TEST_PLAN_CACHE_ENTRIES": str(entries),
                "ZM_TEST_RACY_MARGIN_NS": str(margin_ns),
            },
            ready_path="/walks",
        )
        servers.append(server.start())
        return Served(server)

    try:
        yield start
    finally:
        for server in servers:
            server.stop()
            server.cleanup()


def change_link_swapped(root: Path) -> None:
    """`game/current` -> targets/v1 becomes -> targets/v2 (``ln -sfn``: a new link renamed over)."""
    swap = root / "game" / "current-new"
    swap.symlink_to("../targets/v2", target_is_directory=True)
    swap.replace(root / "game" / "current")


SERVER_CHANGES = {**CHANGES, "symlink swapped": change_link_swapped}


@pytest.mark.server
def test_through_gunicorn_each_change_is_seen_by_the_next_request(
    tmp_path: Path, serve: Callable[..., Served]
) -> None:
    data = tmp_path / "data"
    for change in SERVER_CHANGES:
        root = data / change.replace(" ", "-")
        write_tree(
            root,
            {
                "game/a.txt": b"alpha",
                "game/b.txt": b"bravo!",
                "game/sub/c.txt": b"charlie",
                "targets/v1/one.txt": b"version one",
                "targets/v2/two.txt": b"version two!",
            },
        )
        (root / "game" / "current").symlink_to("../targets/v1", target_is_directory=True)
    settle()
    served = serve(data)
    for change, make in SERVER_CHANGES.items():
        name = f"{change.replace(' ', '-')}/game"
        walks = served.walks()
        before = served.head(name)
        entries = served.entries(name)
        assert served.head(name) == before
        assert served.walks() == walks + 1, f"{change}: the second request walked again"
        make(data / change.replace(" ", "-"))
        after = served.head(name)
        if change == "rewritten in place":
            # The ETag covers each file's size and mtime, not its ctime (nor its device or inode), so
            # that every host with a copy gives the same one: a rewrite of the same size with the mtime
            # set back (rsync --inplace --times, touch -r) keeps it, as with nginx's and Apache's
            # mtime-size ETags. The plan still sees the change: the body has the new bytes.
            assert after == before, f"{change}: the ETag or the length changed"
        else:
            assert after[1] != before[1], f"{change}: the next request kept the old ETag"
        changed = served.entries(name)
        assert changed != entries, f"{change}: the next request kept the old entries"
        if change == "rewritten in place":
            assert changed["sub/c.txt"][1] == b"CHARLIE"
        if change == "symlink swapped":
            assert "current/two.txt" in changed and "current/one.txt" not in changed
        if change == "added":
            assert changed["new.txt"][1] == b"new" and int(after[0]) > int(before[0])


@pytest.mark.server
def test_through_gunicorn_the_cache_off_and_the_real_margin(
    tmp_path: Path, serve: Callable[..., Served]
) -> None:
    data = tmp_path / "data"
    write_tree(data, {"game/a.txt": b"alpha", "game/b.txt": b"bravo"})
    settle()
    off = serve(data, entries=0)
    for expected in (1, 2, 3):
        off.head("game")
        assert off.walks() == expected
    # The real 3 s margin: a folder written just now is walked for each request.
    real = serve(data, margin_ns=planning.RACY_MARGIN_NS)
    (data / "game" / "c.txt").write_bytes(b"charlie")
    real.head("game")
    real.head("game")
    assert real.walks() == 2
