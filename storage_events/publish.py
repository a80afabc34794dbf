"""The ingest protocol, publisher side, with no I/O: :class:`PublishSession` says what to send
to a relay's ``/ingest`` and what the relay's frames mean, for an agent publishing its stream
and for a relay pushing its log alike.

As in the ``websockets`` library's protocol objects, the caller owns the connection: it sends
the bytes the session returns, feeds it every frame received, and tells it how the connection
ended. The session checks each reply (a hostile or broken relay gets a
:class:`PeerProtocolError`, never an assertion), keeps the batches in flight, and works out
which batch a refusal is about, so that every decision can be tested without a socket.

A session lives as long as its publisher: :meth:`PublishSession.start` begins each connection,
and what one connection taught (the relay's frame limit, where connections drop, how large a
batch it takes) shapes the next.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from storage_events.errors import PeerError
from storage_events.wire import (
    FRAME_BUDGET,
    MAX_BATCH,
    Ack,
    Batch,
    Error,
    Event,
    Hello,
    Welcome,
    decode_to_agent,
    encode_frame,
)

# Close codes with which a relay refuses what it was sent (1009 alone, with no error frame, is
# the web server's frame limit).
_REFUSED = frozenset({1007, 1008, 1009})
_FRAME_LIMIT = re.compile(r"frame with (\d+) bytes exceeds limit of (\d+)")
_MIN_FRAME = 1024  # bytes: max_frame is never lowered below this, whatever a relay claims


@dataclass(frozen=True, slots=True)
class InFlight:
    """A batch sent and not yet acknowledged. Positions are the acknowledged kind: an agent's
    ``seq``, a pushing relay's own ``id``."""

    first: int
    last: int
    count: int  # events
    size: int  # bytes of its frame


class Refused(PeerError):
    """The relay refused what it was sent (its error frame, or its close code, says why): the
    same again at once would be refused again."""


class PublisherRefused(Refused):
    """The relay refused the publisher itself (its token, its names, its stream), not one of
    its batches: an error frame before the welcome, or with nothing in flight."""


class BatchRefused(Refused):
    """The relay refused ``batch``: by an error frame, a close code, or (``implicit``) by
    dropping the connection while the batch was in flight, at the same place again, as a web
    server dropping an oversized frame does."""

    def __init__(
        self,
        reason: str,
        batch: InFlight,
        *,
        frame_too_big: bool = False,
        frame_limit: int | None = None,
        implicit: bool = False,
    ) -> None:
        super().__init__(reason)
        self.batch = batch
        self.frame_too_big = frame_too_big
        self.frame_limit = frame_limit  # bytes, when the close reason gave the web server's
        self.implicit = implicit


class PeerProtocolError(PeerError):
    """The relay sent something that is not a valid reply at this point of the protocol."""


class PublishSession:
    """One publisher's side of the ingest protocol: :meth:`start` gives the hello, then every
    frame received goes to :meth:`receive`, every batch to send through :meth:`frame`, and a
    connection that ends without an error frame to :meth:`closed`.

    ``peer`` names the relay in error messages. ``max_events``: events a batch may hold, at
    most; ``max_frame``: bytes a frame may hold; ``window``: positions that may be sent and not
    yet acknowledged (None: no limit here, the caller keeps its own).
    """

    def __init__(
        self,
        hello: Hello,
        *,
        peer: str,
        max_events: int = MAX_BATCH,
        max_frame: int = FRAME_BUDGET,
        window: int | None = None,
    ) -> None:
        self.hello = hello
        self.peer = peer
        self.max_events = max_events
        self.max_frame = max_frame  # lowered by adapt() when the relay's is smaller
        self.window = window
        # Events per batch now, and at most: adapt() lowers both when the relay refuses a
        # batch, so that the event it cannot take is found, or its limit is met.
        self.limit = self.ceiling = max_events
        self.acked = 0  # the last position the relay holds (its welcome, then its acks)
        self.sent = 0  # the last position sent on this connection
        self.open = False  # welcomed on this connection, and not refused since
        self._waiting = False  # hello sent, no welcome yet
        self._in_flight: deque[InFlight] = deque()
        self._cut = False  # the last frame left events behind: they fill at least one more
        self._unit = "id" if hello.role == "relay" else "seq"
        # Where connections dropped with batches in flight, and how often there in a row.
        self._dropped_at, self._drops = -1, 0

    def start(self) -> bytes:
        """A new connection: the hello frame to send first."""
        self.open, self._waiting = False, True
        self._in_flight.clear()
        return encode_frame(self.hello)

    def may_send(self, waiting: int) -> bool:
        """Whether to send a batch now, with ``waiting`` events ready: at once when nothing is
        in flight; while a batch is, only a full one (``limit`` events, or more than the last
        frame could hold), so that a trickle waits for the ack and goes as one batch, and a
        burst keeps both ends busy."""
        if not self.can_send:
            return False
        return not self._in_flight or waiting >= self.limit or self._cut

    @property
    def can_send(self) -> bool:
        """Whether the window has room for another batch."""
        return self.window is None or self.sent - self.acked < self.window

    def receive(self, frame: bytes | str) -> Welcome | Ack:
        """What a frame from the relay says. Raises :class:`PublisherRefused` or
        :class:`BatchRefused` for an error frame, :class:`PeerProtocolError` for anything that
        is not a valid reply here."""
        try:
            msg = self._decode(frame)
        except (Refused, PeerProtocolError):
            self.open = self._waiting = False  # the connection is over: nothing more is taken
            raise
        return msg

    def _decode(self, frame: bytes | str) -> Welcome | Ack:
        if isinstance(frame, str):
            raise self._broken("sent a text frame (the protocol has binary frames only)")
        try:
            msg = decode_to_agent(frame)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise self._broken(f"sent a frame that cannot be decoded as a reply ({e})") from None
        if isinstance(msg, Error):
            if self.open and self._in_flight:
                # Acks of earlier batches come before the error frame: the oldest batch still
                # in flight is the one refused.
                raise BatchRefused(msg.message, self._in_flight[0])
            raise PublisherRefused(msg.message)
        if isinstance(msg, Welcome):
            if not self._waiting:
                raise self._broken("sent a second welcome on one connection")
            if msg.acked < 0:
                raise self._broken(f"claims to hold {self._unit} {msg.acked}")
            self.acked = self.sent = msg.acked
            self.open, self._waiting = True, False
            return msg
        if not self.open:
            raise self._broken(f"acknowledged {self._unit} {msg.seq} before its welcome")
        if msg.seq > self.sent:
            raise self._broken(
                f"acknowledged {self._unit} {msg.seq} of {self.hello.stream}, beyond the last "
                f"one sent to it ({self.sent})"
            )
        if msg.seq < self.acked:
            raise self._broken(
                f"acknowledged {self._unit} {msg.seq} of {self.hello.stream} after "
                f"{self.acked}: acknowledgements are cumulative and cannot go back"
            )
        self.acked = msg.seq
        while self._in_flight and self._in_flight[0].last <= msg.seq:
            self._in_flight.popleft()
            self.limit = min(self.ceiling, self.limit * 2)  # taken: grow back
        return msg

    def _broken(self, what: str) -> PeerProtocolError:
        return PeerProtocolError(
            f"relay {self.peer} {what}, which breaks the ingest protocol: check that it is a "
            "storage-events relay of a compatible version"
        )

    def frame(self, events: list[Event]) -> tuple[bytes, list[Event]]:
        """The frame of the next batch, made of the first of ``events`` (at least one) that fit
        in ``max_frame`` bytes, and the events left for later. The batch counts as sent."""
        batch = events
        frame = encode_frame(Batch(batch))
        while len(frame) > self.max_frame and len(batch) > 1:
            # Split by bytes: events vary (deep paths, raw names), and the relay closes the
            # connection on a frame over its limit, which would be resent forever. A single
            # event goes whatever its size: the relay tells whether it takes it.
            keep = min(len(batch) - 1, max(1, int(len(batch) * self.max_frame / len(frame) * 0.9)))
            batch = batch[:keep]
            frame = encode_frame(Batch(batch))
        first, last = self._position(batch[0]), self._position(batch[-1])
        self._in_flight.append(InFlight(first, last, len(batch), len(frame)))
        self.sent = last
        self._cut = len(batch) < len(events)
        return frame, events[len(batch) :]

    def _position(self, event: Event) -> int:
        return event.id if self.hello.role == "relay" else event.seq

    def closed(self, code: int | None, reason: str = "") -> BatchRefused | None:
        """The connection ended other than by an error frame (``code`` and ``reason``: the
        relay's close frame; ``code`` None: it dropped with none). Returns the refusal it
        amounts to, None when it was no more than a lost connection."""
        was_open, self.open, self._waiting = self.open, False, False
        if not (was_open and self._in_flight):
            return None
        if code is None:
            self._drops = self._drops + 1 if self._dropped_at == self.acked else 1
            self._dropped_at = self.acked
            if self._drops < 2:
                return None  # (a relay restarting does that too)
            return BatchRefused(
                f"the relay dropped the connection {self._drops} times while it had the batch "
                "(too big for it?)",
                max(self._in_flight, key=lambda b: b.size),
                frame_too_big=True,
                implicit=True,
            )
        if code not in _REFUSED:
            return None
        if code != 1009:
            return BatchRefused(reason or f"closed with code {code}", self._in_flight[0])
        limit = _FRAME_LIMIT.search(reason)
        if limit is None:
            batch = max(self._in_flight, key=lambda b: b.size)
            return BatchRefused(reason or "message too big", batch, frame_too_big=True)
        # The web server refuses a frame as it arrives, while the relay may not yet have
        # acknowledged the batches before it: the culprit is the big frame, not the oldest.
        frame_limit = int(limit.group(2))
        batch = next((b for b in self._in_flight if b.size > frame_limit), self._in_flight[0])
        return BatchRefused(reason, batch, frame_too_big=True, frame_limit=frame_limit)

    def adapt(self, refused: BatchRefused, replace: Callable[[int], bool]) -> None:
        """Make the next batches what the relay can take after it refused one: smaller frames
        when it was too big, smaller batches to find the event it refuses, and once that is a
        single event, ``replace(position)`` (True: it was replaced, so batches grow again)."""
        batch = refused.batch
        if refused.frame_limit is not None:
            # Below the web server's limit, which counts its own framing as well.
            self.max_frame = max(_MIN_FRAME, refused.frame_limit - 1024)
        elif refused.frame_too_big:
            self.max_frame = max(_MIN_FRAME, min(self.max_frame, batch.size // 2))
        if batch.count > 1:
            self.ceiling = max(1, batch.count // 2)
            self.limit = max(1, batch.count // 4)
        elif replace(batch.first):
            self.ceiling = self.max_events  # it was that event, not the size of the batches
            self.limit = 1
