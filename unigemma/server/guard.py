"""Checks on what a client sends before any handler sees it: text that is valid Unicode, JSON
that is not nested absurdly deep, and a Host header this server answers to.

`check_tree` walks a parsed body once, without recursion (a body nested 900 deep must not
overflow Python's stack here or in the chat template later): a lone UTF-16 surrogate
(`"\\ud800"`, which JSON allows and the tokenizer cannot encode) or nesting past `MAX_DEPTH`
is reported with the field's path, and the request gets a 400 naming it.

`HostCheck` refuses a request whose Host header is not one of the server's names (DNS
rebinding: a web page whose name now resolves to 127.0.0.1 would otherwise drive a local
server that has no API key). A rebinding page always sends its own domain name, so an IP
literal is safe to allow when the server is reachable from other machines.
"""

from __future__ import annotations

import ipaddress
import json
import re

MAX_DEPTH = 64  # JSON levels in a body (a tool's parameter schema needs a handful)
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_SURROGATE = re.compile("[\ud800-\udfff]")


def check_tree(value, where: str = "", max_depth: int = MAX_DEPTH) -> tuple[str, str] | None:
    """(field path, what is wrong) for the first bad string or too-deep container, else None."""
    stack = [(value, where, 0)]
    while stack:
        v, at, depth = stack.pop()
        if isinstance(v, str):
            if _SURROGATE.search(v):
                return at or "body", "contains a lone UTF-16 surrogate (text must be valid Unicode)"
        elif isinstance(v, (dict, list)):
            if depth >= max_depth:
                return at or "body", f"nested deeper than {max_depth} levels"
            for k, x in (v.items() if isinstance(v, dict) else enumerate(v)):
                if isinstance(k, str) and _SURROGATE.search(k):
                    return at or "body", "a key contains a lone UTF-16 surrogate (text must be valid Unicode)"
                stack.append((x, f"{at}[{k}]" if isinstance(k, int) else (f"{at}.{k}" if at else k), depth + 1))
    return None


def _host_name(header: bytes) -> str:
    """'Example.COM:8000' -> 'example.com'; '[::1]:8000' -> '::1'."""
    host = header.decode("latin-1").strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    return host in ("localhost", "") or (_is_ip(host) and ipaddress.ip_address(host).is_loopback)


def allowed_hosts(bind: str, extra: list[str] | tuple[str, ...] = ()) -> tuple[tuple[str, ...], bool]:
    """(names, any IP literal too) for a server bound to `bind`: the loopback names and the bound
    address; bound to another address (other machines can reach it), also any IP literal.
    Names others use for it (a DNS name, a proxy's) come from --allowed-host; '*' allows all."""
    names = {*LOOPBACK_NAMES, bind.strip("[]").lower(), *(n.strip().strip("[]").lower().rstrip(".") for n in extra)}
    return tuple(sorted(names - {""})), not is_loopback(bind)


class HostCheck:
    """ASGI middleware: 400 for a Host header that is not one of `names` (or an IP, with `any_ip`)."""

    def __init__(self, app, names, any_ip: bool = False, on_refuse=None):
        self.app, self.names, self.any_ip, self.on_refuse = app, frozenset(names), any_ip, on_refuse

    def allows(self, header: bytes | None) -> bool:
        if header is None or "*" in self.names:  # HTTP/1.0 without Host: not a browser
            return True
        name = _host_name(header)
        return name in self.names or (self.any_ip and _is_ip(name))

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or self.allows(dict(scope["headers"]).get(b"host")):
            return await self.app(scope, receive, send)
        if self.on_refuse:
            self.on_refuse()
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        message = "this server does not answer to that Host name (start it with --allowed-host NAME to add one)"
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                     "code": "host_not_allowed"}}).encode()  # schema.error_body: it imports us
        await send({"type": "http.response.start", "status": 400,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
