"""Slow clients against the recommended set-up: nginx (``examples/nginx.conf``) in front of
gunicorn (``examples/gunicorn.conf.py``: 2 workers x 8 gthread threads = 16 slots), serving
``examples/plain_app.py``.

The attack that found the problem, from a second client address (127.0.0.2; all of 127.0.0.0/8
reaches loopback, so nginx's per-address limits see two clients): 50 slowloris connections,
each sending a request head a byte at a time and never finishing it, and 50 slow readers, each
asking for a large ZIP and then reading about 10 KB/s or nothing at all. Meanwhile a normal client
(127.0.0.1) asks for the app's page again and again.

* Through nginx every one of those requests is answered within a second: the slowloris heads
  never reach gunicorn, and only ``limit_conn``'s few downloads per address hold its threads.
* gunicorn alone, with the same settings, answers none of them: each slowloris connection holds
  a thread while it reads the head, and 16 of them hold them all. (Shown with a short timeout;
  the same request is answered at once before the attack and after it.)

gunicorn runs with the example's settings, only its address and pid file changed; nginx with the
example's file, only its addresses and the paths it writes changed (see ``example_config``).
And the README shows that file: every line of its nginx block is a line of it, in order.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .clients import connect, send_get, time_request
from .nginx import Nginx, nginx_executable
from .servers import PROJECT, GunicornServer

EXAMPLES = PROJECT / "examples"
MIB = 1024 * 1024
ATTACKER = "127.0.0.2"
CLIENT = "127.0.0.1"
SLOWLORIS = 50
SLOW_READERS = 50
READ_RATE = 10 * 1024  # bytes per second, for the half of the slow readers that read at all
PROBES = 10
ANSWERED_WITHIN = 1.0  # seconds


def example_gunicorn_setting(name: str) -> object:
    namespace: dict[str, object] = {}
    exec(compile((EXAMPLES / "gunicorn.conf.py").read_text(), "gunicorn.conf.py", "exec"), namespace)
    return namespace[name]


THREADS = example_gunicorn_setting("threads")  # per gunicorn worker


@pytest.fixture(scope="module")
def files_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("slow-clients")
    (root / "game").mkdir()
    for name in ("disc-1.bin", "disc-2.bin"):
        (root / "game" / name).write_bytes(os.urandom(16 * MIB))
    return root


@pytest.fixture(scope="module")
def gunicorn(files_root: Path) -> Iterator[GunicornServer]:
    """gunicorn.conf.py as it is (preloaded app, 2 workers x 8 threads), on a free port."""
    server = GunicornServer(
        "plain_app:application",
        pythonpath=[EXAMPLES],
        env={"FILES_ROOT": str(files_root)},
        config=EXAMPLES / "gunicorn.conf.py",
    )
    with server:
        yield server


def example_config(upstream: str) -> Callable[[Path, int], str]:
    """examples/nginx.conf with its addresses and the paths it writes changed for the test, and
    nothing else: each line changed must be found exactly once, so the test follows the file."""
    text = (EXAMPLES / "nginx.conf").read_text()

    def render(prefix: Path, port: int) -> str:
        changes = {
            "pid /run/nginx-downloads.pid;": f"pid {prefix}/nginx.pid;",
            "error_log /var/log/nginx/downloads-error.log;": f"error_log {prefix}/error.log;",
            "access_log /var/log/nginx/downloads-access.log;": f"access_log {prefix}/access.log;",
            "proxy_temp_path /var/lib/nginx/proxy;": f"proxy_temp_path {prefix}/proxy_temp;",
            # nginx creates every temporary folder it knows of: keep them all in the prefix.
            "client_body_temp_path /var/lib/nginx/body;": (
                f"client_body_temp_path {prefix}/client_body_temp; fastcgi_temp_path {prefix}/fastcgi_temp; "
                f"uwsgi_temp_path {prefix}/uwsgi_temp; scgi_temp_path {prefix}/scgi_temp;"
            ),
            "server 127.0.0.1:8000;": f"server {upstream};",
            "listen 80;": f"listen {CLIENT}:{port};",
        }
        config = text
        for old, new in changes.items():
            assert config.count(old) == 1, f"examples/nginx.conf no longer has {old!r} exactly once"
            config = config.replace(old, new)
        return config

    return render


@pytest.fixture(scope="module")
def nginx(gunicorn: GunicornServer) -> Iterator[Nginx]:
    executable = nginx_executable()
    # Outside pytest's private (0700) folders: the example's workers run as www-data.
    prefix = Path(tempfile.mkdtemp(prefix="zm-nginx-"))
    prefix.chmod(0o755)
    server = Nginx(executable, prefix, example_config(f"{gunicorn.host}:{gunicorn.port}"))
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(prefix, ignore_errors=True)


class Attack:
    """Slowloris connections and slow readers from ``ATTACKER``, driven by one thread.

    Slowloris: a request line and one header, then a byte of another header every second.
    Slow readers: a complete GET of a large ZIP; the first half then read ``READ_RATE`` bytes per
    second, the others nothing at all.
    """

    def __init__(self, host: str, port: int, path: str) -> None:
        self.host, self.port, self.path = host, port, path
        self.slowloris: list[socket.socket] = []
        self.readers: list[socket.socket] = []
        self.ended: set[socket.socket] = set()  # connections the server closed
        self.statuses: dict[socket.socket, bytes] = {}  # each reader's status line, once read
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drive, daemon=True)

    def __enter__(self) -> Attack:
        try:
            for _ in range(SLOWLORIS):
                self.add_slowloris()
            for _ in range(SLOW_READERS):
                sock = connect(self.host, self.port, source=ATTACKER, receive_buffer=64 * 1024)
                send_get(sock, self.path)
                sock.setblocking(False)
                self.readers.append(sock)
        except BaseException:
            self.close()
            raise
        self._thread.start()
        return self

    def add_slowloris(self) -> None:
        sock = connect(self.host, self.port, source=ATTACKER)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n")
        self.slowloris.append(sock)
        time.sleep(0.005)  # give every server process its chance to accept

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        for sock in self.slowloris + self.readers:
            sock.close()

    def open_slowloris(self) -> int:
        return sum(1 for sock in self.slowloris if sock not in self.ended)

    def _drive(self) -> None:
        reading = self.readers[: SLOW_READERS // 2]
        selector = selectors.DefaultSelector()
        for sock in reading:
            selector.register(sock, selectors.EVENT_READ)
        last_byte = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now - last_byte >= 1.0:
                last_byte = now
                for sock in self.slowloris:
                    if sock not in self.ended:
                        try:
                            sock.send(b"X")
                        except OSError:
                            self.ended.add(sock)
            # Each reading client takes at most READ_RATE / 10 bytes per tenth of a second.
            for key, _ in selector.select(timeout=0.1):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(READ_RATE // 10)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                self.statuses.setdefault(sock, data.split(b"\r\n", 1)[0])
                if not data:
                    self.ended.add(sock)
                    selector.unregister(sock)
            time.sleep(0.1)
        selector.close()


def attacking_connections(pid: int) -> int:
    """How many connections from ``ATTACKER`` process ``pid`` holds (its socket fds, matched in
    /proc/net/tcp by inode)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    attacker = "".join(f"{int(part):02X}" for part in reversed(ATTACKER.split("."))) + ":"
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    return sum(1 for row in rows if row[2].startswith(attacker) and row[9] in inodes)


def probe_latencies(host: str, port: int, timeout: float) -> list[float | None]:
    """The normal client's requests for the app's page, one every half second."""
    latencies = []
    for _ in range(PROBES):
        latencies.append(time_request(host, port, "/", timeout=timeout, source=CLIENT))
        time.sleep(0.5)
    return latencies


@pytest.mark.server
def test_behind_nginx_slow_clients_do_not_delay_anyone_else(nginx: Nginx, gunicorn: GunicornServer) -> None:
    assert time_request(nginx.host, nginx.port, "/", timeout=5) is not None  # the set-up answers
    with Attack(nginx.host, nginx.port, "/files/game") as attack:
        time.sleep(1.5)  # every attacking connection is open, the admitted downloads stream
        latencies = probe_latencies(nginx.host, nginx.port, timeout=ANSWERED_WITHIN)
        print(f"through nginx, under attack: probe latencies {latencies}")
        # The attack was on all along: nginx still holds every slowloris connection (its
        # client_header_timeout is 10 s), and let only a few of the downloads through.
        assert attack.open_slowloris() == SLOWLORIS
        statuses = list(attack.statuses.values())
        admitted = sum(1 for status in statuses if status.startswith(b"HTTP/1.1 200"))
        refused = sum(1 for status in statuses if status.startswith(b"HTTP/1.1 429"))
        print(f"reading slow readers: {admitted} admitted (200), {refused} refused (429)")
        assert 1 <= admitted <= 4
    assert all(latency is not None and latency < ANSWERED_WITHIN for latency in latencies), latencies


@pytest.mark.server
def test_gunicorn_alone_is_held_up_by_the_same_slow_clients(gunicorn: GunicornServer) -> None:
    """The reason for nginx in front: with the same settings and no nginx, the page waits."""
    host, port = gunicorn.host, gunicorn.port
    before = time_request(host, port, "/", timeout=5)
    assert before is not None and before < ANSWERED_WITHIN
    with Attack(host, port, "/files/game") as attack:
        time.sleep(1.5)
        # gunicorn's workers each accept what they can: should one have taken fewer attacking
        # connections than it has threads, the attack goes on as an attacker's would, with more.
        for _ in range(SLOWLORIS):
            held = [attacking_connections(pid) for pid in gunicorn.worker_pids()]
            if min(held) > THREADS:
                break
            attack.add_slowloris()
        else:
            raise AssertionError("a gunicorn worker kept taking no attacking connections")
        print(f"attacking connections per gunicorn worker: {held}")
        time.sleep(0.5)
        during = [time_request(host, port, "/", timeout=2 * ANSWERED_WITHIN, source=CLIENT) for _ in range(2)]
        print(f"gunicorn alone, under attack: probe latencies {during}")
    assert during == [None, None]  # not answered in twice the time nginx needed at most
    # The attack over (its connections closed), the threads are free again.
    after = time_request(host, port, "/", timeout=10)
    assert after is not None and after < 5, after


def readme_block(heading: str) -> str:
    """The first fenced code block after ``heading`` in README.md."""
    readme = (PROJECT / "README.md").read_text(encoding="utf-8")
    after = readme[readme.index(heading) :]
    start = after.index("\n", after.index("```")) + 1
    return after[start : after.index("```", start)]


def test_readme_nginx_block_is_copied_from_the_example() -> None:
    source = [line.strip() for line in (EXAMPLES / "nginx.conf").read_text(encoding="utf-8").splitlines()]
    block = [line.strip() for line in readme_block("### nginx in front").splitlines() if line.strip()]
    assert len(block) > 20
    position = 0
    for line in block:
        assert line in source[position:], f"README line not in examples/nginx.conf (in order): {line!r}"
        position = source.index(line, position) + 1
