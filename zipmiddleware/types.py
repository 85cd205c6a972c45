"""Type aliases for WSGI (PEP 3333)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeAlias

WSGIEnvironment: TypeAlias = dict[str, Any]
StartResponse: TypeAlias = Callable[..., Callable[[bytes], object]]
WSGIApplication: TypeAlias = Callable[[WSGIEnvironment, StartResponse], Iterable[bytes]]
