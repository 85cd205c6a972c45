"""Settings: one frozen object, built from keyword arguments, TOML, or strings.

Every door goes through :func:`build_settings`, which checks each key against the
table below, so a typo or a bad value raises :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import difflib
import inspect
import os
import sqlite3
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from werkzeug.utils import ImportStringError, import_string

from .crccache import MEMORY, CrcCache, SQLiteCrcCache
from .deployment import gunicorn_config
from .errors import ConfigError
from .names import safe_arcname
from .routing import Resolver, load_resolver, rule_arguments

# zlib's own bounds: 0 means "store", 1-9 are deflate levels.
MIN_LEVEL, MAX_LEVEL = 0, 9
# A chunk under 1 KiB costs more in per-chunk overhead than it saves in memory; one
# over 64 MiB defeats the point of streaming in constant memory.
MIN_CHUNK, MAX_CHUNK = 1024, 64 * 1024 * 1024

# A day: a longer stall timeout is a mistake (a unit confused), not a wish.
MAX_SECONDS = 86400

TRUE_STRINGS = {"1", "true", "yes", "on"}
FALSE_STRINGS = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class Settings:
    """Validated configuration of one :class:`~zipmiddleware.ZipMiddleware`."""

    # (werkzeug rule, resolver), resolvers imported and checked against their rule.
    routes: tuple[tuple[str, Resolver], ...] = ()
    # Every served file must resolve inside one of these (after symlinks).
    roots: tuple[str, ...] = ()
    # Folder names skipped at any depth when a folder is zipped (compared case-insensitively).
    exclude: tuple[str, ...] = ()
    # File-name globs skipped when a folder is zipped (compared case-insensitively).
    ignore: tuple[str, ...] = ()
    # 256 KiB: bytes per read where data goes through the server, and the least size of a
    # body chunk. Measured through gunicorn (bench/engine_speed.py), 256 KiB sends a stored
    # ZIP the ordinary way 1.15x to 1.4x as fast as 64 KiB and about as fast as 1 MiB, at a
    # quarter of the latter's memory per download; zero-copy file data does not depend on it.
    chunk_size: int = 262144
    # Stored (0) by default: game and media files are already compressed, and
    # deflate runs at ~35 MB/s, far below disk and network speed.
    compression_level: int = 0
    # Without ZIP64 an archive cannot pass 4 GiB or 65,535 entries.
    zip64: bool = True
    # Where the CRC-32s of served files are kept (see crccache.py): an SQLite file
    # shared by every worker, or any CrcCache. None: in memory, per process.
    crc_cache: CrcCache | None = None
    # A client that accepts no bytes for this long (seconds) is dropped and its thread
    # freed; 0 turns it off. 60 s is nginx's send_timeout: long enough for a mobile link
    # that drops out for a while, short enough that stalled clients cannot pile up.
    stall_timeout: float = 60.0
    # The most file data (bytes) one Range request may read, beyond what it sends, to
    # learn CRC-32s the cache lacks; a range that needs more gets the whole archive (200).
    # 64 MiB: four times the CRC checkpoint interval, so an honest resume always fits.
    cold_range_limit: int = 64 * 1024 * 1024
    # Entries (files and folders) of the folder plans kept per process for later requests
    # (see planning.PlanCache); 0 keeps none. About 700 bytes each with their layout and
    # what the cache's check keeps (measured: bench/plan_scale.py), so at most ~140 MB.
    plan_cache_entries: int = 200_000
    # Stored file data goes from the page cache to the client's socket with sendfile where
    # the server allows it (gunicorn's sync and gthread workers without TLS: see zerocopy.py).
    zero_copy: bool = True
    # Stored entries of files say their CRC-32 and sizes after their data, in a data
    # descriptor: an archive can start before any file is read. False puts them in each local
    # header instead, for strict streaming readers (Java's ZipInputStream, stream-unzip): an
    # uncached file is then read once before it is sent (see zipengine.py).
    data_descriptors: bool = True
    # Restartable sources (see sources.py) opened ahead of the entry being sent, by a pool of
    # threads shared by the process; each holds at most 1 MiB until its turn (see fetching.py).
    # 0 turns it off. 4, measured (bench/remote_sources.py: 200 x 4 MiB, 50 ms to the first
    # byte): 4.9x the throughput of 0, ente's upper value; 8 gives 7.7x but holds 9 connections
    # per download on the origin and twice the memory, which many downloads at once multiply.
    prefetch: int = 4
    # Failures in a row a restartable source may have (each waits retry_backoff x n seconds,
    # then opens it again where it failed); ente's values. Progress starts the count again.
    retries: int = 3
    retry_backoff: float = 0.4
    # "abort": a source that still fails aborts the download (nothing damaged looks complete).
    # "skip": one that fails before its first byte is left out and listed in a last entry named
    # skipped_list_name; such archives are sent without a Content-Length.
    on_error: str = "abort"
    skipped_list_name: str = "SKIPPED FILES.txt"
    # Called with an events.EntryEvent per entry and an events.DownloadEvent per download.
    on_entry: Callable[[Any], object] | None = None
    on_download: Callable[[Any], object] | None = None
    # Prometheus metrics (see metrics.py); needs prometheus_client.
    metrics: bool = False


def _is_str_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)


def _split_lines(value: str) -> list[str]:
    """An .ini list: one item per line (paths and folder names may contain spaces)."""
    return [line.strip() for line in value.splitlines() if line.strip()]


def _str_list(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = _split_lines(value)
    elif isinstance(value, Iterable) and not isinstance(value, Mapping):
        value = list(value)
    if not _is_str_list(value):
        raise ConfigError(key, f"expected a list of strings, got {value!r}")
    return tuple(value)


def _roots(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, os.PathLike):
        value = [value]
    if not isinstance(value, str) and isinstance(value, Iterable):
        value = [os.fspath(item) if isinstance(item, os.PathLike) else item for item in value]
    return tuple(real_folder(key, item) for item in _str_list(key, value))


def real_folder(key: str, path: str | os.PathLike[str]) -> str:
    """``path`` with symlinks resolved; it must be an existing folder."""
    try:
        real = os.path.realpath(path)
    except ValueError:  # a NUL byte
        raise ConfigError(key, f"{os.fspath(path)!r} is not a valid path") from None
    if not os.path.isdir(real):
        raise ConfigError(key, f"{os.fspath(path)!r} is not an existing directory")
    return real


def _int_in(low: int, high: int) -> Callable[[str, Any], int]:
    def convert(key: str, value: Any) -> int:
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise ConfigError(key, f"expected a whole number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected a whole number, got {value!r}")
        if not low <= value <= high:
            raise ConfigError(key, f"expected a number from {low} to {high}, got {value}")
        return value

    return convert


def _seconds(key: str, value: Any) -> float:
    """A duration in seconds, 0 or more (0 turns the feature off)."""
    if isinstance(value, str):
        try:
            value = float(value.strip().removesuffix("s").strip())
        except ValueError:
            raise ConfigError(key, f"expected a number of seconds, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ConfigError(key, f"expected a number of seconds, got {value!r}")
    if not 0 <= value <= MAX_SECONDS:
        raise ConfigError(key, f"expected 0 to {MAX_SECONDS} seconds, got {value}")
    return float(value)


SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gib": 1024**3,
}


def _bytes(key: str, value: Any) -> int:
    """A size in bytes: a whole number, or a string such as ``"64 MiB"``."""
    if isinstance(value, str):
        text = value.strip().lower().replace("_", "")
        number = text.rstrip("abcdefghijklmnopqrstuvwxyz ").strip()
        unit = text[len(number) :].strip()
        if unit not in SIZE_UNITS or not number.isdigit():
            raise ConfigError(key, f"expected a size in bytes such as 67108864 or '64 MiB', got {value!r}")
        value = int(number) * SIZE_UNITS[unit]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(key, f"expected a size in bytes (0 or more), got {value!r}")
    return value


def _bool(key: str, value: Any) -> bool:
    if isinstance(value, str):
        text = value.strip().lower()
        if text in TRUE_STRINGS:
            return True
        if text in FALSE_STRINGS:
            return False
    if isinstance(value, bool):
        return value
    raise ConfigError(key, f"expected true or false, got {value!r}")


def _choice(*choices: str) -> Callable[[str, Any], str]:
    def convert(key: str, value: Any) -> str:
        text = value.strip().lower() if isinstance(value, str) else value
        if text not in choices:
            raise ConfigError(key, f"expected one of {', '.join(map(repr, choices))}, got {value!r}")
        return str(text)

    return convert


def _entry_name(key: str, value: Any) -> str:
    """A name for an entry the middleware adds: kept as it is in the archive, so it must be safe."""
    if not isinstance(value, str) or not value.strip() or safe_arcname(value) != value:
        raise ConfigError(key, f"expected a plain file name such as 'SKIPPED FILES.txt', got {value!r}")
    return value


def _callback(key: str, value: Any) -> Callable[[Any], object] | None:
    """A callable, or ``"package.module:function"``; empty or None: no callback."""
    if isinstance(value, str):
        value = value.strip()
        if not value:
            return None
        try:
            value = import_string(value)
        except ImportStringError as exc:
            raise ConfigError(key, f"{value!r} is not importable: {exc.exception}") from None
    if value is None or callable(value):
        return value  # type: ignore[no-any-return]
    raise ConfigError(key, f"expected a callable or 'package.module:function', got {value!r}")


def _metrics(key: str, value: Any) -> bool:
    enabled = _bool(key, value)
    if enabled:
        from .metrics import get_metrics

        try:
            get_metrics(True)
        except ImportError as exc:
            raise ConfigError(key, str(exc)) from None
        except ConfigError as exc:  # PROMETHEUS_MULTIPROC_DIR unusable
            raise ConfigError(key, exc.problem) from None
    return enabled


def _split_route_line(line: str) -> tuple[str, str]:
    """``RULE = RESOLVER``, split at the first ``=`` outside a ``<converter(arg=...)>``."""
    depth = 0
    for index, char in enumerate(line):
        depth += {"<": 1, ">": -1}.get(char, 0)
        if char == "=" and depth == 0:
            return line[:index].strip(), line[index + 1 :].strip()
    return "", ""


def _inline_table(text: str) -> dict[str, Any] | None:
    """A TOML inline table, ``{ resolver = "directory", root = "/srv" }``; None if incomplete."""
    try:
        return tomllib.loads(f"value = {text}")["value"]  # type: ignore[no-any-return]
    except tomllib.TOMLDecodeError:
        return None


def _route_lines(key: str, value: str) -> dict[str, Any]:
    """Routes as an .ini gives them: lines of ``RULE = package.module:function`` or
    ``RULE = { resolver = "directory", root = "/srv/games" }`` (a table may go on over
    several lines, which are joined with spaces)."""
    routes: dict[str, Any] = {}
    lines = iter(value.splitlines())
    for line in lines:
        line = line.strip()
        if not line:
            continue
        rule, resolver = _split_route_line(line)
        if not rule or not resolver:
            raise ConfigError(key, f"expected lines of 'RULE = package.module:function', got {line!r}")
        if resolver.startswith("{"):
            table = _inline_table(resolver)
            while table is None:
                more = next(lines, None)
                if more is None:
                    raise ConfigError(
                        f"{key}[{rule!r}]",
                        f'expected a table {{ resolver = "directory", root = "/srv" }}, got {resolver!r}',
                    )
                resolver = f"{resolver} {more.strip()}"
                table = _inline_table(resolver)
            routes[rule] = table
        else:
            routes[rule] = resolver
    return routes


def _route_table(key: str, table: Mapping[str, Any]) -> Any:
    """``{ resolver = NAME, **parameters }``: call a built-in or imported factory with them."""
    from .resolvers import BUILT_IN  # resolvers -> planning -> config: imported when needed

    built_in = "a built-in resolver (" + ", ".join(BUILT_IN) + ")"
    parameters = dict(table)
    name = parameters.pop("resolver", None)
    if not isinstance(name, str) or not name:
        raise ConfigError(
            f"{key}.resolver",
            f"expected {built_in} or 'package.module:factory', got {name!r}",
        )
    factory = BUILT_IN.get(name)
    if factory is None:
        try:
            factory = import_string(name)
        except ImportStringError as exc:
            close = difflib.get_close_matches(name.lower(), BUILT_IN, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"{key}.resolver",
                f"{name!r} is neither {built_in} nor importable{hint}: {exc.exception}",
            ) from None
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # a callable without a signature: let the call decide
        signature = None
    if signature is not None:
        takes = ", ".join(signature.parameters) or "no parameters"
        if not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
            for parameter in parameters:
                if parameter not in signature.parameters:
                    close = difflib.get_close_matches(str(parameter), signature.parameters, n=1)
                    hint = f"did you mean {close[0]!r}? " if close else ""
                    raise ConfigError(f"{key}.{parameter}", f"{name} takes no such parameter ({hint}{takes})")
        try:
            signature.bind(**parameters)
        except TypeError as exc:
            raise ConfigError(key, f"{name} takes {takes}: {exc}") from None
    try:
        resolver = factory(**parameters)
    except ConfigError as exc:
        raise ConfigError(f"{key}.{exc.key}", exc.problem) from None
    if not callable(resolver):
        raise ConfigError(f"{key}.resolver", f"{name}(...) returned {resolver!r}, which is not callable")
    return resolver


def _routes(key: str, value: Any) -> tuple[tuple[str, Resolver], ...]:
    """Routes: a mapping rule -> resolver, or (.ini) lines of ``RULE = RESOLVER``.

    A resolver is a callable, a ``"package.module:function"`` string, or a table
    naming a factory and its parameters (see :mod:`zipmiddleware.resolvers`).
    """
    if isinstance(value, str):
        value = _route_lines(key, value)
    if not isinstance(value, Mapping):
        raise ConfigError(key, f"expected a mapping of rule -> resolver, got {value!r}")
    routes = []
    for rule, resolver in value.items():
        where = f"{key}[{rule!r}]"
        if not isinstance(rule, str) or not rule.startswith("/"):
            raise ConfigError(where, "a rule is a path starting with '/'")
        arguments = rule_arguments(where, rule)
        if isinstance(resolver, Mapping):
            resolver = _route_table(where, resolver)
        elif not (callable(resolver) or isinstance(resolver, str)):
            raise ConfigError(
                where,
                f"expected a callable, 'package.module:function' or a resolver table, got {resolver!r}",
            )
        routes.append((rule, load_resolver(where, resolver, arguments)))
    return tuple(routes)


def _crc_cache(key: str, value: Any) -> CrcCache | None:
    """An SQLite file path, ``":memory:"``, a database URL, or an object with ``get_many``/``put_many``.

    Empty or None: the default, a per-user file chosen by each worker (see crccache.py).
    A path is checked now, by writing to it as the user gunicorn's workers will run as.
    A URL (text with "://"): ``sqlite:////srv/crc.sqlite`` is that file, as its path would be;
    any other (``postgresql+psycopg://user:password@host/db``) is a store that many hosts share
    (see crcdatabase.py): its URL and driver are checked now, not the database (one that is down
    when the application starts does not stop it).
    """
    if isinstance(value, str):
        value = value.strip()
    if value is None or value == "":
        return None
    if isinstance(value, str) and "://" in value:
        scheme, _, rest = value.partition("://")
        if scheme.split("+")[0].lower() != "sqlite":
            from .crcdatabase import DatabaseCrcCache

            try:
                return DatabaseCrcCache(value)
            except ConfigError as exc:  # named as the setting was spelt
                raise ConfigError(key, exc.problem) from None
        from urllib.parse import unquote

        path = unquote(rest[1:]) if rest.startswith("/") and "?" not in rest else None
        if rest and (path is None or (path and path != MEMORY and not os.path.isabs(path))):
            raise ConfigError(key, f"expected sqlite:////absolute/file.sqlite (4 slashes), got {value!r}")
        value = path or MEMORY
    if value == MEMORY:
        return SQLiteCrcCache(MEMORY)
    if isinstance(value, (str, os.PathLike)):
        if not os.path.isabs(value):  # relative to whichever folder the server started in: a slip
            raise ConfigError(key, f"expected an absolute file path or {MEMORY!r}, got {value!r}")
        try:
            cache = SQLiteCrcCache(value)
            cache.check_writable_as(_worker_user())
        except (ValueError, OSError, sqlite3.Error) as exc:
            problem = f"expected an SQLite file the workers can write, {value!s}: {exc}"
            raise ConfigError(key, problem) from None
        return cache
    if isinstance(value, CrcCache):
        return value
    raise ConfigError(key, f"expected a file path or an object with get_many and put_many, got {value!r}")


def _worker_user() -> Callable[[], None] | None:
    """If gunicorn is loading the app as one user for workers that run as another
    (``--user``/``--group``), what makes a process that user, exactly as gunicorn does."""
    cfg = gunicorn_config()
    if cfg is None:
        return None
    try:
        uid, gid, initgroups = cfg.uid, cfg.gid, cfg.initgroups
        from gunicorn.util import set_owner_process  # type: ignore[import-untyped]
    except Exception:  # a gunicorn we do not know: check as this process
        return None
    if (uid, gid) == (os.geteuid(), os.getegid()):
        return None
    return lambda: set_owner_process(uid, gid, initgroups=initgroups)


CONVERTERS: dict[str, Callable[[str, Any], Any]] = {
    "routes": _routes,
    "roots": _roots,
    "exclude": _str_list,
    "ignore": _str_list,
    "chunk_size": _int_in(MIN_CHUNK, MAX_CHUNK),
    "compression_level": _int_in(MIN_LEVEL, MAX_LEVEL),
    "zip64": _bool,
    "crc_cache": _crc_cache,
    "stall_timeout": _seconds,
    "cold_range_limit": _bytes,
    "plan_cache_entries": _int_in(0, 10**9),
    "zero_copy": _bool,
    "data_descriptors": _bool,
    "prefetch": _int_in(0, 8),
    "retries": _int_in(0, 10),
    "retry_backoff": _seconds,
    "on_error": _choice("abort", "skip"),
    "skipped_list_name": _entry_name,
    "on_entry": _callback,
    "on_download": _callback,
    "metrics": _metrics,
}


# How each door spells the keys. Keyword arguments, TOML and .ini use the names of
# CONVERTERS; Flask's app.config uses the names the original plan gave them.
FLASK_PREFIX = "ZIPSTREAM_"
FLASK_NAMES: dict[str, str] = {
    **{key: FLASK_PREFIX + key.upper() for key in CONVERTERS},
    "zip64": FLASK_PREFIX + "ENABLE_ZIP64",
}


def _unknown(name: str, known: Iterable[str]) -> ConfigError:
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return ConfigError(name, f"unknown setting ({hint}known settings: {', '.join(known)})")


def build_settings(options: Mapping[str, Any], names: Mapping[str, str] | None = None) -> Settings:
    """Check and convert every key; unknown keys and bad values raise :class:`ConfigError`.

    ``names`` maps each key to its spelling in the door it came through, so that
    errors name the key as the user wrote it.
    """
    names = names or {}
    values = {}
    for key, value in options.items():
        convert = CONVERTERS.get(key)
        if convert is None:
            raise _unknown(key, CONVERTERS)
        values[key] = convert(names.get(key, key), value)
    # A built-in resolver's root (directory(root=...)) is a root of the middleware too.
    roots = [*values.get("roots", ())]
    for _, resolver in values.get("routes", ()):
        roots += [root for root in getattr(resolver, "roots", ()) if root not in roots]
    if roots:
        values["roots"] = tuple(roots)
    # A built-in resolver that lists folders itself (s3) skips what the middleware's walks skip.
    for _, resolver in values.get("routes", ()):
        use_rules = getattr(resolver, "use_rules", None)
        if callable(use_rules):
            use_rules(values.get("exclude", ()), values.get("ignore", ()))
    return Settings(**values)


def flask_settings(config: Mapping[str, Any]) -> Settings:
    """Settings from Flask's ``app.config``: every ``ZIPSTREAM_*`` key (see FLASK_NAMES)."""
    keys = {name: key for key, name in FLASK_NAMES.items()}
    options = {}
    for name, value in config.items():
        if not isinstance(name, str) or not name.startswith(FLASK_PREFIX):
            continue
        if name not in keys:
            raise _unknown(name, keys)
        options[keys[name]] = value
    return build_settings(options, FLASK_NAMES)


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read the ``[zipmiddleware]`` table of a TOML file."""
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(os.fspath(path), f"not valid TOML: {exc}") from None
    table = document.get("zipmiddleware")
    if not isinstance(table, dict):
        raise ConfigError("zipmiddleware", f"{os.fspath(path)} has no [zipmiddleware] table")
    return table
