"""The atlas server under hostile requests, sent as raw bytes over a socket to a real server on a
free port: every malformed request gets a 4xx JSON answer naming what is wrong (never a dropped
connection), and a Host header that does not name the server is refused (DNS rebinding). The atlas
is a tiny hand-made one (statistics of the relation study alone), so the test needs no run."""

import json
import socket
import threading

import numpy as np
import polars as pl
import pytest

from neuronmap.atlas.index import AtlasSources, build_index, write_index
from neuronmap.atlas.server import Atlas, host_names, host_refused, make_server
from neuronmap.io import tables
from neuronmap.io.parquet import write_table


def tiny_run(root):
    """A run with neuron_stats.parquet for 2 sites x 2 layers x 8 units, and its atlas index."""
    rng = np.random.default_rng(0)
    keys = [(site, layer, unit) for site in ("act", "up") for layer in range(2) for unit in range(8)]
    stats = pl.DataFrame({
        "site": [k[0] for k in keys], "layer": [k[1] for k in keys], "unit": [k[2] for k in keys],
        "count": [100] * len(keys), "mean": rng.normal(size=len(keys)), "var": rng.random(len(keys)),
        "min": rng.normal(size=len(keys)) - 3, "max": rng.normal(size=len(keys)) + 3,
        "frac_positive": rng.random(len(keys)), "frac_active": rng.random(len(keys))})
    run = root / "results" / "tiny"
    run.mkdir(parents=True)
    write_table(stats, run / "neuron_stats.parquet", tables.NEURON_STATS)
    sources = AtlasSources.found_in(run)
    frame, metadata = build_index(sources)
    write_index(frame, metadata, run / "atlas" / "units.parquet", sources)
    return run


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = make_server(Atlas(tiny_run(tmp_path_factory.mktemp("atlas"))), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def raw(server, request: bytes) -> tuple[int, dict, dict]:
    """Send bytes, read the answer to the end (the server closes or Content-Length says): status,
    headers, JSON body. A dropped connection (no status line) fails here."""
    with socket.create_connection(server.server_address[:2], timeout=30) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed without an answer to {request[:100]!r} (got {data!r})"
            data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        if request.startswith(b"HEAD "):
            return status, headers, {}  # an answer to HEAD has no body
        while len(body) < int(headers["content-length"]):
            chunk = sock.recv(65536)
            assert chunk, "answer cut short"
            body += chunk
    return status, headers, json.loads(body)


def get(server, target: str, host: str | None = "default", method: str = "GET") -> tuple[int, dict]:
    port = server.server_address[1]
    host_line = f"Host: 127.0.0.1:{port}\r\n" if host == "default" else "" if host is None else f"Host: {host}\r\n"
    status, headers, body = raw(server, f"{method} {target} HTTP/1.1\r\n{host_line}Connection: close\r\n\r\n".encode())
    assert headers["content-type"].startswith("application/json"), headers
    return status, body


def test_good_requests_answer(server):
    port = server.server_address[1]
    status, body = get(server, "/api/units?offset=3&limit=2")
    assert status == 200 and body["total"] == 32 and len(body["rows"]) == 2 and body["offset"] == 3
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"LOCALHOST:{port}", f"[::1]:{port}"):
        assert get(server, "/api/columns", host=host)[0] == 200, host
    assert get(server, "/api/unit/up/1/7")[1]["unit"] == 7
    assert get(server, "/api/units?offset=1000000&limit=5")[1]["rows"] == []  # past the end: an empty page


@pytest.mark.parametrize("target, parameter", [
    ("/api/units?offset=99999999999999999999", "offset"),
    ("/api/units?offset=-1", "offset"),
    ("/api/units?offset=1e3", "offset"),
    ("/api/units?offset=%EF%BC%91", "offset"),  # a full-width digit, which int() takes
    ("/api/units?offset=1_0", "offset"),
    ("/api/units?offset=" + "9" * 5000, "offset"),  # more digits than int() converts
    ("/api/units?limit=99999999999999999999", "limit"),
    ("/api/units?limit=-5", "limit"),
    ("/api/units?limit=abc", "limit"),
    ("/api/units?limit=0", "limit"),
    ("/api/units?limit=1001", "limit"),
    ("/api/units?limit=1,2", "limit"),
    ("/api/units?layer=99999999999999999999", "layer"),
    ("/api/units?unit=1,,2", "unit"),
    ("/api/units?layer=-1", "layer"),
    ("/api/units?sort=nope", "sort"),
    ("/api/units?filter=mean:x:", "filter"),
    ("/api/units?token=a&in=elsewhere", "in"),
    ("/api/units?label=de&method=x", "method"),
    ("/api/unit/act/%C2%B2/0", "layer"),  # '²'.isdigit() is true, int('²') fails
    ("/api/unit/act/0/99999999999999999999", "unit"),
    ("/api/unit/act/0", "/api/unit/<site>/<layer>/<unit>"),
])
def test_malformed_parameters_are_named(server, target, parameter):
    status, body = get(server, target)
    assert status == 400 and parameter in body["error"], (target, body)


def test_unknown_routes_methods_and_long_requests(server):
    for target in ("/nowhere", "/api", "/api/units/x", "/api/unit/act/0/99", "//etc/passwd", "/%00"):
        status, body = get(server, target)
        assert status == 404 and body["error"], target
    status, body = get(server, "http://evil.example/api/columns")
    assert status == 400 and "path" in body["error"]
    for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "BREW"):
        status, body = get(server, "/api/columns", method=method)
        assert status == 405 and method in body["error"], method
    status, headers, _ = raw(server, b"HEAD / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert status == 405 and headers["allow"] == "GET"
    status, body = get(server, "/api/units?token=" + "a" * 60_000)  # long, under the 64 kB line limit
    assert status == 200 and body["total"] == 0
    status, body = get(server, "/api/units?token=" + "a" * 100_000)
    assert status == 414 and body["error"]
    status, headers, body = raw(server, b"GARBAGE\r\n\r\n")
    assert 400 <= status < 500 and body["error"]
    status, headers, body = raw(server, b"GET / HTTP/9.9\r\nHost: 127.0.0.1\r\n\r\n")
    assert 400 <= status < 506 and body["error"]  # http.server: 505, version not supported
    many = b"".join(b"X-%d: y\r\n" % i for i in range(200))
    status, _, body = raw(server, b"GET / HTTP/1.1\r\n" + many + b"\r\n")
    assert status == 431 and body["error"]


def test_host_header_is_checked(server):
    port = server.server_address[1]
    for host, code in ((f"evil.example:{port}", 403), (f"127.0.0.1.nip.io:{port}", 403), ("127.0.0.1:1", 403),
                       ("127.0.0.1", 403), ("", 403), (None, 400), (f"localhost:{port}:{port}", 403)):
        status, body = get(server, "/api/columns", host=host)
        assert status == code and "Host" in body["error"], (host, body)
    both = f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nHost: evil.example:{port}\r\n\r\n".encode()
    status, _, body = raw(server, both)
    assert status == 400 and "Host" in body["error"]
    # The page too: a rebound domain gets nothing.
    status, body = get(server, "/", host=f"evil.example:{port}")
    assert status == 403


def test_keep_alive_still_works(server):
    """Two requests on one connection: the answers are framed, the second one still comes."""
    port = server.server_address[1]
    one = f"GET /api/units?limit=1 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    with socket.create_connection(server.server_address[:2], timeout=30) as sock:
        sock.sendall(one + one.replace(b"limit=1", b"limit=2"))
        file = sock.makefile("rb")
        for expected in (1, 2):
            assert file.readline().split()[1] == b"200"
            length = None
            while (line := file.readline()) != b"\r\n":
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            assert len(json.loads(file.read(length))["rows"]) == expected


def test_host_rules():
    names = host_names("127.0.0.1")
    assert host_refused(["localhost:80"], names, 80) is None and host_refused(["localhost"], names, 80) is None
    assert host_refused(["10.1.2.3:8000"], names, 8000) is None  # an IP address is no rebound domain
    assert host_refused(["myhost:8000"], host_names("myhost"), 8000) is None
    assert host_refused(["myhost:8000"], names, 8000)[0] == 403
    assert host_refused([], names, 8000)[0] == 400
