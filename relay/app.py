"""The relay as an ASGI application: routes, and the parts they share."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute

from storage_events import __version__

from .config import RelayConfig
from .feed import Feed
from .hub import Hub
from .ingest import Ingest, IngestLimits
from .sqlite_log import SQLiteLog


def create_app(cfg: RelayConfig) -> Starlette:
    log = SQLiteLog(Path(cfg.data), synchronous=cfg.durability.upper())
    hub = Hub()
    ingest = Ingest(log, hub, IngestLimits(max_batch=cfg.max_batch))
    feed = Feed(log, hub, heartbeat=cfg.heartbeat, buffer_bytes=cfg.subscriber_buffer)

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({
            "status": "ok",
            "version": __version__,
            "head": log.head,
            "subscribers": len(hub),
            "agents": ingest.connections,
        })

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            hub.close()
            ingest.close()
            log.close()

    return Starlette(
        routes=[
            Route("/events", feed.endpoint),
            WebSocketRoute("/ingest", ingest.endpoint),
            Route("/healthz", healthz),
        ],
        lifespan=lifespan,
    )
