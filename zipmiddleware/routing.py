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


def load_resolver(rule: str, resolver: Resolver | str) -> Resolver:
    """Import ``"package.module:function"`` strings once, at start-up."""
    if callable(resolver):
        return resolver
    try:
        loaded = import_string(resolver)
    except ImportStringError as exc:
        raise ConfigError(f"routes[{rule!r}]", f"cannot import {resolver!r}: {exc.exception}") from None
    if not callable(loaded):
        raise ConfigError(f"routes[{rule!r}]", f"{resolver!r} is not callable")
    return loaded  # type: ignore[no-any-return]


class RouteTable:
    """Match PATH_INFO (under SCRIPT_NAME) against werkzeug rules."""

    def __init__(self, routes: Iterable[tuple[str, Resolver | str]]) -> None:
        self._resolvers: dict[str, Resolver] = {}
        self._map = Map(strict_slashes=False, merge_slashes=False, redirect_defaults=False)
        # No redirects: a request that is not exactly a download route belongs to the app.
        for rule, resolver in routes:
            self._resolvers[rule] = load_resolver(rule, resolver)
            try:
                self._map.add(Rule(rule, endpoint=rule))
            except (ValueError, LookupError) as exc:
                raise ConfigError(f"routes[{rule!r}]", f"invalid rule: {exc}") from None

    def match(self, environ: WSGIEnvironment) -> Match | None:
        adapter = self._map.bind_to_environ(environ)
        try:
            endpoint, args = adapter.match(return_rule=False)
        except HTTPException:
            return None
        return Match(endpoint, self._resolvers[endpoint], dict(args))
