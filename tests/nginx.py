"""A real nginx for tests, started in the foreground with its own prefix, logs and temporary folders.

    nginx = Nginx(nginx_executable(), prefix, render)   # render(prefix, port) -> nginx.conf text
    try:
        nginx.start()
        urllib.request.urlopen(nginx.url + "/")
    finally:
        nginx.stop()

Used by tests/test_nginx.py (its own configuration) and tests/test_slow_clients.py
(``examples/nginx.conf``, with its paths and addresses changed for the test).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .clients import free_port, unavailable
from .servers import alive, children

NGINX = "/usr/sbin/nginx"


def nginx_executable() -> str:
    """nginx on PATH or Debian's; skips (fails under ZM_REQUIRE_ALL) if there is none."""
    found = shutil.which("nginx") or (NGINX if os.access(NGINX, os.X_OK) else None)
    if found is None:
        unavailable("nginx is not installed (Debian: nginx)")
    return found


class Nginx:
    """An nginx master in the foreground (``daemon off``), its configuration made by ``render``.

    ``render(prefix, port)`` returns the whole configuration for a server that listens on
    127.0.0.1:``port`` and keeps its pid file, logs (``error.log``, ``access.log``) and
    temporary folders under ``prefix``.
    """

    def __init__(self, executable: str, prefix: Path, render: Callable[[Path, int], str]) -> None:
        self.executable = executable
        self.prefix = prefix
        self.render = render
        self.host = "127.0.0.1"
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def proxy_temp(self) -> Path:
        return self.prefix / "proxy_temp"

    def start(self) -> Nginx:
        # nginx binds the port itself: take a free one, and try another should it be gone by then.
        for _ in range(5):
            if self._start_on(free_port()):
                return self
        raise RuntimeError(f"nginx did not start:\n{self.logs()}")

    def _start_on(self, port: int) -> bool:
        self.port = port
        (self.prefix / "nginx.conf").write_text(self.render(self.prefix, port))
        for log in ("error.log", "access.log", "nginx.out"):
            (self.prefix / log).write_bytes(b"")
        directives = "daemon off; master_process on;"
        command = [
            self.executable,
            "-p",
            f"{self.prefix}/",
            "-c",
            f"{self.prefix}/nginx.conf",
            "-g",
            directives,
        ]
        with open(self.prefix / "nginx.out", "wb") as out:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.process = None
                if "Address already in use" in self.logs():
                    return False
                raise RuntimeError(f"nginx exited during start-up:\n{self.logs()}")
            if self._answers():
                return True
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"nginx did not answer within 10 s:\n{self.logs()}")

    def _answers(self) -> bool:
        """nginx itself answers (whatever the status: the upstream may not be up yet)."""
        try:
            with socket.create_connection((self.host, self.port), timeout=1) as connection:
                connection.sendall(b"GET /nginx-ready HTTP/1.0\r\nHost: localhost\r\n\r\n")
                answer = b""
                while chunk := connection.recv(4096):
                    answer += chunk
        except OSError:
            return False
        head = answer.partition(b"\r\n\r\n")[0].lower()
        return head.startswith(b"http/1.1 ") and b"\r\nserver: nginx" in head

    def stop(self) -> None:
        """SIGQUIT (graceful), then SIGKILL to the whole process group. Idempotent."""
        process = self.process
        if process is None:
            return
        workers = self.worker_pids()
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGQUIT)
            try:
                process.wait(timeout=8)  # worker_shutdown_timeout cuts open downloads after 3 s
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        # A worker whose master was killed would linger: kill it if it is still in our group.
        for pid in workers:
            with contextlib.suppress(OSError):
                if alive(pid) and os.getpgid(pid) == process.pid:
                    os.kill(pid, signal.SIGKILL)
        self.process = None

    def worker_pids(self) -> list[int]:
        assert self.process is not None
        return [pid for pid in children(self.process.pid) if alive(pid)]

    def open_temp_files(self) -> dict[str, int]:
        """Files under proxy_temp the workers hold open (deleted ones included) and their sizes."""
        found = {}
        for pid in self.worker_pids():
            with contextlib.suppress(FileNotFoundError):
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    with contextlib.suppress(OSError):
                        target = os.readlink(f"/proc/{pid}/fd/{fd}")
                        if target.startswith(f"{self.proxy_temp}/"):
                            found[target] = os.stat(f"/proc/{pid}/fd/{fd}").st_size
        return found

    def temp_folder_entries(self) -> list[str]:
        return sorted(str(path.relative_to(self.proxy_temp)) for path in self.proxy_temp.rglob("*"))

    def error_log(self) -> str:
        return (self.prefix / "error.log").read_text(errors="replace")

    def access_entries(self, uri: str) -> list[AccessEntry]:
        """The access log's lines for requests of ``uri`` (each written when its request ended), in
        the ``probe`` log format of tests/test_nginx.py's configuration."""
        entries = []
        for line in (self.prefix / "access.log").read_text(errors="replace").splitlines():
            uri_field, status, upstream_status, sent, received, upstream_accel, sent_accel = line.split(" ")
            if uri_field == uri:
                entries.append(
                    AccessEntry(
                        int(status), upstream_status, int(sent), int(received), upstream_accel, sent_accel
                    )
                )
        return entries

    def logs(self) -> str:
        parts = []
        for name in ("nginx.out", "error.log"):
            with contextlib.suppress(FileNotFoundError):
                parts.append(f"--- {name} ---\n{(self.prefix / name).read_text(errors='replace')[-10000:]}")
        return "\n".join(parts)


@dataclass(frozen=True)
class AccessEntry:
    status: int  # what nginx answered
    upstream_status: str  # what gunicorn answered
    body_bytes_sent: int
    upstream_bytes_received: int
    upstream_x_accel_buffering: str  # what gunicorn sent ("-": none)
    sent_x_accel_buffering: str  # what nginx passed on to the client ("-": none)
