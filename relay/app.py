"""The relay as an ASGI application: routes, and the parts they share."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from urllib.parse import parse_qs

import msgspec
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from storage_events.relay.auth import Authenticator, Credential, bearer
from storage_events.relay.config import RelayConfig, is_loopback, own_name
from storage_events.relay.dcache.api import ChannelService
from storage_events.relay.dcache.channels import Limits, Registry
from storage_events.relay.dcache.namespace import namespace_endpoint
from storage_events.relay.dcache.store import ChannelStore
from storage_events.relay.dcache.user import user_endpoint
from storage_events.relay.edge.guard import Guard, Policy
from storage_events.relay.federation.pull import Puller
from storage_events.relay.federation.push import Pusher
from storage_events.relay.feed.endpoint import Feed
from storage_events.relay.feed.hub import Hub
from storage_events.relay.feed.page import page
from storage_events.relay.ingest.endpoint import Ingest
from storage_events.relay.ingest.session import IngestLimits
from storage_events.relay.log.base import EventLog, Retention, StoreError
from storage_events.relay.log.sqlite import SQLiteLog
from storage_events.relay.ops.health import health_endpoint
from storage_events.relay.ops.metrics import metrics_endpoint
from storage_events.relay.ops.sites import sites_endpoint
from storage_events.relay.state.endpoint import state_endpoint
from storage_events.relay.state.follower import Follower
from storage_events.relay.state.reader import View

logger = logging.getLogger("storage_events.relay")


class Relay(Starlette):
    """The routes, with one exception: an ``/ingest`` WebSocket goes to its endpoint past the
    middleware stack (only :class:`Guard` checks it). Each connection otherwise keeps a dozen
    coroutines of that stack alive while it lasts: measured, a third of the memory an idle
    agent's connection takes, and about a tenth of the CPU per frame it sends.

    A request logging in with a user's password has it checked first, on a thread: the check
    is slow on purpose, and the routes identify callers without awaiting."""

    def __init__(
        self, ingest: Ingest, policy: Policy, auth: Authenticator, **kwargs: object
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._ingest = Guard(ingest.asgi, policy)
        self._auth = auth
        self._checking = asyncio.Lock()

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # (Not a coroutine of its own: it would stay alive as long as each connection.)
        if scope["type"] == "websocket" and scope["path"] == "/ingest":
            return self._ingest(scope, receive, send)
        if scope["type"] == "http":
            cred: Credential | None = None
            for name, value in scope["headers"]:
                if name == b"authorization":
                    cred = bearer(value.decode("latin-1"), None)
            if cred is None and b"access_token=" in scope["query_string"]:
                cred = parse_qs(scope["query_string"].decode("latin-1")).get(
                    "access_token", [None]
                )[0]
            if self._auth.needs_check(cred):
                return self._checked(cred, scope, receive, send)  # type: ignore[arg-type]
        return super().__call__(scope, receive, send)

    async def _checked(self, cred: Credential, scope: Scope, receive: Receive, send: Send) -> None:
        # One check at a time: a flood of guesses takes at most one core, never the loop.
        async with self._checking:
            if self._auth.needs_check(cred):  # (the same login may have been checked meanwhile)
                await asyncio.to_thread(self._auth.check, cred)
        await super().__call__(scope, receive, send)


def open_log(cfg: RelayConfig) -> EventLog:
    """The configured backend, not yet started (see :meth:`EventLog.start`)."""
    retention = Retention(cfg.retention_days * 86400, cfg.retention_events, cfg.retention_bytes)
    servers = cfg.nats_servers()
    if servers:
        from storage_events.relay.log.nats import NATSLog

        return NATSLog(
            servers,
            name=cfg.name,
            stream=cfg.nats_stream,
            replicas=cfg.nats_replicas,
            retention=retention,
        )
    return SQLiteLog(
        Path(cfg.data),
        synchronous=cfg.durability.upper(),
        name=cfg.name,
        retention=retention,
        namespace=cfg.namespace,
    )


def create_app(cfg: RelayConfig) -> Relay:
    if cfg.name is None:  # (relays started alike on one host must not share a name)
        cfg = msgspec.structs.replace(cfg, name=own_name(Path(cfg.data)))
    log = open_log(cfg)
    hub = Hub()
    auth = Authenticator(cfg.token, cfg.jwt, cfg.user)
    log.follow(hub.publish)  # whoever stored them: this relay, or another on a shared store
    ingest = Ingest(
        log,
        IngestLimits(max_batch=cfg.max_batch, hello_timeout=cfg.request_head_timeout),
        auth,
        me=cfg.name,
    )
    pullers = [Puller(up, ingest, cfg.name) for up in cfg.upstream]
    pushers = [Pusher(target, log, cfg.name) for target in cfg.push]
    hub.listeners.extend(p.notify for p in pushers)
    sink = None
    if cfg.kafka is not None:
        from storage_events.relay.kafka.checkpoint import FileCheckpoint
        from storage_events.relay.kafka.sink import KafkaSink

        # On a NATS store the relays sharing it share one checkpoint, beside the log.
        place = None
        if isinstance(log, SQLiteLog):
            place = FileCheckpoint(Path(cfg.data), cfg.kafka.topic)
        sink = KafkaSink(cfg.kafka, log, cfg.name, place)
        hub.listeners.append(sink.notify)
    view = follower = None
    if isinstance(log, SQLiteLog):
        if log.namespace is not None:
            view = View(log.path)
    elif cfg.namespace:  # a shared log: this replica keeps a view of its own
        follower = Follower(Path(cfg.data), log)
        view = View(follower.path)
    feed = Feed(
        log,
        hub,
        heartbeat=cfg.heartbeat,
        buffer_bytes=cfg.subscriber_buffer,
        auth=auth,
        per_identity=cfg.max_subscribers_per_identity,
        view=view,
    )
    registry = Registry(
        Limits(
            per_user=cfg.channels_per_user,
            timeout=cfg.channel_timeout,
            backlog=cfg.channel_backlog,
        )
    )
    channels: ChannelService
    if isinstance(log, SQLiteLog):
        channels = ChannelService(
            registry,
            ChannelStore(Path(cfg.data)),
            log,
            auth,
            heartbeat=cfg.heartbeat,
            buffer_bytes=cfg.subscriber_buffer,
        )
    else:  # the replicas of a NATS store share them
        from storage_events.relay.dcache.shared import SharedChannels

        channels = SharedChannels(
            registry, log, auth, heartbeat=cfg.heartbeat, buffer_bytes=cfg.subscriber_buffer
        )
    hub.listeners.append(channels.notify)

    async def retention() -> None:
        while True:
            try:
                await log.trim()
            except StoreError as e:  # a full disk, say: try again next time
                logger.error("retention could not run: %s", e)
            await asyncio.sleep(cfg.retention_check)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        tasks = [
            asyncio.create_task(job)
            for job in (
                retention(),
                *channels.jobs(),
                *(p.run() for p in pullers),
                *(p.run() for p in pushers),
                *([sink.run()] if sink is not None else []),
            )
        ]
        channels.notify([])  # route what arrived while the relay was down
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            hub.close()
            channels.close()
            await channels.stop()
            if sink is not None:
                await sink.close()
            await log.close()
            if follower is not None:
                follower.close()

    policy = Policy.make(
        cfg.allowed_hosts,
        cfg.cors_origins,
        anonymous=not auth.enabled,
        listen_loopback=is_loopback(cfg.host_port()[0]),
    )
    middleware = [Middleware(Guard, policy=policy)]
    if cfg.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=cfg.cors_origins,
                allow_methods=["GET", "POST", "PATCH", "DELETE"],
                allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
                expose_headers=["Location"],
            )
        )
    app = Relay(
        ingest,
        policy,
        auth,
        middleware=middleware,
        routes=[
            Route("/", page),
            Route("/events", feed.endpoint),
            Route("/healthz", health_endpoint(log, hub, ingest, auth)),
            Route("/sites", sites_endpoint(feed, ingest, pullers, pushers, sink)),
            Route("/state", state_endpoint(view, feed)),
            Route("/api/v1/user", user_endpoint(auth)),
            Route("/api/v1/namespace/{path:path}", namespace_endpoint(view, feed)),
            Route(
                "/metrics",
                metrics_endpoint(log, hub, ingest, feed, channels, pullers, pushers, auth, sink),
            ),
            *channels.routes(),
        ],
        lifespan=lifespan,
    )
    # For the server's shutdown: every stream is told to reconnect (elsewhere, or later).
    app.state.hub = hub
    app.state.log = log  # started by the server, on its loop
    app.state.channels = channels
    app.state.sink = sink  # started by the server once the log has (it reads the checkpoint)
    app.state.follower = follower  # started by the server once the log has (it catches up)
    return app
