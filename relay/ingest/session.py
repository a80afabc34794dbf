"""The ingest protocol, relay side, with no I/O: :class:`IngestSession` checks every frame of
one connection and says what to store, or why the connection must close."""

from __future__ import annotations

import re
from dataclasses import dataclass

import msgspec

from storage_events.errors import PeerError
from storage_events.relay.auth import Authenticator, AuthError, Identity
from storage_events.relay.federation.core import LoopGuard
from storage_events.wire import (
    Batch,
    Event,
    Hello,
    decode_to_relay,
    event_problem,
)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_STREAM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


class ProtocolError(PeerError):
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

    def __init__(
        self, limits: IngestLimits, auth: Authenticator | None = None, me: str = "relay"
    ) -> None:
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
            raise ProtocolError(
                "text frames are not part of the ingest protocol: send msgpack in binary frames",
                1003,
            )
        # Before the sender is known only a small hello is decoded: an anonymous peer must not
        # make the relay parse megabytes.
        if self.hello is None and len(frame) > self.limits.max_hello:
            raise ProtocolError(
                f"the first frame must be a hello of at most "
                f"{self.limits.max_hello:,} bytes, not {len(frame):,}",
                1009,
            )
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
            raise ProtocolError(
                f"site name {hello.site[:80]!r} is not valid: use letters, "
                "digits, '.', '_' or '-' (at most 64)"
            )
        if not _NAME.match(hello.node):
            raise ProtocolError(f"node name {hello.node[:80]!r} is not valid")
        if not _STREAM.match(hello.stream):
            raise ProtocolError(f"stream name {hello.stream[:80]!r} is not valid")
        if hello.role == "relay" and hello.site == self.me:
            raise ProtocolError(
                f"a relay named {hello.site!r} is pushing to itself: give each relay its own `name`"
            )
        if self.auth is not None:
            try:
                who = self.auth.identify(hello.token)
            except AuthError as e:
                raise ProtocolError(str(e)) from None
            if who is not None:
                self._check_identity(hello, who)
        if hello.role == "agent" and not (
            hello.stream.startswith(hello.node + ":") and len(hello.stream) > len(hello.node) + 1
        ):
            # Names no relay's loss notices (<relay>.gap) or another node's stream can take.
            raise ProtocolError(
                f"an agent's stream is <its node>:<run id>, not "
                f"{hello.stream!r} for node {hello.node!r}"
            )
        if hello.role == "relay":
            if not re.fullmatch(rf"relay:{re.escape(hello.site)}:[0-9]+", hello.stream):
                raise ProtocolError(
                    f"a relay's stream is relay:<its name>:<its log's epoch>, "
                    f"not {hello.stream[:80]!r}"
                )
            self.loops = LoopGuard(self.me, f"relay {hello.site!r}")
        self.hello = hello
        return hello

    def _check_identity(self, hello: Hello, who: Identity) -> None:
        if who.role != hello.role:
            raise ProtocolError(
                f"token {who.name!r} is a {who.role} token: it cannot publish as {hello.role}"
            )
        if who.site != hello.site:
            raise ProtocolError(
                f"token {who.name!r} may publish as "
                f"{'site' if who.role == 'agent' else 'relay'} "
                f"{who.site!r}, not {hello.site!r}"
            )
        if who.node is not None and who.node != hello.node:
            raise ProtocolError(
                f"token {who.name!r} may publish as node {who.node!r}, not {hello.node!r}"
            )
        self.identity = who.name
        if who.role == "relay":
            self.sites = who.scope.sites

    def _check_batch(self, events: list[Event]) -> list[Event]:
        hello = self.hello
        assert hello is not None
        if len(events) > self.limits.max_batch:
            raise ProtocolError(
                f"batch of {len(events)} events exceeds the limit of {self.limits.max_batch}", 1009
            )
        if hello.role == "relay":
            return self._check_relayed(events)
        previous = 0
        for i, ev in enumerate(events):
            where = f"event {i} (seq {ev.seq})"
            _check_event(where, ev)
            if ev.stream != hello.stream:
                raise ProtocolError(
                    f"{where} belongs to stream {ev.stream[:80]!r}, "
                    f"not to this connection's {hello.stream!r}"
                )
            if ev.site != hello.site or ev.node != hello.node:
                raise ProtocolError(
                    f"{where} claims site/node {ev.site[:64]!r}/{ev.node[:64]!r}"
                    f" but the connection said {hello.site!r}/{hello.node!r}"
                )
            if previous and ev.seq != previous + 1:
                # An agent numbers every event it publishes, loss notices included.
                raise ProtocolError(
                    f"{where}: seq numbers within a batch go up by one "
                    f"(seq {ev.seq} after {previous})"
                )
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


def check_relayed(
    events: list[Event], previous: int, sender: str | None, sites: frozenset[str] | None = None
) -> int:
    """Events from another relay, pushed (``sender``: its name) or pulled: valid names, paths
    and flags; the sender's ids increase; only ``sites`` (None: any). Returns the last id."""
    for i, ev in enumerate(events):
        _check_event(f"event {i}", ev)
        if not (_NAME.match(ev.site) and _NAME.match(ev.node) and _STREAM.match(ev.stream)):
            raise ProtocolError(f"event {i}: site, node or stream name is not valid")
        where = f"event {i} ({ev.stream} seq {ev.seq})"  # (names checked: safe to show)
        gap = _is_gap(ev)  # a relay's loss notice: made by the puller or the sender itself
        if ev.stream.endswith(".gap") and not gap:
            raise ProtocolError(
                f"{where}: a stream <relay>.gap holds only that relay's loss "
                "notices (an overflow of / from site and node <relay>)"
            )
        if (
            sites is not None
            and ev.site not in sites
            and not (ev.site == sender and ev.stream == f"{sender}.gap")
        ):  # its own loss notices
            raise ProtocolError(
                f"{where}: relay {sender!r} may not push events of site {ev.site!r}"
            )
        if ev.id <= previous:
            raise ProtocolError(
                f"{where}: the sending relay's ids must increase (id {ev.id} after {previous})"
            )
        if not (ev.via or (gap and sender is None)) or (ev.origin_id is None and not gap):
            raise ProtocolError(
                f"{where}: a relayed event names the relays it passed through "
                "(via) and the first one's id (origin_id)"
            )
        if sender is not None and ev.via[-1] != sender:
            raise ProtocolError(
                f"{where}: a pushed event's via must end with the pushing relay {sender!r}"
            )
        if len(set(ev.via)) != len(ev.via):
            raise ProtocolError(f"{where}: via names a relay twice ({' → '.join(ev.via)})")
        if len(ev.via) == 1 and ev.origin_id not in (ev.id, None):
            # The first relay's id is the one it sends: only further hops can keep another.
            raise ProtocolError(
                f"{where}: origin_id {ev.origin_id} of an event stored only by "
                f"{ev.via[0]} must be its id {ev.id}"
            )
        previous = ev.id
    return previous


def _is_gap(ev: Event) -> bool:
    return (
        ev.stream.endswith(".gap")
        and ev.site == ev.node == ev.stream[:-4]
        and ev.path == "/"
        and ev.flags == ["IN_Q_OVERFLOW"]
        and ev.old_path is None
    )


def _check_event(where: str, ev: Event) -> None:
    # The limits are the wire's (the agent checks them too, before numbering an event).
    problem = event_problem(ev)
    if problem is not None:
        raise ProtocolError(f"{where}: {problem}")
