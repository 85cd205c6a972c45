"""A FastAPI app whose downloads zipmiddleware serves, configured by settings alone.

Run it with ``uvicorn fastapi_app:app`` in this folder (``pip install 'zipmiddleware[asgi]'
fastapi uvicorn``), then try:

* http://127.0.0.1:8000/api/games: the app's own JSON, never slowed by the downloads;
* http://127.0.0.1:8000/files/<game>: a game's folder as a ZIP (sized, resumable);
* http://127.0.0.1:8000/files/<game>/<file>: one file, sent as it is.

``ZM_GAMES`` names the folder of games (default: data/games next to this file, which
``make demo`` fills). The app holds no download code: a route, a built-in resolver and a
root are all zipmiddleware is told, as for the WSGI examples.
"""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import FastAPI

from zipmiddleware.asgi import ZipMiddleware

GAMES = Path(os.environ.get("ZM_GAMES") or Path(__file__).resolve().parent / "data" / "games")

app = FastAPI(title="Game library")


@app.get("/api/games")
async def games() -> dict[str, list[str]]:
    """The games there are (a JSON endpoint of the app itself)."""
    names = sorted(entry.name for entry in os.scandir(GAMES) if entry.is_dir()) if GAMES.is_dir() else []
    return {"games": names}


app.add_middleware(
    ZipMiddleware,
    routes={"/files/<path:subpath>": {"resolver": "directory", "root": str(GAMES)}},
    ignore=["*.tmp", ".*"],  # files left out of ZIPs
)
