"""Federation without I/O: what a relay takes from its peers.

Events reach a relay from its agents, from upstream relays whose feeds it pulls, and from
downstream relays that push theirs. Whatever the route, an event keeps its origin (site, node,
stream, seq, the first relay's id) and gains the name of every relay that stores it (``via``).
Three rules follow, applied here and in the log:

- exactly once: the log drops an event whose (stream, seq) it already holds, so the same event
  arriving by two routes is stored once, and per-stream order is the origin's order;
- no loops: an event whose ``via`` already names this relay has been here before; it is dropped
  and the peer it came through is reported, once per connection;
- no silent loss: when an upstream says (with ``gap``) that it no longer holds what we had not yet
  taken, we store an overflow event saying so, as an agent does when the kernel drops events.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import msgspec

from storage_events import sse
from storage_events.errors import PeerError
from storage_events.wire import Event, event_from_json

# Checkpoint keys live beside agent stream positions; agents' stream names cannot start with @.
UPSTREAM_KEY = "@upstream:{}:{}"  # name, the upstream log's epoch
PUSHED_KEY = "@{}"  # the pushing relay's stream: relay:<name>:<epoch of its log>
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class PeerRefused(PeerError):
    """A peer relay answered, but refused the link (a bad token, a bad resume point, …):
    retrying at once would not help."""


class BadFeed(PeerError, ValueError):
    """An upstream's feed broke the protocol (an event that is not one, a message beyond the
    parser's limit): the connection is dropped; the upstream may be fixed by the next try."""


class LoopGuard:
    """Drops events that already passed through this relay, and words the error once."""

    def __init__(self, me: str, peer: str) -> None:
        self.me = me
        self.peer = peer
        self.looped = 0  # events dropped, not yet counted by the caller
        self.report: str | None = None  # for the log: set at the first loop, taken by the caller
        self._seen = False

    def admit(self, events: list[Event]) -> list[Event]:
        fresh = [ev for ev in events if self.me not in ev.via]
        if len(fresh) < len(events):
            self.looped += len(events) - len(fresh)
            if not self._seen:
                self._seen = True
                example = next(ev for ev in events if self.me in ev.via)
                self.report = (
                    f"federation loop: {self.peer} sent events that already passed through this "
                    f"relay ({self.me}), e.g. {example.site}/{example.stream} seq {example.seq} "
                    f"via {' → '.join(example.via)}; they were dropped. Check the [[upstream]] "
                    "and [[push]] entries of the relays on that path: each event needs one way "
                    "to each relay."
                )
        return fresh


@dataclass(slots=True)
class Taken:
    """What one chunk of an upstream's feed amounts to."""

    events: list[Event]
    last_id: int | None = None  # the upstream's id of the last event (the checkpoint)
    reconnect: bool = False  # the upstream is shutting down


class FeedReader:
    """Turns an upstream relay's SSE feed into events for our log.

    Events keep their origin; their ``id`` is the upstream's, which is our checkpoint. A ``gap``
    (the upstream's retention dropped ids we had not taken) becomes an overflow event.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self._parser = sse.SSEParser()
        self.gaps = 0

    def feed(self, chunk: bytes, now: int) -> Taken:
        """Raises :class:`BadFeed`, naming the upstream, when the feed breaks the protocol."""
        out = Taken([])
        try:
            messages = self._parser.feed(chunk)
        except sse.MessageTooLarge as e:
            raise BadFeed(f"upstream {self.upstream}: {e}") from None
        for m in messages:
            if m.event in ("inotify", "overflow"):
                try:
                    ev = event_from_json(m.data)
                except (msgspec.ValidationError, msgspec.DecodeError) as e:
                    raise BadFeed(
                        f"upstream {self.upstream} sent an event that is not one: {e}"
                    ) from None
                out.events.append(ev)
                out.last_id = ev.id
            elif m.event == "gap":
                try:
                    gap = json.loads(m.data)
                    lost_to, resumes = int(gap["lost_to"]), int(gap["resumes_after"])
                except (ValueError, KeyError, TypeError) as e:
                    raise BadFeed(
                        f"upstream {self.upstream} sent a gap that is not one: {m.data[:200]!r}"
                    ) from e
                notice = self.lost(lost_to, now)
                notice.id = out.last_id = resumes
                out.events.append(notice)
            elif m.event == "shutdown":
                out.reconnect = True
        return out

    def lost(self, lost_to: int, now: int) -> Event:
        self.gaps += 1
        return lost(self.upstream, lost_to, now)


def lost(relay: str, lost_to: int, now: int) -> Event:
    """An overflow event for the whole tree: ids up to ``lost_to`` of ``relay`` can no longer
    be had. It has a stream of its own, so it is stored once wherever the news spreads."""
    return Event(
        site=relay,
        node=relay,
        path="/",
        flags=["IN_Q_OVERFLOW"],
        is_dir=True,
        ts=now,
        stream=f"{relay}.gap",
        seq=lost_to,
    )
