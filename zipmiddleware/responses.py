"""Responses as values (werkzeug ``Response`` objects); the only place headers are decided."""

from __future__ import annotations

import mimetypes
import os

from werkzeug.exceptions import RequestedRangeNotSatisfiable
from werkzeug.wrappers import Response
from werkzeug.wsgi import FileWrapper, wrap_file

from .config import Settings
from .errors import RefusedError
from .names import content_disposition
from .planning import NOT_FOUND, FilePlan, ZipPlan, reopen
from .types import WSGIEnvironment
from .zipengine import ZipStream

ALLOWED_METHODS = ("GET", "HEAD")


def text_response(status: int, text: str, **headers: str) -> Response:
    response = Response(text + "\n", status=status, mimetype="text/plain")
    # An error or "not yet" must never be cached as if it were the download.
    response.headers["Cache-Control"] = "no-store"
    response.headers.update(headers)
    return response


def method_not_allowed() -> Response:
    return text_response(
        405, "Method Not Allowed: downloads answer GET and HEAD.", Allow=", ".join(ALLOWED_METHODS)
    )


def pending_response(retry_after: int, message: str | None) -> Response:
    text = message or "Accepted: this download is being prepared; try again shortly."
    return text_response(202, text, **{"Retry-After": str(max(0, int(retry_after)))})


def file_response(plan: FilePlan, environ: WSGIEnvironment, chunk_size: int) -> Response:
    """The file itself, as werkzeug's ``send_file`` would send it.

    A full 200 body is the server's ``wsgi.file_wrapper`` object itself, so
    gunicorn can use sendfile. Conditional GET and single ranges come from
    werkzeug's ``make_conditional``; a 206 keeps werkzeug's own ``FileWrapper``,
    which can seek, because gunicorn's cannot and werkzeug would otherwise read
    and discard every byte before the range.
    """
    checked = plan.file
    try:
        file = os.fdopen(reopen(checked), "rb")
    except OSError as exc:
        raise RefusedError(404, NOT_FOUND, f"cannot send {checked.path!r}: {exc}") from None
    try:
        mimetype = plan.mimetype or mimetypes.guess_type(plan.download_name)[0] or "application/octet-stream"
        response = Response(FileWrapper(file, chunk_size), mimetype=mimetype, direct_passthrough=True)
        response.headers["Content-Disposition"] = content_disposition(plan.download_name)
        _device, inode, size, mtime_ns = checked.identity
        response.content_length = size
        response.last_modified = checked.mtime  # type: ignore[assignment]
        response.set_etag(f"{mtime_ns:x}-{size:x}-{inode:x}")
        response.cache_control.no_cache = True
        response.make_conditional(environ, accept_ranges=True, complete_length=size)
        if response.status_code == 200:
            response.response = wrap_file(environ, file, chunk_size)
        return response
    except RequestedRangeNotSatisfiable:
        file.close()
        return text_response(416, "Range Not Satisfiable.", **{"Content-Range": f"bytes */{checked.size}"})
    except BaseException:
        file.close()
        raise


def zip_response(plan: ZipPlan, settings: Settings) -> Response:
    """A streamed archive. Nothing is read until the server iterates the body."""
    stream = ZipStream(
        plan.entries,
        chunk_size=settings.chunk_size,
        compression_level=settings.compression_level,
        zip64=settings.zip64,
    )
    response = Response(stream, mimetype="application/zip", direct_passthrough=True)
    response.headers["Content-Disposition"] = content_disposition(plan.download_name)
    # Proxies such as nginx buffer responses by default; a download must stream.
    response.headers["X-Accel-Buffering"] = "no"
    response.headers["Accept-Ranges"] = "none"
    response.cache_control.no_cache = True
    return response
