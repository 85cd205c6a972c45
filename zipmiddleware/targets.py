"""What a resolver returns: plain, immutable descriptions of a download.

Nothing here touches the file system; :mod:`zipmiddleware.planning` checks and
expands these values before anything is sent.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    from .sources import RestartableSource, VersionedSource

logger = logging.getLogger("zipmiddleware")

StrPath: TypeAlias = "str | os.PathLike[str]"
Source: TypeAlias = "bytes | bytearray | memoryview | Iterable[bytes] | RestartableSource"


@dataclass(frozen=True)
class FileTarget:
    """Send one file as it is (sendfile where the server offers it).

    >>> FileTarget("/srv/games/doom.zip", download_name="Doom (1993).zip")
    """

    path: StrPath
    download_name: str | None = None
    mimetype: str | None = None


@dataclass(frozen=True)
class SourceTarget:
    """Send one versioned source as it is (see :class:`~zipmiddleware.sources.VersionedSource`):
    an object kept elsewhere, streamed through with its size, validators and ranges.

    >>> SourceTarget(s3_object, download_name="Doom (1993).zip")
    """

    source: VersionedSource
    download_name: str | None = None
    mimetype: str | None = None


@dataclass(frozen=True)
class ZipEntry:
    """One member of an explicit :class:`ZipTarget`: a file path or a byte source.

    ``source`` may be ``bytes``, any iterable of ``bytes``, or a restartable source
    (an object with ``open(offset)``, such as :class:`~zipmiddleware.sources.UrlSource`:
    fetched ahead and retried, see :mod:`zipmiddleware.fetching`); if it has a
    ``close()`` method it is called once the download ends, however it ends.
    ``size`` (if given) is checked against what the source yields; ``mtime`` is a
    POSIX timestamp or an aware ``datetime`` and defaults to a restartable source's
    own ``size`` and ``mtime``, else to 1980-01-01, never the current time, so that
    the archive's bytes do not depend on the clock.
    """

    arcname: str
    path: StrPath | None = None
    source: Source | None = None
    size: int | None = None
    mtime: float | datetime | None = None

    def __post_init__(self) -> None:
        if (self.path is None) == (self.source is None):
            raise TypeError("ZipEntry needs exactly one of path= or source=")
        if self.size is not None and self.size < 0:
            raise ValueError("ZipEntry size must be >= 0")


@dataclass(frozen=True)
class ZipTarget:
    """A streamed ZIP archive: explicit entries, or a folder (see :meth:`from_directory`)."""

    entries: tuple[ZipEntry, ...] = ()
    download_name: str | None = None
    directory: StrPath | None = field(default=None, repr=False)

    def __init__(
        self,
        entries: Iterable[ZipEntry] = (),
        download_name: str | None = None,
        *,
        directory: StrPath | None = None,
    ) -> None:
        object.__setattr__(self, "entries", tuple(entries))
        object.__setattr__(self, "download_name", download_name)
        object.__setattr__(self, "directory", directory)
        if directory is not None and self.entries:
            raise TypeError("ZipTarget takes entries or a directory, not both")

    @classmethod
    def from_directory(cls, path: StrPath, download_name: str | None = None) -> ZipTarget:
        """Zip a whole folder, applying the middleware's ``exclude`` and ``ignore`` rules.

        The walk happens when the response is planned, not here. A folder that
        holds exactly one file (after the rules) is sent directly as that file.

        >>> ZipTarget.from_directory("/srv/games/quake", download_name="Quake.zip")
        """
        return cls(download_name=download_name, directory=path)


@dataclass(frozen=True)
class Pending:
    """The download is still being prepared: 202 Accepted with ``Retry-After``."""

    retry_after: int = 5
    message: str | None = None


@dataclass(frozen=True)
class Failed:
    """The download cannot be served: an error response with ``status``."""

    message: str
    status: int = 500

    def __post_init__(self) -> None:
        if not 400 <= self.status <= 599:
            raise ValueError("Failed status must be an HTTP error status (400-599)")


Target: TypeAlias = FileTarget | SourceTarget | ZipTarget | Pending | Failed


@dataclass(frozen=True)
class PathTarget:
    """A path whose kind is decided on disk: a file is sent, a folder is zipped.

    What a status row ('available' + path) becomes.
    """

    path: StrPath
    download_name: str | None = None


Resolved: TypeAlias = Target | PathTarget | None

# Status values of a download-request row, as in the systems this grew from.
READY_STATUSES = frozenset({"available", "streaming_ready"})
WAITING_STATUSES = frozenset({"pending", "processing"})


def _as_mapping(result: Any) -> Mapping[str, Any] | None:
    """Rows come as dicts, ``sqlite3.Row`` or SQLAlchemy rows; view each as a mapping."""
    if isinstance(result, Mapping):
        return result
    mapping = getattr(result, "_mapping", None)  # SQLAlchemy Row
    if isinstance(mapping, Mapping):
        return mapping
    keys = getattr(result, "keys", None)  # sqlite3.Row
    if callable(keys):
        return {key: result[key] for key in keys()}
    return None


def interpret(result: Any) -> Resolved:
    """Turn whatever a resolver returned into a target (or ``None`` for 404).

    Raises ``TypeError`` for a value that is not a resolver result at all and
    ``ValueError`` for a status row that cannot be served; both become a 500.
    """
    if result is None or isinstance(result, (FileTarget, SourceTarget, ZipTarget, Pending, Failed)):
        return result
    if inspect.iscoroutine(result):
        result.close()  # never awaited: closed, so Python does not warn about it later
        raise TypeError(
            "resolver returned a coroutine: async resolvers need zipmiddleware.asgi.ZipMiddleware"
        )
    row = _as_mapping(result)
    if row is None or "status" not in row:
        raise TypeError(f"resolver returned an unsupported value of type {type(result).__name__}")
    status = str(row["status"]).strip().lower()
    if status in READY_STATUSES:
        path = row.get("path")
        if not path:
            raise ValueError(f"status row {status!r} has no 'path'")
        return PathTarget(path, row.get("download_name"))
    if status in WAITING_STATUSES:
        retry_after = row.get("retry_after") or 5
        return Pending(retry_after=int(retry_after))
    if status == "failed":
        # The row may carry an internal error text; it stays in the log.
        logger.info("download request failed: %r", row.get("error") or row.get("message"))
        return Failed("This download could not be prepared.", status=500)
    raise ValueError(f"status row has an unknown status {status!r}")
