"""Subscribe to a relay's feed from Python, resuming after every drop without a gap.

from storage_events.client import subscribe

for item in subscribe("http://relay:8808", paths=["/data/run1"], since="earliest"):
    if item.type == "inotify":
        print(item.event.path, item.event.flags)

With ``since="snapshot"`` the feed starts with a ``state`` item for every file and directory
that exists under the filters, then one ``snapshot`` item, then the events after it: list and
watch without a race. :class:`storage_events.namespace.Mirror` keeps the tree from them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import httpx

from storage_events.errors import PeerError

from .sse import MessageTooLarge, SSEParser
from .wire import Event, event_from_json

log = logging.getLogger("storage_events.client")


class FeedError(PeerError):
    """The relay refused the subscription (a 4xx, in ``status``), or sent a feed this client
    cannot read (``status`` None): retrying the same request would not help."""

    def __init__(self, status: int | None, message: str) -> None:
        super().__init__(message if status is None else f"relay answered {status}: {message}")
        self.status = status
        self.message = message


@dataclass(slots=True)
class Received:
    # "inotify", "overflow" (the agent lost kernel events), "gap", and with since="snapshot":
    # "state" (an entry that exists), "snapshot" (all of them were sent), "reset" (the
    # connection dropped before "snapshot": forget the state items, a new snapshot follows)
    type: str
    id: int | None
    data: str  # the JSON text exactly as the relay sent it

    @property
    def event(self) -> Event:
        """The typed :class:`~storage_events.wire.Event` (for ``inotify``, ``overflow`` and
        ``state``)."""
        return event_from_json(self.data)


def events_url(url: str) -> str:
    """A relay base URL or a full ``…/events`` URL → the feed URL."""
    base = url.rstrip("/")
    return base if base.endswith("/events") else base + "/events"


def _event_id(url: str, value: str | None) -> int | None:
    """A relay's event ids are numbers (ASCII digits, 64-bit): anything else comes from a peer
    that is not one, and would be sent back to it as ``Last-Event-ID``."""
    if not value:
        return None
    if not (value.isascii() and value.isdigit() and len(value) <= 19):
        raise FeedError(
            None, f"relay {events_url(url)} sent an event id that is not one: {value[:80]!r}"
        )
    return int(value)


def subscribe(
    url: str,
    *,
    paths: Iterable[str] = (),
    sites: Iterable[str] = (),
    nodes: Iterable[str] = (),
    types: Iterable[str] = (),
    since: str | int | None = None,
    token: str | None = None,
    reconnect: bool = True,
    max_backoff: float = 5.0,
) -> Iterator[Received]:
    """Yield what the feed sends, forever (or until the relay refuses, or sends what no
    retry would mend, raising :class:`FeedError`). After a dropped connection it resumes from
    the last id it saw."""
    params: list[tuple[str, str]] = [("path", p) for p in paths]
    params += [("site", s) for s in sites] + [("node", n) for n in nodes]
    params += [("type", t) for t in types]
    headers = {"Accept": "text/event-stream"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    last_id: str | None = None
    backoff = 0.1
    tried = False
    with httpx.Client(timeout=httpx.Timeout(10.0, read=None)) as http:
        while True:
            if tried and last_id is None and since == "snapshot":
                yield Received("reset", None, "")
            tried = True
            query = list(params)
            if last_id is not None:
                headers["Last-Event-ID"] = last_id
            elif since is not None:
                query.append(("since", str(since)))
            parser = SSEParser()
            try:
                with http.stream("GET", events_url(url), params=query, headers=headers) as resp:
                    if 400 <= resp.status_code < 500:
                        raise FeedError(
                            resp.status_code, resp.read().decode(errors="replace").strip()
                        )
                    resp.raise_for_status()
                    backoff = 0.1
                    for chunk in resp.iter_bytes():
                        try:
                            messages = parser.feed(chunk)
                        except MessageTooLarge as e:
                            # Resuming would get the same message again.
                            raise FeedError(
                                None,
                                f"relay {events_url(url)} sent a feed this client cannot read: {e}",
                            ) from None
                        for msg in messages:
                            if msg.event == "shutdown":
                                raise httpx.RemoteProtocolError("the relay is shutting down")
                            yield Received(msg.event, _event_id(url, msg.id), msg.data)
                        # The relay sends the resume point first, so even an idle connection
                        # knows where to pick up.
                        last_id = parser.last_event_id or last_id
            except (httpx.TransportError, httpx.HTTPStatusError) as e:
                last_id = parser.last_event_id or last_id
                if not reconnect:
                    raise
                log.warning(
                    "feed %s dropped (%s); resuming after id %s in %.1f s", url, e, last_id, backoff
                )
            else:
                last_id = parser.last_event_id or last_id
                if not reconnect:
                    return
            time.sleep(backoff)
            backoff = min(backoff * 2, max_backoff)
