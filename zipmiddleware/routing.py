"""The route table: werkzeug rules mapped to resolvers. Pure; no I/O."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from werkzeug.exceptions import HTTPException
from werkzeug.routing import Map, Rule
from werkzeug.utils import ImportStringError, import_string

from .errors import ConfigError
from .types import WSGIEnvironment

Resolver = Callable[..., Any]


@dataclass(frozen=True)
class Match:
    rule: str
    resolver: Resolver
    args: dict[str, Any]


def _new_map() -> Map:
    # No redirects: a request that is not exactly a download route belongs to the app.
    return Map(strict_slashes=False, merge_slashes=False, redirect_defaults=False)


def rule_arguments(key: str, rule: str) -> set[str]:
    """The names a werkzeug rule captures; an invalid rule raises :class:`ConfigError`."""
    parsed = Rule(rule, endpoint=rule)
    try:
        _new_map().add(parsed)
    except (ValueError, LookupError) as exc:
        raise ConfigError(key, f"invalid rule: {exc}") from None
    return set(parsed.arguments)


def load_resolver(key: str, resolver: Resolver | str, arguments: set[str]) -> Resolver:
    """Import a ``"package.module:function"`` string, and let the resolver check the rule's arguments."""
    if isinstance(resolver, str):
        try:
            resolver = import_string(resolver)
        except ImportStringError as exc:
            raise ConfigError(key, f"cannot import {resolver!r}: {exc.exception}") from None
    if not callable(resolver):
        raise ConfigError(key, f"{resolver!r} is not callable")
    check = getattr(resolver, "check_arguments", None)
    if callable(check):  # the built-in resolvers: which argument holds the path, what a query binds
        try:
            check(arguments)
        except ConfigError as exc:
            raise ConfigError(f"{key}.{exc.key}", exc.problem) from None
    return resolver


class RouteTable:
    """Match PATH_INFO (under SCRIPT_NAME) against werkzeug rules (checked in config.py)."""

    def __init__(self, routes: Iterable[tuple[str, Resolver]]) -> None:
        self._resolvers: dict[str, Resolver] = {}
        self._map = _new_map()
        for rule, resolver in routes:
            self._resolvers[rule] = resolver
            self._map.add(Rule(rule, endpoint=rule))

    def match(self, environ: WSGIEnvironment) -> Match | None:
        adapter = self._map.bind_to_environ(environ)
        try:
            endpoint, args = adapter.match(return_rule=False)
        except HTTPException:
            return None
        return Match(endpoint, self._resolvers[endpoint], dict(args))
