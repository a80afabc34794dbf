"""``/ingest``: the WebSocket shell around :class:`~.session.IngestSession`. Each batch is
acknowledged once the log holds it; the log hands what it stored to the hub itself."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable

from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketDisconnected

from storage_events.relay.auth import Authenticator
from storage_events.relay.federation.core import PUSHED_KEY, LoopGuard
from storage_events.relay.ingest.session import IngestLimits, IngestSession, ProtocolError
from storage_events.relay.log.base import EventLog, StoreError
from storage_events.wire import (
    Ack,
    Error,
    Event,
    Hello,
    Welcome,
    encode_frame,
)

log = logging.getLogger("storage_events.relay")


class Ingest:
    """The WebSocket endpoint, and the one way events from outside enter the log (agents,
    pushing relays, and the feeds of upstream relays)."""

    def __init__(
        self,
        log: EventLog,
        limits: IngestLimits,
        auth: Authenticator | None = None,
        me: str = "relay",
    ) -> None:
        self.auth = auth
        self.me = me
        self.log = log
        self.limits = limits
        self.connections = 0
        self.by_site: Counter[str] = Counter()  # open agent connections
        self.relays: Counter[str] = Counter()  # open connections of relays pushing to us
        self.last_ts: dict[str, int] = {}  # newest event time stored, by site
        self.route: dict[str, str] = {}  # by site: the peer relay its events last came from
        self.looped = 0  # events dropped because they had already passed through this relay
        # Why the log cannot store right now (None: it can): shown by /healthz and /metrics.
        self.store_error: str | None = None
        # agent stream → the connection publishing it (session, socket, who)
        self._live: dict[str, tuple[IngestSession, WebSocket, str]] = {}
        self._closing: set[asyncio.Future[None]] = set()  # connections being told they lost it

    async def store(self, events: list[Event], checkpoint: tuple[str, int] | None = None) -> None:
        """Store; a ``checkpoint`` says they came from a peer relay. While the log cannot
        store, this waits and retries: the senders' batches stay unacknowledged (they keep
        them) and no connection is dropped, so nobody reconnects in a loop."""
        delay = 0.2
        while True:
            try:
                records = await self.log.append(events, checkpoint)
                break
            except StoreError as e:
                if self.store_error is None:
                    log.error("%s", e)
                self.store_error = str(e)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
        if self.store_error is not None:
            log.warning("the event log stores again")
            self.store_error = None
        # Only what was stored moves a site's health (what was held already stands for itself).
        if checkpoint is None:  # an agent's batch: one site
            last = records[-1].event() if records else events[-1] if events else None
            if last is not None:
                self.last_ts[last.site] = last.ts
                self.route.pop(last.site, None)
            return
        for ev in [r.event() for r in records] if records else events:
            self.last_ts[ev.site] = ev.ts
            if len(ev.via) >= 2:  # the last is this relay; a loss notice made here has no other
                self.route[ev.site] = ev.via[-2]  # the peer's own name for itself

    def count_loops(self, guard: LoopGuard) -> None:
        if guard.report is not None:
            log.error("%s", guard.report)
            guard.report = None
        self.looped, guard.looped = self.looped + guard.looped, 0

    def asgi(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        return self.endpoint(WebSocket(scope, receive, send))

    async def endpoint(self, ws: WebSocket) -> None:
        await ws.accept()
        session = IngestSession(self.limits, self.auth, self.me)
        peer = f"{ws.client.host}:{ws.client.port}" if ws.client else "?"
        counter: Counter[str] | None = None
        publishing: str | None = None  # the agent stream this connection holds
        self.connections += 1
        try:
            try:
                hello = session.receive(await _receive(ws, timeout=self.limits.hello_timeout))
            except TimeoutError:
                raise ProtocolError(f"no hello within {self.limits.hello_timeout:g} s") from None
            assert isinstance(hello, Hello)
            peer = f"{hello.role} {hello.site}/{hello.node} ({peer})"
            # A relay's position is the last of its ids we hold; an agent's, its stream's seq.
            key = PUSHED_KEY.format(hello.stream) if hello.role == "relay" else hello.stream
            session.checkpoint = await self.log.position(key)
            if hello.role == "agent":
                # Checked and taken with no await between: no other hello comes in between.
                self._check_owner(hello)
                self._take(hello.stream, session, ws, peer)
                publishing = hello.stream
            counter = self.relays if hello.role == "relay" else self.by_site
            counter[hello.site] += 1
            await ws.send_bytes(
                encode_frame(Welcome(stream=hello.stream, acked=session.checkpoint))
            )
            log.info("%s connected, stream %s", peer, hello.stream)
            while True:
                events = session.receive(await _receive(ws))
                assert isinstance(events, list)
                if session.loops is not None:
                    self.count_loops(session.loops)
                    await self.store(events, (key, session.checkpoint))
                    acked = self.log.held(key)
                else:
                    if events and not session.replaced:
                        await self.store(events)
                    if session.replaced:
                        break  # (its events may be stored, but the newer connection is told)
                    acked = session.ack(self.log.held(key))
                await ws.send_bytes(encode_frame(Ack(hello.stream, acked)))
        except ProtocolError as e:
            log.warning("closing ingest connection from %s: %s", peer, e)
            await _refuse(ws, str(e), e.code)
        except StoreError as e:
            # Not the sender's fault: close without an error frame, so it retries soon and
            # resends what was not acknowledged.
            log.error("cannot store events from %s: %s", peer, e)
            await _close(ws, 1011, "the relay cannot store events right now; retry")
        except (WebSocketDisconnect, WebSocketDisconnected):
            # (The second: closed by the relay meanwhile, as when a newer connection took over.)
            log.info("%s disconnected", peer)
        finally:
            self.connections -= 1
            if counter is not None:
                counter[hello.site] -= 1
            if publishing is not None and self._live.get(publishing, (None,))[0] is session:
                del self._live[publishing]

    def _take(self, stream: str, session: IngestSession, ws: WebSocket, peer: str) -> None:
        """Make this the one connection publishing ``stream``. An older one of the same sender
        (site, node and token) is a connection its agent gave up on (it reconnected: the old
        one may not even know yet): it is closed, and acknowledges nothing more, so every ack
        goes to the connection whose events were stored. Anyone else is refused."""
        holder = (
            (session.hello.site, session.hello.node, session.identity) if session.hello else None
        )
        old = self._live.get(stream)
        if old is not None:
            old_session, old_ws, old_peer = old
            old_hello = old_session.hello
            if old_hello is None or holder != (
                old_hello.site,
                old_hello.node,
                old_session.identity,
            ):
                raise ProtocolError(f"stream {stream!r} is being published by {old_peer}")
            old_session.replaced = True
            log.warning("stream %s: %s takes over from %s", stream, peer, old_peer)
            # No error frame: the agent there must not take this for a refusal of its batch.
            closing = asyncio.ensure_future(
                _close(old_ws, 1012, "a newer connection publishes this stream")
            )
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)
        self._live[stream] = (session, ws, peer)

    def _check_owner(self, hello: Hello) -> None:
        """An agent's stream is its own: bound to the site and node that first published it,
        and published through this relay (not reaching it by federation); one connection at a
        time publishes it (:meth:`_take`)."""
        owner = self.log.stream_owner(hello.stream)
        if owner is not None and (owner.site != hello.site or owner.node not in (None, hello.node)):
            raise ProtocolError(
                f"stream {hello.stream!r} belongs to {owner.site}/"
                f"{owner.node or '?'}: an agent publishes a stream of its own"
            )
        if owner is not None and owner.direct is False:
            raise ProtocolError(
                f"stream {hello.stream!r} reaches this relay through "
                "federation: its agent publishes to one relay only"
            )


async def _receive(ws: WebSocket, timeout: float | None = None) -> bytes | str:
    message = await (ws.receive() if timeout is None else asyncio.wait_for(ws.receive(), timeout))
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    return message.get("bytes") if message.get("bytes") is not None else message.get("text", "")


async def _close(ws: WebSocket, code: int, reason: str) -> None:
    with contextlib.suppress(RuntimeError, WebSocketDisconnect, OSError):
        await ws.close(code, reason)


async def _refuse(ws: WebSocket, message: str, code: int) -> None:
    try:
        await ws.send_bytes(encode_frame(Error(message)))
        # A close reason is limited to 123 bytes; the Error frame has the whole story.
        await ws.close(code, message.encode()[:123].decode("utf-8", "ignore"))
    except (RuntimeError, WebSocketDisconnect, OSError):
        pass  # the peer is already gone
