"""Every real ZIP reader this machine can run, one function each.

Each reader takes the path of an archive and returns ``{entry name: (size, sha256 hex)}``,
computed from the bytes that reader itself produced (streamed into :mod:`hashlib`, or read
back from the files it extracted); only ``info_zip`` on archives of gigabytes gives the
CRC-32 it checked instead (``"crc32:XXXXXXXX"``, see below). It raises :class:`ReaderFailed`
(an ``AssertionError``) with the reader's own output when the reader reports any error or
warning, or returns something that cannot be a faithful reading (a name twice, a name that
is not UTF-8, more or fewer bytes than its listing says).

A reader whose program is missing skips its test, or fails it where ``ZM_REQUIRE_ALL`` is set
(see :func:`tests.clients.unavailable`). The programs written for this (``readers/zipread.go``,
``readers/ZipRead.java``, ``readers/ZipRead.cs``) are compiled once and kept in a folder of
the temporary directory named after a hash of their source and of the compiler's version.

What each reader checks, and how:

``python_zipfile``
    :class:`zipfile.ZipFile` on the path (central directory, then each local header): every
    member read to its end, which checks its CRC-32; any warning is an error.
``info_zip``
    Debian's ``unzip``. ``unzip -tq`` must report no error: it checks every entry's data
    against its CRC-32 and that no two entries overlap. Names, sizes and CRC-32s come from
    ``unzip -v``. The contents: an archive of at most :data:`EXTRACT_MAX_ENTRIES` entries and
    :data:`EXTRACT_MAX_BYTES` bytes is extracted into a temporary folder (so unzip's own
    handling of the names is exercised, and the files found there are what is returned); a
    bigger one, up to :data:`STREAM_MAX_BYTES`, is read with one ``unzip -p`` (every entry's
    data, in directory order, on one pipe) split at the listed sizes, so that 65,000 entries
    cost one process. Past that (unzip reads ~120 MB/s, so a second pass over 4.5 GB takes
    ~40 s), each entry is returned with the CRC-32 ``-t`` checked its data against, as
    ``"crc32:XXXXXXXX"`` instead of a SHA-256: the test compares it with the source file's.
``seven_zip``
    ``7z t`` must exit 0 and print none of 7-Zip's warnings ("Warnings", "Headers Error",
    "There are data after the end of archive", "Unexpected end", ...). Names and sizes from
    ``7z l -slt``; contents by extraction into a temporary folder (small archives) or one
    ``7z x -so`` split at the listed sizes (big ones), as for ``info_zip``.
``bsdtar_pipe``, ``bsdcpio_pipe``
    libarchive reading the archive from a pipe (``cat ARCHIVE |``), never as a file: its
    streaming reader, which sees only local headers, data and data descriptors, and never the
    central directory. Both extract into a temporary folder and what they wrote is returned
    (names as they created them). ``bsdtar -S`` writes runs of zeros as holes, so a sparse
    4.5 GB entry costs no space; ``bsdcpio`` has no such option and writes it all. Extraction
    goes to /dev/shm where memory allows (see :func:`scratch`). Anything either prints on
    stderr is a failure. ``bsdtar -tv`` is not used: in this mode
    it lists entries with a data descriptor with size 0 and exits 0 even when it stops early.
``go_archive_zip``
    Go's ``archive/zip`` (``readers/zipread.go``): every entry opened and read to its end, where
    Go checks the size and CRC-32 against the central directory and, with bit 3, the data
    descriptor's CRC-32 (``zip: checksum error`` otherwise). The program writes each entry's
    data to a pipe, hashed here (Go 1.19's own SHA-256 would take 17 s for 4.5 GB).
``java_zipfile``, ``java_zipinputstream``
    ``readers/ZipRead.java``: ``java.util.zip.ZipFile`` on the path (its checks of the end
    records and the central directory, which in JDK 17.0.8 and later include each ZIP64 extra
    field; it checks no CRC-32, so the program compares its own with the directory's), and
    ``java.util.zip.ZipInputStream``
    from a pipe (local headers only; it checks CRC-32s and sizes, and refuses a STORED entry
    that has a data descriptor: "only DEFLATED entries can have EXT descriptor").
``mono_ziparchive``
    Mono's ``System.IO.Compression.ZipArchive`` (``readers/ZipRead.cs``): central directory,
    then each local header; the program checks each entry's CRC-32 and length itself (its
    SHA-256 and CRC-32 come from libcrypto and zlib: Mono's managed SHA-256 takes minutes for
    4.5 GB).
``stream_unzip``
    The ``stream-unzip`` package, in this process, fed 64 KiB chunks of the file: local
    headers only; it cannot read a STORED entry with a data descriptor whose local header
    gives size 0 (``NotStreamUnzippable``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .clients import TOOL_ENV, unavailable

Contents = dict[str, tuple[int, str]]
Reader = Callable[[Path], Contents]

READ_SIZE = 1 << 20
STREAM_CHUNK = 64 * 1024  # what stream-unzip is fed at a time
TIMEOUT = 1800  # seconds for one reader program; far above what any of them needs
# Up to this many entries and bytes, info_zip and seven_zip extract into a folder; beyond, they
# stream every entry's data through one pipe.
EXTRACT_MAX_ENTRIES = 2000
EXTRACT_MAX_BYTES = 256 * 1024 * 1024
# Over this many bytes of data, info_zip does not read the data a second time (see info_zip).
STREAM_MAX_BYTES = 1 << 30
# A "digest" that starts with this is a CRC-32 the reader checked the data against, not a SHA-256.
CRC_ONLY = "crc32:"
SHOWN = 6000  # characters of a reader's stdout and stderr quoted in a failure

SOURCES = Path(__file__).resolve().parent / "readers"


class ReaderFailed(AssertionError):
    """A reader reported an error or a warning, or read something impossible."""


# -- shared helpers: output, subprocesses, hashing ------------------------------------------


def _shown(data: bytes | str) -> str:
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    if len(text) <= SHOWN:
        return text
    half = SHOWN // 2
    return f"{text[:half]}\n[... {len(text) - SHOWN} characters ...]\n{text[-half:]}"


def fail(reader: str, problem: str, stdout: bytes | str = b"", stderr: bytes | str = b"") -> ReaderFailed:
    """The exception for a reader's failure, quoting its output."""
    parts = [f"{reader}: {problem}"]
    if stderr:
        parts.append(f"--- stderr ---\n{_shown(stderr)}")
    if stdout:
        parts.append(f"--- stdout ---\n{_shown(stdout)}")
    return ReaderFailed("\n".join(parts))


def require(*programs: str) -> dict[str, str]:
    """The full path of each program; a missing one skips (or, under ZM_REQUIRE_ALL, fails)."""
    found = {program: shutil.which(program) for program in programs}
    missing = [program for program, path in found.items() if path is None]
    if missing:
        unavailable(
            f"needs {', '.join(missing)} on PATH (Debian: apt-get install unzip p7zip-full "
            "libarchive-tools golang-go default-jdk-headless mono-mcs libmono-system-io-compression4.0-cil)"
        )
    return {program: path for program, path in found.items() if path is not None}


def run(
    reader: str, command: list[str | Path], *, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run a reader's program to its end (UTF-8 locale, output captured); it must exit 0."""
    result = subprocess.run(
        [str(part) for part in command],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        cwd=cwd,
        env=env or TOOL_ENV,
        timeout=TIMEOUT,
        check=False,
    )
    if result.returncode != 0:
        raise fail(reader, f"{_command(command)} exited {result.returncode}", result.stdout, result.stderr)
    return result


def _command(command: list[str | Path]) -> str:
    return " ".join(str(part) for part in command)


class Started:
    """A reader's program running, its stdout a pipe for us to read, its stderr kept in a file."""

    def __init__(
        self, reader: str, command: list[str | Path], process: subprocess.Popen[bytes], errors: IO[bytes]
    ):
        self.reader = reader
        self.command = command
        self.process = process
        self.errors = errors
        self._stdout = process.stdout

    @property
    def stdout(self) -> IO[bytes]:
        assert self._stdout is not None, "started without stdout=PIPE"
        return self._stdout

    def stderr(self) -> bytes:
        self.errors.seek(0)
        return self.errors.read()

    def failure(self, problem: str, stdout: bytes = b"") -> ReaderFailed:
        """A failure of this program, with its exit status once it has ended."""
        try:
            code = self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            code = None
        return fail(
            self.reader, f"{_command(self.command)} (exit status {code}): {problem}", stdout, self.stderr()
        )

    def finish(self, stdout: bytes = b"") -> None:
        """Wait for the end: exit 0 and nothing on stderr, or :class:`ReaderFailed`."""
        code = self.process.wait(timeout=TIMEOUT)
        errors = self.stderr()
        if code != 0:
            raise fail(self.reader, f"{_command(self.command)} exited {code}", stdout, errors)
        if errors.strip():
            raise fail(self.reader, f"{_command(self.command)} wrote to stderr", stdout, errors)


@contextlib.contextmanager
def start(
    reader: str,
    command: list[str | Path],
    *,
    feed: Path | None = None,
    cwd: Path | None = None,
    stdout: int | IO[bytes] = subprocess.PIPE,
) -> Iterator[Started]:
    """Start a reader's program; with ``feed``, its stdin is a pipe from ``cat feed`` (never the
    file itself, which a program could seek in). Everything started is ended on the way out."""
    processes: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryFile() as errors:
        try:
            pipe: IO[bytes] | None = None
            if feed is not None:
                cat = subprocess.Popen(["cat", "--", str(feed)], stdout=subprocess.PIPE, env=TOOL_ENV)
                processes.append(cat)
                pipe = cat.stdout
            process = subprocess.Popen(
                [str(part) for part in command],
                stdin=subprocess.DEVNULL if pipe is None else pipe,
                stdout=stdout,
                stderr=errors,
                cwd=cwd,
                env=TOOL_ENV,
            )
            processes.append(process)
            if pipe is not None:
                pipe.close()  # the reader holds the only reading end
            yield Started(reader, command, process, errors)
        finally:
            # ``cat`` may end with EPIPE when a reader stops at the central directory: not an error.
            for process in reversed(processes):
                if process.poll() is None:
                    process.kill()
                process.wait()
                if process.stdout is not None:
                    process.stdout.close()


def memory_available() -> int:
    """MemAvailable of /proc/meminfo, in bytes (0 where it cannot be read)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def tmpfs_with_room(need: int) -> str | None:
    """/dev/shm, if it is writable and it and the memory have room for ``need`` bytes and as
    much again; else None (the temporary directory)."""
    shm = "/dev/shm"
    try:
        if not os.access(shm, os.W_OK | os.X_OK):
            return None
        st = os.statvfs(shm)
    except OSError:
        return None
    return shm if st.f_bavail * st.f_frsize > need and memory_available() > 2 * need else None


def scratch(archive: Path) -> str | None:
    """Where a reader extracts ``archive``: tmpfs where it has room for the archive's size and
    2 GiB more (see :func:`tmpfs_with_room`), else the temporary directory (None).

    Creating 65,600 small files costs bsdcpio 14 s on this machine's ext4 and 1.6 s on tmpfs;
    a sparse 4.5 GB entry costs bsdtar -S nothing on either, and bsdcpio 4.5 GB of either.
    """
    return tmpfs_with_room(archive.stat().st_size + (2 << 30))


def sha256_file(path: Path) -> tuple[int, str]:
    """Size and SHA-256 of a file's content (holes of a sparse file read as zeros)."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as file:
        while block := file.read(READ_SIZE):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def add(reader: str, contents: Contents, name: str, size: int, sha256: str) -> None:
    """One entry as a reader read it; the same name twice is a failure (a dict would hide it)."""
    if name in contents:
        raise fail(reader, f"entry {name!r} read twice")
    contents[name] = (size, sha256)


def utf8_name(reader: str, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise fail(reader, f"entry name {raw!r} is not UTF-8: {exc}") from None


def extracted(reader: str, folder: Path) -> Contents:
    """The regular files under ``folder`` (what a reader extracted), by path relative to it with
    forward slashes; anything else there (a link, a device) is a failure. Empty folders are ignored."""
    contents: Contents = {}
    root = os.fsencode(folder)
    for directory, _, files in os.walk(root):
        prefix = directory[len(root) + 1 :] + b"/" if directory != root else b""
        for file in files:
            path = directory + b"/" + file
            name = utf8_name(reader, prefix + file)
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode):
                raise fail(reader, f"extracted {name!r}, which is not a regular file")
            if st.st_size <= READ_SIZE:  # most files: one read
                with open(path, "rb", buffering=0) as opened:
                    data = opened.read(st.st_size + 1)
                add(reader, contents, name, len(data), hashlib.sha256(data).hexdigest())
            else:
                add(reader, contents, name, *sha256_file(Path(os.fsdecode(path))))
    return contents


def read_split(reader: str, command: list[str | Path], listing: list[tuple[str, int]]) -> Contents:
    """:func:`split_stream` of what ``command`` writes (every entry's data, in order); the
    command's failure, with its output, if either fails."""
    with start(reader, command) as started:
        try:
            contents = split_stream(reader, started.stdout, listing)
        except ReaderFailed as exc:
            raise started.failure(str(exc)) from None
        started.finish()
    return contents


def split_stream(reader: str, stream: IO[bytes], listing: list[tuple[str, int]]) -> Contents:
    """Hash a stream that holds every entry's data one after the other, cut at the listed sizes.

    A reader that wrote more or fewer bytes than its own listing says fails (a size that is
    off shows as wrong hashes of every entry after it, so the first one is named)."""
    contents: Contents = {}
    for index, (name, size) in enumerate(listing):
        digest = hashlib.sha256()
        left = size
        while left:
            block = stream.read(min(READ_SIZE, left))
            if not block:
                raise fail(
                    reader,
                    f"the data of entry {index} ({name!r}) ended after {size - left} of the {size} bytes "
                    "its listing gives",
                )
            digest.update(block)
            left -= len(block)
        add(reader, contents, name, size, digest.hexdigest())
    rest = stream.read(READ_SIZE)
    if rest:
        raise fail(reader, f"more data after the last listed entry: {rest[:200]!r}")
    return contents


def small_enough_to_extract(listing: list[tuple[str, int]]) -> bool:
    return len(listing) <= EXTRACT_MAX_ENTRIES and sum(size for _, size in listing) <= EXTRACT_MAX_BYTES


def parse_hex_lines(reader: str, output: bytes) -> Contents:
    """``<sha256> <size> <name as hex of its UTF-8>`` lines (ZipRead.java, ZipRead.cs)."""
    contents: Contents = {}
    for line in output.decode("ascii").splitlines():
        match = re.fullmatch(r"([0-9a-f]{64}) (\d+) ([0-9a-f]*)", line)
        if match is None:
            raise fail(reader, f"unexpected output line {line!r}", output)
        add(reader, contents, utf8_name(reader, bytes.fromhex(match[3])), int(match[2]), match[1])
    return contents


# -- compiled helpers -----------------------------------------------------------------------


def _cache_root() -> Path:
    """This user's folder for compiled helpers in the temporary directory (not shared with others)."""
    root = Path(tempfile.gettempdir()) / f"zipmiddleware-readers-{os.getuid()}"
    root.mkdir(mode=0o700, exist_ok=True)
    st = root.lstat()
    if root.is_symlink() or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise RuntimeError(f"{root} is not a private folder of this user")
    return root


def compiled(
    name: str, sources: list[Path], toolchain: list[str], build: Callable[[Path, Path], None]
) -> Path:
    """A folder holding what ``build(folder, scratch)`` compiled from ``sources``, built once: the
    folder is named after a hash of the sources and of the toolchain's version output, and is
    filled under another name and then renamed, so that a build cut short is never used."""
    digest = hashlib.sha256()
    for source in sources:
        digest.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
    version = subprocess.run(toolchain, capture_output=True, timeout=60, check=False, env=TOOL_ENV)
    digest.update(version.stdout + version.stderr)
    root = _cache_root()
    target = root / f"{name}-{digest.hexdigest()[:20]}"
    if target.is_dir():
        return target
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{name}-") as scratch:
        output = Path(scratch, "out")
        output.mkdir()
        build(output, Path(scratch))
        try:
            os.rename(output, target)
        except OSError:
            if not target.is_dir():  # else another process built the same just now
                raise
    return target


def _build(command: list[str | Path], env: dict[str, str] | None = None) -> None:
    result = subprocess.run(
        [str(part) for part in command], capture_output=True, timeout=600, check=False, env=env or TOOL_ENV
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{_command(command)} exited {result.returncode}:\n"
            f"{_shown(result.stdout)}\n{_shown(result.stderr)}"
        )


@functools.cache
def go_program() -> Path:
    tools = require("go")
    source = SOURCES / "zipread.go"

    def build(output: Path, scratch: Path) -> None:
        env = {
            **TOOL_ENV,
            "GOPATH": str(scratch / "gopath"),
            "GOCACHE": str(scratch / "gocache"),
            "GOTOOLCHAIN": "local",  # never download another Go
            "GOPROXY": "off",
            "GOFLAGS": "",
            "GOENV": "off",
            "CGO_ENABLED": "0",
        }
        _build([tools["go"], "build", "-trimpath", "-o", output / "zipread", source], env)

    return compiled("zipread-go", [source], [tools["go"], "version"], build) / "zipread"


@functools.cache
def java_classes() -> Path:
    tools = require("javac", "java")
    source = SOURCES / "ZipRead.java"

    def build(output: Path, scratch: Path) -> None:
        _build([tools["javac"], "-encoding", "UTF-8", "-d", output, source])

    return compiled("zipread-java", [source], [tools["javac"], "-version"], build)


@functools.cache
def mono_program() -> Path:
    tools = require("mcs", "mono")
    source = SOURCES / "ZipRead.cs"

    def build(output: Path, scratch: Path) -> None:
        _build(
            [
                tools["mcs"],
                "-nologo",
                "-warnaserror+",
                "-r:System.IO.Compression.dll",
                f"-out:{output / 'ZipRead.exe'}",
                source,
            ]
        )

    return compiled("zipread-mono", [source], [tools["mcs"], "--version"], build) / "ZipRead.exe"


# -- the readers ------------------------------------------------------------------------------


def python_zipfile(path: Path) -> Contents:
    reader = "python_zipfile"
    contents: Contents = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            with zipfile.ZipFile(path) as archive:
                for info in archive.infolist():
                    digest = hashlib.sha256()
                    size = 0
                    with archive.open(info) as member:
                        while block := member.read(READ_SIZE):
                            digest.update(block)
                            size += len(block)
                    if size != info.file_size:
                        raise fail(
                            reader,
                            f"{info.filename!r}: read {size} bytes, the directory says {info.file_size}",
                        )
                    add(reader, contents, info.filename, size, digest.hexdigest())
        except (
            zipfile.BadZipFile,
            zipfile.LargeZipFile,
            NotImplementedError,
            OSError,
            EOFError,
            ValueError,
        ) as exc:
            raise fail(reader, f"{type(exc).__name__}: {exc}") from exc
        except Warning as exc:
            raise fail(reader, f"warning {type(exc).__name__}: {exc}") from exc
    return contents


# "    5000  Stored     5000   0% 2023-11-14 22:13 92c5aad6  name": two spaces before the name.
UNZIP_V_LINE = re.compile(
    rb"^ *(?P<size>\d+) +\S+ +\d+ +-?\d+% +\S+ +\S+ +(?P<crc>[0-9a-f]{8})  (?P<name>.*)$", re.M
)


def info_zip_listing(path: Path) -> list[tuple[str, int, int]]:
    """Names, sizes and CRC-32s as ``unzip -v`` lists them, in directory order."""
    reader = "info_zip"
    result = run(reader, ["unzip", "-v", path])
    listing = [
        (utf8_name(reader, m["name"]), int(m["size"]), int(m["crc"], 16))
        for m in UNZIP_V_LINE.finditer(result.stdout)
    ]
    footer = re.search(rb"^-{8} .*?(\d+) files?\s*\Z", result.stdout, re.M | re.S)
    if footer is None or int(footer[1]) != len(listing):
        raise fail(reader, f"unzip -v listed {len(listing)} entries, its total says otherwise", result.stdout)
    return listing


def info_zip(path: Path) -> Contents:
    """See the module docstring: ``unzip -tq``, then the contents by extraction (small archives),
    one ``unzip -p`` (up to :data:`STREAM_MAX_BYTES`), or the listed CRC-32s (bigger ones)."""
    reader = "info_zip"
    require("unzip", "cat")
    test = run(reader, ["unzip", "-tq", path])
    if b"No errors detected in compressed data" not in test.stdout or re.search(rb"(?i)warning", test.stdout):
        raise fail(reader, "unzip -tq did not report 'No errors detected'", test.stdout, test.stderr)
    listing = info_zip_listing(path)
    sizes = [(name, size) for name, size, _ in listing]
    if small_enough_to_extract(sizes):
        with tempfile.TemporaryDirectory(prefix="zm-unzip-", dir=scratch(path)) as folder:
            result = run(reader, ["unzip", "-q", "-o", path, "-d", folder])
            if result.stdout.strip() or result.stderr.strip():
                raise fail(reader, "unzip -q printed something", result.stdout, result.stderr)
            return extracted(reader, Path(folder))
    if sum(size for _, size in sizes) > STREAM_MAX_BYTES:
        # unzip reads ~120 MB/s: a second pass over gigabytes costs more than it adds to -t,
        # which has checked each entry's data against the CRC-32 listed here.
        contents: Contents = {}
        for name, size, crc in listing:
            add(reader, contents, name, size, f"{CRC_ONLY}{crc:08x}")
        return contents
    return read_split(reader, ["unzip", "-p", path], sizes)


# Lines of 7-Zip's output that mean something went wrong (it exits 0 after some of them).
SEVEN_ZIP_COMPLAINTS = re.compile(
    r"warning|error|unexpected|unsupported|there are data after|can ?not open|is not archive|"
    r"headers error|unconfirmed|payload|end of archive",
    re.I,
)


def seven_zip_complaints(output: str, path: Path) -> list[str]:
    return [
        line
        for line in output.splitlines()
        if SEVEN_ZIP_COMPLAINTS.search(line)
        and not line.startswith(("Path = ", "Listing archive: "))
        and str(path) not in line
    ]


def seven_zip_listing(path: Path) -> list[tuple[str, int]]:
    """Names and sizes as ``7z l -slt`` lists them (folders left out), in its order."""
    reader = "seven_zip"
    result = run(reader, ["7z", "l", "-slt", "-sccUTF-8", path])
    text = result.stdout.decode("utf-8", "replace")
    complaints = seven_zip_complaints(text + result.stderr.decode("utf-8", "replace"), path)
    if complaints:
        raise fail(reader, f"7z l complained: {complaints[:5]}", result.stdout, result.stderr)
    _, separator, items = text.partition("\n----------\n")
    if not separator:
        raise fail(reader, "7z l -slt listed no entries", result.stdout, result.stderr)
    listing = []
    for block in items.split("\n\n"):
        fields = dict(re.findall(r"^(\w[\w ]*?) = (.*)$", block, re.M))
        if "Path" not in fields:
            continue
        if fields.get("Folder") == "+":
            raise fail(reader, f"a folder entry {fields['Path']!r}", result.stdout)
        listing.append((fields["Path"], int(fields["Size"])))
    return listing


def seven_zip(path: Path) -> Contents:
    reader = "seven_zip"
    require("7z")
    test = run(reader, ["7z", "t", "-bd", "-sccUTF-8", path])
    text = (test.stdout + test.stderr).decode("utf-8", "replace")
    complaints = seven_zip_complaints(text, path)
    if "Everything is Ok" not in text or complaints:
        raise fail(reader, f"7z t: {complaints[:5] or 'no Everything is Ok'}", test.stdout, test.stderr)
    listing = seven_zip_listing(path)
    if small_enough_to_extract(listing):
        with tempfile.TemporaryDirectory(prefix="zm-7z-", dir=scratch(path)) as folder:
            result = run(reader, ["7z", "x", "-bd", "-y", "-sccUTF-8", f"-o{folder}", path])
            complaints = seven_zip_complaints(
                (result.stdout + result.stderr).decode("utf-8", "replace"), path
            )
            if complaints:
                raise fail(reader, f"7z x: {complaints[:5]}", result.stdout, result.stderr)
            return extracted(reader, Path(folder))
    return read_split(reader, ["7z", "x", "-so", "-bd", path], listing)


def bsdtar_pipe(path: Path) -> Contents:
    reader = "bsdtar_pipe"
    require("bsdtar", "cat")
    with tempfile.TemporaryDirectory(prefix="zm-bsdtar-", dir=scratch(path)) as folder:
        # -S: runs of zeros become holes (a sparse 4.5 GB entry costs no disk space).
        command: list[str | Path] = ["bsdtar", "-x", "-S", "-f", "-", "-C", folder]
        with start(reader, command, feed=path, stdout=subprocess.DEVNULL) as started:
            started.finish()
        return extracted(reader, Path(folder))


def bsdcpio_pipe(path: Path) -> Contents:
    reader = "bsdcpio_pipe"
    require("bsdcpio", "cat")
    with tempfile.TemporaryDirectory(prefix="zm-bsdcpio-", dir=scratch(path)) as folder:
        # -C: read 1 MiB at a time (its default, 512 bytes, makes 4.5 GB cost 27 million system calls).
        command: list[str | Path] = ["bsdcpio", "-i", "-d", "--quiet", "-C", str(READ_SIZE)]
        with start(reader, command, feed=path, cwd=Path(folder), stdout=subprocess.DEVNULL) as started:
            started.finish()
        return extracted(reader, Path(folder))


def go_archive_zip_entries(path: Path) -> list[dict[str, Any]]:
    """Every entry as zipread.go gives it: its header (name, size, mode, modified in UTC,
    method) and ``sha256`` of the data that followed it."""
    reader = "go_archive_zip"
    entries = []
    with start(reader, [go_program(), path]) as started:
        stream = started.stdout
        while line := stream.readline():
            try:
                entry = json.loads(line)
            except ValueError:
                raise started.failure(f"expected an entry's header, got {line[:200]!r}") from None
            digest = hashlib.sha256()
            left = entry["size"]
            while left:
                block = stream.read(min(READ_SIZE, left))
                if not block:
                    raise started.failure(f"the data of {entry['name']!r} ended {left} bytes short")
                digest.update(block)
                left -= len(block)
            entry["sha256"] = digest.hexdigest()
            entries.append(entry)
        started.finish()
    return entries


def go_archive_zip(path: Path) -> Contents:
    reader = "go_archive_zip"
    contents: Contents = {}
    for entry in go_archive_zip_entries(path):
        name = utf8_name(reader, bytes.fromhex(entry["name_hex"]))
        add(reader, contents, name, entry["size"], entry["sha256"])
    return contents


def java_zipfile(path: Path) -> Contents:
    reader = "java_zipfile"
    classes = java_classes()
    result = run(reader, ["java", "-cp", classes, "ZipRead", "file", path])
    if result.stderr.strip():
        raise fail(reader, "java wrote to stderr", result.stdout, result.stderr)
    return parse_hex_lines(reader, result.stdout)


def java_zipinputstream(path: Path) -> Contents:
    reader = "java_zipinputstream"
    classes = java_classes()
    require("cat")
    with start(reader, ["java", "-cp", classes, "ZipRead", "stream"], feed=path) as started:
        output = started.stdout.read()
        started.finish(output)
    return parse_hex_lines(reader, output)


def mono_ziparchive(path: Path) -> Contents:
    reader = "mono_ziparchive"
    program = mono_program()
    result = run(reader, ["mono", program, path])
    if result.stderr.strip():
        raise fail(reader, "mono wrote to stderr", result.stdout, result.stderr)
    return parse_hex_lines(reader, result.stdout)


def _chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as file:
        while chunk := file.read(STREAM_CHUNK):
            yield chunk


def stream_unzip(path: Path) -> Contents:
    reader = "stream_unzip"
    try:
        from stream_unzip import UnzipError
        from stream_unzip import stream_unzip as unzip
    except ImportError:
        unavailable("needs the stream-unzip package (pip install stream-unzip; it is in the 'test' extra)")
    contents: Contents = {}
    try:
        for raw_name, _, chunks in unzip(_chunks(path), chunk_size=STREAM_CHUNK):
            digest = hashlib.sha256()
            size = 0
            for chunk in chunks:
                digest.update(chunk)
                size += len(chunk)
            add(reader, contents, utf8_name(reader, raw_name), size, digest.hexdigest())
    except UnzipError as exc:
        raise fail(reader, f"{type(exc).__name__}: {exc!r}") from exc
    return contents


READERS: dict[str, Reader] = {
    reader.__name__: reader
    for reader in (
        python_zipfile,
        info_zip,
        seven_zip,
        bsdtar_pipe,
        bsdcpio_pipe,
        go_archive_zip,
        java_zipfile,
        java_zipinputstream,
        mono_ziparchive,
        stream_unzip,
    )
}


@dataclass(frozen=True)
class Limitation:
    """What a reader cannot read by design (not a defect of the archive), and the message by
    which it says so: a failure with another message is a real failure."""

    reason: str
    message: re.Pattern[str]


# Readers that see only local headers, and so must find each entry's end from its local header.
CANNOT_READ_STORED_WITH_DESCRIPTOR = {
    "java_zipinputstream": Limitation(
        "java.util.zip.ZipInputStream refuses every STORED entry with a data descriptor, whatever "
        "its local header says",
        re.compile(r"only DEFLATED entries can have EXT descriptor"),
    ),
}
CANNOT_READ_STORED_WITHOUT_LOCAL_SIZE = {
    "stream_unzip": Limitation(
        "stream-unzip cannot read a STORED entry with a data descriptor whose local header gives "
        "size 0 (it can when the local header also has the real sizes)",
        re.compile(r"NotStreamUnzippable"),
    ),
}
