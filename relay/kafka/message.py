"""One stored event as one Kafka message, with no I/O: the format the sink publishes.

The value is the event's JSON exactly as ``/events`` sends it in ``data:`` (its ``id``
included); the key is its ``stream``, so one stream's events share a partition and keep their
order; the headers are CloudEvents' Kafka binary mode (``ce_*``), so a consumer can route and
de-duplicate (``ce_id``) without parsing the value.
"""

from __future__ import annotations

import functools
import json
import time
from typing import NamedTuple
from urllib.parse import quote

from storage_events.relay.log.base import Record, sse_type
from storage_events.wire import Event

Header = tuple[str, bytes]
Headers = list[Header]

SPECVERSION = b"1.0"
CONTENT_TYPE = b"application/json"
# ce_type: the SSE event name (``inotify`` for a change, ``overflow`` for a loss notice).
TYPE_PREFIX = "storage-events."


class Message(NamedTuple):  # (made per event: a tuple is the cheapest to make)
    key: bytes
    value: bytes
    headers: Headers

    @property
    def size(self) -> int:
        """Bytes as the producer counts them against ``message.max.bytes`` (roughly: it adds a
        record header of a few dozen bytes)."""
        return len(self.key) + len(self.value) + sum(len(k) + len(v) for k, v in self.headers)


def rfc3339(ns: int) -> str:
    """``ts`` (nanoseconds since the epoch) as CloudEvents' ``time``: UTC, microseconds."""
    seconds, rest = divmod(ns, 1_000_000_000)
    return f"{_second(seconds)}.{rest // 1000:06d}Z"


@functools.lru_cache(maxsize=64)  # (events come in runs of the same second)
def _second(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


def source(site: str, node: str) -> str:
    """CloudEvents' ``source``, a URI reference naming where the event happened."""
    return f"/storage-events/{quote(site, safe='')}/{quote(node, safe='')}"


@functools.lru_cache(maxsize=4096)
def _constant_headers(site: str, node: str, kind: str) -> tuple[Header, Header, Header]:
    """What one node's events of one kind share (a relay's events come from a few thousand)."""
    return (
        ("ce_source", source(site, node).encode()),
        ("ce_type", (TYPE_PREFIX + kind).encode()),
        ("content-type", CONTENT_TYPE),
    )


def _headers(ev: Event, kind: str, subject: bool = True) -> Headers:
    where, what, content = _constant_headers(ev.site, ev.node, kind)
    headers = [
        ("ce_specversion", SPECVERSION),
        ("ce_id", f"{ev.stream}:{ev.seq}".encode()),
        where,
        what,
        ("ce_time", rfc3339(ev.ts).encode()),
    ]
    if subject:
        headers.append(("ce_subject", ev.path.encode()))
    headers.append(content)
    return headers


def message(record: Record) -> Message:
    ev = record.event()
    return Message(ev.stream.encode(), record.data, _headers(ev, sse_type(record.flags)))


def oversize(record: Record, size: int) -> Message:
    """What goes in place of an event larger than Kafka takes (its paths can make it 1.5 MB):
    a ``too_large`` notice with the same key and ``ce_id``, naming the event, so nothing is
    lost without a word; the event itself is on ``/events``."""
    ev = record.event()
    value = json.dumps(
        {
            "type": "too_large",
            "id": record.id,
            "site": ev.site,
            "node": ev.node,
            "stream": ev.stream,
            "seq": ev.seq,
            "ts": ev.ts,
            "bytes": size,
        },
        separators=(",", ":"),
    ).encode()
    return Message(ev.stream.encode(), value, _headers(ev, "too_large", subject=False))
