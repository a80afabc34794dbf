"""``/api/v1/events``: dCache's storage-events REST + SSE API, over :mod:`.channels`.

Existing dCache clients work unchanged: create a channel, add inotify subscriptions, read the
channel's SSE stream, reconnect with ``Last-Event-ID``. Unlike dCache, channels and their backlog
are kept in :class:`~.store.ChannelStore` and survive a relay restart. This is the service of one
relay; :mod:`.shared` is the one replicas of a NATS store share.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Match, Route

from storage_events import sse
from storage_events.relay.auth import EVERYTHING, Authenticator, AuthError, bearer
from storage_events.relay.dcache.channels import (
    EVENTS,
    MACROS,
    MODIFIERS,
    Channel,
    ChannelError,
    Registry,
    Routed,
    deliverable,
    parse_selector,
    resume,
    system,
)
from storage_events.relay.dcache.store import (
    ChannelStorage,
    ChannelStore,
    Snapshot,
    saved,
    snapshot,
)
from storage_events.relay.feed.filters import Scope
from storage_events.relay.feed.follow import KEEPALIVE_LINE, CatchUp, follow
from storage_events.relay.feed.hub import Mailbox
from storage_events.relay.log.base import EventLog, Record, make_record
from storage_events.wire import Flag

log = logging.getLogger("storage_events.relay")

PREFIX = "/api/v1/events"
ANONYMOUS = "anonymous"
MAX_BODY = 64 * 1024
REPLAY_PAGE = 2000
_EVENT = b"\nevent: inotify\n"  # once in every event a replay sends, and in nothing else
_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Payload Too Large",
    415: "Unsupported Media Type",
    429: "Too Many Requests",
    503: "Service Unavailable",
}

SELECTOR_SCHEMA = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "properties": {
        "path": {
            "type": "string",
            "pattern": "^/(.*[^/])?$",
            "description": "The file or directory to watch (not recursive).",
        },
        "flags": {
            "type": "array",
            "uniqueItems": True,
            "items": {"enum": [*EVENTS, *MACROS, *MODIFIERS]},
        },
        "site": {
            "type": "string",
            "description": "Only this site's events (default: every site you may read).",
        },
    },
    "required": ["path"],
    "additionalProperties": False,
}
EVENT_SCHEMA = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "properties": {
        "name": {"type": "string", "description": "The child's name, for directory watches."},
        "cookie": {"type": "string", "description": "Shared by the two halves of a rename."},
        "mask": {
            "type": "array",
            "minItems": 1,
            "items": {"enum": [*EVENTS, "IN_IGNORED", "IN_ISDIR", "IN_Q_OVERFLOW"]},
        },
    },
    "required": ["mask"],
}


def problem(status: int, detail: str, challenge: str = "Bearer") -> JSONResponse:
    headers = {"WWW-Authenticate": challenge} if status == 401 else None
    return JSONResponse(
        {"status": str(status), "title": _TITLES.get(status, "Error"), "detail": detail},
        status_code=status,
        headers=headers,
    )


Handler = Callable[[Request], Awaitable[Response]]


class ChannelService:
    def __init__(
        self,
        registry: Registry,
        store: ChannelStorage,
        log: EventLog,
        auth: Authenticator,
        *,
        heartbeat: float,
        buffer_bytes: int,
    ) -> None:
        self.registry = registry
        self.store = store
        self.log = log
        self.auth = auth
        self.heartbeat = heartbeat
        self.buffer_bytes = buffer_bytes
        # (A shared store is loaded by whichever replica takes the channels over.)
        self.cursor = store.load(registry, time.time()) if isinstance(store, ChannelStore) else 0
        self.streams: dict[str, Mailbox] = {}  # channel id → its one connected client
        self._pending: list[Record] = []
        self._wake = asyncio.Event()
        self._commit = asyncio.Lock()
        self.routed = 0  # events added to channels' backlogs since start
        self.delivered = 0  # events sent to channel clients since start

    def jobs(self) -> list[Coroutine[Any, Any, None]]:
        """What runs while the relay serves."""
        return [self.run(), self.expire()]

    async def stop(self) -> None:
        """After :meth:`close`, when the relay stops."""
        self.store.close()

    # -- routing: the log's records into channels' backlogs --------------------------------

    def notify(self, records: list[Record]) -> None:
        """Hub listener: new records were stored."""
        if self.registry.has_watches:
            self._pending.extend(records)
        self._wake.set()

    async def run(self) -> None:
        """Route stored records to channels, in id order, from the persisted cursor on."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._route()
            except Exception:
                log.exception("routing events to dCache channels failed; retrying in 1 s")
                await asyncio.sleep(1)
                self._wake.set()

    async def _route(self) -> None:
        while self.cursor < self.log.head:
            if not self.registry.has_watches:
                self._pending.clear()
                self.cursor = self.log.head  # persisted with the next subscription
                return
            pending = [r for r in self._pending if r.id > self.cursor]
            self._pending.clear()
            if not pending or pending[0].id != self.cursor + 1:
                pending = await self.log.read(self.cursor, REPLAY_PAGE)
            # Retention may have dropped records before they were routed: every watch is told.
            lost_to = (pending[0].id if pending else self.log.first) - 1
            if lost_to > self.cursor:
                log.error(
                    "dCache channels: events %d-%d were dropped by retention before "
                    "they were routed; sending IN_Q_OVERFLOW",
                    self.cursor + 1,
                    lost_to,
                )
                notice = make_record(lost_to, "", "", "/", int(Flag.Q_OVERFLOW), b"{}")
                await self._apply(self.registry.route([notice]), lost_to)
                continue
            if not pending:
                return
            await self._apply(self.registry.route(pending, time.monotonic()), pending[-1].id)

    def _snapshots(self, channels: Iterable[Channel]) -> list[Snapshot]:
        """Rows of the channels that still exist (one may be deleted while a request waits)."""
        return [snapshot(ch) for ch in channels if self.registry.channels.get(ch.id) is ch]

    def _saved(self, snaps: list[Snapshot]) -> None:
        for snap in snaps:
            ch = self.registry.channels.get(snap.id)
            if ch is not None:
                saved(ch, snap)

    async def _apply(self, routed: Routed, cursor: int | None = None) -> None:
        """Store what routing produced, then tell connected clients."""
        touched = {id(ch): ch for ch, *_ in routed.events}
        for w in routed.closed:
            touched[id(w.channel)] = w.channel
        for ch in routed.followed.values():
            touched[id(ch)] = ch
        for ch in touched.values():
            self.registry.trimmed(ch)
        live = self.registry.channels
        rows = [
            (ch.id, i, data, origin)
            for ch, i, data, origin in routed.events
            if live.get(ch.id) is ch
        ]
        self.routed += len(rows)
        if not rows and not touched:
            # Nothing reached a channel: the cursor moves on in memory only, and is stored with
            # the next write. After a crash these records are routed again and reach no watch
            # again (a watch added since was stored with a cursor past them). Otherwise every
            # batch stored, a forger's too, would cost a transaction here.
            if cursor is not None:
                self.cursor = cursor
            return
        async with self._commit:
            snaps = self._snapshots(touched.values())
            await self.store.write(snaps, cursor, rows, None, sorted(self.registry.deferred))
            self._saved(snaps)
            if cursor is not None:
                self.cursor = cursor
        self._deliver(routed)
        for w in routed.closed:
            await self._tell(w.channel, system("SUBSCRIPTION_CLOSED", w.url))

    def _deliver(self, routed: Routed) -> None:
        """Push what was routed and stored to the connected clients."""
        items: dict[str, list[tuple[int, bytes]]] = {}
        for ch, i, data, origin in routed.events:
            if ch.id not in self.streams:
                continue
            # Routed under the scope of its time; the owner may have reconnected with a
            # narrower token while this batch was being stored.
            allowed = deliverable(ch.scope, origin, data)
            if allowed is not None:
                items.setdefault(ch.id, []).append((i, sse.render(allowed, event="inotify", id=i)))
        for cid, batch in items.items():
            self.streams[cid].push(batch, sum(len(b) for _, b in batch))

    async def _tell(self, ch: Channel, data: bytes) -> None:
        """A SYSTEM message for the channel's client, if one is connected."""
        box = self.streams.get(ch.id)
        if box is not None:
            item = sse.render(data, event="SYSTEM")
            box.push([(-1, item)], len(item))

    async def _end_stream(self, cid: str, farewell: bytes) -> None:
        """The channel is gone: its client is told ``farewell`` and its stream ends."""
        box = self.streams.pop(cid, None)
        if box is not None:
            box.close(farewell)

    async def _save(self, ch: Channel) -> None:
        async with self._commit:  # so self.cursor is a committed one
            snaps = self._snapshots([ch])
            await self.store.write(snaps, self.cursor, None, None, sorted(self.registry.deferred))
            self._saved(snaps)

    async def expire(self, every: float = 1.0) -> None:
        while True:
            try:
                held = self.registry.flush(time.monotonic())  # loss notices held back
                if held.events:
                    await self._apply(held)
                for ch in self.registry.expired(time.time()):
                    if ch.connected or ch.id not in self.registry.channels:
                        continue  # a client came back, or it went, while we waited
                    log.info(
                        "channel %s of %s expired after %d s without a client",
                        ch.id,
                        ch.owner,
                        ch.timeout,
                    )
                    await self._delete(ch)
            except Exception:
                log.exception("expiring dCache channels failed; trying again")
            await asyncio.sleep(every)

    async def _delete(self, ch: Channel) -> None:
        ended = self.registry.delete(ch)
        async with self._commit:
            await self.store.write([], None, None, [ch.id])
        await self._end_stream(
            ch.id,
            b"".join(
                sse.render(system("SUBSCRIPTION_CLOSED", w.url), event="SYSTEM") for w in ended
            ),
        )

    def close(self) -> None:
        """The relay is stopping: connected clients are told, as dCache does."""
        for box in self.streams.values():
            box.close(sse.render(system("SHUTDOWN"), event="SYSTEM"))

    # -- HTTP ------------------------------------------------------------------------------

    def _caller(self, request: Request) -> tuple[str, Scope]:
        if not self.auth.enabled:
            return ANONYMOUS, Scope()
        who = self.auth.reader(
            bearer(
                request.headers.get("authorization", ""), request.query_params.get("access_token")
            )
        )
        assert who is not None  # enabled: no anonymous callers
        return who.name, who.scope

    def _channel(self, request: Request) -> Channel:
        owner, scope = self._caller(request)
        ch = self.registry.get(request.path_params["cid"], owner)
        ch.scope = scope  # rights follow the owner's current token
        return ch

    def _base(self, request: Request) -> str:
        return str(request.base_url).rstrip("/") + PREFIX + "/channels"

    def _url(self, request: Request, ch: Channel) -> str:
        """A channel's URL as this request reached the relay, as dCache lists them: the name
        the client used, even if the channel was made through another. (A subscription keeps
        the URL it was given at creation: events name it, and clients match the two.)"""
        return f"{self._base(request)}/{ch.id}"

    def routes(self) -> list[Route]:
        def handle(fn: Handler) -> Handler:
            async def wrapped(request: Request) -> Response:
                try:
                    return await fn(request)
                except ChannelError as e:
                    return problem(e.status, e.detail)
                except AuthError as e:
                    return problem(e.status, str(e), self.auth.challenge)

            return wrapped

        channel = PREFIX + "/channels/{cid}"
        watch = channel + "/subscriptions/{type}/{sid}"
        routes = [
            Route(PREFIX, handle(self.info)),
            Route(PREFIX + "/eventTypes", handle(self.event_types)),
            Route(PREFIX + "/eventTypes/{type}", handle(self.event_type)),
            Route(PREFIX + "/eventTypes/{type}/{what}", handle(self.schema)),
            Route(PREFIX + "/channels", handle(self.create), methods=["POST"]),
            Route(PREFIX + "/channels", handle(self.list_channels)),
            Route(channel, handle(self.get_channel)),
            Route(channel, handle(self.patch_channel), methods=["PATCH"]),
            Route(channel, handle(self.delete_channel), methods=["DELETE"]),
            Route(channel + "/subscriptions", handle(self.list_watches)),
            Route(channel + "/subscriptions/{type}", handle(self.subscribe), methods=["POST"]),
            Route(watch, handle(self.get_watch)),
            Route(watch, handle(self.delete_watch), methods=["DELETE"]),
        ]

        async def elsewhere(request: Request) -> Response:
            # Answer in the API's own error format, not the framework's plain text.
            if any(r.matches(request.scope)[0] is Match.PARTIAL for r in routes):
                return problem(405, f"{request.method} is not allowed on {request.url.path}")
            return problem(404, f"there is no {request.url.path} in this API")

        return [
            *routes,
            Route(
                PREFIX + "{rest:path}",
                elsewhere,
                methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"],
            ),
        ]

    async def info(self, request: Request) -> Response:
        lim = self.registry.limits
        return JSONResponse(
            {
                "channels": {
                    "maximumPerUser": lim.per_user,
                    "lifetimeWhenDisconnected": {
                        "minimum": 1,
                        "maximum": lim.max_timeout,
                        "default": lim.timeout,
                    },
                }
            }
        )

    async def event_types(self, request: Request) -> Response:
        self._caller(request)
        return JSONResponse(["inotify"])

    def _type(self, request: Request) -> None:
        kind = request.path_params["type"]
        if kind != "inotify":
            raise ChannelError(404, f"unknown event type {kind[:40]!r}: this relay has 'inotify'")

    async def event_type(self, request: Request) -> Response:
        self._caller(request)
        self._type(request)
        return JSONResponse(
            {
                "description": "Changes to files and directories, as inotify(7) "
                "reports them, from every site of this relay"
            }
        )

    async def schema(self, request: Request) -> Response:
        self._caller(request)
        self._type(request)
        what = request.path_params["what"]
        if what not in ("selector", "event"):
            raise ChannelError(404, f"no {what[:40]!r} here: try 'selector' or 'event'")
        return JSONResponse(SELECTOR_SCHEMA if what == "selector" else EVENT_SCHEMA)

    async def create(self, request: Request) -> Response:
        owner, scope = self._caller(request)
        body = await _json_body(request, required=False)
        client_id = body.get("client-id") if isinstance(body, dict) else None
        if body is not None and (
            not isinstance(body, dict)
            or not isinstance(client_id, str | None)
            or set(body) - {"client-id"}
        ):
            raise ChannelError(400, 'the body may only be {"client-id": "<string>"}')
        ch = self.registry.create(owner, scope, client_id, self._base(request), time.time())
        await self._save(ch)
        log.info("channel %s created by %s", ch.id, owner)
        return Response(status_code=201, headers={"Location": ch.url})

    async def list_channels(self, request: Request) -> Response:
        owner, _ = self._caller(request)
        q = request.query_params
        found = self.registry.listing(owner, q.get("client-id"), "client-id" in q)
        return JSONResponse([self._url(request, ch) for ch in found])

    async def get_channel(self, request: Request) -> Response:
        ch = self._channel(request)
        if "text/event-stream" in request.headers.get("accept", ""):
            return self._connect(ch, request.headers.get("last-event-id"))
        return JSONResponse({"timeout": ch.timeout})

    async def patch_channel(self, request: Request) -> Response:
        body = await _json_body(request)  # first: the channel is looked up after the last await
        ch = self._channel(request)
        if not isinstance(body, dict) or "timeout" not in body:
            raise ChannelError(400, 'send {"timeout": <seconds>}')
        self.registry.set_timeout(ch, body["timeout"])
        await self._save(ch)
        return Response(status_code=204)

    async def delete_channel(self, request: Request) -> Response:
        await self._delete(self._channel(request))
        return Response(status_code=204)

    async def list_watches(self, request: Request) -> Response:
        ch = self._channel(request)
        return JSONResponse([w.url for w in ch.watches.values()])

    async def subscribe(self, request: Request) -> Response:
        body = await _body(request)  # first: the channel is looked up after the last await
        ch = self._channel(request)
        kind = request.path_params["type"]
        if kind != "inotify":
            raise ChannelError(400, f"unknown event type {kind[:40]!r}: this relay has 'inotify'")
        w, new = self.registry.subscribe(ch, parse_selector(body))
        await self._save(ch)
        if not new:
            return Response(status_code=303, headers={"Location": w.url})
        await self._tell(ch, system("NEW_SUBSCRIPTION", w.url))
        return Response(status_code=201, headers={"Location": w.url})

    async def get_watch(self, request: Request) -> Response:
        ch = self._channel(request)
        self._type(request)
        sel = self.registry.watch(ch, request.path_params["sid"]).selector
        return Response(
            json.dumps(
                {
                    k: v
                    for k, v in (("path", sel.path), ("flags", sel.flags), ("site", sel.site))
                    if v is not None
                }
            ),
            media_type="application/json",
        )

    async def delete_watch(self, request: Request) -> Response:
        ch = self._channel(request)
        self._type(request)
        w = self.registry.watch(ch, request.path_params["sid"])
        await self._apply(self.registry.end(w))
        return Response(status_code=204)

    # -- the channel's SSE stream ----------------------------------------------------------

    def _connect(self, ch: Channel, last_event_id: str | None) -> Response:
        start, loss = resume(ch, last_event_id)
        old = self.streams.get(ch.id)
        if old is not None:  # the newest client wins, as in dCache
            old.close(sse.render(system("COMPETING_CLIENT"), event="SYSTEM"))
        box = Mailbox(self.buffer_bytes)
        self.streams[ch.id] = box
        self.registry.connect(ch)
        # Live only: from the next id on (anything already pushed to the box is newer).
        last = ch.next_id - 1 if start is None else start
        return StreamingResponse(
            self._stream(ch, box, last, start is not None, loss),
            media_type="text/event-stream",
            # Its body ends where the connection does (relay/edge/server.py unframes it): see
            # _AsDCache there.
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "close"},
        )

    async def _stream(
        self, ch: Channel, box: Mailbox, last: int, replay: bool, loss: bool
    ) -> AsyncIterator[bytes]:
        try:
            if loss:
                yield sse.render(system("EVENT_LOSS"), event="SYSTEM")
            async for chunk in follow(
                box,
                last,
                self._catch_up(ch),
                heartbeat=self.heartbeat,
                sent=self._sent,
                live_first=not replay,
                keepalive=KEEPALIVE_LINE,  # (dCache sends no comments here)
            ):
                yield chunk
        finally:
            self._gone(ch, box)

    def _gone(self, ch: Channel, box: Mailbox) -> None:
        """The stream of ``box`` ended. Synchronously: a cancelled stream cannot await any more."""
        if self.streams.get(ch.id) is box:
            del self.streams[ch.id]
            if ch.id in self.registry.channels:
                self.registry.disconnect(ch, time.time())
                assert isinstance(self.store, ChannelStore)  # (a shared one tells its holder)
                snaps = self._snapshots([ch])
                self.store.save(snaps, None)
                self._saved(snaps)

    def _sent(self, n: int) -> None:
        self.delivered += n

    def _catch_up(self, ch: Channel) -> CatchUp:
        async def catch_up(after: int) -> AsyncIterator[tuple[int, bytes, int]]:
            async for chunk, newest in self._replay(ch, after):
                yield newest, chunk, chunk.count(_EVENT)

        return catch_up

    async def _replay(self, ch: Channel, after: int) -> AsyncIterator[tuple[bytes, int]]:
        """The stored backlog after ``after``, as the owner may see it now: each row was routed
        under the rights of its time, which may have been wider."""
        if after + 1 < ch.first_id:  # the backlog moved on while this client fell behind
            yield sse.render(system("EVENT_LOSS"), event="SYSTEM"), ch.first_id - 1
            after = ch.first_id - 1
        unknown_told = False
        while True:
            rows = await self.store.fetch(ch.id, after, REPLAY_PAGE)
            if not rows:
                return
            chunks = []
            if rows[0][0] > after + 1:  # trimmed while this client was reading
                chunks.append(sse.render(system("EVENT_LOSS"), event="SYSTEM"))
            after = rows[-1][0]
            for i, data, origin in rows:
                if origin is None:
                    # Stored before rows kept their origin: only an owner who may read
                    # everything gets it; anyone else is told that something is missing.
                    if ch.scope == EVERYTHING:
                        chunks.append(sse.render(data, event="inotify", id=i))
                    elif not unknown_told:
                        chunks.append(sse.render(system("EVENT_LOSS"), event="SYSTEM"))
                        unknown_told = True
                    continue
                allowed = deliverable(ch.scope, origin, data)
                if allowed is not None:
                    chunks.append(sse.render(allowed, event="inotify", id=i))
            yield b"".join(chunks), after  # rows skipped still move the replay on


async def _body(request: Request) -> bytes:
    # Only JSON, said so: a page on another origin cannot send that without a CORS preflight
    # (a form or a "simple" fetch can send text/plain), so no page can write here.
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    body = await request.body()
    if body and media != "application/json" and not media.endswith("+json"):
        raise ChannelError(
            415,
            f"the request body must be JSON, sent with Content-Type: "
            f"application/json (not {media[:60] or 'none'!r})",
        )
    if len(body) > MAX_BODY:
        raise ChannelError(413, f"the request body is larger than {MAX_BODY} bytes")
    return body


async def _json_body(request: Request, required: bool = True) -> Any:
    body = await _body(request)
    if not body.strip():
        if required:
            raise ChannelError(400, "this request needs a JSON body")
        return None
    try:
        return json.loads(body)
    except ValueError as e:
        raise ChannelError(400, f"the body is not valid JSON: {e}") from None
