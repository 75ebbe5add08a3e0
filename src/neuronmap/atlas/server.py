"""`neuronmap atlas`: a local web server over a run's atlas index (Python's own http.server).

At start it reads the index alone (atlas/units.parquet); a card reads its unit's layer of the
other files when it opens (card.py). Routes:

  /                          the page (one HTML file, its script and style inline; it fetches only
                             from this server)
  /api/columns               the index's columns and what the run has
  /api/units?...             a page of the table: site, layer, unit (values or comma lists), token
                             (with match=token|substring and in=both|peak|decoded), label (with
                             method=lape|ap), filter=<column>:<min>:<max> (repeatable), sort=<column>,
                             desc=1, offset, limit
  /api/unit/<site>/<layer>/<unit>   the unit's card
"""

from __future__ import annotations

import json
import logging
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from ..errors import NeuronmapError
from .card import Cards
from .query import Index, QueryError

log = logging.getLogger(__name__)

INDEX = Path("atlas") / "units.parquet"


class Atlas:
    """What the server answers from: the index in memory and the lazy cards."""

    def __init__(self, run: str | Path):
        self.run = Path(run)
        path = self.run / INDEX
        if not path.is_file():
            raise NeuronmapError(
                f"{path}: no atlas index; build it with `snakemake --cores 2 atlas_index` (the run's config) or "
                f"`neuronmap atlas-index --run {self.run}`")
        self.index = Index.load(path)
        self.cards = Cards(self.index, self.run)
        self.page = resources.files("neuronmap.atlas").joinpath("page.html").read_bytes()
        log.info("atlas index %s: %d units, %d columns, loaded in %.2f s", path, self.index.frame.height,
                 len(self.index.columns), self.index.seconds_to_load)

    def answer(self, target: str) -> tuple[int, str, bytes]:
        """(status, content type, body) of a GET request."""
        url = urlsplit(target)
        path = url.path
        if path in ("/", "/index.html"):
            return 200, "text/html; charset=utf-8", self.page
        if path == "/favicon.ico":
            return 204, "image/x-icon", b""
        try:
            if path == "/api/columns":
                return _json(200, self.index.describe())
            if path == "/api/units":
                return _json(200, self.index.units(parse_qs(url.query, keep_blank_values=True)))
            if path.startswith("/api/unit/"):
                parts = [unquote(p) for p in path.removeprefix("/api/unit/").split("/")]
                if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
                    raise QueryError(f"{path}: expected /api/unit/<site>/<layer>/<unit>")
                card = self.cards.card(parts[0], int(parts[1]), int(parts[2]))
                if card is None:
                    return _json(404, {"error": f"no unit {'/'.join(parts)} in the atlas"})
                return _json(200, card)
        except QueryError as exc:
            return _json(400, {"error": str(exc)})
        return _json(404, {"error": f"{path}: not found"})


def _json(status: int, payload) -> tuple[int, str, bytes]:
    # allow_nan=False: a NaN that slipped through is a bug, not a JSON extension the browser rejects.
    return status, "application/json; charset=utf-8", json.dumps(payload, allow_nan=False).encode()


class Handler(BaseHTTPRequestHandler):
    atlas: Atlas  # set on the class that make_server builds
    protocol_version = "HTTP/1.1"

    def do_GET(self):  # noqa: N802 (http.server's name)
        start = time.perf_counter()
        try:
            status, kind, body = self.atlas.answer(self.path)
        except NeuronmapError as exc:  # a source file missing or unreadable: say which
            status, kind, body = _json(500, {"error": str(exc)})
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)
        log.debug("%s %d %.1f ms", self.path, status, 1000 * (time.perf_counter() - start))

    def log_message(self, format, *args):  # noqa: A002 (http.server's signature)
        log.debug(format, *args)


def make_server(atlas: Atlas, host: str, port: int) -> ThreadingHTTPServer:
    """The server, bound (port 0: a free one, server.server_address says which); not yet serving."""
    handler = type("AtlasHandler", (Handler,), {"atlas": atlas})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def url_of(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}/"


def serve(run: str | Path, host: str, port: int) -> None:
    atlas = Atlas(run)
    try:
        server = make_server(atlas, host, port)
    except OSError as exc:
        raise NeuronmapError(f"atlas: cannot listen on {host}:{port}: {exc.strerror} (try --port 0)") from None
    print(f"neuronmap atlas of {atlas.run}: {url_of(server)} ({atlas.index.frame.height} units; Ctrl-C stops)",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
