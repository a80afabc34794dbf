"""``GET /sites``: per-site health as JSON, and the state of this relay's federation links.

A reader restricted to some sites or paths sees only what concerns it: its sites, no
federation links (they name other relays and sites), and, restricted to paths, no time of the
last event (it moves on events the reader may not see)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from storage_events.relay.auth import EVERYTHING, AuthError
from storage_events.relay.federation.pull import Puller
from storage_events.relay.federation.push import Pusher
from storage_events.relay.feed.endpoint import Feed
from storage_events.relay.feed.filters import Scope
from storage_events.relay.ingest.endpoint import Ingest
from storage_events.relay.kafka.sink import KafkaSink


def summary(
    ingest: Ingest,
    pullers: list[Puller],
    pushers: list[Pusher],
    scope: Scope,
    now: float,
    sink: KafkaSink | None = None,
) -> dict:
    names = set(ingest.last_ts) | {s for s, n in ingest.by_site.items() if n}
    sites = []
    for site in sorted(names):
        if scope.sites is not None and site not in scope.sites:
            continue
        entry: dict = {
            "site": site,
            "agents": ingest.by_site.get(site, 0),  # connected to this relay
            "via": ingest.route.get(site),  # the peer relay its events came from; None: agents
        }
        ts = ingest.last_ts.get(site)
        if scope.prefixes is None:
            entry["last_event"] = ts / 1e9 if ts else None  # agent clock, s since the epoch
            entry["lag_seconds"] = max(0.0, now - ts / 1e9) if ts else None
        sites.append(entry)
    answer: dict = {"relay": ingest.me, "sites": sites}
    if scope == EVERYTHING:
        answer |= {
            "upstreams": [
                {
                    "name": p.name,
                    "url": p.cfg.url,
                    "connected": p.connected,
                    "checkpoint": p.checkpoint,
                }
                for p in pullers
            ],
            "pushes": [
                {"url": p.cfg.url, "connected": p.connected, "acked": p.position} for p in pushers
            ],
            "pushing_here": {name: n for name, n in sorted(ingest.relays.items()) if n},
            "loops_dropped": ingest.looped,
        }
        if sink is not None:
            answer["kafka"] = sink.status()
    return answer


def sites_endpoint(
    feed: Feed,
    ingest: Ingest,
    pullers: list[Puller],
    pushers: list[Pusher],
    sink: KafkaSink | None = None,
) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        try:
            _, scope = feed.authorize(request)
        except AuthError as e:
            return feed.refusal(e)
        # No scope: anonymous where no authentication is configured, which sees everything.
        return JSONResponse(
            summary(ingest, pullers, pushers, scope or EVERYTHING, time.time(), sink)
        )

    return endpoint
