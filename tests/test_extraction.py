"""What extracting an archive gives on disk: times right in every time zone (the extended
timestamp), modes 0644 and 0755 (executables stay executable), with Info-ZIP unzip, bsdtar and 7-Zip."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from werkzeug.test import Client

from zipmiddleware import ZipMiddleware, ZipTarget

from .clients import unavailable
from .conftest import plain_app, write_tree

EXTRACT = {
    "unzip": ["unzip", "-q", "{archive}"],
    "bsdtar": ["bsdtar", "-xpf", "{archive}"],
    "7z": ["7z", "x", "-bd", "-y", "{archive}"],
}
PACKAGES = {"unzip": "unzip", "bsdtar": "libarchive-tools", "7z": "p7zip-full"}
WHEN = 1_700_000_001  # an odd second: the DOS time alone cannot say it


def archive_of(root: Path, tmp_path: Path, **options: object) -> tuple[Path, str]:
    middleware = ZipMiddleware(
        plain_app, routes={"/d": lambda request: ZipTarget.from_directory(root)}, roots=[root], **options
    )
    response = Client(middleware).get("/d")
    assert response.status_code == 200
    path = tmp_path / "archive.zip"
    path.write_bytes(response.data)
    return path, response.headers["ETag"]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = write_tree(
        tmp_path / "game",
        {"start.sh": b"#!/bin/sh\necho hi\n", "bin/game": b"\x7fELF...", "readme.txt": b"hello"},
    )
    os.chmod(root / "start.sh", 0o755)
    os.chmod(root / "bin/game", 0o700)  # private on the server, executable: 0755 in the archive
    os.chmod(root / "readme.txt", 0o600)  # private on the server: 0644 in the archive
    for path in root.rglob("*"):
        if path.is_file():
            os.utime(path, (WHEN, WHEN))
    return root


@pytest.mark.parametrize("zone", ["America/New_York", "Asia/Tokyo", "UTC"])
@pytest.mark.parametrize("tool", list(EXTRACT))
@pytest.mark.parametrize("level", [0, 6], ids=["stored", "deflated"])
def test_extracted_times_and_modes(tree: Path, tmp_path: Path, tool: str, zone: str, level: int) -> None:
    if shutil.which(tool) is None:
        unavailable(f"{tool} is not installed (Debian: apt-get install {PACKAGES[tool]})")
    archive, _ = archive_of(tree, tmp_path, compression_level=level)
    out = tmp_path / "out"
    out.mkdir()
    command = [part.format(archive=archive) for part in EXTRACT[tool]]
    result = subprocess.run(
        command, cwd=out, env={**os.environ, "TZ": zone}, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    os.umask(umask := os.umask(0o022))
    expected = {"start.sh": 0o755, "bin/game": 0o755, "readme.txt": 0o644}
    for name, mode in expected.items():
        st = (out / name).stat()
        assert (st.st_mtime, stat.S_IMODE(st.st_mode)) == (WHEN, mode & ~umask), (name, zone)
        assert stat.S_ISREG(st.st_mode)


def test_a_chmod_changes_the_etag(tree: Path, tmp_path: Path) -> None:
    _, before = archive_of(tree, tmp_path)
    os.chmod(tree / "readme.txt", 0o700)
    _, after = archive_of(tree, tmp_path)
    assert before != after
