"""dCache channels shared by the replicas of a NATS store (``--store nats://``).

One replica at a time holds the channels (:mod:`.lease`): it keeps them in memory as a single
relay does, routes the log into them, expires them, and answers every channel API request; the
others pass the requests their clients send to it over NATS request/reply (:mod:`.forward`), so
clients see one service whatever replica they reach. State and backlogs are on JetStream
(:mod:`.nats_store`): whoever takes the lease over loads them and routes on from the stored
cursor, to the same channel event ids.

A channel's stream is served by the replica its client reached, from the backlog stream: catch-up
after the resume point, then live from this replica's subscription to that stream, which also
carries the SYSTEM messages for clients. The holder is asked for the resume point like any other
request and told when the client goes; every replica says every few seconds which clients it
has, so that one that dies does not keep its channels connected, and never expiring, for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Coroutine
from typing import Any

import msgspec
from nats.errors import Error as NATSError
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NATSTimeout
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Match, Route

from storage_events import sse
from storage_events.relay.auth import Authenticator, AuthError
from storage_events.relay.dcache import forward
from storage_events.relay.dcache.api import MAX_BODY, PREFIX, ChannelService, problem
from storage_events.relay.dcache.channels import (
    Channel,
    Registry,
    Routed,
    deliverable,
    resume,
    system,
)
from storage_events.relay.dcache.lease import TTL, LeaseKeeper
from storage_events.relay.dcache.nats_store import NATSChannelStore, Notice, decode_row
from storage_events.relay.feed.filters import Scope
from storage_events.relay.feed.hub import Mailbox
from storage_events.relay.log.base import StoreError
from storage_events.relay.log.nats import NATSLog

log = logging.getLogger("storage_events.relay")

PRESENCE_EVERY = 3.0  # seconds between a replica's "these clients are mine"
PRESENCE_TIMEOUT = 15.0  # the holder disconnects a channel not claimed for this long
FORWARD_TIMEOUT = 10.0
CONNECTION = "x-storage-events-connection"  # (forwarded only) the stream a grant is for
_COMPETING = sse.render(system("COMPETING_CLIENT"), event="SYSTEM")


class Grant(msgspec.Struct, array_like=True):
    """The holder's answer to a client connecting to a channel's stream."""

    start: int | None  # as :func:`.channels.resume`
    loss: bool
    first: int
    next: int
    since: int  # the stream sequence of the notice that this client took the channel


class Presence(msgspec.Struct, array_like=True):
    conns: list[tuple[str, str]]  # (channel, connection) of streams on one replica
    gone: bool = False  # these ended


_grants = msgspec.msgpack.Decoder(Grant)
_presence = msgspec.msgpack.Decoder(Presence)
_encode = msgspec.msgpack.encode


class Reader(Mailbox):
    """A client of a channel's stream on this replica."""

    __slots__ = ("conn", "scope", "since")

    def __init__(self, max_bytes: int, conn: str, scope: Scope, since: int) -> None:
        super().__init__(max_bytes)
        self.conn = conn
        self.scope = scope  # as this replica checked the client's token
        self.since = since  # notices from before this client connected are not its


def unavailable(detail: str) -> Response:
    r = problem(503, f"{detail}; another relay takes the channels over within about 15 s: retry")
    r.headers["Retry-After"] = "5"
    return r


class SharedChannels(ChannelService):
    def __init__(
        self,
        registry: Registry,
        log: NATSLog,
        auth: Authenticator,
        *,
        heartbeat: float,
        buffer_bytes: int,
    ) -> None:
        self.nats_store = NATSChannelStore(log)
        super().__init__(
            registry, self.nats_store, log, auth, heartbeat=heartbeat, buffer_bytes=buffer_bytes
        )
        self.nats_log = log
        self.me = f"{log.name}/{secrets.token_hex(4)}"  # a replica restarted is another
        self.holding = False
        self.listening = False  # to the backlog stream: streams can be served
        self._term = 0  # changes whenever this relay starts or stops holding the channels
        self.streams: dict[str, Reader] = {}  # type: ignore[assignment]
        self._subject = f"storage-events.{log.stream}.channel-api."
        self._conns: dict[str, tuple[str, float]] = {}  # channel → its connection, last claimed
        self._keeper: LeaseKeeper | None = None
        self._local: list[Route] = []  # the handlers, for requests passed to this replica
        self._tasks: set[asyncio.Task[Any]] = set()

    def jobs(self) -> list[Coroutine[Any, Any, None]]:
        return [self._serve()]

    def _spawn(self, job: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(job)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self) -> None:
        while True:
            try:
                await self.nats_store.start(TTL)
                await self.nats_store.listen(self._heard, self._noticed)
                self.listening = True
                break
            except (StoreError, NATSError) as e:
                log.error("dCache channels: cannot open their state on JetStream (%s)", e)
                await asyncio.sleep(5)
        self._keeper = LeaseKeeper(self.nats_store.lease, self.me)
        await asyncio.gather(self._keeper.hold(self._hold_channels), self._refresh())

    async def stop(self) -> None:
        """Give the channels up at once, so another replica need not wait for the lease."""
        if self._keeper is not None:
            await self._keeper.stop()
        if self._tasks:  # (streams that ended tell the holder)
            await asyncio.wait(self._tasks, timeout=2)

    # -- holding the channels --------------------------------------------------------------

    async def _hold_channels(self) -> None:
        """This replica's time as the holder: until cancelled, or the store fails."""
        jobs: list[asyncio.Task[None]] = []
        subs: list[Any] = []
        try:
            registry = Registry(self.registry.limits)
            async with self._commit:  # (after any write still on its way from before)
                self.cursor = await self.nats_store.load(registry, time.time())
            self.registry = registry
            # Routed up to the log's head before answering: a client resuming with an id it
            # got from the last holder finds that id here.
            await self._route()
            nc = self.nats_log.client
            subs = [
                await nc.subscribe(self._subject + "requests", "holder", cb=self._request),
                await nc.subscribe(self._subject + "presence", cb=self._presence),
            ]
            self.holding = True
            self._term += 1
            log.info(
                "dCache channels: this relay holds them now (%d channels, routed to log id %d)",
                len(registry.channels),
                self.cursor,
            )
            jobs = [
                asyncio.get_running_loop().create_task(job)
                for job in (self.run(), self._expire_later(), self._sweep())
            ]
            self._wake.set()
            await self.nats_store.failed.wait()
            log.warning("dCache channels: writing them failed; loading them again")
        finally:
            if self.holding:
                self._term += 1
            self.holding = False
            self.nats_store.failed.set()  # a request still running must not write any more
            for job in jobs:
                job.cancel()
            for sub in subs:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            self.registry = Registry(self.registry.limits)
            self._conns.clear()
            self._pending.clear()

    async def _expire_later(self) -> None:
        # Whoever took over knows no client yet: they all say so within PRESENCE_EVERY.
        await asyncio.sleep(2 * PRESENCE_EVERY)
        await self.expire()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(PRESENCE_EVERY)
            try:
                now = time.monotonic()
                for cid, (_, seen) in list(self._conns.items()):
                    if now - seen > PRESENCE_TIMEOUT:
                        del self._conns[cid]
                        ch = self.registry.channels.get(cid)
                        if ch is not None and ch.connected:
                            log.info("channel %s: no relay says its client is connected", cid)
                            self.registry.disconnect(ch, time.time())
                            await self._save(ch)
                await self.nats_store.trim_notices()
            except (StoreError, NATSError) as e:
                log.warning("dCache channels: checking their clients failed (%s)", e)

    async def _presence(self, msg: Any) -> None:
        try:
            p = _presence.decode(msg.data)
        except msgspec.DecodeError as e:
            log.error("dCache channels: a presence message that is not one (%s)", e)
            return
        self._spawn(self._present(p))

    async def _present(self, p: Presence) -> None:
        now = time.monotonic()
        for cid, conn in p.conns:
            ch = self.registry.channels.get(cid)
            known = self._conns.get(cid)
            if ch is None or (known is not None and known[0] != conn):
                continue  # (an older client, whose relay is told to end it)
            if p.gone:
                self._conns.pop(cid, None)
                if ch.connected:
                    self.registry.disconnect(ch, time.time())
                    await self._save(ch)
            else:
                self._conns[cid] = (conn, now)
                if not ch.connected:
                    self.registry.connect(ch)
                    await self._save(ch)

    # -- what the single relay does locally, here through the backlog stream --------------

    def _deliver(self, routed: Routed) -> None:
        """(Clients get events from the backlog stream, on every replica.)"""

    async def _tell(self, ch: Channel, data: bytes) -> None:
        if ch.connected:
            await self.nats_store.notice(Notice(ch.id, "tell", data))

    async def _end_stream(self, cid: str, farewell: bytes) -> None:
        await self.nats_store.notice(Notice(cid, "closed", farewell))

    async def get_channel(self, request: Request) -> Response:
        """(Here only as the holder, for requests passed on: a stream's grant.)"""
        if "text/event-stream" not in request.headers.get("accept", ""):
            return await super().get_channel(request)
        ch = self._channel(request)
        start, loss = resume(ch, request.headers.get("last-event-id"))
        conn = request.headers.get(CONNECTION, "")
        self.registry.connect(ch)
        self._conns[ch.id] = (conn, time.monotonic())
        await self._save(ch)
        since = await self.nats_store.notice(Notice(ch.id, "connected", conn=conn))
        grant = Grant(start, loss, ch.first_id, ch.next_id, since)
        return Response(_encode(grant), media_type="application/msgpack")

    # -- requests: answered by the holder, wherever they arrive ----------------------------

    def routes(self) -> list[Route]:
        public = []
        for route in super().routes():
            if not route.path.startswith(PREFIX + "/channels"):
                public.append(route)  # (the same answer everywhere)
                continue
            self._local.append(route)
            endpoint = self._open if route.path == PREFIX + "/channels/{cid}" else self._passed
            public.append(Route(route.path, endpoint, methods=route.methods))
        return public

    async def _passed(self, request: Request) -> Response:
        return forward.response(await self._ask(request))

    async def _ask(self, request: Request, conn: str | None = None) -> forward.Answer:
        """The holder's answer to ``request``, as this replica or over NATS."""
        fwd = await forward.forwarded(request, MAX_BODY, {CONNECTION: conn} if conn else None)
        if self.holding:
            return await self._dispatch(fwd)
        try:
            reply = await self.nats_log.client.request(
                self._subject + "requests", forward.encode(fwd), timeout=FORWARD_TIMEOUT
            )
        except NoRespondersError:
            return forward.answer(unavailable("no relay holds the dCache channels at the moment"))
        except NATSTimeout:
            return forward.answer(
                unavailable(
                    f"the relay holding the dCache channels did not answer in {FORWARD_TIMEOUT} s"
                )
            )
        except NATSError as e:
            return forward.answer(
                unavailable(f"cannot reach the relay holding the dCache channels over NATS ({e})")
            )
        try:
            return forward.decode_answer(reply.data)
        except msgspec.DecodeError as e:
            return forward.answer(problem(502, f"the holder's answer is not one ({e})"))

    async def _request(self, msg: Any) -> None:
        self._spawn(self._reply(msg))

    async def _reply(self, msg: Any) -> None:
        try:
            answer = await self._dispatch(forward.decode_request(msg.data))
        except msgspec.DecodeError as e:
            answer = forward.answer(problem(400, f"a forwarded request that is not one ({e})"))
        except Exception as e:
            log.exception("dCache channels: a request passed to this relay failed")
            answer = forward.answer(problem(500, f"the relay holding the channels failed: {e}"))
        with contextlib.suppress(NATSError):
            await msg.respond(forward.encode(answer))

    async def _dispatch(self, fwd: forward.Forwarded) -> forward.Answer:
        if not self.holding:
            return forward.answer(unavailable("this relay no longer holds the dCache channels"))
        scope = forward.scope(fwd)
        term = self._term
        partial = False
        for route in self._local:
            match, child = route.matches(scope)
            if match is Match.FULL:
                try:
                    response = await route.endpoint(forward.request({**scope, **child}, fwd.body))
                except StoreError as e:
                    response = unavailable(f"the dCache channels could not be stored ({e})")
                if self._term != term:  # what it did may be lost with the state it was made on
                    response = unavailable("the relay holding the dCache channels changed")
                return forward.answer(response)
            partial = partial or match is Match.PARTIAL
        if partial:
            return forward.answer(problem(405, f"{fwd.method} is not allowed on {fwd.path}"))
        return forward.answer(problem(404, f"there is no {fwd.path} in this API"))

    # -- a channel's stream, on the replica its client reached -----------------------------

    async def _open(self, request: Request) -> Response:
        if request.method != "GET" or "text/event-stream" not in request.headers.get("accept", ""):
            return await self._passed(request)
        try:
            owner, scope = self._caller(request)
        except AuthError as e:
            return problem(e.status, str(e))
        if not self.listening:
            return unavailable("this relay is still opening the dCache channels' stream")
        conn = secrets.token_hex(8)
        answer = await self._ask(request, conn)
        if answer.status != 200:
            return forward.response(answer)
        try:
            grant = _grants.decode(answer.body)
        except msgspec.DecodeError as e:  # (a holder of another version)
            return problem(502, f"the relay holding the channels answered with no grant ({e})")
        cid = request.path_params["cid"]
        old = self.streams.get(cid)
        if old is not None:
            old.close(_COMPETING)
        box = self.streams[cid] = Reader(self.buffer_bytes, conn, scope, grant.since)
        view = Channel(cid, owner, scope, None, "", 0, grant.next, grant.first)
        # Always from the backlog first: it holds what was stored since the holder answered.
        last = grant.next - 1 if grant.start is None else grant.start
        return StreamingResponse(
            self._stream(view, box, last, True, grant.loss),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    def _gone(self, ch: Channel, box: Mailbox) -> None:
        if self.streams.get(ch.id) is box:
            del self.streams[ch.id]
            assert isinstance(box, Reader)
            self._spawn(self._say([(ch.id, box.conn)], gone=True))

    async def _say(self, conns: list[tuple[str, str]], gone: bool = False) -> None:
        with contextlib.suppress(NATSError):
            await self.nats_log.client.publish(
                self._subject + "presence", _encode(Presence(conns, gone))
            )

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(PRESENCE_EVERY)
            if self.streams:
                await self._say([(cid, box.conn) for cid, box in self.streams.items()])

    def _heard(self, cid: str, data: bytes) -> None:
        box = self.streams.get(cid)
        if box is None:
            return
        row = decode_row(data)
        allowed = deliverable(box.scope, row.origin(), row.data)
        if allowed is not None:
            item = sse.render(allowed, event="inotify", id=row.id)
            box.push([(row.id, item)], len(item))

    def _noticed(self, seq: int, notice: Notice) -> None:
        box = self.streams.get(notice.cid)
        if box is None or seq <= box.since:
            return
        if notice.kind == "tell":
            item = sse.render(notice.data, event="SYSTEM")
            box.push([(-1, item)], len(item))
        elif notice.kind == "closed" or (notice.kind == "connected" and notice.conn != box.conn):
            del self.streams[notice.cid]
            box.close(notice.data if notice.kind == "closed" else _COMPETING)
