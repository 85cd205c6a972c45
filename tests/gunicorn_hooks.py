"""A gunicorn settings file (``gunicorn -c tests/gunicorn_hooks.py ...``) that makes the worker
say which zipmiddleware it runs.

The virtualenv has the project installed in editable mode, so a test run from a
second checkout of the project (an older commit, to show that a test fails
there) could serve the installed copy instead of the one beside the test without
anyone noticing. With this file the worker logs the module's file once the app is
loaded, and the test checks it against the folder it expects.

gunicorn ignores names here that are not its settings, so ``WORKER_IMPORTS`` is
for the tests only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

WORKER_IMPORTS = "worker imported zipmiddleware from "


def post_worker_init(worker: Any) -> None:
    import zipmiddleware

    worker.log.info("%s%s", WORKER_IMPORTS, zipmiddleware.__file__)


def imported_from(log: str) -> list[str]:
    """Every file the workers of a gunicorn log reported importing zipmiddleware from."""
    return [line.split(WORKER_IMPORTS, 1)[1].strip() for line in log.splitlines() if WORKER_IMPORTS in line]


def this_checkout_runs(log: Callable[[], str], timeout: float = 10) -> list[str]:
    """Wait until the workers of a server started with this file have said which zipmiddleware
    they imported, and check it is the one beside these tests; the files they named."""
    expected = str(Path(__file__).resolve().parent.parent / "zipmiddleware" / "__init__.py")
    deadline = time.monotonic() + timeout
    while not imported_from(log()) and time.monotonic() < deadline:
        time.sleep(0.05)
    found = imported_from(log())
    assert found and all(path == expected for path in found), (expected, found)
    return found
