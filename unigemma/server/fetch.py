"""Fetching media from http(s) URLs (only with `--allow-url-fetch`), without becoming an SSRF hole.

The host name is resolved once; every address must be globally routable (no private,
loopback, link-local, multicast, reserved or shared ranges, IPv4-mapped ones included), and
the connection goes to that checked address (the name is not resolved again, so DNS
rebinding cannot swap in an internal one; TLS still verifies the certificate for the name).
Redirects are not followed, the body is capped at `max_bytes` and the whole fetch at
`timeout` seconds. Errors are InputErrors naming the URL.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
from urllib.parse import urlsplit

from ..errors import InputError


def check_address(address: str) -> None:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    if not ip.is_global or ip.is_multicast:
        raise InputError(f"refusing to fetch from {ip}: not a public address")


def _resolve(host: str, port: int) -> str:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise InputError(f"cannot resolve {host!r}: {e}") from None
    addresses = sorted({info[4][0] for info in infos})
    for a in addresses:  # every address the name has, not just the first: any could be used
        check_address(a)
    return addresses[0]


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to a checked address, with SNI and certificate checks for the original name."""

    def __init__(self, host, address, **kw):
        super().__init__(host, **kw)
        self._address = address

    def connect(self):
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def fetch(url: str, *, max_bytes: int, timeout: float = 10.0) -> bytes:
    """The body at an http(s) URL, at most max_bytes, within timeout seconds."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(f"only http(s) URLs can be fetched, got {url[:80]!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    address = _resolve(parts.hostname, port)
    if parts.scheme == "https":
        conn = _PinnedHTTPS(parts.hostname, address, port=port, timeout=timeout,
                            context=ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(address, port, timeout=timeout)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    deadline = time.monotonic() + timeout
    try:
        conn.request("GET", path, headers={"Host": parts.netloc.rsplit("@", 1)[-1], "User-Agent": "unigemma"})
        response = conn.getresponse()
        if 300 <= response.status < 400:
            raise InputError(f"{url[:80]} redirects ({response.status}); redirects are not followed")
        if response.status != 200:
            raise InputError(f"{url[:80]} answered HTTP {response.status}")
        body = bytearray()
        while chunk := response.read(65536):
            body += chunk
            if len(body) > max_bytes:
                raise InputError(f"{url[:80]} is larger than {max_bytes} bytes")
            if time.monotonic() > deadline:
                raise InputError(f"fetching {url[:80]} took longer than {timeout} s")
        return bytes(body)
    except (OSError, http.client.HTTPException) as e:
        raise InputError(f"cannot fetch {url[:80]}: {e}") from None
    finally:
        conn.close()
