"""Settings from keyword arguments, TOML files and PasteDeploy-style strings."""

from __future__ import annotations

from pathlib import Path

import pytest

from zipmiddleware import ConfigError, ZipMiddleware
from zipmiddleware.config import Settings, build_settings
from zipmiddleware.paste import filter_app_factory

from .conftest import plain_app


def resolve(request, **args):  # used as "tests.test_config:resolve"
    return None


def test_defaults_are_the_contracts() -> None:
    settings = ZipMiddleware(plain_app).settings
    assert (settings.chunk_size, settings.compression_level, settings.zip64) == (262144, 0, True)
    assert settings.roots == settings.exclude == settings.ignore == ()


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("chunk_size", 100, "chunk_size: expected a number from 1024"),
        ("chunk_size", "lots", "chunk_size: expected a whole number"),
        ("chunk_size", 1.5, "chunk_size: expected a whole number"),
        ("chunk_size", True, "chunk_size: expected a whole number"),
        ("compression_level", 10, "compression_level: expected a number from 0 to 9"),
        ("compression_level", -1, "compression_level: expected a number from 0 to 9"),
        ("zip64", "maybe", "zip64: expected true or false"),
        ("zip64", 2, "zip64: expected true or false"),
        ("roots", ["/definitely/not/here"], "roots: '/definitely/not/here' is not an existing directory"),
        ("roots", ["/srv/a\0b"], "roots: '/srv/a\\x00b' is not a valid path"),
        ("crc_cache", "memory", "crc_cache: expected an absolute file path"),
        ("stall_timeout", "soon", "stall_timeout: expected a number of seconds"),
        ("stall_timeout", 10**6, "stall_timeout: expected 0 to 86400 seconds"),
        ("cold_range_limit", "64 MB", "cold_range_limit: expected a size in bytes"),
        ("cold_range_limit", -1, "cold_range_limit: expected a size in bytes"),
        ("exclude", [1, 2], "exclude: expected a list of strings"),
        ("routes", {"download": "x:y"}, "routes['download']: a rule is a path starting with '/'"),
        ("routes", {"/d/<x>": 42}, "routes['/d/<x>']: expected a callable"),
        ("routes", {"/d/<x>": "no.such.module:resolve"}, "routes['/d/<x>']: cannot import"),
        ("routes", {"/d/<bad:x>": resolve}, "routes['/d/<bad:x>']: invalid rule"),
        ("chunksize", 65536, "chunksize: unknown setting"),
        ("prefetch", 9, "prefetch: expected a number from 0 to 8"),
        ("retries", -1, "retries: expected a number from 0 to 10"),
        ("retry_backoff", "later", "retry_backoff: expected a number of seconds"),
        ("on_error", "ignore", "on_error: expected one of 'abort', 'skip'"),
        ("skipped_list_name", "../x.txt", "skipped_list_name: expected a plain file name"),
        ("skipped_list_name", "", "skipped_list_name: expected a plain file name"),
        ("on_entry", 42, "on_entry: expected a callable"),
        ("on_download", "no.such.module:hook", "on_download: 'no.such.module:hook' is not importable"),
    ],
    ids=lambda v: str(v)[:30],
)
def test_bad_values_name_the_key(key: str, value: object, expected: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        ZipMiddleware(plain_app, **{key: value})
    assert str(info.value).startswith(expected)
    assert info.value.key.startswith(key)


def test_string_values_as_pastedeploy_delivers_them(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b c").mkdir()
    settings = build_settings(
        {
            "roots": f"\n{tmp_path / 'a'}\n{tmp_path / 'b c'}\n",
            "exclude": "updates\nOld Versions",
            "ignore": "*.nfo\n*.sfv",
            "chunk_size": " 131072 ",
            "compression_level": "6",
            "zip64": "false",
            "routes": "\n/download/<int:game_id> = tests.test_config:resolve\n/files/<path:sub>=tests.test_config:resolve\n",
        }
    )
    assert settings == Settings(
        routes=(("/download/<int:game_id>", resolve), ("/files/<path:sub>", resolve)),
        roots=(str(tmp_path / "a"), str(tmp_path / "b c")),
        exclude=("updates", "Old Versions"),
        ignore=("*.nfo", "*.sfv"),
        chunk_size=131072,
        compression_level=6,
        zip64=False,
    )


def test_a_one_line_list_is_one_item(tmp_path: Path) -> None:
    (tmp_path / "My Games").mkdir()
    settings = build_settings({"roots": str(tmp_path / "My Games"), "exclude": "Old Versions"})
    assert settings.roots == (str(tmp_path / "My Games"),)
    assert settings.exclude == ("Old Versions",)


def test_bad_route_line_names_the_key() -> None:
    with pytest.raises(ConfigError, match="^routes: expected lines of 'RULE = package.module:function'"):
        build_settings({"routes": "/download/<int:x> tests.test_config:resolve"})


def test_paste_filter_builds_the_middleware(tmp_path: Path) -> None:
    middleware = filter_app_factory(
        plain_app, {"here": str(tmp_path)}, roots=str(tmp_path), routes="/d/<x> = tests.test_config:resolve"
    )
    assert isinstance(middleware, ZipMiddleware)
    assert middleware.settings.roots == (str(tmp_path.resolve()),)
    with pytest.raises(ConfigError, match="^chunk_sise: unknown setting"):
        filter_app_factory(plain_app, {}, chunk_sise="1")


def test_from_config_reads_toml(tmp_path: Path) -> None:
    config = tmp_path / "zipmiddleware.toml"
    config.write_text(
        f"""
[zipmiddleware]
roots = ["{tmp_path}"]
exclude = ["updates", "extras"]
chunk_size = 131072
compression_level = 9

[zipmiddleware.routes]
"/download/<int:game_id>" = "tests.test_config:resolve"
""",
        encoding="utf-8",
    )
    middleware = ZipMiddleware.from_config(plain_app, config)
    assert middleware.settings.chunk_size == 131072
    assert middleware.settings.compression_level == 9
    assert middleware.settings.routes == (("/download/<int:game_id>", resolve),)
    assert ZipMiddleware.from_config(plain_app, config, chunk_size=4096).settings.chunk_size == 4096


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[zipmiddleware]\nchunk_size = 'big'\n", "^chunk_size: expected a whole number"),
        ("[zipmiddleware]\ncolour = 'red'\n", "^colour: unknown setting"),
        ("[other]\nx = 1\n", "^zipmiddleware: .* has no \\[zipmiddleware\\] table"),
        ("[zipmiddleware\n", "not valid TOML"),
    ],
)
def test_from_config_errors(tmp_path: Path, text: str, expected: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=expected):
        ZipMiddleware.from_config(plain_app, config)


# -- one settings model, four doors ------------------------------------------------------------


def factory(greeting: str, times: int = 1):  # used as "tests.test_config:factory" in a table
    def resolver(request, **args):
        return None

    resolver.greeting = greeting * times  # type: ignore[attr-defined]
    return resolver


def entry_hook(event: object) -> None:  # on_entry, by reference and by name
    pass


def download_hook(event: object) -> None:  # on_download, by reference and by name
    pass


def summary(settings: Settings) -> dict[str, object]:
    """Settings as comparable values: a resolver by what it is, not by identity."""

    def describe(resolver: object) -> object:
        if hasattr(resolver, "greeting"):
            return resolver.greeting
        return repr(resolver) if hasattr(resolver, "roots") or hasattr(resolver, "bucket") else resolver

    fields = {name: getattr(settings, name) for name in Settings.__dataclass_fields__}
    fields["routes"] = tuple((rule, describe(resolver)) for rule, resolver in settings.routes)
    fields["crc_cache"] = getattr(settings.crc_cache, "path", settings.crc_cache)
    return fields


@pytest.fixture
def door_tree(tmp_path: Path) -> Path:
    for name in ("games", "more games", "shared"):
        (tmp_path / name).mkdir()
    return tmp_path


def settings_by_door(door: str, tree: Path) -> Settings:
    """The same configuration, written as each door takes it."""
    games, more, shared, cache = tree / "games", tree / "more games", tree / "shared", tree / "crc.sqlite"
    routes = {  # as Python code writes them (keywords, Flask)
        "/download/<int:game_id>": "tests.test_config:resolve",
        "/files/<path:subpath>": {"resolver": "directory", "root": str(shared)},
        "/hello/<name>": {"resolver": "tests.test_config:factory", "greeting": "hi", "times": 2},
        "/objects/<path:key>": {"resolver": "s3", "bucket": "my-games", "prefix": "games/"},
    }
    if door == "keywords":
        return ZipMiddleware(
            plain_app,
            routes=routes,
            roots=[str(games), str(more)],
            exclude=["updates", "Old Versions"],
            ignore=["*.nfo", "file_id.diz"],
            chunk_size=131072,
            compression_level=6,
            zip64=False,
            crc_cache=str(cache),
            stall_timeout=12.5,
            cold_range_limit=1048576,
            zero_copy=False,
            data_descriptors=False,
            prefetch=2,
            retries=5,
            retry_backoff=0.25,
            on_error="skip",
            skipped_list_name="missing.txt",
            on_entry=entry_hook,
            on_download="tests.test_config:download_hook",
        ).settings
    if door == "toml":
        config = tree / "zipmiddleware.toml"
        config.write_text(
            f"""
[zipmiddleware]
roots = ["{games}", "{more}"]
exclude = ["updates", "Old Versions"]
ignore = ["*.nfo", "file_id.diz"]
chunk_size = 131072
compression_level = 6
zip64 = false
crc_cache = "{cache}"
stall_timeout = 12.5
cold_range_limit = "1 MiB"
zero_copy = false
data_descriptors = false
prefetch = 2
retries = 5
retry_backoff = 0.25
on_error = "skip"
skipped_list_name = "missing.txt"
on_entry = "tests.test_config:entry_hook"
on_download = "tests.test_config:download_hook"

[zipmiddleware.routes]
"/download/<int:game_id>" = "tests.test_config:resolve"
"/files/<path:subpath>" = {{ resolver = "directory", root = "{shared}" }}

[zipmiddleware.routes."/hello/<name>"]
resolver = "tests.test_config:factory"
greeting = "hi"
times = 2

[zipmiddleware.routes."/objects/<path:key>"]
resolver = "s3"
bucket = "my-games"
prefix = "games/"
""",
            encoding="utf-8",
        )
        return ZipMiddleware.from_config(plain_app, config).settings
    if door == "ini":
        ini = tree / "app.ini"
        ini.write_text(
            f"""
[DEFAULT]
shared = {shared}

[app:main]
use = call:tests.test_config:paste_app_factory
filter-with = downloads

[filter:downloads]
use = egg:zipmiddleware#main
roots =
    {games}
    {more}
exclude =
    updates
    Old Versions
ignore =
    *.nfo
    file_id.diz
chunk_size = 131072
compression_level = 6
zip64 = false
crc_cache = {cache}
stall_timeout = 12.5
cold_range_limit = 1MiB
zero_copy = false
data_descriptors = false
prefetch = 2
retries = 5
retry_backoff = 0.25s
on_error = skip
skipped_list_name = missing.txt
on_entry = tests.test_config:entry_hook
on_download = tests.test_config:download_hook
routes =
    /download/<int:game_id> = tests.test_config:resolve
    /files/<path:subpath> = {{ resolver = "directory",
                               root = "%(shared)s" }}
    /hello/<name> = {{ resolver = "tests.test_config:factory", greeting = "hi", times = 2 }}
    /objects/<path:key> = {{ resolver = "s3", bucket = "my-games",
                            prefix = "games/" }}
""",
            encoding="utf-8",
        )
        from paste.deploy import loadapp

        return loadapp(f"config:{ini}").settings  # type: ignore[no-any-return]
    if door == "flask":
        from flask import Flask

        from zipmiddleware.flask import Downloads

        app = Flask(__name__)
        app.config.update(
            ZIPSTREAM_ROUTES=routes,
            ZIPSTREAM_ROOTS=[str(games), str(more)],
            ZIPSTREAM_EXCLUDE=["updates", "Old Versions"],
            ZIPSTREAM_IGNORE=["*.nfo", "file_id.diz"],
            ZIPSTREAM_CHUNK_SIZE=131072,
            ZIPSTREAM_COMPRESSION_LEVEL=6,
            ZIPSTREAM_ENABLE_ZIP64=False,
            ZIPSTREAM_CRC_CACHE=str(cache),
            ZIPSTREAM_STALL_TIMEOUT=12.5,
            ZIPSTREAM_COLD_RANGE_LIMIT=1048576,
            ZIPSTREAM_ZERO_COPY=False,
            ZIPSTREAM_DATA_DESCRIPTORS=False,
            ZIPSTREAM_PREFETCH=2,
            ZIPSTREAM_RETRIES=5,
            ZIPSTREAM_RETRY_BACKOFF=0.25,
            ZIPSTREAM_ON_ERROR="SKIP",
            ZIPSTREAM_SKIPPED_LIST_NAME="missing.txt",
            ZIPSTREAM_ON_ENTRY="tests.test_config:entry_hook",
            ZIPSTREAM_ON_DOWNLOAD=download_hook,
        )
        return Downloads().init_app(app).settings
    raise AssertionError(door)


def paste_app_factory(global_conf: dict[str, str]) -> object:  # [app:main] of the .ini door
    return plain_app


DOORS = ["keywords", "toml", "ini", "flask"]


@pytest.mark.parametrize("door", DOORS)
def test_every_door_gives_the_same_settings(door: str, door_tree: Path) -> None:
    built = settings_by_door(door, door_tree)
    # The s3 resolver lists folders itself: it was handed the same exclude and ignore rules.
    s3_resolver = dict(built.routes)["/objects/<path:key>"]
    assert s3_resolver.argument is None and s3_resolver.subpath({"key": "a/b"}) == "a/b"
    assert s3_resolver.rules.excluded("UPDATES") and s3_resolver.rules.ignored("readme.NFO")
    assert not s3_resolver.rules.ignored("readme.txt")
    settings = summary(built)
    assert settings == {
        "routes": (
            ("/download/<int:game_id>", resolve),
            ("/files/<path:subpath>", f"directory(root={str(door_tree / 'shared')!r})"),
            ("/hello/<name>", "hihi"),
            ("/objects/<path:key>", "s3(bucket='my-games', prefix='games/')"),
        ),
        # the directory resolver's root is a root too
        "roots": (str(door_tree / "games"), str(door_tree / "more games"), str(door_tree / "shared")),
        "exclude": ("updates", "Old Versions"),
        "ignore": ("*.nfo", "file_id.diz"),
        "chunk_size": 131072,
        "compression_level": 6,
        "zip64": False,
        "crc_cache": str(door_tree / "crc.sqlite"),
        "stall_timeout": 12.5,
        "cold_range_limit": 1048576,
        "zero_copy": False,
        "data_descriptors": False,
        "prefetch": 2,
        "retries": 5,
        "retry_backoff": 0.25,
        "on_error": "skip",
        "skipped_list_name": "missing.txt",
        "on_entry": entry_hook,
        "on_download": download_hook,
        "plan_cache_entries": 200_000,  # the default: no door sets it here
        "metrics": False,
    }


# What each door calls a key, and a bad value for it as that door would carry it.
SPELLINGS = {
    "keywords": {"chunk_size": "chunk_size", "zip64": "zip64", "routes": "routes"},
    "toml": {"chunk_size": "chunk_size", "zip64": "zip64", "routes": "routes"},
    "ini": {"chunk_size": "chunk_size", "zip64": "zip64", "routes": "routes"},
    "flask": {
        "chunk_size": "ZIPSTREAM_CHUNK_SIZE",
        "zip64": "ZIPSTREAM_ENABLE_ZIP64",
        "routes": "ZIPSTREAM_ROUTES",
    },
}


def open_door(door: str, options: dict[str, object], tmp_path: Path) -> None:
    """Build a middleware from ``options`` (keyed by each door's own spelling) through ``door``."""
    if door == "keywords":
        ZipMiddleware(plain_app, **options)  # type: ignore[arg-type]
    elif door == "toml":
        import json

        lines = ["[zipmiddleware]"] + [f"{key} = {json.dumps(value)}" for key, value in options.items()]
        config = tmp_path / "door.toml"
        config.write_text("\n".join(lines) + "\n", encoding="utf-8")
        ZipMiddleware.from_config(plain_app, config)
    elif door == "ini":
        filter_app_factory(plain_app, {}, **{key: str(value) for key, value in options.items()})
    else:
        from flask import Flask

        from zipmiddleware.flask import Downloads

        app = Flask(__name__)
        app.config.update(options)
        Downloads(app)


@pytest.mark.parametrize("door", DOORS)
@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("chunk_size", "lots", "expected a whole number, got 'lots'"),
        ("chunk_size", "12", "expected a number from 1024 to 67108864, got 12"),
        ("zip64", "maybe", "expected true or false, got 'maybe'"),
    ],
)
def test_every_door_names_the_key_of_a_bad_value(
    door: str, key: str, value: str, problem: str, tmp_path: Path
) -> None:
    spelled = SPELLINGS[door][key]
    with pytest.raises(ConfigError) as info:
        open_door(door, {spelled: value}, tmp_path)
    assert str(info.value) == f"{spelled}: {problem}"
    assert info.value.key == spelled


@pytest.mark.parametrize(
    ("door", "typo", "suggestion"),
    [
        ("keywords", "chunksize", "chunk_size"),
        ("toml", "compresion_level", "compression_level"),
        ("ini", "zip_64", "zip64"),
        ("flask", "ZIPSTREAM_CHUNKSIZE", "ZIPSTREAM_CHUNK_SIZE"),
        ("flask", "ZIPSTREAM_ZIP64", "ZIPSTREAM_ENABLE_ZIP64"),
    ],
)
def test_every_door_rejects_an_unknown_key_and_suggests_one(
    door: str, typo: str, suggestion: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError) as info:
        open_door(door, {typo: "1"}, tmp_path)
    assert info.value.key == typo
    assert str(info.value).startswith(f"{typo}: unknown setting (did you mean {suggestion!r}?")


def test_flask_door_reads_only_its_prefix() -> None:
    from flask import Flask

    from zipmiddleware.flask import Downloads

    app = Flask(__name__)
    app.config.update(SECRET_KEY="x", ZIPSTREAMING=1, CHUNK_SIZE="nonsense", ZIPSTREAM_CHUNK_SIZE="8192")
    assert Downloads().init_app(app).settings.chunk_size == 8192


@pytest.mark.parametrize(
    ("routes", "message"),
    [
        ({"/f/<path:p>": {"root": "/"}}, "^routes\\['/f/<path:p>'\\].resolver: expected a built-in resolver"),
        (
            {"/f/<path:p>": {"resolver": "zip"}},
            "^routes\\['/f/<path:p>'\\].resolver: 'zip' is neither a built-in",
        ),
        (
            {"/f/<path:p>": {"resolver": "directory", "rot": "/"}},
            "^routes\\['/f/<path:p>'\\].rot: directory takes no such parameter \\(did you mean 'root'\\? root, argument\\)",
        ),
        (
            {"/f/<path:p>": {"resolver": "directory", "root": "/", 1: "x"}},
            "^routes\\['/f/<path:p>'\\].1: directory takes no such parameter \\(root, argument\\)",
        ),
        (
            {"/f/<path:p>": {"resolver": "Directroy", "root": "/"}},
            "^routes\\['/f/<path:p>'\\].resolver: 'Directroy' is neither a built-in .* \\(did you mean 'directory'\\?\\)",
        ),
        (
            {"/f/<path:p>": {"resolver": "directory"}},
            "^routes\\['/f/<path:p>'\\]: directory takes root, argument: ",
        ),
        (
            {"/f/<path:p>": {"resolver": "directory", "root": "/definitely/not/here"}},
            "^routes\\['/f/<path:p>'\\].root: '/definitely/not/here' is not an existing directory",
        ),
        (
            {"/f/<int:a>/<int:b>": {"resolver": "directory", "root": "/"}},
            "^routes\\['/f/<int:a>/<int:b>'\\].argument: say which",
        ),
        (
            {"/f/<int:id>": {"resolver": "sql", "url": "sqlite://", "query": "SELECT 1 WHERE :ident = 1"}},
            "^routes\\['/f/<int:id>'\\].query: binds ident, which the request does not give",
        ),
        ("/f/<p> = { resolver = 'directory', root = '/'", "^routes\\['/f/<p>'\\]: expected a table"),
    ],
    ids=lambda v: str(v)[:40],
)
def test_resolver_tables_name_the_key(routes: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_settings({"routes": routes})


def test_ini_route_table_may_span_lines_and_hold_equals_signs(tmp_path: Path) -> None:
    database = tmp_path / "app.db"
    settings = build_settings(
        {
            "routes": f"""
            /requests/<int:id> = {{ resolver = "sql", url = "sqlite:///{database}",
                query = "SELECT status, path FROM requests
                         WHERE id = :id AND user_name = :remote_user" }}
            /files/<path:subpath> = {{ resolver = "directory", root = "{tmp_path}" }}
            """
        }
    )
    (rule, sql_resolver), (_, directory_resolver) = settings.routes
    assert rule == "/requests/<int:id>"
    assert sql_resolver.parameters == {"id", "remote_user"}
    query = " ".join(str(sql_resolver.statement).split())
    assert query == "SELECT status, path FROM requests WHERE id = :id AND user_name = :remote_user"
    assert directory_resolver.root == str(tmp_path)


def test_readme_documents_every_key_in_every_door() -> None:
    from zipmiddleware.config import CONVERTERS, FLASK_NAMES

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("## Settings") :]
    table = table[: table.index("How each door writes a value")]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    documented = {row.split("|")[1].strip().strip("`"): row for row in rows}
    assert set(documented) == set(CONVERTERS)
    for key, row in documented.items():
        assert f"`{FLASK_NAMES[key]}`" in row, f"README: the Flask spelling of {key} is missing"
