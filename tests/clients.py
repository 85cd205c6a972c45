"""Helpers for driving real HTTP clients (curl, wget, http.client) against a test server."""

from __future__ import annotations

import hashlib
import http.client
import os
import signal
import socket
import subprocess
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest

from .servers import GunicornServer

# The tools print non-ASCII file names; a UTF-8 locale keeps them intact.
TOOL_ENV = {**os.environ, "LC_ALL": "C.UTF-8"}


def unavailable(reason: str) -> NoReturn:
    """Skip a test whose server or client program is missing; fail instead where
    ``ZM_REQUIRE_ALL`` is set (``.ci/run`` sets it: CI installs everything and must run it all)."""
    if os.environ.get("ZM_REQUIRE_ALL"):
        pytest.fail(f"{reason} (ZM_REQUIRE_ALL is set, so nothing may be skipped)")
    pytest.skip(reason)


def require_module(name: str) -> None:
    """Skip (or, under ``ZM_REQUIRE_ALL``, fail) a test whose Python package is not installed."""
    try:
        __import__(name)
    except ImportError:
        unavailable(f"{name} is not installed")


def run(command: list[Any], timeout: float = 30, **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
    """Run a client tool with a bounded time and a UTF-8 locale; output is captured."""
    return subprocess.run(command, capture_output=True, timeout=timeout, env=TOOL_ENV, check=False, **kwargs)


def read_headers(path: Path) -> tuple[int, dict[str, list[str]]]:
    """Status and headers (lower-case names) of the last response in a ``curl -D`` file."""
    blocks = [b for b in path.read_bytes().decode("latin-1").split("\r\n\r\n") if b.strip()]
    lines = blocks[-1].split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return status, headers


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def request(
    server: GunicornServer, method: str, path: str, headers: dict[str, str] | None = None
) -> tuple[http.client.HTTPResponse, bytes]:
    """One request on a fresh connection: the response and its whole body."""
    connection = http.client.HTTPConnection(server.host, server.port, timeout=15)
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        return response, response.read()
    finally:
        connection.close()


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def free_port() -> int:
    """A port free on 127.0.0.1 now (for servers that must bind it themselves)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def kill_part_way(command: list[Any], output: Path, at_least: int, log: Path, timeout: float = 20) -> int:
    """Start a download, SIGKILL the client once ``output`` holds ``at_least`` bytes; its size then."""
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, env=TOOL_ENV
        )
        try:
            wait_for(lambda: size_of(output) >= at_least or process.poll() is not None, timeout, 0.005)
            assert process.poll() is None, (
                f"the client ended ({process.returncode}) before it could be killed: {log.read_bytes()!r}"
            )
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
    assert process.returncode == -signal.SIGKILL
    return size_of(output)


def assert_good_zip(path: Path, files: dict[str, bytes]) -> None:
    """``unzip -t`` finds no error, and every entry holds what the folder holds."""
    result = run(["unzip", "-t", path])
    assert result.returncode == 0, result.stdout + result.stderr
    assert b"No errors detected" in result.stdout
    with zipfile.ZipFile(path) as opened:
        assert {info.filename: opened.read(info) for info in opened.infolist()} == files


@dataclass(frozen=True)
class Download:
    """An uninterrupted download: where it is saved, its hash and its headers."""

    path: Path
    sha256: str
    size: int
    headers: dict[str, list[str]]


def curl_download(url: str, folder: Path, name: str) -> Download:
    """Download ``url`` in one go with curl; it must be a 200 with an exact Content-Length."""
    path, header_file = folder / name, folder / f"{name}.headers"
    result = run(["curl", "-sS", "--fail", "--max-time", "20", "-D", header_file, "-o", path, url])
    assert result.returncode == 0, result.stderr
    status, headers = read_headers(header_file)
    assert status == 200
    assert headers["content-length"] == [str(size_of(path))]
    return Download(path, sha256_file(path), size_of(path), headers)


# -- raw sockets: clients that read as slowly as a test says, or not at all ---------------------


def connect(
    host: str, port: int, *, source: str = "127.0.0.1", receive_buffer: int | None = None, timeout: float = 10
) -> socket.socket:
    """A TCP connection from ``source`` (any of 127.0.0.0/8 reaches loopback: a second client
    address for per-address limits). ``receive_buffer`` fixes SO_RCVBUF, so that a client that
    stops reading holds a known, small amount in its kernel buffer."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if receive_buffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.bind((source, 0))
        sock.settimeout(timeout)
        sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def send_get(sock: socket.socket, path: str, headers: dict[str, str] | None = None) -> None:
    """Send a complete HTTP/1.1 GET for ``path`` (no keep-alive unless ``headers`` asks for it)."""
    lines = [f"GET {path} HTTP/1.1", "Host: localhost", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    if not any(k.lower() == "connection" for k in headers or {}):
        lines.append("Connection: close")
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))


@dataclass
class RawResponse:
    """The head of a response read from a raw socket, and the body bytes read with it."""

    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    @property
    def length(self) -> int:
        return int(self.headers["content-length"])


def read_head(sock: socket.socket) -> RawResponse:
    """Read until the end of the response head; the bytes read past it start ``body``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"connection closed before the end of the head: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return RawResponse(int(status_line.split()[1]), headers, body)


def read_paced(sock: socket.socket, rate: float, seconds: float, piece: int = 8192) -> bytes:
    """Read at ``rate`` bytes per second for ``seconds`` (less if the body ends first)."""
    data = bytearray()
    began = time.monotonic()
    while (now := time.monotonic()) - began < seconds:
        allowed = int(rate * (now - began)) - len(data)
        if allowed < piece:
            time.sleep(piece / rate / 4)
            continue
        chunk = sock.recv(min(allowed, 65536))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def read_to_end(sock: socket.socket, timeout: float = 30) -> tuple[bytes, str]:
    """Everything until the connection ends: the bytes, and how it ended ("eof", "reset" or "timeout")."""
    data = bytearray()
    sock.settimeout(timeout)
    try:
        while chunk := sock.recv(1 << 20):
            data += chunk
    except (ConnectionResetError, BrokenPipeError):
        return bytes(data), "reset"
    except TimeoutError:
        return bytes(data), "timeout"
    return bytes(data), "eof"


def response_complete(answer: bytes) -> bool:
    """Whether ``answer`` holds a whole response: its head, then ``Content-Length`` bytes or the
    last chunk (a response with neither ends only when the connection does)."""
    head, found, body = answer.partition(b"\r\n\r\n")
    if not found:
        return False
    fields = head.decode("latin-1").lower().split("\r\n")[1:]
    headers = dict(line.split(":", 1) for line in fields if ":" in line)
    if "content-length" in headers:
        return len(body) >= int(headers["content-length"])
    return "chunked" in headers.get("transfer-encoding", "") and body.endswith(b"0\r\n\r\n")


def time_request(host: str, port: int, path: str, timeout: float, source: str = "127.0.0.1") -> float | None:
    """Seconds until a complete 200 answer to GET ``path`` on a new connection; None if it did not
    come within ``timeout`` seconds. (Counted to the answer's last byte, not to the connection's
    end: gunicorn may close it later.)"""
    began = time.monotonic()
    try:
        with connect(host, port, source=source, timeout=timeout) as sock:
            send_get(sock, path)
            answer = b""
            while not response_complete(answer):
                remaining = timeout - (time.monotonic() - began)
                if remaining <= 0:
                    return None
                sock.settimeout(remaining)
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
    except TimeoutError:
        return None
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
    return time.monotonic() - began


def wsgi_get(app: Any, path: str, method: str = "GET", **headers: str) -> tuple[Any, bytes]:
    """``app``'s response (werkzeug's test client) and its body, closed: which is when a body
    gives the cache what it learnt. Header names with "_" for "-" (``If_Range="..."``)."""
    from werkzeug.test import Client

    response = Client(app).open(
        path, method=method, headers={k.replace("_", "-"): v for k, v in headers.items()}
    )
    try:
        return response, response.get_data()
    finally:
        response.close()
