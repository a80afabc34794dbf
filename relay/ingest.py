"""``/ingest``: the WebSocket agents publish on.

:class:`IngestSession` is the protocol with no I/O: it checks every frame and says what to
store or why the connection must close. :class:`Ingest` is the thin WebSocket shell around it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import msgspec
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketDisconnected

from storage_events.wire import (
    Ack,
    Batch,
    Error,
    Event,
    Hello,
    Welcome,
    decode_to_relay,
    encode_frame,
    event_problem,
)

from .auth import Authenticator, AuthError, Identity
from .federation import PUSHED_KEY, LoopGuard
from .hub import Hub
from .log import EventLog, StoreError

log = logging.getLogger("storage_events.relay")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_STREAM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


class ProtocolError(Exception):
    """The peer broke the ingest protocol; the message tells it (and the log) how."""

    def __init__(self, message: str, code: int = 1008) -> None:
        super().__init__(message)
        self.code = code  # WebSocket close code


MAX_HELLO = 16 * 1024  # bytes: names and a token


@dataclass(frozen=True, slots=True)
class IngestLimits:
    max_batch: int = 10_000
    # Nothing larger is decoded before the sender is known: a hello is names and a token.
    max_hello: int = MAX_HELLO
    hello_timeout: float = 10.0


class IngestSession:
    """One connection's protocol state: a :class:`Hello`, then batches of its stream (an
    agent) or of any streams (a relay pushing its log)."""

    def __init__(self, limits: IngestLimits, auth: Authenticator | None = None,
                 me: str = "relay") -> None:
        self.limits = limits
        self.auth = auth
        self.me = me
        self.hello: Hello | None = None
        self.sites: frozenset[str] | None = None  # a pushing relay's allowed sites
        self.checkpoint = 0  # a pushing relay: the last of its ids in the latest batch;
        # an agent: the highest seq the relay may acknowledge to it (held, or sent by it)
        self.loops: LoopGuard | None = None  # a pushing relay: events that come back
        self.replaced = False  # an agent: a newer connection publishes its stream now
        self.identity: str | None = None  # the token's name (None: anonymous)

    def receive(self, frame: bytes | str) -> Hello | list[Event]:
        if isinstance(frame, str):
            raise ProtocolError("text frames are not part of the ingest protocol: send msgpack "
                                "in binary frames", 1003)
        # Before the sender is known only a small hello is decoded: an anonymous peer must not
        # make the relay parse megabytes.
        if self.hello is None and len(frame) > self.limits.max_hello:
            raise ProtocolError(f"the first frame must be a hello of at most "
                                f"{self.limits.max_hello:,} bytes, not {len(frame):,}", 1009)
        try:
            msg = decode_to_relay(frame)
        except msgspec.ValidationError as e:
            raise ProtocolError(f"invalid frame: {e}", 1007) from None
        except msgspec.DecodeError as e:
            raise ProtocolError(f"frame is not msgpack: {e}", 1007) from None
        if self.hello is None:
            if not isinstance(msg, Hello):
                raise ProtocolError("the first frame must be a hello")
            return self._check_hello(msg)
        if not isinstance(msg, Batch):
            raise ProtocolError("hello sent twice on one connection")
        return self._check_batch(msg.events)

    def _check_hello(self, hello: Hello) -> Hello:
        if not _NAME.match(hello.site):
            raise ProtocolError(f"site name {hello.site[:80]!r} is not valid: use letters, "
                                "digits, '.', '_' or '-' (at most 64)")
        if not _NAME.match(hello.node):
            raise ProtocolError(f"node name {hello.node[:80]!r} is not valid")
        if not _STREAM.match(hello.stream):
            raise ProtocolError(f"stream name {hello.stream[:80]!r} is not valid")
        if hello.role == "relay" and hello.site == self.me:
            raise ProtocolError(f"a relay named {hello.site!r} is pushing to itself: give "
                                "each relay its own `name`")
        if self.auth is not None:
            try:
                who = self.auth.identify(hello.token)
            except AuthError as e:
                raise ProtocolError(str(e)) from None
            if who is not None:
                self._check_identity(hello, who)
        if hello.role == "agent" and not (hello.stream.startswith(hello.node + ":")
                                          and len(hello.stream) > len(hello.node) + 1):
            # Names no relay's loss notices (<relay>.gap) or another node's stream can take.
            raise ProtocolError(f"an agent's stream is <its node>:<run id>, not "
                                f"{hello.stream!r} for node {hello.node!r}")
        if hello.role == "relay":
            if not re.fullmatch(rf"relay:{re.escape(hello.site)}:[0-9]+", hello.stream):
                raise ProtocolError(f"a relay's stream is relay:<its name>:<its log's epoch>, "
                                    f"not {hello.stream[:80]!r}")
            self.loops = LoopGuard(self.me, f"relay {hello.site!r}")
        self.hello = hello
        return hello

    def _check_identity(self, hello: Hello, who: Identity) -> None:
        if who.role != hello.role:
            raise ProtocolError(f"token {who.name!r} is a {who.role} token: it cannot "
                                f"publish as {hello.role}")
        if who.site != hello.site:
            raise ProtocolError(f"token {who.name!r} may publish as "
                                f"{'site' if who.role == 'agent' else 'relay'} "
                                f"{who.site!r}, not {hello.site!r}")
        if who.node is not None and who.node != hello.node:
            raise ProtocolError(f"token {who.name!r} may publish as node {who.node!r}, "
                                f"not {hello.node!r}")
        self.identity = who.name
        if who.role == "relay":
            self.sites = who.scope.sites

    def _check_batch(self, events: list[Event]) -> list[Event]:
        hello = self.hello
        assert hello is not None
        if len(events) > self.limits.max_batch:
            raise ProtocolError(f"batch of {len(events)} events exceeds the limit of "
                                f"{self.limits.max_batch}", 1009)
        if hello.role == "relay":
            return self._check_relayed(events)
        previous = 0
        for i, ev in enumerate(events):
            where = f"event {i} (seq {ev.seq})"
            _check_event(where, ev)
            if ev.stream != hello.stream:
                raise ProtocolError(f"{where} belongs to stream {ev.stream[:80]!r}, "
                                    f"not to this connection's {hello.stream!r}")
            if ev.site != hello.site or ev.node != hello.node:
                raise ProtocolError(f"{where} claims site/node {ev.site[:64]!r}/{ev.node[:64]!r}"
                                    f" but the connection said {hello.site!r}/{hello.node!r}")
            if previous and ev.seq != previous + 1:
                # An agent numbers every event it publishes, loss notices included.
                raise ProtocolError(f"{where}: seq numbers within a batch go up by one "
                                    f"(seq {ev.seq} after {previous})")
            previous = ev.seq
            if ev.via or ev.origin_id is not None:
                raise ProtocolError(f"{where}: an agent cannot set via/origin_id (relays do)")
            ev.id = 0
        if events:
            self.checkpoint = max(self.checkpoint, events[-1].seq)
        return events

    def ack(self, held: int) -> int:
        """What an agent is told is stored: never beyond what it sent itself, whatever the log
        holds (so no one else's events can make it drop its own unstored ones)."""
        return min(held, self.checkpoint)

    def _check_relayed(self, events: list[Event]) -> list[Event]:
        """A pushing relay's batch: its own ids increase; sites are within its token's."""
        hello = self.hello
        assert hello is not None and self.loops is not None
        self.checkpoint = check_relayed(events, self.checkpoint, hello.site, self.sites)
        return self.loops.admit(events)


def check_relayed(events: list[Event], previous: int, sender: str | None,
                  sites: frozenset[str] | None = None) -> int:
    """Events from another relay, pushed (``sender``: its name) or pulled: valid names, paths
    and flags; the sender's ids increase; only ``sites`` (None: any). Returns the last id."""
    for i, ev in enumerate(events):
        _check_event(f"event {i}", ev)
        if not (_NAME.match(ev.site) and _NAME.match(ev.node) and _STREAM.match(ev.stream)):
            raise ProtocolError(f"event {i}: site, node or stream name is not valid")
        where = f"event {i} ({ev.stream} seq {ev.seq})"  # (names checked: safe to show)
        gap = _is_gap(ev)  # a relay's loss notice: made by the puller or the sender itself
        if ev.stream.endswith(".gap") and not gap:
            raise ProtocolError(f"{where}: a stream <relay>.gap holds only that relay's loss "
                                "notices (an overflow of / from site and node <relay>)")
        if sites is not None and ev.site not in sites and not (
                ev.site == sender and ev.stream == f"{sender}.gap"):  # its own loss notices
            raise ProtocolError(f"{where}: relay {sender!r} may not push events of site "
                                f"{ev.site!r}")
        if ev.id <= previous:
            raise ProtocolError(f"{where}: the sending relay's ids must increase "
                                f"(id {ev.id} after {previous})")
        if not (ev.via or (gap and sender is None)) or (ev.origin_id is None and not gap):
            raise ProtocolError(f"{where}: a relayed event names the relays it passed through "
                                "(via) and the first one's id (origin_id)")
        if sender is not None and ev.via[-1] != sender:
            raise ProtocolError(f"{where}: a pushed event's via must end with the pushing "
                                f"relay {sender!r}")
        if len(set(ev.via)) != len(ev.via):
            raise ProtocolError(f"{where}: via names a relay twice ({' → '.join(ev.via)})")
        if len(ev.via) == 1 and ev.origin_id not in (ev.id, None):
            # The first relay's id is the one it sends: only further hops can keep another.
            raise ProtocolError(f"{where}: origin_id {ev.origin_id} of an event stored only by "
                                f"{ev.via[0]} must be its id {ev.id}")
        previous = ev.id
    return previous


def _is_gap(ev: Event) -> bool:
    return (ev.stream.endswith(".gap") and ev.site == ev.node == ev.stream[:-4]
            and ev.path == "/" and ev.flags == ["IN_Q_OVERFLOW"] and ev.old_path is None)


def _check_event(where: str, ev: Event) -> None:
    # The limits are the wire's (the agent checks them too, before numbering an event).
    problem = event_problem(ev)
    if problem is not None:
        raise ProtocolError(f"{where}: {problem}")


class Ingest:
    """The WebSocket endpoint. Batches from all connections are stored one at a time by a
    single writer thread, and published to the hub in id order."""

    def __init__(self, log: EventLog, hub: Hub, limits: IngestLimits,
                 auth: Authenticator | None = None, me: str = "relay") -> None:
        self.auth = auth
        self.me = me
        self.log = log
        self.hub = hub
        self.limits = limits
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="log-writer")
        self._lock = asyncio.Lock()
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

    async def store(self, events: list[Event],
                    checkpoint: tuple[str, int] | None = None) -> None:
        """Store and publish; a ``checkpoint`` says they came from a peer relay. While the log
        cannot store, this waits and retries: the senders' batches stay unacknowledged (they
        keep them) and no connection is dropped, so nobody reconnects in a loop."""
        delay = 0.2
        async with self._lock:
            loop = asyncio.get_running_loop()
            while True:
                try:
                    records = await loop.run_in_executor(
                        self._writer, functools.partial(self.log.append, events, checkpoint))
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
            self.hub.publish(records)
        # Only what was stored moves a site's health (a shared log's records come back later,
        # through its subscription: there, what was sent stands for them).
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

    async def trim(self, **limits: float) -> int:
        """Apply retention on the writer thread, between two batches."""
        async with self._lock:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._writer,
                                              functools.partial(self.log.trim, **limits))

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
            session.checkpoint = (await asyncio.to_thread(self.log.position, key)
                                  if self.log.position_io else self.log.position(key))
            if hello.role == "agent":
                # Checked and taken with no await between: no other hello comes in between.
                self._check_owner(hello)
                self._take(hello.stream, session, ws, peer)
                publishing = hello.stream
            counter = self.relays if hello.role == "relay" else self.by_site
            counter[hello.site] += 1
            await ws.send_bytes(encode_frame(Welcome(stream=hello.stream,
                                                     acked=session.checkpoint)))
            log.info("%s connected, stream %s", peer, hello.stream)
            while True:
                events = session.receive(await _receive(ws))
                assert isinstance(events, list)
                if session.loops is not None:
                    self.count_loops(session.loops)
                    await self.store(events, (key, session.checkpoint))
                    acked = self.log.position(key)
                else:
                    if events and not session.replaced:
                        await self.store(events)
                    if session.replaced:
                        break  # (its events may be stored, but the newer connection is told)
                    acked = session.ack(self.log.position(key))
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
        holder = (session.hello.site, session.hello.node, session.identity) \
            if session.hello else None
        old = self._live.get(stream)
        if old is not None:
            old_session, old_ws, old_peer = old
            old_hello = old_session.hello
            if old_hello is None or holder != (old_hello.site, old_hello.node,
                                               old_session.identity):
                raise ProtocolError(f"stream {stream!r} is being published by {old_peer}")
            old_session.replaced = True
            log.warning("stream %s: %s takes over from %s", stream, peer, old_peer)
            # No error frame: the agent there must not take this for a refusal of its batch.
            closing = asyncio.ensure_future(_close(old_ws, 1012, "a newer connection "
                                                   "publishes this stream"))
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)
        self._live[stream] = (session, ws, peer)

    def _check_owner(self, hello: Hello) -> None:
        """An agent's stream is its own: bound to the site and node that first published it,
        and published through this relay (not reaching it by federation); one connection at a
        time publishes it (:meth:`_take`)."""
        owner = self.log.stream_owner(hello.stream)
        if owner is not None and (owner.site != hello.site
                                  or owner.node not in (None, hello.node)):
            raise ProtocolError(f"stream {hello.stream!r} belongs to {owner.site}/"
                                f"{owner.node or '?'}: an agent publishes a stream of its own")
        if owner is not None and owner.direct is False:
            raise ProtocolError(f"stream {hello.stream!r} reaches this relay through "
                                "federation: its agent publishes to one relay only")

    def close(self) -> None:
        self._writer.shutdown(wait=True)


async def _receive(ws: WebSocket, timeout: float | None = None) -> bytes | str:
    message = await asyncio.wait_for(ws.receive(), timeout)
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
