"""Helpers for driving real HTTP clients (curl, wget, http.client) against a test server."""

from __future__ import annotations

import hashlib
import http.client
import os
import subprocess
import time
from collections.abc import Callable
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
