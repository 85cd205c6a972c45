"""The demo (examples/flask_app.py) under a real gunicorn, started the way ``make demo`` starts it.

    with DemoServer(tmp_path / "data", prepare_seconds=1) as demo:
        urllib.request.urlopen(demo.url + "/")

The command is the Makefile's ``make demo PORT=...`` (test_demo.py checks the two agree),
``cd examples && gunicorn -c gunicorn.conf.py -b 127.0.0.1:PORT flask_app:app``, with PORT a
free port (a port taken between the choice and gunicorn's start is retried). Everything else
comes from examples/gunicorn.conf.py: gthread, 2 workers, 8 threads, preload_app. ``ZM_DEMO_*``
variables point the demo at ``data`` and make it quick; ``XDG_RUNTIME_DIR`` points gunicorn's
control socket into a private folder, so that it does not replace the one of a demo already
running on this machine.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from .clients import free_port
from .servers import PROJECT, ServerProcess, alive, children, gunicorn_executable

EXAMPLES = PROJECT / "examples"


class DemoServer(ServerProcess):
    label = "demo"

    def __init__(
        self,
        data: Path,
        *,
        prepare_seconds: float = 1.0,
        poll_seconds: float = 0.5,
        big_game_gib: float = 5,
        start_timeout: float = 30.0,
        stop_timeout: float = 15.0,
    ) -> None:
        self.data = Path(data)
        self.env = {
            "ZM_DEMO_DATA": str(self.data),
            "ZM_DEMO_PREPARE_SECONDS": str(prepare_seconds),
            "ZM_DEMO_POLL_SECONDS": str(poll_seconds),
            "ZM_DEMO_BIG_GAME_GIB": str(big_game_gib),
        }
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.host = "127.0.0.1"
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._workdir: str | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def command(self) -> list[str]:
        return [
            gunicorn_executable(),
            "-c",
            "gunicorn.conf.py",
            "-b",
            f"{self.host}:{self.port}",
            "flask_app:app",
        ]

    def worker_pids(self) -> list[int]:
        """The live workers of the gunicorn master."""
        if self.process is None:
            return []
        return [pid for pid in children(self.process.pid) if alive(pid)]

    def start(self) -> DemoServer:
        self._workdir = tempfile.mkdtemp(prefix="demo-gunicorn-")
        try:
            for _attempt in range(3):
                self.port = free_port()
                if self._start_once():
                    return self
            raise RuntimeError(f"gunicorn could not bind a free port:\n{self.log()}")
        except BaseException:
            self.stop()
            self.cleanup()
            raise

    def _start_once(self) -> bool:
        """Start gunicorn and wait for an answer; False if the port was taken meanwhile."""
        runtime = Path(self._workdir or ".", "runtime")
        runtime.mkdir(exist_ok=True)
        env = {key: value for key, value in os.environ.items() if not key.startswith("GUNICORN")}
        env.update(self.env, PYTHONUNBUFFERED="1", XDG_RUNTIME_DIR=str(runtime))
        with open(Path(self._workdir or ".", "gunicorn.log"), "wb") as log:
            self.process = subprocess.Popen(
                self.command,
                cwd=EXAMPLES,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own process group, so stop() can kill all of it
            )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                if "Address already in use" in self.log():
                    self.process = None
                    return False
                raise RuntimeError(f"gunicorn exited with {self.process.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                connection = http.client.HTTPConnection(self.host, self.port, timeout=2)
                try:
                    connection.request("GET", "/")
                    if connection.getresponse().status == 200:
                        return True
                finally:
                    connection.close()
            time.sleep(0.1)
        raise RuntimeError(f"gunicorn did not answer within {self.start_timeout} s:\n{self.log()}")

    def stop(self) -> None:
        """SIGTERM the master (a graceful stop), SIGKILL the process group if it takes too long."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=self.stop_timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)  # workers left behind, if any
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=self.stop_timeout)
