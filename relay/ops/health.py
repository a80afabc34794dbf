"""``GET /healthz``: liveness for load balancers and systemd, and the log's state for those who
may know it (operators, and peer relays, which learn the log's epoch here)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from storage_events import __version__
from storage_events.relay.auth import Authenticator, AuthError, bearer
from storage_events.relay.feed.hub import Hub
from storage_events.relay.ingest.endpoint import Ingest
from storage_events.relay.log.base import EventLog


def health_endpoint(
    log: EventLog, hub: Hub, ingest: Ingest, auth: Authenticator
) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        failing = ingest.store_error is not None
        status = {"status": "store_failing" if failing else "ok"}
        code = 503 if failing else 200  # a relay that cannot store is not healthy
        # The header only: a token in the URL would end up in access logs, and nothing that
        # polls /healthz is a browser's EventSource.
        token = bearer(request.headers.get("authorization", ""), None)
        if auth.enabled and token is None:
            # Anonymous, where tokens are configured: whether it is up, nothing about its log.
            return JSONResponse(status, status_code=code)
        try:
            auth.identify(token)  # any valid token, whatever its role, may know the rest
        except AuthError as e:
            return PlainTextResponse(
                f"{e}\n", status_code=e.status, headers={"WWW-Authenticate": auth.challenge}
            )
        detail = {
            **status,
            "version": __version__,
            "relay": ingest.me,
            "epoch": log.epoch,
            "head": log.head,
            "first": log.first,
            "subscribers": len(hub),
            "agents": ingest.connections,
        }
        if failing:
            detail["store_error"] = ingest.store_error
        return JSONResponse(detail, status_code=code)

    return endpoint
