"""Built-in resolvers, usable from configuration alone.

Each name here is a *factory*: called with its parameters, it returns a resolver.
In a TOML file, an .ini or ``app.config`` a route says which one and with what::

    "/files/<path:subpath>" = { resolver = "directory", root = "/srv/games" }
    "/requests/<int:id>" = { resolver = "sql", url = "sqlite:///app.db", query = "SELECT ..." }
    "/objects/<path:subpath>" = { resolver = "s3", bucket = "my-games", prefix = "games/" }

A built-in resolver's ``root`` is added to the middleware's ``roots``, so a route
configured this way needs nothing else.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any

from werkzeug.wrappers import Request

from .config import real_folder
from .confinement import is_inside
from .errors import ConfigError
from .targets import FileTarget, StrPath, ZipTarget

if TYPE_CHECKING:
    from .s3 import S3Resolver  # imported when used: boto3 is needed only then

# Route arguments a path-serving resolver looks for, in this order, when the rule has several.
PATH_ARGUMENTS = ("subpath", "path")


def _real_folder(key: str, root: Any) -> str:
    if not isinstance(root, (str, os.PathLike)) or not os.fspath(root):
        raise ConfigError(key, f"expected a folder path, got {root!r}")
    return real_folder(key, root)


class PathResolver:
    """What resolvers that serve the path a route captured share: which argument holds it.

    ``argument`` names it; by default ``subpath``, ``path``, or the rule's only argument.
    """

    def __init__(self, argument: str | None = None) -> None:
        if argument is not None and not isinstance(argument, str):
            raise ConfigError("argument", f"expected the name of a route argument, got {argument!r}")
        self.argument = argument

    def check_arguments(self, names: Collection[str]) -> None:
        """Called for each rule this resolver serves: one argument must hold the path."""
        if self.argument is not None and self.argument not in names:
            raise ConfigError("argument", f"the rule has no argument {self.argument!r}")
        if self.argument is None and len(names) > 1 and not any(name in names for name in PATH_ARGUMENTS):
            raise ConfigError("argument", f"say which argument holds the path: {sorted(names)}")

    def subpath(self, args: Mapping[str, Any]) -> str:
        """The captured path: the named argument, else ``subpath``, ``path`` or the only one."""
        if self.argument is not None:
            return str(args[self.argument])
        for name in PATH_ARGUMENTS:
            if name in args:
                return str(args[name])
        return str(next(iter(args.values()))) if len(args) == 1 else ""


class DirectoryResolver(PathResolver):
    """Serve what lies under ``root`` at the captured path: a file as it is, a folder as a ZIP.

    A folder is zipped with the middleware's ``exclude`` and ``ignore`` rules, and a
    folder left with one file is sent as that file. A path that does not exist, or
    that leads outside ``root`` (``..``, an absolute path, a symlink), is a 404.
    """

    def __init__(self, root: StrPath, argument: str | None = None) -> None:
        self.root = _real_folder("root", root)
        self.roots = (self.root,)
        # What it returns is opened inside this root only, not any of the middleware's roots,
        # so that a symlink swapped in cannot lead one route into another route's files.
        self.confine_to = self.roots
        super().__init__(argument)

    def __repr__(self) -> str:
        return f"directory(root={self.root!r})"

    def __call__(self, request: Request, **args: Any) -> FileTarget | ZipTarget | None:
        subpath = self.subpath(args)
        try:
            path = os.path.realpath(os.path.join(self.root, subpath))
        except (ValueError, OSError):  # a NUL byte; a link replaced by a folder while it was read
            return None
        if not is_inside(path, self.root):
            return None
        if os.path.isdir(path):
            return ZipTarget.from_directory(path)
        if os.path.isfile(path):
            return FileTarget(path)
        return None


def directory(root: StrPath, argument: str | None = None) -> DirectoryResolver:
    """A resolver serving the files and folders under ``root`` (see :class:`DirectoryResolver`).

    ``argument`` names the route argument holding the path below ``root``; by default
    ``subpath``, ``path``, or the rule's only argument. A rule with none serves ``root``.

    >>> ZipMiddleware(app, routes={"/files/<path:subpath>": directory(root="/srv/games")})
    """
    return DirectoryResolver(root, argument)


class SQLResolver:
    """Run a query per request and answer with its first row (a status row, see the README).

    The route's arguments and ``remote_user`` (the request's ``REMOTE_USER``, or
    None) are bound as parameters, so ``WHERE user_name = :remote_user`` scopes a
    request to its user. The query runs in a transaction that is rolled back.
    """

    def __init__(self, url: str, query: str, root: StrPath | None = None) -> None:
        try:
            import sqlalchemy
        except ImportError:
            raise ConfigError(
                "resolver", "the sql resolver needs SQLAlchemy: pip install 'zipmiddleware[sql]'"
            ) from None
        if not isinstance(url, str) or not url:
            raise ConfigError("url", f"expected a database URL, got {url!r}")
        try:
            self.url = sqlalchemy.engine.make_url(url)
            self.url.get_dialect().import_dbapi()  # the driver must import now, not at the first request
        except Exception as exc:  # ArgumentError, NoSuchModuleError, ImportError of a driver
            raise ConfigError("url", f"cannot use {_hidden_password(url)!r}: {exc}") from None
        if not isinstance(query, str) or not query.strip():
            raise ConfigError("query", f"expected an SQL query, got {query!r}")
        self.statement = sqlalchemy.text(query)
        self.parameters = frozenset(self.statement.compile().binds)
        if "remote_user" in self.parameters:  # typed, so that PostgreSQL can compare a NULL
            self.statement = self.statement.bindparams(
                sqlalchemy.bindparam("remote_user", type_=sqlalchemy.String)
            )
        self.root = None if root is None else _real_folder("root", root)
        self.roots = () if self.root is None else (self.root,)
        self._engine: Any = None
        self._engine_pid = 0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"sql(url={self.url.render_as_string(hide_password=True)!r})"

    def check_arguments(self, names: Collection[str]) -> None:
        """Every parameter of the query must be a route argument or ``remote_user``."""
        unknown = self.parameters - set(names) - {"remote_user"}
        if unknown:
            known = ", ".join(sorted({*names, "remote_user"}))
            raise ConfigError(
                "query",
                f"binds {', '.join(sorted(unknown))}, which the request does not give (it gives: {known})",
            )

    def engine(self) -> Any:
        """One engine (and connection pool) per process: pools must not cross a fork."""
        with self._lock:
            if self._engine is None or self._engine_pid != os.getpid():
                import sqlalchemy

                if self._engine is not None:
                    self._engine.dispose(close=False)  # the parent's connections stay the parent's
                self._engine = sqlalchemy.create_engine(self.url, pool_pre_ping=True)
                self._engine_pid = os.getpid()
            return self._engine

    def __call__(self, request: Request, **args: Any) -> dict[str, Any] | None:
        values = {**args, "remote_user": request.remote_user}
        bound = {name: values[name] for name in self.parameters}
        with self.engine().connect() as connection:
            row = connection.execute(self.statement, bound).mappings().first()
        if row is None:
            return None
        found = dict(row)
        path = found.get("path")
        if self.root is not None and isinstance(path, str) and path and not os.path.isabs(path):
            found["path"] = os.path.join(self.root, path)
        return found


def sql(url: str, query: str, root: StrPath | None = None) -> SQLResolver:
    """A resolver that looks each request up in a database (see :class:`SQLResolver`).

    ``url`` is an SQLAlchemy database URL (``sqlite:///app.db``,
    ``postgresql+psycopg://user@host/db``); ``root``, if given, is where relative
    paths in the rows lie.
    """
    return SQLResolver(url, query, root)


def _hidden_password(url: str) -> str:
    try:
        import sqlalchemy

        return str(sqlalchemy.engine.make_url(url).render_as_string(hide_password=True))
    except Exception:
        return "<database URL>"


def s3(
    bucket: str,
    prefix: str = "",
    endpoint_url: str | None = None,
    region_name: str | None = None,
    argument: str | None = None,
) -> S3Resolver:
    """A resolver serving the objects of ``bucket`` below ``prefix``: an object as it is, a
    "folder" of keys as a ZIP (see :class:`zipmiddleware.s3.S3Resolver`). Needs boto3.

    ``endpoint_url`` is that of a store other than AWS (MinIO, Ceph, R2...); ``region_name``
    the bucket's region where boto3's configuration does not say it; ``argument`` names the
    route argument holding the path below ``prefix`` (by default ``subpath``, ``path``, or the
    rule's only argument; a rule with none serves the whole prefix).

    >>> ZipMiddleware(app, routes={"/games/<path:subpath>": s3(bucket="my-games", prefix="games/")})
    """
    try:
        from .s3 import S3Resolver
    except ImportError as exc:
        if (exc.name or "").partition(".")[0] not in ("boto3", "botocore"):
            raise
        needs = "the s3 resolver needs boto3: pip install 'zipmiddleware[s3]'"
        raise ConfigError("resolver", needs) from None
    return S3Resolver(bucket, prefix, endpoint_url, region_name, argument)


BUILT_IN: Mapping[str, Any] = {"directory": directory, "sql": sql, "s3": s3}
