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
