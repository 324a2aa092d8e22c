"""Fetching media from http(s) URLs (only with `--allow-url-fetch`), without becoming an SSRF hole.

The host name is resolved once; every address must be globally routable (no private,
loopback, link-local, multicast, reserved or shared ranges), and so must any IPv4 address an
IPv6 one carries (IPv4-mapped and -compatible, NAT64 64:ff9b::/96, 6to4 2002::/16, Teredo
2001::/32: each can lead to an IPv4 host behind the filter). The connection goes to that
checked address (the name is not resolved again, so DNS rebinding cannot swap in an internal
one; TLS still verifies the certificate for the name). Redirects are not followed and the body
is capped at `max_bytes`. `timeout` bounds the whole fetch: connect, TLS, headers and body; a
watchdog shuts the socket down at the deadline, so a server sending a byte a second cannot
stretch it. Errors, a malformed URL included, are InputErrors naming the URL.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import time
from urllib.parse import urlsplit

from ..errors import InputError

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215: the IPv4 sits at a prefix-dependent place


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address can lead to."""
    out = [a for a in (ip.ipv4_mapped, ip.sixtofour) if a is not None]
    if ip.teredo:
        out += list(ip.teredo)  # (server, client)
    if int(ip) >> 32 == 0 or ip in _NAT64:  # ::a.b.c.d (IPv4-compatible), NAT64
        out.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return out


def check_address(address: str) -> None:
    ip = ipaddress.ip_address(address.split("%")[0])
    candidates = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _NAT64_LOCAL:
            raise InputError(f"refusing to fetch from {ip}: not a public address (local-use NAT64)")
        candidates += _embedded_ipv4(ip)
    for a in candidates:
        if not a.is_global or a.is_multicast:
            raise InputError(f"refusing to fetch from {ip}: not a public address"
                             + (f" (it carries {a})" if a is not ip else ""))


def _resolve(host: str, port: int) -> str:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, ValueError) as e:  # UnicodeError (a bad IDNA label), NUL in the name
        raise InputError(f"cannot resolve {host[:80]!r}: {e}") from None
    addresses = sorted({info[4][0] for info in infos})
    for a in addresses:  # every address the name has, not just the first: any could be used
        check_address(a)
    return addresses[0]


class _Watchdog:
    """Shuts a connection's socket down at the deadline, whatever call is blocked on it."""

    def __init__(self, deadline: float):
        self.deadline, self.fired, self._sock = deadline, False, None
        self._lock = threading.Lock()
        self._timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sock = sock.dup()  # shutdown acts on the connection, so a duplicate reaches it
            if self.fired:
                self._sock.shutdown(socket.SHUT_RDWR)

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            if self._sock is not None:
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._timer.cancel()
        with self._lock:
            if self._sock is not None:
                self._sock.close()


class _Pinned(http.client.HTTPConnection):
    """HTTP to a checked address, the socket under a watchdog."""

    def __init__(self, address, port, watchdog, timeout):
        super().__init__(address, port, timeout=timeout)
        self._watchdog = watchdog

    def connect(self):
        self.sock = _open(self.host, self.port, self._watchdog, self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to a checked address, with SNI and certificate checks for the original name."""

    def __init__(self, host, address, port, watchdog, timeout):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address, self._watchdog = address, watchdog

    def connect(self):
        sock = _open(self._address, self.port, self._watchdog, self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def _open(address: str, port: int, watchdog: _Watchdog, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(max(0.01, min(timeout, watchdog.deadline - time.monotonic())))
        sock.connect((address, port))
        watchdog.watch(sock)
    except BaseException:
        sock.close()
        raise
    return sock


def _split(url: str) -> tuple:
    try:
        parts = urlsplit(url)
        port = parts.port  # raises on ':99999', ':b'
        host = parts.hostname
    except ValueError as e:
        raise InputError(f"{url[:80]!r} is not a valid URL: {e}") from None
    if parts.scheme not in ("http", "https") or not host:
        raise InputError(f"only http(s) URLs can be fetched, got {url[:80]!r}")
    return parts, host, port or (443 if parts.scheme == "https" else 80)


def fetch(url: str, *, max_bytes: int, timeout: float = 10.0) -> bytes:
    """The body at an http(s) URL, at most max_bytes, within timeout seconds in all."""
    deadline = time.monotonic() + timeout
    parts, host, port = _split(url)
    address = _resolve(host, port)
    watchdog = _Watchdog(deadline)
    if parts.scheme == "https":
        conn = _PinnedHTTPS(host, address, port, watchdog, timeout)
    else:
        conn = _Pinned(address, port, watchdog, timeout)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        conn.request("GET", path, headers={"Host": parts.netloc.rsplit("@", 1)[-1], "User-Agent": "unigemma"})
        response = conn.getresponse()
        if 300 <= response.status < 400:
            raise InputError(f"{url[:80]} redirects ({response.status}); redirects are not followed")
        if response.status != 200:
            raise InputError(f"{url[:80]} answered HTTP {response.status}")
        body = bytearray()
        while chunk := response.read1(65536):
            body += chunk
            if len(body) > max_bytes:
                raise InputError(f"{url[:80]} is larger than {max_bytes} bytes")
        if watchdog.fired:  # the cut may look like the end of the body
            raise InputError(f"fetching {url[:80]} took longer than {timeout} s")
        return bytes(body)
    except InputError:
        raise
    except (OSError, ValueError, http.client.HTTPException) as e:
        if watchdog.fired or time.monotonic() > deadline:
            raise InputError(f"fetching {url[:80]} took longer than {timeout} s") from None
        raise InputError(f"cannot fetch {url[:80]}: {e}") from None
    finally:
        watchdog.close()
        conn.close()
