"""Names that leave the server: ZIP entry names and download file names.

Policy (see README, "Entry names"):

* Names read from disk that are not valid UTF-8 are decoded as cp1252, the
  encoding such names most often come from; bytes cp1252 leaves undefined
  become U+FFFD. So ``caf\\xe9.txt`` downloads as ``café.txt``.
* Entry names are relative with forward slashes; empty, ``.`` and ``..``
  components, a leading drive letter, and control characters (NUL included)
  are removed or replaced, so no entry can land outside the folder it is
  extracted into ("zip slip").
* Names are compared case-insensitively (archives are often extracted on
  Windows or macOS); a clash is renamed ``name (1).ext``, ``name (2).ext`` ...
"""

from __future__ import annotations

import os
import re
import unicodedata
from urllib.parse import quote

from werkzeug.http import dump_options_header

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DRIVE = re.compile(r"^[A-Za-z]:")


def display_name(name: str) -> str:
    """A name from the file system as text that can be sent (see module docstring)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: os.fsdecode's escape of invalid bytes
        raw = os.fsencode(name)
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            name = raw.decode("cp1252", errors="replace")
    return name


def safe_arcname(name: str) -> str:
    """A relative, forward-slash entry name with no way out of its folder (empty if nothing
    is left of it: ``..``, ``C:``)."""
    name = display_name(name).replace("\\", "/")
    parts: list[str] = []
    for part in name.split("/"):
        part = _CONTROL.sub("_", part).strip()
        if not parts:
            part = _DRIVE.sub("", part)
        if part in ("", ".", ".."):
            continue
        parts.append(part)
    return "/".join(parts)


def _numbered(name: str, number: int) -> str:
    stem, ext = os.path.splitext(name)
    if not stem:  # ".profile" has no extension
        stem, ext = ext, ""
    return f"{stem} ({number}){ext}"


class NameTable:
    """Hands out unique entry names, renaming clashes ``name (1).ext``.

    A clash is the same name ignoring case, or a file name that is also used as
    a folder in another entry's path (``a`` and ``a/b``).
    """

    def __init__(self) -> None:
        self._files: set[str] = set()
        self._dirs: set[str] = set()
        # Per clashing name, the number to try first: every lower one is taken already (names
        # are never given back), so 6,000 files named alike cost 6,000 tries, not 18 million.
        self._next: dict[str, int] = {}

    def _taken(self, key: str) -> bool:
        return key in self._files or key in self._dirs

    def _free(self, folder: str, leaf: str) -> str:
        """``leaf`` numbered (``leaf (n).ext``, n = 1, 2, ...) so that it is free in ``folder``."""
        prefix = f"{folder}/" if folder else ""
        base = (prefix + leaf).casefold()
        number = self._next.get(base, 1)
        while self._taken((prefix + _numbered(leaf, number)).casefold()):
            number += 1
        self._next[base] = number + 1
        return _numbered(leaf, number)

    def add(self, arcname: str) -> str:
        parts = arcname.split("/")
        # Folders along the way must not be files already.
        for i in range(len(parts) - 1):
            prefix = "/".join(parts[: i + 1]).casefold()
            if prefix in self._files:
                parts[i] = self._free("/".join(parts[:i]), parts[i])
        name = "/".join(parts)
        if self._taken(name.casefold()):
            folder, _, leaf = name.rpartition("/")
            name = f"{folder}/{self._free(folder, leaf)}" if folder else self._free(folder, leaf)
        self._files.add(name.casefold())
        parts = name.split("/")
        for i in range(1, len(parts)):
            self._dirs.add("/".join(parts[:i]).casefold())
        return name


def content_disposition(filename: str) -> str:
    """``attachment`` with an ASCII ``filename=`` fallback and ``filename*=UTF-8''...``.

    RFC 6266 section 4.3: clients that know ``filename*`` prefer it; old ones use
    the ASCII fallback, made by dropping accents (NFKD) and anything else
    outside printable ASCII.
    """
    filename = _CONTROL.sub("", display_name(filename)).strip() or "download"
    stem, ext = os.path.splitext(filename)
    ascii_stem, ascii_ext = (
        unicodedata.normalize("NFKD", part).encode("ascii", "ignore").decode("ascii") for part in (stem, ext)
    )
    ascii_name = (ascii_stem if ascii_stem.strip(" ._") else "download") + ascii_ext
    # RFC 5987 attr-char, as werkzeug.utils.send_file quotes it.
    quoted = quote(filename, safe="!#$&+-.^_`|~")
    return dump_options_header("attachment", {"filename": ascii_name, "filename*": f"UTF-8''{quoted}"})
