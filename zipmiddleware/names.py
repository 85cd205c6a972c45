"""Names that leave the server: ZIP entry names and download file names.

Policy (see README, "Folders and entry names"). An archive is made here but extracted anywhere, so every
entry name is one that Windows and macOS can create, and names that those systems take for the
same file are renamed, never merged:

* Names read from disk that are not valid UTF-8 are decoded as cp1252, the
  encoding such names most often come from; bytes cp1252 leaves undefined
  become U+FFFD. So ``caf\\xe9.txt`` downloads as ``café.txt``.
* Entry names are relative with forward slashes; empty, ``.`` and ``..``
  components, a leading drive letter, and control characters (NUL included)
  are removed or replaced, so no entry can land outside the folder it is
  extracted into ("zip slip").
* Invisible characters become ``_``: control characters (C0 and C1), format characters
  (Unicode category Cf: bidi overrides such as U+202E, zero-width spaces and joiners, the BOM)
  and non-characters (U+FFFE, U+FDD0...). A bidi override makes ``photo\\u202egpj.exe`` show as
  ``photoexe.jpg``; HFS+ ignores format characters, so two names differing by one are one file
  there. The same set as Chromium's downloads (``base/i18n/file_util_icu.cc``).
* Names are Unicode NFC. Names from macOS often arrive decomposed (HFS+ stores a variant of
  NFD, and APFS keeps whatever form it was given, comparing names regardless of it), so the
  same name can reach us in either form: ``é`` decomposed comes out as ``é`` composed, and the
  two then clash like any other duplicate instead of giving two entries that look alike and
  extract onto one file.
* Characters Windows does not allow in a name, ``< > : " | ? *``, become ``_`` (``\\``
  separates folders, as ``/`` does). Source for this rule and the next two: Microsoft,
  "Naming Files, Paths, and Namespaces" (learn.microsoft.com, win32/fileio/naming-a-file).
* No component ends in a dot or a space, which that page rules out because Windows drops them
  (``a.`` and ``a`` would be one file there; Explorer cannot open ``a.``). They are removed; a
  component made only of dots and spaces (``...``, ``. .``) becomes ``_``, never ``..`` and never
  nothing (a bare ``.`` or ``..`` is dropped as above).
* No component is a Windows device name: CON, PRN, AUX, NUL, COM1-COM9, LPT1-LPT9 and the
  superscript-digit COM¹ COM² COM³ LPT¹ LPT² LPT³, plus the console's CONIN$ and CONOUT$ (as
  CPython's ``ntpath.isreserved`` has them); in any case, bare or followed by spaces or by an
  extension, since Windows looks only at the part before the first dot (``nul.tar.gz`` is the
  null device). Such a component gets ``_`` after that part: ``CON`` -> ``CON_``,
  ``con.txt`` -> ``con_.txt``, ``Com1.tar.gz`` -> ``Com1_.tar.gz``.
* Names are compared ignoring case and normalization (see :meth:`NameTable.key`): Windows
  ignores case, macOS both; a clash, including one that the rules above create (``a.`` and
  ``a``, ``CON`` and ``CON_``), is renamed ``name (1).ext``, ``name (2).ext`` ...

Every rule depends on the name alone, so a folder gives the same entry names on every request and
every host running the same Python minor version (its Unicode tables decide NFC, case folding and
which characters are format characters; a character a newer version assigns can name differently).
"""

from __future__ import annotations

import os
import re
import unicodedata
from urllib.parse import quote

from werkzeug.http import dump_options_header

_DRIVE = re.compile(r"^[A-Za-z]:")
_WINDOWS_FORBIDDEN = '<>:"|?*'  # in a name; "/" and "\\" separate names
_FORBIDDEN = re.compile(f"[{re.escape(_WINDOWS_FORBIDDEN)}]")
# Windows device names, upper case: a component whose part before the first dot, less trailing
# spaces, is one of them opens the device.
_DEVICES = frozenset(
    ["CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"]
    + [f"{port}{n}" for port in ("COM", "LPT") for n in "123456789¹²³"]
)

# For plain_names: the bytes a plain ASCII name may hold (printable, not forbidden), what no plain
# name holds (an empty component, one that starts with a space or ends in a space or a dot), and
# a device name starting a component, in any case ("ı" too: "conın$".upper() is "CONIN$").
_FORBIDDEN_CHARS = _WINDOWS_FORBIDDEN + "\\"
_PLAIN_ASCII = bytes(c for c in range(0x20, 0x7F) if chr(c) not in _FORBIDDEN_CHARS)
_BAD_ENDS = ("//", "/ ", " /", "./")
_DEVICE_COMPONENT = re.compile(
    r"/(?:[cC][oO](?:[nN](?:[iIı][nN]\$|[oO][uU][tT]\$)?|[mM][1-9¹²³])|[pP][rR][nN]|[aA][uU][xX]|[nN][uU][lL]"
    r"|[lL][pP][tT][1-9¹²³]) *[./]"
)


def display_name(name: str) -> str:
    """A name from the file system as text that can be sent (see module docstring)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: os.fsdecode's escape of invalid bytes
        try:
            raw = os.fsencode(name)
        except UnicodeEncodeError:  # a surrogate no file name has (not from os.fsdecode)
            return name.encode("utf-8", "replace").decode("utf-8")
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            name = raw.decode("cp1252", errors="replace")
    return name


def _invisible(char: str) -> bool:
    """Whether ``char`` is a control or format character, or a non-character (see the module
    docstring)."""
    code = ord(char)
    return unicodedata.category(char) in ("Cc", "Cf") or code & 0xFFFE == 0xFFFE or 0xFDD0 <= code <= 0xFDEF


def visible(name: str) -> str:
    """``name`` with each invisible character replaced by ``_`` (see the module docstring).
    Printable names hold none: only the others are looked at a character at a time."""
    if name.isprintable():
        return name
    return "".join("_" if _invisible(char) else char for char in name)


def _trim_end(part: str) -> str:
    """``part`` less the dots and white space it ends with."""
    end = len(part)
    while end and (part[end - 1] == "." or part[end - 1].isspace()):
        end -= 1
    return part[:end]


def safe_arcname(name: str, within: str = "") -> str:
    """A relative, forward-slash entry name with no way out of its folder, that Windows and macOS
    can create as it is (see the module docstring); empty if nothing is left of it: ``..``,
    ``C:``.

    With ``within``, a safe path that ``name`` continues (``safe_arcname(folder)`` where
    ``name`` is a file in that folder, both UTF-8): ``safe_arcname(folder + "/" + name)``, made
    by making only ``name`` safe.
    """
    name = unicodedata.normalize("NFC", display_name(name)).replace("\\", "/")
    parts: list[str] = [within] if within else []  # (a drive letter only leads)
    for part in visible(name).split("/"):
        part = part.strip()
        if not parts:
            part = _DRIVE.sub("", part).lstrip()
        if part in ("", ".", ".."):
            continue
        if part[-1] == ".":  # (white space is stripped already)
            part = _trim_end(part) or "_"  # "...": neither ".." nor nothing
        stem, dot, ext = part.partition(".")
        if stem.rstrip(" ").upper() in _DEVICES:
            part = f"{stem}_{dot}{ext}"
        parts.append(part)
    # Forbidden characters last (so that "C:" is still a drive above): no rule above keeps or
    # drops a component for one of them, and no device name holds one.
    return _FORBIDDEN.sub("_", "/".join(parts))


def plain_names(names: list[str]) -> bool:
    """Whether :func:`safe_arcname` leaves every one of ``names`` as it is, and none is empty,
    told quickly; true only if each name is printable, NFC, and holds nothing any rule changes.

    A few scans in C over the names joined by ``/``: no control character (nor any character
    ``str.isprintable`` rejects, which leaves U+0020 the only white space), no forbidden one (so
    no drive letter), no empty component, none starting with a space or ending in a space or a
    dot (as ``.`` and ``..`` do), none starting with a device name.
    """
    if not names:
        return True
    text = "/" + "/".join(names) + "/"
    if text.isascii():
        if text.encode("ascii").translate(None, _PLAIN_ASCII):  # a control or forbidden character
            return False
    elif not text.isprintable() or not unicodedata.is_normalized("NFC", text):
        return False
    else:
        for char in _FORBIDDEN_CHARS:
            if char in text:
                return False
    for pair in _BAD_ENDS:
        if pair in text:
            return False
    return _DEVICE_COMPONENT.search(text) is None


def _numbered(name: str, number: int) -> str:
    stem, ext = os.path.splitext(name)
    if not stem:  # ".profile" has no extension
        stem, ext = ext, ""
    return f"{stem} ({number}){ext}"


class NameTable:
    """Hands out unique entry names, renaming clashes ``name (1).ext``.

    A clash is the same name ignoring case and normalization (see :meth:`key`), or a file name
    that is also used as a folder in another entry's path (``a`` and ``a/b``).
    """

    @staticmethod
    def key(name: str) -> str:
        """``name`` as Windows and macOS compare names, or near enough: Unicode's "canonical
        caseless" form NFD(casefold(NFD(name))), kept in NFC (the same equality). The inner NFD
        matters only for U+0345 and the letters holding it, all of which fold to something with
        an iota (U+03B9), so only a name whose folding has one is decomposed first; ASCII is just
        lower-cased. Each ``/`` stays where it was: a folder's key starts its files' keys."""
        if name.isascii():
            return name.lower()
        folded = name.casefold()
        if "\u03b9" in folded:
            folded = unicodedata.normalize("NFD", name).casefold()
        return unicodedata.normalize("NFC", folded)

    @staticmethod
    def keys(names: list[str]) -> list[str]:
        """``[key(name) for name in names]`` for entry names (no line breaks: control characters
        are gone), at once over the names joined: a line break is left alone by every step."""
        if not names:
            return []
        text = "\n".join(names)
        if text.isascii():
            return text.lower().split("\n")
        return NameTable.key(text).split("\n")

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
        base = self.key(prefix + leaf)
        number = self._next.get(base, 1)
        while self._taken(self.key(prefix + _numbered(leaf, number))):
            number += 1
        self._next[base] = number + 1
        return _numbered(leaf, number)

    def add(self, arcname: str) -> str:
        parts = arcname.split("/")
        # Folders along the way must not be files already.
        for i in range(len(parts) - 1):
            prefix = self.key("/".join(parts[: i + 1]))
            if prefix in self._files:
                parts[i] = self._free("/".join(parts[:i]), parts[i])
        name = "/".join(parts)
        if self._taken(self.key(name)):
            folder, _, leaf = name.rpartition("/")
            name = f"{folder}/{self._free(folder, leaf)}" if folder else self._free(folder, leaf)
        self._files.add(self.key(name))
        parts = name.split("/")
        for i in range(1, len(parts)):
            self._dirs.add(self.key("/".join(parts[:i])))
        return name


def content_disposition(filename: str) -> str:
    """``attachment`` with an ASCII ``filename=`` fallback and ``filename*=UTF-8''...``.

    RFC 6266 section 4.3: clients that know ``filename*`` prefer it; old ones use
    the ASCII fallback, made by dropping accents (NFKD) and anything else
    outside printable ASCII.
    """
    filename = visible(display_name(filename)).strip() or "download"
    stem, ext = os.path.splitext(filename)
    ascii_stem, ascii_ext = (
        unicodedata.normalize("NFKD", part).encode("ascii", "ignore").decode("ascii") for part in (stem, ext)
    )
    ascii_name = (ascii_stem if ascii_stem.strip(" ._") else "download") + ascii_ext
    # RFC 5987 attr-char, as werkzeug.utils.send_file quotes it.
    quoted = quote(filename, safe="!#$&+-.^_`|~")
    return dump_options_header("attachment", {"filename": ascii_name, "filename*": f"UTF-8''{quoted}"})
