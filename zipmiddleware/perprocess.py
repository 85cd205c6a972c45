"""Things a process makes once and a forked child must make again: thread pools (a child's copy
of the parent's has no threads) and connection pools (a child must not share the parent's
sockets)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class PerProcess(Generic[T]):
    """Call it for this process's one ``make()``: made on first use, and again after a fork."""

    def __init__(self, make: Callable[[], T]) -> None:
        self._make = make
        self._lock = threading.Lock()
        self._made: tuple[int, T] | None = None

    def __call__(self) -> T:
        pid, made = os.getpid(), self._made
        if made is None or made[0] != pid:
            with self._lock:
                made = self._made
                if made is None or made[0] != pid:
                    made = self._made = (pid, self._make())
        return made[1]
