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

Every other request gets a JSON error with a 4xx status that names what is wrong: a parameter out
of range, a method other than GET (405), a request line over 64 kB (414). The Host header must name
this server (the bound address, localhost or an IP address, with the bound port; 403 otherwise),
so that a web page whose domain is rebound to 127.0.0.1 cannot read the atlas (DNS rebinding).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from ..errors import NeuronmapError
from .card import Cards
from .query import Index, QueryError, integer

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
                if len(parts) != 3:
                    raise QueryError(f"{path[:80]}: expected /api/unit/<site>/<layer>/<unit>")
                card = self.cards.card(parts[0], integer("layer", parts[1]), integer("unit", parts[2]))
                if card is None:
                    return _json(404, {"error": f"no unit {'/'.join(parts)} in the atlas"})
                return _json(200, card)
        except QueryError as exc:
            return _json(400, {"error": str(exc)})
        return _json(404, {"error": f"{path[:80]}: not found"})


def _json(status: int, payload) -> tuple[int, str, bytes]:
    # allow_nan=False: a NaN that slipped through is a bug, not a JSON extension the browser rejects.
    return status, "application/json; charset=utf-8", json.dumps(payload, allow_nan=False).encode()


class Handler(BaseHTTPRequestHandler):
    atlas: Atlas  # these two set on the class that make_server builds
    names: frozenset[str]  # the host names that name this server (host_names)
    protocol_version = "HTTP/1.1"

    def parse_request(self) -> bool:
        """http.server's parsing, then what this server refuses before any route: a method other
        than GET, a target that is not a path, a Host that does not name this server."""
        if not super().parse_request():
            return False  # http.server answered already (through send_error, as JSON)
        if self.command != "GET":
            self.send_error(405, f"method {self.command[:20]!r} not allowed: the atlas answers GET only")
            return False
        if not self.path.startswith("/"):
            self.send_error(400, "the request target must be a path (/...)")
            return False
        refused = host_refused(self.headers.get_all("Host") or [], self.names, self.server.server_address[1])
        if refused is not None:
            self.send_error(*refused)
            return False
        return True

    def do_GET(self):  # noqa: N802 (http.server's name)
        start = time.perf_counter()
        try:
            status, kind, body = self.atlas.answer(self.path)
        except NeuronmapError as exc:  # a source file missing or unreadable: say which
            status, kind, body = _json(500, {"error": str(exc)})
        except Exception:  # a bug: an answer all the same, never a dropped connection
            log.exception("atlas: %s", self.path[:200])
            status, kind, body = _json(500, {"error": "internal error (the server's log has it)"})
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)
        log.debug("%s %d %.1f ms", self.path[:200], status, 1000 * (time.perf_counter() - start))

    def send_error(self, code, message=None, explain=None):
        """http.server's errors (and this server's refusals) as JSON, like the routes' errors."""
        self.close_connection = True  # the rest of a refused request cannot be trusted
        # http.server takes a line it cannot parse for HTTP/0.9 and answers it with a bare body;
        # nothing speaks 0.9 any more, so it gets a status line like any other request.
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.0"
        _, _, body = _json(code, {"error": message or self.responses.get(code, ("error",))[0]})
        try:
            self.send_response(code, None)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            if code == 405:
                self.send_header("Allow", "GET")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except OSError:  # the client left
            pass

    def log_message(self, format, *args):  # noqa: A002 (http.server's signature)
        log.debug(format, *args)


def host_names(host: str) -> frozenset[str]:
    """The names a Host header may give for a server bound to `host`: localhost, the name it was
    bound to, and the machine's names where it listens on every address."""
    names = {"localhost", host.lower()}
    if host in ("", "0.0.0.0", "::"):
        names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
    return frozenset(names)


def host_refused(hosts: list[str], names: frozenset[str], port: int) -> tuple[int, str] | None:
    """(status, reason) when the Host header does not name this server, else None. Accepted: one
    of `names` or an IP address (a browser sends one only for a page loaded from that address, so
    no domain of another's is rebound to it), with the bound port (a browser leaves it out for
    port 80)."""
    if len(hosts) != 1:
        return 400, "the Host header is missing" if not hosts else "more than one Host header"
    host = hosts[0].strip().lower()
    name, _, given = host.rpartition(":") if not host.endswith("]") else (host, "", "")
    if not name:  # no port given
        name, given = host, "80"
    if given != str(port):
        return 403, f"Host {hosts[0][:80]!r}: not this server's port ({port})"
    if name in names or _is_ip(name.removeprefix("[").removesuffix("]")):
        return None
    return 403, (f"Host {hosts[0][:80]!r}: not this server (expected an IP address or one of {sorted(names)}, "
                 f"with port {port})")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def make_server(atlas: Atlas, host: str, port: int) -> ThreadingHTTPServer:
    """The server, bound (port 0: a free one, server.server_address says which); not yet serving."""
    handler = type("AtlasHandler", (Handler,), {"atlas": atlas, "names": host_names(host)})
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
