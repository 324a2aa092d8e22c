"""The chat page: GET / (static/index.html) and its assets under /static (page.js, page.css,
vendor/ with marked and DOMPurify), all sent with a Content-Security-Policy.

Replies are model output, so untrusted: the page sanitises the Markdown it renders with DOMPurify,
and the policy is the second line — scripts only from this server's files (no inline script, no
event-handler attributes, no eval), no inline styles, images and media from this server or the
page's own object URLs, requests only to this server, and no framing. The app's Host check and
body limit wrap these routes like every other.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from starlette.staticfiles import StaticFiles

STATIC = Path(__file__).with_name("static")
CSP = "; ".join((
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' blob:",  # blob: the thumbnails of the user's own attachments
    "media-src 'self' blob:",  # ... and their audio players
    "connect-src 'self'",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
))
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


class _Assets(StaticFiles):
    """StaticFiles with the page's headers on every file (index.html is reachable here too)."""

    def file_response(self, *args, **kwargs):
        response = super().file_response(*args, **kwargs)
        response.headers.update(HEADERS)
        return response


def register(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html", headers=HEADERS)

    app.mount("/static", _Assets(directory=STATIC), name="static")
