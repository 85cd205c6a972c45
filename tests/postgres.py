"""A throwaway PostgreSQL server on 127.0.0.1 for the tests of the ``sql`` resolver.

    from .postgres import postgresql_url_fixture  # noqa: F401  (registers "postgresql_url")

    def test_something(postgresql_url: str) -> None:
        engine = sqlalchemy.create_engine(postgresql_url)

The fixture ``postgresql_url`` (session scope) finds the server binaries, runs
``initdb`` in a fresh folder under /tmp (as the ``postgres`` user when the tests
run as root: PostgreSQL refuses to run as root), starts ``postgres`` on a free
port of 127.0.0.1, creates the database ``zipmiddleware_test`` with the table
``downloads`` (:data:`DOWNLOADS_TABLE`), and yields
``postgresql+psycopg://postgres@127.0.0.1:PORT/zipmiddleware_test``. At the
end of the session the server is stopped and its folder removed, however the
tests ended.

Only a machine without the server binaries skips (install the Debian package
``postgresql``), and even that fails under ``ZM_REQUIRE_ALL`` (see
``clients.unavailable``); any other failure to start is an error.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .clients import unavailable

DATABASE = "zipmiddleware_test"
SUPERUSER = "postgres"
# A status row per download request: the shape the sql resolver's queries read.
DOWNLOADS_TABLE = """
CREATE TABLE IF NOT EXISTS downloads (
    id INTEGER PRIMARY KEY,
    user_name VARCHAR(100),
    status VARCHAR(40) NOT NULL,
    path VARCHAR(1000),
    download_name VARCHAR(200),
    error VARCHAR(1000),
    retry_after INTEGER
)
"""
SKIP_REASON = "PostgreSQL server binaries (initdb, postgres) not found; install the Debian package postgresql"


def _version_key(bindir: str) -> tuple[int, ...]:
    version = Path(bindir).parent.name  # /usr/lib/postgresql/15/bin -> "15"
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def find_bindir() -> Path | None:
    """A folder holding both ``initdb`` and ``postgres``: the newest Debian install,
    else ``pg_config --bindir``, else wherever PATH finds them."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            found = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10)
            if found.returncode == 0 and found.stdout.strip():
                candidates.append(found.stdout.strip())
    for name in ("postgres", "initdb"):
        on_path = shutil.which(name)
        if on_path:
            candidates.append(str(Path(on_path).resolve().parent))
    for candidate in candidates:
        folder = Path(candidate)
        if all(os.access(folder / tool, os.X_OK) for tool in ("initdb", "postgres")):
            return folder
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresServer:
    """One ``postgres`` process over a fresh data folder; ``stop()`` removes everything."""

    def __init__(self, bindir: Path, start_timeout: float = 30.0) -> None:
        self.bindir = bindir
        self.start_timeout = start_timeout
        self.host = "127.0.0.1"
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.folder: str | None = None
        self.user: dict[str, Any] = {}
        if os.geteuid() == 0:
            try:
                entry = pwd.getpwnam(SUPERUSER)
            except KeyError:
                raise RuntimeError(
                    "running as root, but there is no 'postgres' user to run the PostgreSQL server as"
                ) from None
            self.user = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
            self._owner = (entry.pw_uid, entry.pw_gid)
        else:
            self._owner = None

    @property
    def data(self) -> str:
        assert self.folder is not None
        return os.path.join(self.folder, "data")

    @property
    def log_path(self) -> str:
        assert self.folder is not None
        return os.path.join(self.folder, "postgres.log")

    def url(self, database: str = DATABASE) -> str:
        return f"postgresql+psycopg://{SUPERUSER}@{self.host}:{self.port}/{database}"

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except (OSError, AssertionError):
            return ""

    def _run(self, command: list[str]) -> None:
        done = subprocess.run(
            command,
            capture_output=True,
            timeout=120,
            cwd=self.folder,
            env={**os.environ, "LC_ALL": "C"},
            check=False,
            **self.user,
        )
        if done.returncode != 0:
            output = (done.stdout + done.stderr).decode(errors="replace")
            raise RuntimeError(f"{' '.join(command)} failed with {done.returncode}:\n{output}")

    def start(self) -> PostgresServer:
        try:
            self._init()
            for _attempt in range(3):  # another process may take the free port before postgres binds it
                if self._start():
                    break
            else:
                raise RuntimeError(f"postgres could not bind a port on 127.0.0.1:\n{self.log()}")
            self._create_database()
        except BaseException:
            self.stop()
            raise
        return self

    def _init(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="zm-postgres-", dir="/tmp")
        if self._owner is not None:
            os.chown(self.folder, *self._owner)
        self._run(
            [
                str(self.bindir / "initdb"),
                "-D",
                self.data,
                "-U",
                SUPERUSER,
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
            ]
        )

    def _start(self) -> bool:
        """Start postgres on a free port; False if it could not bind it, raise on any other failure."""
        self.port = free_port()
        command = [
            str(self.bindir / "postgres"),
            "-D",
            self.data,
            "-k",
            self.folder,  # its Unix socket stays in our folder, never in /var/run/postgresql
            "-h",
            self.host,
            "-p",
            str(self.port),
            "-F",  # no fsync: a test database need not survive a power cut
            "-c",
            "max_connections=40",
        ]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.folder,
                env={**os.environ, "LC_ALL": "C"},
                start_new_session=True,
                **self.user,
            )
        deadline = time.monotonic() + self.start_timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log_text = self.log()
                self.process = None
                if "could not bind" in log_text or "Address already in use" in log_text:
                    Path(self.log_path).unlink(missing_ok=True)
                    return False
                raise RuntimeError(f"postgres exited during start-up:\n{log_text}")
            try:
                with self.connect("postgres"):
                    return True
            except Exception as exc:  # not accepting connections yet
                last_error = exc
            time.sleep(0.05)
        raise RuntimeError(
            f"postgres did not accept connections within {self.start_timeout} s ({last_error!r}):\n{self.log()}"
        )

    def connect(self, database: str) -> Any:
        import psycopg

        return psycopg.connect(
            host=self.host,
            port=self.port,
            user=SUPERUSER,
            dbname=database,
            connect_timeout=2,
            autocommit=True,
        )

    def _create_database(self) -> None:
        with self.connect("postgres") as connection:
            connection.execute(f'CREATE DATABASE "{DATABASE}"')
        with self.connect(DATABASE) as connection:
            connection.execute(DOWNLOADS_TABLE)

    def stop(self) -> None:
        """Fast shutdown (SIGINT), SIGKILL of its process group after 10 s; remove the folder. Idempotent."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


@contextlib.contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    """A started server, stopped and removed on leaving; skips if PostgreSQL is not installed."""
    bindir = find_bindir()
    if bindir is None:
        unavailable(SKIP_REASON)
    server = PostgresServer(bindir).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session", name="postgresql_url")
def postgresql_url_fixture() -> Iterator[str]:
    """The SQLAlchemy URL of a fresh database (with the table ``downloads``) on a private server."""
    with running_postgres() as server:
        yield server.url()
