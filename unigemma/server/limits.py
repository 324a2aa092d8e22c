"""Request body limit (413 before the body is read whole) and the meter: metrics and the
replies in progress.

`BodyLimit` is plain ASGI middleware: a Content-Length over the limit is refused at once; a
body without one (chunked) is read only up to the limit, then refused. The body it read is
handed on to the app, and later `receive` calls go to the server (so disconnects still arrive).

`Meter` counts each request's outcome once: ok, rejected (a 4xx, before or during
generation), failed (a 5xx), disconnected (the client left), cancelled (the server ended it at
shutdown). It also holds the live pumps, so a shutdown can end them (`end_all`), and hands
each finished reply's timings to the Prometheus histograms (`metrics.py`), once they exist.
"""

from __future__ import annotations

import json
import time
from collections import deque

from .schema import error_body


class BodyLimit:
    def __init__(self, app, max_bytes: int, on_refuse=None):
        self.app, self.max_bytes, self.on_refuse = app, max_bytes, on_refuse

    async def _refuse(self, send) -> None:
        if self.on_refuse:
            self.on_refuse()
        body = json.dumps(error_body(f"the request body is larger than {self.max_bytes} bytes",
                                     code="request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._refuse(send)
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                return
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            if size > self.max_bytes:
                return await self._refuse(send)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(parts), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class Closing(Exception):
    """The server is shutting down: the request is refused or ended (503)."""


class Meter:
    """Completion tokens/s over the last `window` seconds, with the scheduler's stats."""

    def __init__(self, scheduler, window: float = 10.0):
        self.scheduler, self.window = scheduler, window
        self.started = int(time.time())
        self.samples: deque[tuple[float, int]] = deque()
        self.requests = {"ok": 0, "rejected": 0, "failed": 0, "disconnected": 0, "cancelled": 0}
        self.live: set = set()  # the pumps of replies in progress
        self.closing = False  # set at shutdown: new generations are refused
        self.metrics = None  # metrics.Metrics, set when /metrics is registered

    def observe(self, timings) -> None:
        """A finished reply's timings (generate/stream.py Timings)."""
        if self.metrics is not None:
            self.metrics.observe(timings)

    def count(self, outcome: str) -> None:
        self.requests[outcome] = self.requests.get(outcome, 0) + 1

    def count_status(self, status: int) -> None:
        self.count("rejected" if status < 500 else "failed")

    def end_all(self) -> None:
        """Shutdown's grace is over: every reply in progress ends with a 503 error."""
        for pump in list(self.live):
            pump.abort(Closing("the server is shutting down; this reply was cut short"))

    def snapshot(self) -> dict:
        stats = self.scheduler.stats()
        now = time.monotonic()
        self.samples.append((now, stats["completion_tokens"]))
        while len(self.samples) > 2 and now - self.samples[0][0] > self.window:
            self.samples.popleft()
        (t0, n0), (t1, n1) = self.samples[0], self.samples[-1]
        stats["tokens_per_s"] = (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0
        stats["kv_use"] = stats["kv_tokens_used"] / stats["kv_tokens_total"] if stats["kv_tokens_total"] else 0.0
        stats["queue_depth"] = stats["waiting"]
        stats["requests"] = dict(self.requests)
        stats["uptime_s"] = int(time.time()) - self.started
        return stats
