"""``GET /``: a live web page of the feed. It reads ``/events`` like any other subscriber (with
the visitor's token, so it shows exactly what they may read) and polls ``/sites``."""

from __future__ import annotations

from importlib import resources

from starlette.requests import Request
from starlette.responses import HTMLResponse

_PAGE = resources.files(__package__).joinpath("index.html").read_bytes()


async def page(request: Request) -> HTMLResponse:
    return HTMLResponse(
        _PAGE,
        headers={
            "Cache-Control": "no-cache",
            # Paths are shown with textContent only; this forbids anything else sneaking in.
            "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
            "style-src 'unsafe-inline'",
        },
    )
