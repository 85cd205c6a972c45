"""A Quart app whose downloads come from its config (``ZIPSTREAM_*``) through the Quart extension.

``ZM_QUART_ROOT``: the served folder; ``ZM_QUART_CRC``: the CRC-32 store.
"""

from __future__ import annotations

import os

from quart import Quart, jsonify

from zipmiddleware.quart import Downloads

app = Quart(__name__)
app.config.update(
    ZIPSTREAM_ROUTES={
        "/downloads/<path:subpath>": {
            "resolver": "directory",
            "root": os.environ.get("ZM_QUART_ROOT", "/nonexistent"),
        }
    },
    ZIPSTREAM_CRC_CACHE=os.environ.get("ZM_QUART_CRC", ":memory:"),
    ZIPSTREAM_CHUNK_SIZE=131072,
)
downloads = Downloads(app)


@app.route("/api/hello")
async def hello() -> object:
    return jsonify(hello="quart")
