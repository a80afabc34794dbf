"""The relay as an ASGI application: routes, and the parts they share."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute

from storage_events import __version__

from .auth import Authenticator
from .config import RelayConfig
from .feed import Feed
from .hub import Hub
from .ingest import Ingest, IngestLimits
from .metrics import metrics_endpoint
from .sqlite_log import SQLiteLog


def create_app(cfg: RelayConfig) -> Starlette:
    log = SQLiteLog(Path(cfg.data), synchronous=cfg.durability.upper())
    hub = Hub()
    auth = Authenticator(cfg.token, cfg.jwt)
    ingest = Ingest(log, hub, IngestLimits(max_batch=cfg.max_batch), auth)
    feed = Feed(log, hub, heartbeat=cfg.heartbeat, buffer_bytes=cfg.subscriber_buffer,
                auth=auth, per_identity=cfg.max_subscribers_per_identity)

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({
            "status": "ok",
            "version": __version__,
            "head": log.head,
            "first": log.first,
            "subscribers": len(hub),
            "agents": ingest.connections,
        })

    async def retention() -> None:
        while True:
            await ingest.trim(max_age=cfg.retention_days * 86400,
                              max_events=cfg.retention_events, max_bytes=cfg.retention_bytes)
            await asyncio.sleep(cfg.retention_check)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        trimmer = asyncio.create_task(retention())
        try:
            yield
        finally:
            trimmer.cancel()
            hub.close()
            ingest.close()
            log.close()

    middleware = []
    if cfg.cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=cfg.cors_origins,
                                     allow_methods=["GET"],
                                     allow_headers=["Authorization", "Last-Event-ID"]))
    app = Starlette(
        middleware=middleware,
        routes=[
            Route("/events", feed.endpoint),
            WebSocketRoute("/ingest", ingest.endpoint),
            Route("/healthz", healthz),
            Route("/metrics", metrics_endpoint(log, hub, ingest, feed)),
        ],
        lifespan=lifespan,
    )
    app.state.hub = hub  # for the server's shutdown: feeds are told to reconnect elsewhere
    return app
