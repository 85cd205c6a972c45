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

from typing import Any

WORKER_IMPORTS = "worker imported zipmiddleware from "


def post_worker_init(worker: Any) -> None:
    import zipmiddleware

    worker.log.info("%s%s", WORKER_IMPORTS, zipmiddleware.__file__)


def imported_from(log: str) -> list[str]:
    """Every file the workers of a gunicorn log reported importing zipmiddleware from."""
    return [line.split(WORKER_IMPORTS, 1)[1].strip() for line in log.splitlines() if WORKER_IMPORTS in line]
