"""Shared fixtures for in-process tests (webtest with its WSGI lint on)."""

from __future__ import annotations

import grp
import io
import os
import pwd
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from webtest import TestApp

from zipmiddleware import ZipMiddleware


def plain_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    """The wrapped application: answers every request it gets with a recognisable body."""
    start_response("200 OK", [("Content-Type", "text/plain"), ("X-App", "yes")])
    return [b"from the app: ", environ["PATH_INFO"].encode("latin-1")]


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def write_generated_tree(root: Path, files: dict[tuple[str, ...], bytes]) -> dict[str, bytes]:
    """Write a generated tree (path parts -> data), skipping what cannot exist together
    (a file where a folder was wanted, or the reverse); return what was written."""
    written: dict[str, bytes] = {}
    for parts, data in files.items():
        path = root.joinpath(*parts)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists():
                continue
            path.write_bytes(data)
        except OSError:
            continue
        written["/".join(parts)] = data
    return written


def read_zip(body: bytes) -> dict[str, bytes]:
    """Every entry of an archive, after checking all CRCs."""
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        assert archive.testzip() is None
        return {info.filename: archive.read(info) for info in archive.infolist()}


@pytest.fixture
def games(tmp_path: Path) -> Path:
    """A root holding a multi-file game, a single-file game and a file outside the games."""
    root = tmp_path / "games"
    write_tree(
        root,
        {
            "quake/quake.exe": b"MZ" + b"q" * 5000,
            "quake/id1/pak0.pak": bytes(range(256)) * 400,
            "quake/id1/config.cfg": b"bind w +forward\n",
            "quake/readme.nfo": b"cracked by nobody",
            "quake/updates/patch.exe": b"patch",
            "quake/extras/manual.pdf": b"%PDF",
            "doom/doom.wad": b"IWAD" + b"d" * 9000,
            "doom/file_id.diz": b"doom",
        },
    )
    (tmp_path / "secret.txt").write_bytes(b"outside the roots")
    return root


@pytest.fixture
def make_client(games: Path) -> Callable[..., TestApp]:
    """A TestApp over ZipMiddleware(plain_app, ...) with one route per resolver."""

    def make(resolve: Callable[..., Any], rule: str = "/download/<name>", **options: Any) -> TestApp:
        options.setdefault("roots", [str(games)])
        options.setdefault("exclude", ["updates", "extras"])
        options.setdefault("ignore", ["*.nfo", "file_id.diz"])
        return TestApp(ZipMiddleware(plain_app, routes={rule: resolve}, **options), lint=True)

    return make


@dataclass(frozen=True)
class User:
    """The unprivileged user gunicorn's workers drop to."""

    uid: int
    gid: int
    group: str


@pytest.fixture
def nobody() -> User:
    if os.geteuid() != 0:
        pytest.skip("needs root: gunicorn must drop to 'nobody' for the worker to lack root's rights")
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody'")
    return User(entry.pw_uid, entry.pw_gid, grp.getgrgid(entry.pw_gid).gr_name)
