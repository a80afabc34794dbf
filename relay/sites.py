"""``GET /sites``: per-site health as JSON, and the state of this relay's federation links."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from .auth import AuthError
from .feed import Feed
from .ingest import Ingest
from .push import Pusher
from .upstream import Puller


def summary(ingest: Ingest, pullers: list[Puller], pushers: list[Pusher],
            allowed: frozenset[str] | None, now: float) -> dict:
    names = set(ingest.last_ts) | {s for s, n in ingest.by_site.items() if n}
    sites = []
    for site in sorted(names):
        if allowed is not None and site not in allowed:
            continue
        ts = ingest.last_ts.get(site)
        sites.append({
            "site": site,
            "agents": ingest.by_site.get(site, 0),  # connected to this relay
            "last_event": ts / 1e9 if ts else None,  # agent clock, seconds since the epoch
            "lag_seconds": max(0.0, now - ts / 1e9) if ts else None,
            "via": ingest.route.get(site),  # the peer relay its events came from; None: agents
        })
    return {
        "relay": ingest.me,
        "sites": sites,
        "upstreams": [{"name": p.name, "url": p.cfg.url, "connected": p.connected,
                       "checkpoint": p.checkpoint} for p in pullers],
        "pushes": [{"url": p.cfg.url, "connected": p.connected, "acked": p.position}
                   for p in pushers],
        "pushing_here": {name: n for name, n in sorted(ingest.relays.items()) if n},
        "loops_dropped": ingest.looped,
    }


def sites_endpoint(feed: Feed, ingest: Ingest, pullers: list[Puller],
                   pushers: list[Pusher]) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        try:
            _, scope = feed.authorize(request)
        except AuthError as e:
            return PlainTextResponse(f"{e}\n", status_code=e.status,
                                     headers={"WWW-Authenticate": "Bearer"})
        allowed = scope.sites if scope is not None else None
        return JSONResponse(summary(ingest, pullers, pushers, allowed, time.time()))

    return endpoint
