"""The examples, run as a user runs them: the Flask game library, the Pyramid app via PasteDeploy,
and the Pyramid app under a real gunicorn started with ``--paste``."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from paste.deploy import loadapp
from webtest import TestApp

PROJECT = Path(__file__).resolve().parent.parent
EXAMPLES = PROJECT / "examples"
PYRAMID_APP = EXAMPLES / "pyramid_app"
PYRAMID_INI = PYRAMID_APP / "development.ini"

EXCLUDED_DIRS = {"updates", "extras"}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_zip(body: bytes) -> dict[str, bytes]:
    """Every entry of an archive, after checking every CRC."""
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        assert archive.testzip() is None
        return {info.filename: archive.read(info) for info in archive.infolist()}


def download_paths(folder: Path) -> dict[str, Path]:
    """The files a ZIP of ``folder`` must hold: no updates/extras folders, no .nfo/.sfv/file_id.diz."""
    found = {}
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if not path.is_file() or EXCLUDED_DIRS & {part.lower() for part in rel.parts[:-1]}:
            continue
        if path.suffix.lower() in (".nfo", ".sfv") or path.name.lower() == "file_id.diz":
            continue
        found[rel.as_posix()] = path
    return found


def expected_entries(folder: Path) -> dict[str, bytes]:
    """What a ZIP of ``folder`` must hold, entry name -> bytes."""
    return {name: path.read_bytes() for name, path in download_paths(folder).items()}


# -- the Pyramid app through PasteDeploy -------------------------------------------------------


@pytest.fixture(scope="module")
def pyramid_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of examples/pyramid_app, its .ini unchanged, with more files (and traps) in data/."""
    base = tmp_path_factory.mktemp("pyramid-demo")
    shutil.copytree(PYRAMID_APP, base / "pyramid_app")
    data = base / "pyramid_app" / "data"
    files = {
        "Jazz Jackrabbit/JAZZ.EXE": b"MZ" + bytes(range(256)) * 64,
        "Jazz Jackrabbit/levels/DIAMOND.J2L": b"level" * 1000,
        "Jazz Jackrabbit/JAZZ.NFO": b"release notes",
        "Jazz Jackrabbit/file_id.diz": b"Jazz Jackrabbit shareware",
        "Jazz Jackrabbit/extras/soundtrack.mod": b"M.K." * 100,
        "Jazz Jackrabbit/updates/patch.exe": b"patch",
        "readme-first.txt": b"Read me first.\n",
    }
    for rel, content in files.items():
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).write_bytes(content)
    (base / "outside.txt").write_bytes(b"not for download")
    (data / "link-out").symlink_to(base / "outside.txt")
    return base / "pyramid_app"


@pytest.fixture(scope="module")
def pyramid_data(pyramid_copy: Path) -> Path:
    return pyramid_copy / "data"


@pytest.fixture(scope="module")
def pyramid_client(pyramid_copy: Path) -> Iterator[TestApp]:
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(pyramid_copy))
        patch.delitem(sys.modules, "library", raising=False)
        app = loadapp("config:" + str(pyramid_copy / "development.ini"))
        yield TestApp(app, lint=True)
        sys.modules.pop("library", None)


def test_pyramid_home_is_pyramid(pyramid_client: TestApp) -> None:
    page = pyramid_client.get("/")
    assert 'href="/files/Jazz%20Jackrabbit"' in page.text
    assert 'href="/files/readme-first.txt"' in page.text


def test_pyramid_folder_is_a_zip(pyramid_client: TestApp, pyramid_data: Path) -> None:
    response = pyramid_client.get("/files/Jazz%20Jackrabbit")
    assert response.content_type == "application/zip"
    assert 'filename="Jazz Jackrabbit.zip"' in response.headers["Content-Disposition"]
    assert read_zip(response.body) == expected_entries(pyramid_data / "Jazz Jackrabbit")
    assert sorted(read_zip(response.body)) == ["JAZZ.EXE", "levels/DIAMOND.J2L"]


def test_pyramid_file_is_sent_as_it_is(pyramid_client: TestApp, pyramid_data: Path) -> None:
    response = pyramid_client.get("/files/readme-first.txt")
    assert response.body == (pyramid_data / "readme-first.txt").read_bytes()
    assert "filename=readme-first.txt" in response.headers["Content-Disposition"]


@pytest.mark.parametrize(
    "path",
    [
        "/files/nothing-here",
        "/files/%2E%2E/outside.txt",
        "/files/levels/%2E%2E/%2E%2E/outside.txt",
        "/files/link-out",
    ],
)
def test_pyramid_missing_or_outside_is_404(pyramid_client: TestApp, path: str) -> None:
    response = pyramid_client.get(path, status=404)
    assert "this download does not exist" in response.text  # the resolver said None
    assert "not for download" not in response.text


# -- the Pyramid app under a real gunicorn ------------------------------------------------------


def gunicorn_supports(setting: str) -> bool:
    from gunicorn.config import KNOWN_SETTINGS

    return any(known.name == setting for known in KNOWN_SETTINGS)


def fetch(url: str, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, dict(response.headers), response.read()


@pytest.mark.server
def test_pyramid_example_under_gunicorn_paste(tmp_path: Path) -> None:
    """As the .ini's comment says: ``cd examples/pyramid_app && gunicorn --paste development.ini``."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    command = [
        sys.executable,
        "-m",
        "gunicorn",
        "--paste",
        "development.ini",
        "-c",
        "../gunicorn.conf.py",
        "--bind",
        f"fd://{listener.fileno()}",
        "--workers",
        "1",
    ]
    if gunicorn_supports("control_socket_disable"):
        command.append("--no-control-socket")
    log = (tmp_path / "gunicorn.log").open("wb")
    env = {key: value for key, value in os.environ.items() if not key.startswith("GUNICORN")}
    process = subprocess.Popen(
        command,
        cwd=PYRAMID_APP,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        pass_fds=[listener.fileno()],
        start_new_session=True,
    )
    listener.close()
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                status, _, page = fetch(url + "/", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert process.poll() is None, "gunicorn exited:\n" + (tmp_path / "gunicorn.log").read_text()
                assert time.monotonic() < deadline, "gunicorn did not answer in time"
                time.sleep(0.1)
        assert status == 200 and b"Shareware%20Sampler" in page

        status, headers, body = fetch(url + "/files/Shareware%20Sampler")
        assert status == 200
        assert headers["Content-Type"] == "application/zip"
        assert read_zip(body) == expected_entries(PYRAMID_APP / "data" / "Shareware Sampler")
        assert set(read_zip(body)) == {"README.TXT", "docs/HISTORY.TXT", "docs/ORDER.FRM"}

        status, headers, body = fetch(url + "/files/welcome.txt")
        assert body == (PYRAMID_APP / "data" / "welcome.txt").read_bytes()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


# -- plain WSGI -------------------------------------------------------------------------


def test_plain_wsgi_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "album" / "disc 2").mkdir(parents=True)
    (tmp_path / "album" / "cover.jpg").write_bytes(b"\xff\xd8jpeg")
    (tmp_path / "album" / "disc 2" / "track.flac").write_bytes(b"fLaC" * 100)
    (tmp_path.parent / "outside.txt").write_bytes(b"secret")
    monkeypatch.setenv("FILES_ROOT", str(tmp_path))
    monkeypatch.syspath_prepend(str(EXAMPLES))
    sys.modules.pop("plain_app", None)
    plain_app = importlib.import_module("plain_app")
    client = TestApp(plain_app.application, lint=True)
    archive = zipfile.ZipFile(io.BytesIO(client.get("/files/album").body))
    assert sorted(archive.namelist()) == ["cover.jpg", "disc 2/track.flac"]
    assert client.get("/files/album/cover.jpg").body == b"\xff\xd8jpeg"
    client.get("/files/..%2Foutside.txt", status=404)
    client.get("/files/nothing", status=404)
    assert client.get("/").text.startswith("Try /files/")


# -- the README shows what the examples run --------------------------------------------------


def readme_block(heading: str) -> str:
    """The first fenced code block after ``heading`` in README.md."""
    readme = (PROJECT / "README.md").read_text(encoding="utf-8")
    after = readme[readme.index(heading) :]
    start = after.index("```")
    start = after.index("\n", start) + 1
    return after[start : after.index("```", start)]


@pytest.mark.parametrize(
    ("heading", "example"),
    [
        ("### Plain WSGI", EXAMPLES / "plain_app.py"),
        ("### Flask", EXAMPLES / "flask_app.py"),
        ("### Pyramid / PasteDeploy (.ini)", PYRAMID_INI),
        ("### ASGI: Starlette, FastAPI", EXAMPLES / "fastapi_app.py"),
        ("### Quart", PROJECT / "tests" / "quart_app.py"),
    ],
    ids=["plain", "flask", "pyramid", "fastapi", "quart"],
)
def test_readme_setups_are_copied_from_the_examples(heading: str, example: Path) -> None:
    """Every line of the README's set-up appears in the example the tests run, in the same order."""
    source = [line.strip() for line in example.read_text(encoding="utf-8").splitlines()]
    position = 0
    for line in readme_block(heading).splitlines():
        if not line.strip():
            continue
        assert line.strip() in source[position:], f"README line not in {example.name} (in order): {line!r}"
        position = source.index(line.strip(), position) + 1


def test_readme_gunicorn_settings_are_the_examples() -> None:
    def settings(code: str) -> dict[str, object]:
        namespace: dict[str, object] = {}
        exec(compile(code, "gunicorn.conf.py", "exec"), namespace)
        return {key: value for key, value in namespace.items() if not key.startswith("__")}

    example = settings((EXAMPLES / "gunicorn.conf.py").read_text(encoding="utf-8"))
    assert settings(readme_block("### gunicorn")) == example
    assert example["worker_class"] == "gthread"
