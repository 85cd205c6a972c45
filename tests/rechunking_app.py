"""``tests.server_app``'s app behind an outer middleware that holds the body back by one chunk.

It passes the server's ``start_response`` through untouched, but looks one chunk ahead (as a
middleware that must know which chunk is the last one does): each chunk reaches the server
only once the next one has been produced, so what the inner body has produced is never all
on the socket when the body is asked for more. Served as ``rechunking_app:app`` with
``--pythonpath TESTS,PROJECT``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from server_app import app as inner


class OneBehind:
    def __init__(self, body: Iterable[bytes]) -> None:
        self.body = body

    def __iter__(self) -> Iterator[bytes]:
        held: bytes | None = None
        for chunk in self.body:
            if held is not None:
                yield held
            held = chunk
        if held is not None:
            yield held

    def close(self) -> None:
        close = getattr(self.body, "close", None)
        if close is not None:
            close()


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> OneBehind:
    return OneBehind(inner(environ, start_response))
