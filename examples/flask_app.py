"""A small game library: Flask serves the pages, zipmiddleware serves the downloads.

Run it with ``make demo`` (gunicorn, see gunicorn.conf.py) or ``python flask_app.py``, then open
http://127.0.0.1:8000/ (``make demo PORT=8080``: port 8080; ``python flask_app.py``: port 5000).

A download goes as in the systems this grew from:

1. The page POSTs /games/<id>/requests, which writes a download_requests row as 'processing'.
2. A background thread prepares the download (here it only waits, then looks at the game's
   folder) and sets the row to 'available' (one file), 'streaming_ready' (a folder, zipped as
   it is sent) or 'failed' (with the reason in its ``error`` column, which users never see).
3. The page polls /requests/<id>; once the row is ready it shows a "Save" link to
   /download/<id>, which the user clicks. zipmiddleware answers it from the row alone through its
   built-in ``sql`` resolver: this app holds no download code, only configuration.

Environment:

* ``ZM_DEMO_DATA``: where the games and the database live (default: data/ next to this file).
* ``ZM_DEMO_PREPARE_SECONDS``: how long preparing a download takes (default 3).
* ``ZM_DEMO_POLL_SECONDS``: how often the page asks how a download is doing (default 2).
* ``ZM_DEMO_BIG_GAME_GIB``: the size of "Megalith", a game of sparse files (default 5, so that
  its ZIP needs ZIP64 and takes a while to download; 0 leaves it out).

The sample games are written on the first start and kept; a game missing from the data folder
is written on the next start. Delete the data folder to start afresh.
"""

from __future__ import annotations

import fnmatch
import os
import random
import shutil
import sqlite3
import threading
import time
import uuid
from contextlib import closing
from pathlib import Path
from typing import Any

from flask import Flask, abort, jsonify, render_template_string, request, url_for

from zipmiddleware.events import DownloadEvent
from zipmiddleware.flask import Downloads


def number_from_env(name: str, default: float) -> float:
    return float(os.environ.get(name) or default)


DATA = Path(os.environ.get("ZM_DEMO_DATA") or Path(__file__).resolve().parent / "data")
GAMES = DATA / "games"
DATABASE = DATA / "library.db"
PREPARE_SECONDS = number_from_env("ZM_DEMO_PREPARE_SECONDS", 3)
POLL_SECONDS = number_from_env("ZM_DEMO_POLL_SECONDS", 2)
BIG_GAME_BYTES = int(number_from_env("ZM_DEMO_BIG_GAME_GIB", 5) * (1 << 30))

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
# A game of several GiB, so that ZIP64 and a long download can be seen. Its big files are
# sparse (holes, see SPARSE_FROM): written in an instant, taking no disk space, read as zeros.
BIG_GAME = "Megalith"
if BIG_GAME_BYTES > 0:
    SAMPLE_GAMES[BIG_GAME] = {
        "megalith.exe": 256 << 10,
        "data/world.pak": BIG_GAME_BYTES - BIG_GAME_BYTES // 10,
        "data/movies.pak": BIG_GAME_BYTES // 10,
    }
SPARSE_FROM = 64 << 20  # sample files this big are holes, not random bytes
SAMPLE_MTIME = 1_700_000_000  # fixed, so repeated starts give byte-identical archives


def write_sample_file(path: Path, seed: str, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if size >= SPARSE_FROM:
        path.touch()
        os.truncate(path, size)
    else:
        path.write_bytes(random.Random(seed).randbytes(size))
    os.utime(path, (SAMPLE_MTIME, SAMPLE_MTIME))


def create_sample_library() -> None:
    """Write the sample games that are missing, and the database."""
    GAMES.mkdir(parents=True, exist_ok=True)
    for game, files in SAMPLE_GAMES.items():
        if (GAMES / game).is_dir():
            continue
        staging = DATA / f".game-{uuid.uuid4().hex}"
        staging.mkdir()
        for name, size in files.items():
            write_sample_file(staging / name, f"{game}/{name}", size)
        try:
            staging.rename(GAMES / game)  # atomic: another process never sees half a game
        except OSError:
            shutil.rmtree(staging)
            if not (GAMES / game).is_dir():
                raise
    with closing(connect()) as db, db:
        db.execute("PRAGMA journal_mode = WAL")  # readers do not wait for a download being prepared
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
                error TEXT,
                created_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP);
            CREATE TABLE IF NOT EXISTS completed_downloads (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                request_id INTEGER REFERENCES download_requests (id),
                user_name TEXT NOT NULL,
                download_name TEXT NOT NULL,
                bytes INTEGER NOT NULL,
                seconds REAL NOT NULL,
                finished_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP);
            """
        )
        columns = {row["name"] for row in db.execute("PRAGMA table_info(download_requests)")}
        if "error" not in columns:  # a database made by an earlier version of this demo
            db.execute("ALTER TABLE download_requests ADD COLUMN error TEXT")
        db.executemany(
            "INSERT OR IGNORE INTO games (name, path) VALUES (?, ?)", [(game, game) for game in SAMPLE_GAMES]
        )


def connect() -> sqlite3.Connection:
    db = sqlite3.connect(DATABASE, timeout=10)
    db.row_factory = sqlite3.Row
    return db


def user_of(req: Any) -> str:
    return req.remote_user or "guest"


def record_download(event: DownloadEvent) -> None:
    """on_download: every download that reached its last byte becomes a completed_downloads row
    (a resumed one counts once, when the part that ends it completes)."""
    if event.status != "complete" or (event.range is not None and event.range[1] != event.total):
        return
    with closing(connect()) as db, db:
        db.execute(
            "INSERT INTO completed_downloads (request_id, user_name, download_name, bytes, seconds)"
            " VALUES (?, ?, ?, ?, ?)",
            (
                event.route_args.get("request_id"),
                event.remote_user or "guest",
                event.download_name,
                event.bytes_sent,
                round(event.duration, 3),
            ),
        )


create_sample_library()
app = Flask(__name__)
app.config.update(
    ZIPSTREAM_ROUTES={
        "/download/<int:request_id>": {
            "resolver": "sql",
            "url": f"sqlite:///{DATABASE}",
            "query": "SELECT status, path, download_name, error FROM download_requests"
            " WHERE id = :request_id AND user_name = COALESCE(:remote_user, 'guest')",
        }
    },
    ZIPSTREAM_ROOTS=[str(GAMES)],
    ZIPSTREAM_EXCLUDE=["updates", "extras"],
    ZIPSTREAM_IGNORE=["*.nfo", "*.sfv", "file_id.diz"],
    ZIPSTREAM_CHUNK_SIZE=262144,
    ZIPSTREAM_COMPRESSION_LEVEL=0,
    ZIPSTREAM_ENABLE_ZIP64=True,
    ZIPSTREAM_CRC_CACHE=str(DATA / "crc-cache.sqlite"),
    ZIPSTREAM_ON_DOWNLOAD=record_download,
)
Downloads(app)
# The middleware answers /download/... before Flask sees it; the rule is here only for url_for.
app.add_url_rule("/download/<int:request_id>", "download", build_only=True)


def downloadable_files(folder: Path) -> list[Path]:
    """The files a download of ``folder`` holds: the middleware's exclude and ignore rules."""
    exclude = {name.casefold() for name in app.config["ZIPSTREAM_EXCLUDE"]}
    ignore = [pattern.casefold() for pattern in app.config["ZIPSTREAM_IGNORE"]]
    return sorted(
        path
        for path in folder.rglob("*")
        if path.is_file()
        and not any(part.casefold() in exclude for part in path.relative_to(folder).parts[:-1])
        and not any(fnmatch.fnmatch(path.name.casefold(), pattern) for pattern in ignore)
    )


def human_size(size: int) -> str:
    """Bytes for people: 3145728 -> '3.0 MiB'."""
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if round(value, 1) < 1024:
            return f"{value:.1f} {unit}"
    return f"{value / 1024:.1f} TiB"


# -- download requests -------------------------------------------------------------------------


def prepare_download(request_id: int, game: str, folder: Path) -> None:
    """The background step: where a real library would fetch or unpack the game, this one waits."""
    try:
        time.sleep(PREPARE_SECONDS)
        if not folder.is_dir():
            raise FileNotFoundError(f"game folder {folder} is missing")
        files = downloadable_files(folder)
        if not files:
            raise FileNotFoundError(f"game folder {folder} holds nothing to download")
        if len(files) == 1:  # sent as that file, not zipped
            status, path, download_name = "available", files[0], files[0].name
        else:
            status, path, download_name = "streaming_ready", folder, f"{game}.zip"
        with closing(connect()) as db, db:
            db.execute(
                "UPDATE download_requests SET status = ?, path = ?, download_name = ? WHERE id = ?",
                (status, str(path), download_name, request_id),
            )
    except Exception as exc:
        app.logger.exception("preparing download request %d failed", request_id)
        try:
            with closing(connect()) as db, db:
                db.execute(
                    "UPDATE download_requests SET status = 'failed', error = ? WHERE id = ?",
                    (f"{type(exc).__name__}: {exc}", request_id),
                )
        except sqlite3.Error:
            app.logger.exception("could not mark download request %d as failed", request_id)


def describe(row: sqlite3.Row) -> dict[str, Any]:
    """What the page learns about a request: never its path or its error text."""
    ready = row["status"] in ("available", "streaming_ready")
    return {
        "id": row["id"],
        "game": row["game"],
        "status": row["status"],
        "download_name": row["download_name"] if ready else None,
        "status_url": url_for("request_status", request_id=row["id"]),
        "download_url": url_for("download", request_id=row["id"]),
    }


def find_request(request_id: int) -> sqlite3.Row | None:
    with closing(connect()) as db:
        return db.execute(
            "SELECT r.id, g.name AS game, r.status, r.download_name"
            " FROM download_requests AS r LEFT JOIN games AS g ON g.id = r.game_id"
            " WHERE r.id = ? AND r.user_name = ?",
            (request_id, user_of(request)),
        ).fetchone()


@app.post("/games/<int:game_id>/requests")
def request_download(game_id: int):
    with closing(connect()) as db, db:
        game = db.execute("SELECT name, path FROM games WHERE id = ?", (game_id,)).fetchone()
        if game is None:
            abort(404)
        cursor = db.execute(
            "INSERT INTO download_requests (game_id, user_name, status) VALUES (?, ?, 'processing')",
            (game_id, user_of(request)),
        )
    request_id = cursor.lastrowid
    threading.Thread(
        target=prepare_download,
        args=(request_id, game["name"], GAMES / game["path"]),
        name=f"prepare-download-{request_id}",
        daemon=True,
    ).start()
    body = describe(find_request(request_id))
    return jsonify(body), 201, {"Location": body["status_url"]}


@app.get("/requests/<int:request_id>")
def request_status(request_id: int):
    found = find_request(request_id)
    if found is None:
        abort(404)
    return jsonify(describe(found))


# -- the page ----------------------------------------------------------------------------------

PAGE = """<!doctype html>
<html lang="en">
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Game library</title>
<link rel="icon" href="data:,">
<style>
  :root { --accent: #2456c7; --muted: #5f6b7a; --line: #e2e6ec; --ok: #17703a; --bad: #b3261e; }
  body { font: 16px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d232b;
         max-width: 60rem; margin: 2.5rem auto; padding: 0 1.25rem; }
  h1 { margin: 0 0 .25rem; font-size: 1.8rem; }
  .lead { margin: 0 0 1.5rem; color: var(--muted); }
  table { width: 100%; border-collapse: collapse; }
  th, td { padding: .65rem .75rem; border-bottom: 1px solid var(--line); text-align: left; }
  th { font-size: .75rem; font-weight: 600; letter-spacing: .05em; text-transform: uppercase;
       color: var(--muted); }
  .size, .files { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
  .name { font-weight: 600; }
  .action { width: 1%; padding-left: 1.5rem; }
  .status { width: 40%; color: var(--muted); }
  tr[data-state="processing"] .status, tr[data-state="pending"] .status { font-style: italic; }
  button.download { font: inherit; font-size: .9rem; padding: .35rem .95rem; border: 0;
                    border-radius: .4rem; background: var(--accent); color: #fff; cursor: pointer; }
  button.download:hover { filter: brightness(1.1); }
  button.download:disabled { opacity: .45; cursor: progress; }
  a.ready { color: var(--ok); font-weight: 600; }
  .error { color: var(--bad); }
  footer { margin-top: 2rem; font-size: .85rem; color: var(--muted); }
  code { font-size: .9em; }
</style>
<h1>Game library</h1>
<p class="lead">Each download is prepared in the background, then served by zipmiddleware:
  a game of one file as that file, any other as a ZIP built while it is sent.</p>
<table id="games">
  <thead>
    <tr>
      <th>Game</th><th class="size">Size</th><th class="files">Files</th>
      <th class="action"></th><th>Status</th>
    </tr>
  </thead>
  <tbody>
  {%- for game in games %}
    <tr data-game="{{ game.name }}" data-request-url="{{ game.request_url }}" data-state="idle">
      <td class="name">{{ game.name }}</td>
      <td class="size" data-bytes="{{ game.bytes }}">{{ game.size }}</td>
      <td class="files">{{ game.files }}</td>
      <td class="action"><button type="button" class="download">Download</button></td>
      <td class="status" aria-live="polite"></td>
    </tr>
  {%- endfor %}
  </tbody>
</table>
<footer>
  Sizes and file counts are those of the download: <code>updates</code> and <code>extras</code>
  folders and <code>.nfo</code>, <code>.sfv</code> and <code>file_id.diz</code> files are left out.
  {%- if big_game %}
  {{ big_game }} is mostly sparse files (holes on disk): a long download
  {%- if big_game_zip64 %}, and a ZIP past 4 GiB, which needs ZIP64{% endif %}.
  {%- endif %}
</footer>
<script>
"use strict";
const POLL_MS = {{ poll_ms }};
const WAITING = new Set(["pending", "processing"]);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function show(row, state, content) {
  row.dataset.state = state;
  row.querySelector(".status").replaceChildren(content);
}

function showError(row, text) {
  const message = document.createElement("span");
  message.className = "error";
  message.textContent = text;
  show(row, "failed", message);
}

async function getJSON(url, options = {}) {
  const response = await fetch(url, {...options, headers: {Accept: "application/json"}});
  if (!response.ok) {
    throw new Error(`${response.status} ${response.statusText}`);
  }
  return response.json();
}

async function download(row) {
  const button = row.querySelector("button.download");
  button.disabled = true;
  show(row, "processing", "Preparing…");
  try {
    let job = await getJSON(row.dataset.requestUrl, {method: "POST"});
    while (WAITING.has(job.status)) {
      show(row, job.status, "Preparing…");
      await sleep(POLL_MS);
      job = await getJSON(job.status_url);
    }
    if (job.status === "failed") {
      showError(row, "This download could not be prepared. Please try again later.");
      return;
    }
    const link = document.createElement("a");
    link.className = "ready";
    link.href = job.download_url;
    link.download = "";  // the server names the file
    link.textContent = `Save ${job.download_name}`;
    // The user starts the download with this link. A script's link.click() once polling ends
    // is an automatic download to the browser, and a page gets one of those until the user
    // acts again (Chromium drops the rest): of two games ready with no click between, one was lost.
    show(row, "ready", link);
  } catch (error) {
    console.error(error);
    showError(row, "Something went wrong. Please try again.");
  } finally {
    button.disabled = false;
  }
}

for (const button of document.querySelectorAll("button.download")) {
  button.addEventListener("click", () => download(button.closest("tr")));
}
</script>
</html>
"""


@app.get("/")
def index():
    with closing(connect()) as db:
        rows = db.execute("SELECT id, name, path FROM games ORDER BY name").fetchall()
    games = []
    for row in rows:
        if row["name"] not in SAMPLE_GAMES:  # left out on this start (ZM_DEMO_BIG_GAME_GIB=0)
            continue
        files = downloadable_files(GAMES / row["path"])
        size = sum(path.stat().st_size for path in files)
        games.append(
            {
                "name": row["name"],
                "bytes": size,
                "size": human_size(size),
                "files": len(files),
                "request_url": url_for("request_download", game_id=row["id"]),
            }
        )
    return render_template_string(
        PAGE,
        games=games,
        poll_ms=round(POLL_SECONDS * 1000),
        big_game=BIG_GAME if BIG_GAME in SAMPLE_GAMES else None,
        big_game_zip64=BIG_GAME_BYTES >= 4 << 30,
    )


if __name__ == "__main__":
    app.run(debug=True)
