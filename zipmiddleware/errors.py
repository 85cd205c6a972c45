"""Exceptions raised by zipmiddleware."""

from __future__ import annotations


class ZipMiddlewareError(Exception):
    """Root of every exception this package raises."""


class ConfigError(ZipMiddlewareError, ValueError):
    """A configuration key is unknown or has an invalid value.

    The message always starts with the key's name, so a typo in a TOML or .ini
    file points straight at the offending line.
    """

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}")


class RefusedError(ZipMiddlewareError):
    """A download cannot be served; found before the first byte was sent.

    ``status`` is the HTTP status to answer with and ``public`` the short text
    that may be shown to the client. The exception's own message is for the log
    only (it may name paths) and never reaches the response.
    """

    def __init__(self, status: int, public: str, detail: str) -> None:
        self.status = status
        self.public = public
        super().__init__(detail)


class StreamError(ZipMiddlewareError):
    """A failure after the first byte: the server must abort the connection.

    Raised from the body iterator, so the client sees a failed download instead
    of a truncated archive that looks complete.
    """


class UpstreamError(StreamError):
    """A source (a remote file) failed for good.

    Where nothing of the response went out yet, the middleware answers with a 502 instead of
    aborting (see :mod:`zipmiddleware.middleware`).
    """
