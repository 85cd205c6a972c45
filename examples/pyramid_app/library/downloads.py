"""The resolver of ``/files/<path:subpath>``: a file is sent as it is, a folder as a streamed ZIP."""

from __future__ import annotations

import os

from werkzeug.wrappers import Request

from zipmiddleware import FileTarget, ZipTarget

# The .ini's data_dir, set by library.main(), which PasteDeploy runs before it builds the filter.
DATA_DIR: str | None = None


def resolve(request: Request, subpath: str) -> FileTarget | ZipTarget | None:
    if DATA_DIR is None:
        raise RuntimeError("library.main() has not set the data folder")
    base = os.path.realpath(DATA_DIR)
    path = os.path.realpath(os.path.join(base, subpath))
    if os.path.commonpath([base, path]) != base:
        return None  # outside the data folder (.., absolute, symlink): as if it did not exist
    if os.path.isdir(path):
        return ZipTarget.from_directory(path)
    if os.path.isfile(path):
        return FileTarget(path)
    return None
