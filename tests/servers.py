"""Run a real gunicorn (gthread worker) on 127.0.0.1 for tests.

    with GunicornServer("tests.server_app:app", pythonpath=[PROJECT],
                        env={"ZM_TEST_DATA": "/tmp/data"}) as server:
        urllib.request.urlopen(server.url + "/file/a.bin")
        open_fds(server.worker_pid)

``GunicornServer(app_spec, *, pythonpath=(), chdir=None, env=None, args=(),
threads=4, wrapper=(), ready_path="/", start_timeout=20, stop_timeout=10, config=None)``

* The listening socket is bound here (127.0.0.1, a free port) and handed to
  gunicorn as ``--bind fd://N``, so there is no race for the port.
* ``env`` is added to this process's environment; ``args`` are extra gunicorn
  options (for example ``["--user", "nobody", "--group", "nogroup"]``).
* ``wrapper`` is a command put in front of gunicorn, e.g.
  ``["strace", "-f", "-o", LOG, "-e", "trace=sendfile"]``.
* ``config`` is a gunicorn configuration file (``examples/gunicorn.conf.py``) to run as it
  is: gunicorn then gets only ``--config``, the listening socket and the pid file (not the
  worker class, workers, threads or timeouts this class otherwise sets).
* Start-up waits until an HTTP request to ``ready_path`` gets any answer.
* ``url`` is ``http://127.0.0.1:PORT``; ``master_pid`` comes from gunicorn's
  pid file; ``worker_pid`` is the (single) worker, found in ``/proc``.
* ``log()`` returns what gunicorn wrote to stdout/stderr (its error log).
* Stopping sends SIGTERM to the master, waits ``stop_timeout`` seconds, then
  SIGKILLs the process group it started. Leaving the ``with`` block always
  stops it; if the block raised, the log's tail is printed (pytest shows it).
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

PROJECT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
GUNICORN = PROJECT / ".venv" / "bin" / "gunicorn"


def gunicorn_executable() -> str:
    """The project's venv gunicorn, else the one next to this Python, else on PATH."""
    for candidate in (GUNICORN, Path(sys.executable).parent / "gunicorn"):
        if candidate.exists():
            return str(candidate)
    found = shutil.which("gunicorn")
    if found is None:
        raise RuntimeError("gunicorn is not installed")
    return found


def children(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (parsed from /proc/*/stat)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as file:
                stat = file.read()
        except OSError:  # the process went away
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            found.append(int(entry))
    return sorted(found)


def open_fds(pid: int) -> int:
    """How many file descriptors process ``pid`` holds open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def read_bytes(pid: int) -> int:
    """Bytes process ``pid`` (all its threads) has read so far: ``rchar`` of /proc/<pid>/io.

    It counts what read(2), pread(2), readv(2) and sendfile(2) returned, whether the bytes
    came from disk, the page cache or a sparse file's holes, so it measures how much file
    data a worker went through, not how much hit the disk. Socket reads made with recv(2),
    as gunicorn reads requests, are not counted.
    """
    with open(f"/proc/{pid}/io") as file:
        return next(int(line.split()[1]) for line in file if line.startswith("rchar:"))


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time process ``pid`` (all its threads) has used so far."""
    with open(f"/proc/{pid}/stat", "rb") as file:
        stat = file.read()
    # After "pid (comm) " the fields start at the state (field 3 of proc(5)); utime and
    # stime are fields 14 and 15.
    fields = stat[stat.rfind(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_memory(pid: int) -> int:
    """The largest resident set process ``pid`` has had (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as file:
        line = next(line for line in file if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def reset_peak_memory(pid: int) -> None:
    """Start process ``pid``'s VmHWM again from its current resident set (Linux 4.0+; needs the
    right to ptrace it), so that :func:`peak_memory` measures what comes next."""
    with open(f"/proc/{pid}/clear_refs", "w") as file:
        file.write("5")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            stat = file.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 :][:1] not in (b"Z", b"X")


def answer(host: str, port: int, path: str, *, tls: bool = False) -> None:
    """One GET of ``path``, read to its end (whatever its status): raises while the server
    does not answer yet (OSError, http.client.HTTPException)."""
    connection = (
        http.client.HTTPSConnection(host, port, timeout=1.0, context=ssl._create_unverified_context())
        if tls
        else http.client.HTTPConnection(host, port, timeout=1.0)
    )
    try:
        connection.request("GET", path)
        connection.getresponse().read()
    finally:
        connection.close()


def terminate(process: subprocess.Popen[bytes], pid: int, timeout: float) -> None:
    """SIGTERM ``pid`` (the server's master), wait ``timeout`` seconds for ``process`` to end,
    then SIGKILL the process group ``process`` started (it was started in a session of its own)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout)


class ServerProcess:
    """What the test servers share: a private folder holding the server's log, and a
    ``with`` block that starts the server, stops it, and prints the log's tail if the block failed.

    A subclass sets ``label``, ``_workdir`` (when it starts) and defines ``start()`` and ``stop()``.
    """

    label = "server"
    _workdir: str | None = None

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def log(self) -> str:
        """Everything gunicorn wrote so far (stdout and stderr)."""
        if self._workdir is None:
            return ""
        try:
            return Path(self._workdir, "gunicorn.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def cleanup(self) -> None:
        """Remove the private folder (pid file, log); ``__exit__`` calls it after ``stop()``."""
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        if exc_type is not None:
            sys.stderr.write(f"--- gunicorn log ({self.label}) ---\n{self.log()[-20000:]}\n")
        self.cleanup()


class GunicornServer(ServerProcess):
    """A gunicorn subprocess serving ``app_spec`` with one gthread worker."""

    def __init__(
        self,
        app_spec: str,
        *,
        pythonpath: Iterable[str | os.PathLike[str]] = (),
        chdir: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
        threads: int = 4,
        wrapper: Sequence[str] = (),
        ready_path: str = "/",
        start_timeout: float = 20.0,
        stop_timeout: float = 10.0,
        config: str | os.PathLike[str] | None = None,
        tls: bool = False,
    ) -> None:
        self.app_spec = app_spec
        self.tls = tls  # the readiness check then speaks HTTPS (without checking the certificate)
        self.config = os.fspath(config) if config is not None else None
        self.label = app_spec
        self.pythonpath = [os.fspath(p) for p in pythonpath]
        self.chdir = os.fspath(chdir) if chdir is not None else None
        self.env = dict(env or {})
        self.args = list(args)
        self.threads = threads
        self.wrapper = list(wrapper)
        self.ready_path = ready_path
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.host = "127.0.0.1"
        self.port = 0
        self.master_pid = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._workdir: str | None = None
        self._seen_workers: set[int] = set()

    # -- public API ----------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def worker_pid(self) -> int:
        """The worker's PID (exactly one worker is expected)."""
        workers = self.worker_pids()
        if len(workers) != 1:
            raise RuntimeError(f"expected one gunicorn worker, found {workers}")
        return workers[0]

    def worker_pids(self) -> list[int]:
        """The master's live children (gunicorn's workers)."""
        workers = [pid for pid in children(self.master_pid) if alive(pid)] if self.master_pid else []
        self._seen_workers.update(workers)
        return workers

    def start(self) -> GunicornServer:
        """Start gunicorn and wait until it answers; on failure nothing is left running."""
        if self.process is not None:
            raise RuntimeError("already started")
        try:
            self._start()
        except BaseException:
            self.stop()
            self.cleanup()
            raise
        return self

    def _start(self) -> None:
        self._workdir = tempfile.mkdtemp(prefix="gunicorn-test-")
        os.chmod(self._workdir, 0o755)  # a worker running as another user may need to look in
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.host, 0))
            listener.listen(128)
            self.port = listener.getsockname()[1]
            fd = listener.fileno()
            os.set_inheritable(fd, True)
            pidfile = os.path.join(self._workdir, "gunicorn.pid")
            options: dict[str, str] = {"--bind": f"fd://{fd}", "--pid": pidfile}
            if self.config is not None:
                # A configuration file is run as it is: only where to listen and the pid file differ.
                options["--config"] = self.config
            else:
                options.update(
                    {
                        "--worker-class": "gthread",
                        "--workers": "1",
                        "--threads": str(self.threads),
                        "--graceful-timeout": "3",  # stop() must not wait 30 s for streams in flight
                        "--log-level": "info",
                    }
                )
            command = [*self.wrapper, gunicorn_executable(), "--no-control-socket"]
            for option, value in options.items():
                command += [option, value]
            for path in self.pythonpath:
                command += ["--pythonpath", path]
            if self.chdir is not None:
                command += ["--chdir", self.chdir]
            command += [*self.args, self.app_spec]
            with open(os.path.join(self._workdir, "gunicorn.log"), "wb") as log:
                self.process = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
                    pass_fds=(fd,),
                    start_new_session=True,  # its own process group, so stop() can kill all of it
                    cwd=self._workdir,
                )
        finally:
            listener.close()  # gunicorn holds its own copy
        self._wait_until_ready(pidfile)

    def stop(self) -> None:
        """SIGTERM the master, wait, SIGKILL the process group on timeout. Idempotent."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            target = self.master_pid if self.master_pid and alive(self.master_pid) else process.pid
            terminate(process, target, self.stop_timeout)
        # A worker whose master died would linger: kill it if it is still in our process group.
        for pid in self._seen_workers:
            with contextlib.suppress(OSError):
                if alive(pid) and os.getpgid(pid) == process.pid:
                    os.kill(pid, signal.SIGKILL)
        self._seen_workers.clear()
        self.process = None

    # -- internals -------------------------------------------------------------------

    def _wait_until_ready(self, pidfile: str) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.start_timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"gunicorn exited with {self.process.returncode} during start-up:\n{self.log()}"
                )
            if not self.master_pid:
                with contextlib.suppress(OSError, ValueError):
                    self.master_pid = int(Path(pidfile).read_text().strip())
            if self.master_pid and self.worker_pids():
                try:
                    answer(self.host, self.port, self.ready_path, tls=self.tls)
                    return
                except (OSError, http.client.HTTPException) as exc:
                    last_error = exc
            time.sleep(0.05)
        raise RuntimeError(
            f"gunicorn did not answer within {self.start_timeout} s ({last_error!r}):\n{self.log()}"
        )


class AsgiServer(ServerProcess):
    """uvicorn or hypercorn running an ASGI app on 127.0.0.1: one process, its log in
    ``log()``, stopped like the gunicorn ones.

        with AsgiServer("tests.asgi_app:app", env={"ZM_ASGI_ROOT": root}) as server:
            urllib.request.urlopen(server.url + "/files/a.bin")
            open_fds(server.pid)
    """

    def __init__(
        self,
        app_spec: str,
        *,
        server: str = "uvicorn",
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
        chdir: str | os.PathLike[str] | None = None,
        pythonpath: Iterable[str | os.PathLike[str]] = (PROJECT,),
        ready_path: str = "/",
        start_timeout: float = 20,
        stop_timeout: float = 10,
    ) -> None:
        self.app_spec = app_spec
        self.server = server
        self.label = server
        self.env = dict(env or {})
        self.args = list(args)
        self.chdir = chdir
        self.pythonpath = [str(path) for path in pythonpath]
        self.ready_path = ready_path
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> AsgiServer:
        from .clients import free_port

        self._workdir = tempfile.mkdtemp(prefix=f"zm-{self.server}-")
        self.port = free_port()
        if self.server == "uvicorn":
            command = [sys.executable, "-m", "uvicorn", self.app_spec, "--host", "127.0.0.1"]
            command += ["--port", str(self.port), "--no-access-log", "--timeout-graceful-shutdown", "2"]
        elif self.server == "hypercorn":
            command = [sys.executable, "-m", "hypercorn", self.app_spec, "--bind", f"127.0.0.1:{self.port}"]
            command += ["--workers", "0"]  # in this very process, like uvicorn
        else:
            raise ValueError(f"unknown ASGI server {self.server!r}")
        environment = {**os.environ, **self.env}
        environment["PYTHONPATH"] = os.pathsep.join([*self.pythonpath, environment.get("PYTHONPATH", "")])
        with open(Path(self._workdir, "gunicorn.log"), "wb") as log:
            self.process = subprocess.Popen(
                [*command, *self.args],
                cwd=self.chdir,
                env=environment,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            terminate(process, process.pid, self.stop_timeout)
        self.process = None

    def _wait_until_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.server} exited with {self.process.returncode}:\n{self.log()}")
            try:
                answer("127.0.0.1", self.port, self.ready_path)
                return
            except (OSError, http.client.HTTPException):
                time.sleep(0.05)
        raise RuntimeError(f"{self.server} did not answer within {self.start_timeout} s:\n{self.log()}")
