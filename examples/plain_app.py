"""Plain WSGI: any folder under /srv/files (or $FILES_ROOT) downloads as a ZIP, any file as itself.

    gunicorn -k gthread --threads 8 -b 127.0.0.1:8000 plain_app:application
"""

import os

from zipmiddleware import FileTarget, ZipMiddleware, ZipTarget

FILES_ROOT = os.environ.get("FILES_ROOT", "/srv/files")


def app(environ, start_response):  # your application: everything but /files/...
    start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
    return [b"Try /files/<folder> or /files/<folder>/<file>\n"]


def resolve(request, subpath):
    path = os.path.join(FILES_ROOT, subpath)  # ZipMiddleware refuses anything outside roots
    if os.path.isdir(path):
        return ZipTarget.from_directory(path)
    return FileTarget(path) if os.path.isfile(path) else None


application = ZipMiddleware(app, routes={"/files/<path:subpath>": resolve}, roots=[FILES_ROOT])
