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
    assert (settings.chunk_size, settings.compression_level, settings.zip64) == (65536, 0, True)
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
        ("exclude", [1, 2], "exclude: expected a list of strings"),
        ("routes", {"download": "x:y"}, "routes['download']: a rule is a path starting with '/'"),
        ("routes", {"/d/<x>": 42}, "routes['/d/<x>']: expected a callable"),
        ("routes", {"/d/<x>": "no.such.module:resolve"}, "routes['/d/<x>']: cannot import"),
        ("routes", {"/d/<bad:x>": resolve}, "routes['/d/<bad:x>']: invalid rule"),
        ("chunksize", 65536, "chunksize: unknown setting"),
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
