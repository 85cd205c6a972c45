"""A small game library: Flask serves the pages, ZipMiddleware serves the downloads.

Run it with ``make demo`` (gunicorn, see gunicorn.conf.py) or ``python flask_app.py``.
On first start, sample games are generated under $ZM_DEMO_DATA (default: data/ next to this file).
"""

from __future__ import annotations

import fnmatch
import os
import random
import shutil
import sqlite3
import tempfile
from contextlib import closing
from pathlib import Path

from flask import Flask, abort, jsonify, render_template_string, request, url_for

from zipmiddleware import ZipMiddleware

DATA = Path(os.environ.get("ZM_DEMO_DATA") or Path(__file__).resolve().parent / "data")
GAMES = DATA / "games"
DATABASE = DATA / "library.db"
EXCLUDE = ["updates", "extras"]  # folders left out of a game's ZIP, at any depth
IGNORE = ["*.nfo", "*.sfv", "file_id.diz"]  # scene files left out of a game's ZIP

# Sample games: folder -> {file: size in bytes}. Contents are seeded random bytes, so every
# start produces the same files (and the same ZIP archives).
SAMPLE_GAMES = {
    "Doom (1993)": {"DOOM.ZIP": 3 << 20, "DOOM.NFO": 2 << 10},  # one file once the .nfo is ignored
    "Quake": {"quake.iso": 2 << 20},
    "Commander Keen": {
        "KEEN1.EXE": 96 << 10,
        "data/LEVEL01.CK1": 24 << 10,
        "data/LEVEL02.CK1": 24 << 10,
        "data/gfx/EGAGRAPH.CK1": 256 << 10,
        "file_id.diz": 1 << 10,
        "updates/keen-1.31-patch.zip": 64 << 10,
        "extras/manual.pdf": 128 << 10,
    },
    "Ōkami Fan Edition": {
        "okami.exe": 512 << 10,
        "data/brushes/sumi-e.pak": 1 << 20,
        "data/music/title.ogg": 384 << 10,
        "Ōkami.nfo": 2 << 10,
        "extras/artbook/cover.png": 256 << 10,
    },
}
SAMPLE_MTIME = 1_700_000_000  # fixed, so repeated starts give byte-identical archives


def create_sample_library() -> None:
    """Write the sample games and the database, unless they exist already."""
    DATA.mkdir(parents=True, exist_ok=True)
    if not GAMES.exists():
        staging = Path(tempfile.mkdtemp(prefix=".games-", dir=DATA))
        for game, files in SAMPLE_GAMES.items():
            for name, size in files.items():
                path = staging / game / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(random.Random(f"{game}/{name}").randbytes(size))
                os.utime(path, (SAMPLE_MTIME, SAMPLE_MTIME))
        try:
            staging.rename(GAMES)  # atomic: a second process starting at once cannot see half a library
        except OSError:
            shutil.rmtree(staging)
    with closing(connect()) as db, db:
        db.executescript(
            """
            CREATE TABLE IF NOT EXISTS games (
                id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, path TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS download_requests (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                game_id INTEGER NOT NULL REFERENCES games (id),
                user_name TEXT NOT NULL,
                status TEXT NOT NULL CHECK (status IN
                    ('pending', 'processing', 'available', 'streaming_ready', 'failed')),
                path TEXT,
                download_name TEXT,
                created_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP);
            """
        )
        db.executemany(
            "INSERT OR IGNORE INTO games (id, name, path) VALUES (?, ?, ?)",
            [(number, game, game) for number, game in enumerate(SAMPLE_GAMES, start=1)],
        )


def connect() -> sqlite3.Connection:
    db = sqlite3.connect(DATABASE, timeout=10)
    db.row_factory = sqlite3.Row
    return db


def user_of(req) -> str:
    return req.remote_user or "guest"


def downloadable_files(folder: Path) -> list[Path]:
    """The files a download of ``folder`` holds: the same exclude/ignore rules as the middleware."""
    return [
        path
        for path in folder.rglob("*")
        if path.is_file()
        and not any(part.casefold() in EXCLUDE for part in path.relative_to(folder).parts[:-1])
        and not any(fnmatch.fnmatch(path.name.casefold(), pattern) for pattern in IGNORE)
    ]


def resolve_download(request, request_id: int) -> sqlite3.Row | None:
    """ZipMiddleware resolver for /download/<request_id>: the request's row is the answer.

    'available' / 'streaming_ready' + path -> the file, or the folder as a streamed ZIP;
    'pending' / 'processing' -> 202 with Retry-After; 'failed' -> an error; no row -> 404.
    """
    with closing(connect()) as db:
        return db.execute(
            "SELECT status, path, download_name FROM download_requests WHERE id = ? AND user_name = ?",
            (request_id, user_of(request)),
        ).fetchone()


create_sample_library()
app = Flask(__name__)
app.wsgi_app = ZipMiddleware(
    app.wsgi_app,
    routes={"/download/<int:request_id>": resolve_download},
    roots=[str(GAMES)],
    exclude=EXCLUDE,
    ignore=IGNORE,
    chunk_size=65536,
    compression_level=0,
    zip64=True,
)
# ZipMiddleware answers /download/... before Flask sees it; the rule is here only for url_for.
app.add_url_rule("/download/<int:request_id>", "download", build_only=True)

PAGE = """<!doctype html>
<meta charset="utf-8">
<title>Game library</title>
<h1>Game library</h1>
<ul>
{% for game in games %}
  <li>{{ game.name }}
    <button data-url="{{ url_for('request_download', game_id=game.id) }}"
            onclick="requestDownload(this.dataset.url)">Download</button>
{% endfor %}
</ul>
<script>
async function requestDownload(url) {
  const response = await fetch(url, {method: "POST"});
  location = (await response.json()).download_url;
}
</script>
"""


@app.get("/")
def index():
    with closing(connect()) as db:
        games = db.execute("SELECT id, name FROM games ORDER BY name").fetchall()
    return render_template_string(PAGE, games=games)


@app.post("/games/<int:game_id>/request")
def request_download(game_id: int):
    with closing(connect()) as db, db:
        game = db.execute("SELECT name, path FROM games WHERE id = ?", (game_id,)).fetchone()
        if game is None:
            abort(404)
        folder = GAMES / game["path"]
        single = len(downloadable_files(folder)) == 1  # sent as that file, not zipped
        status = "available" if single else "streaming_ready"
        cursor = db.execute(
            "INSERT INTO download_requests (game_id, user_name, status, path, download_name)"
            " VALUES (?, ?, ?, ?, ?)",
            (game_id, user_of(request), status, str(folder), None if single else f"{game['name']}.zip"),
        )
    request_id = cursor.lastrowid
    return jsonify(id=request_id, status=status, download_url=url_for("download", request_id=request_id)), 201


@app.get("/requests/<int:request_id>")
def request_status(request_id: int):
    with closing(connect()) as db:
        row = db.execute(
            "SELECT id, game_id, status, created_at FROM download_requests WHERE id = ? AND user_name = ?",
            (request_id, user_of(request)),
        ).fetchone()
    if row is None:
        abort(404)
    return jsonify({**dict(row), "download_url": url_for("download", request_id=request_id)})


if __name__ == "__main__":
    app.run(debug=True)
