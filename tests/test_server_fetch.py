"""URL fetching (`--allow-url-fetch`): non-public targets are refused after DNS resolution,
redirects are not followed, size and time are capped. A local HTTP server stands in for a
public one; to reach it, the tests that need a response let loopback through the address check
(the refusal itself is tested with the real check, here and in test_server.py)."""

from __future__ import annotations

import http.server
import threading

import pytest

from unigemma.errors import InputError
from unigemma.server import fetch


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data")
            self.end_headers()
        elif self.path == "/big":
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"x" * 300_000)
        elif self.path == "/missing":
            self.send_error(404)
        else:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"picture bytes")

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def origin():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def loopback_allowed(monkeypatch):
    real = fetch.check_address
    monkeypatch.setattr(fetch, "check_address", lambda a: None if a == "127.0.0.1" else real(a))


@pytest.mark.parametrize("address", ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.0.1", "169.254.169.254",
                                     "100.64.0.1", "0.0.0.0", "::1", "fe80::1", "fc00::1", "::ffff:10.0.0.1",
                                     "224.0.0.1", "255.255.255.255"])
def test_non_public_addresses_are_refused(address):
    with pytest.raises(InputError, match="not a public address"):
        fetch.check_address(address)


def test_public_addresses_pass():
    fetch.check_address("8.8.8.8")
    fetch.check_address("2001:4860:4860::8888")


def test_a_name_resolving_to_loopback_is_refused(origin):
    with pytest.raises(InputError, match="not a public address"):
        fetch.fetch(origin.replace("127.0.0.1", "localhost") + "/ok", max_bytes=1000)


def test_fetch_redirect_size_status(origin, loopback_allowed):
    assert fetch.fetch(origin + "/ok", max_bytes=1000) == b"picture bytes"
    with pytest.raises(InputError, match="redirects are not followed"):
        fetch.fetch(origin + "/redirect", max_bytes=1000)
    with pytest.raises(InputError, match="larger than 1000 bytes"):
        fetch.fetch(origin + "/big", max_bytes=1000)
    with pytest.raises(InputError, match="HTTP 404"):
        fetch.fetch(origin + "/missing", max_bytes=1000)
    with pytest.raises(InputError, match="only http"):
        fetch.fetch("ftp://example.com/a.png", max_bytes=1000)
