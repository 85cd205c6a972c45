"""Conditional and range requests (RFC 9110, sections 13 and 14), for files and ZIPs alike.

werkzeug parses the headers; the decision is taken here, once, in the order the
RFC gives, so that a direct file and a streamed archive answer the same request
the same way. werkzeug's own ``make_conditional`` differs where it matters for
downloads: it answers a malformed or multi-part ``Range`` with 416.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from werkzeug.http import parse_date, parse_etags, parse_if_range_header, parse_range_header

from .types import WSGIEnvironment


@dataclass(frozen=True)
class Validators:
    """What a response can be checked against."""

    etag: str | None  # strong, unquoted
    last_modified: datetime | None  # aware, UTC, whole seconds
    length: int | None  # the full body's length; None: ranges cannot be served
    # Whether the date alone tells versions apart. A file's mtime does; an archive's newest
    # mtime does not (replace a file with an older one, remove one, add an old one: the date
    # stays), so for archives only the ETag decides (RFC 9110 13.1.5: If-Range needs a
    # strong validator).
    dated: bool = True


@dataclass(frozen=True)
class Outcome:
    status: int  # 200, 206, 304, 412 or 416
    start: int = 0
    stop: int = 0  # exclusive; for 206 only


FULL = Outcome(200)


def evaluate(environ: WSGIEnvironment, validators: Validators) -> Outcome:
    """The status a GET or HEAD gets, and for 206 the byte range.

    - ``If-Match`` / ``If-Unmodified-Since`` that fail: 412 (dates only where they are
      ``dated``: for archives, only ETags decide).
    - ``If-None-Match`` (weak comparison), else ``If-Modified-Since``: 304.
    - ``Range`` (GET only; ``bytes`` unit; exactly one range): 206 for the
      slice, 416 with the length when it starts past the end. A malformed
      ``Range``, another unit, several ranges, or an ``If-Range`` that does not
      match exactly (strong ETag, or the very Last-Modified date): the full 200.
    """
    etag, last_modified = validators.etag, validators.last_modified

    if_match = environ.get("HTTP_IF_MATCH")
    if if_match is not None:
        tags = parse_etags(if_match)
        if not (tags.star_tag or (etag is not None and tags.contains(etag))):
            return Outcome(412)
    elif validators.dated:
        since = parse_date(environ.get("HTTP_IF_UNMODIFIED_SINCE"))
        if since is not None and last_modified is not None and last_modified > since:
            return Outcome(412)

    if_none_match = environ.get("HTTP_IF_NONE_MATCH")
    if if_none_match is not None:
        tags = parse_etags(if_none_match)
        if tags.star_tag or (etag is not None and tags.contains_weak(etag)):
            return Outcome(304)
    elif validators.dated:
        since = parse_date(environ.get("HTTP_IF_MODIFIED_SINCE"))
        if since is not None and last_modified is not None and last_modified <= since:
            return Outcome(304)

    return _range(environ, validators)


def _range(environ: WSGIEnvironment, validators: Validators) -> Outcome:
    length = validators.length
    header = environ.get("HTTP_RANGE")
    if header is None or not length or environ.get("REQUEST_METHOD", "GET").upper() != "GET":
        return FULL
    parsed = parse_range_header(header)
    if parsed is None or parsed.units != "bytes" or len(parsed.ranges) != 1:
        return FULL
    if not _if_range_holds(environ.get("HTTP_IF_RANGE"), validators):
        return FULL
    first, last = parsed.ranges[0]
    if first < 0 and last is None and -first > length:
        return Outcome(206, 0, length)  # a suffix longer than the body means all of it (RFC 9110 14.1.2)
    span = parsed.range_for_length(length)
    if span is None:
        return Outcome(416)
    return Outcome(206, span[0], span[1])


def _if_range_holds(header: str | None, validators: Validators) -> bool:
    """``If-Range`` needs an exact match: a strong ETag, or exactly the Last-Modified date."""
    if header is None:
        return True
    header = header.strip()
    if header.startswith("W/"):
        return False
    condition = parse_if_range_header(header)
    if condition.etag is not None:
        return condition.etag == validators.etag
    return validators.dated and condition.date is not None and condition.date == validators.last_modified
