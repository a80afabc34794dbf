"""Subscribe to a relay's feed from Python, resuming after every drop without a gap.

from storage_events.client import subscribe

for item in subscribe("http://relay:8808", paths=["/data/run1"], since="earliest"):
    if item.type == "inotify":
        print(item.event.path, item.event.flags)

``asubscribe`` is the same for asyncio (``async for item in asubscribe(...)``).

With ``since="snapshot"`` the feed starts with a ``state`` item for every file and directory
that exists under the filters, then one ``snapshot`` item, then the events after it: list and
watch without a race. :class:`storage_events.namespace.Mirror` keeps the tree from them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterable, Iterator
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


class _Resume:
    """One subscription across its connections, without I/O: what the next request asks for,
    what the bytes received say, where to resume after a drop and when."""

    def __init__(
        self,
        url: str,
        *,
        paths: Iterable[str],
        sites: Iterable[str],
        nodes: Iterable[str],
        types: Iterable[str],
        since: str | int | None,
        token: str | None,
        max_backoff: float,
    ) -> None:
        self.url = events_url(url)
        self._params: list[tuple[str, str]] = [("path", p) for p in paths]
        self._params += [("site", s) for s in sites] + [("node", n) for n in nodes]
        self._params += [("type", t) for t in types]
        self._headers = {"Accept": "text/event-stream"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._since = since
        self._max_backoff = max_backoff
        self._backoff = 0.1
        self._tried = False
        self._parser = SSEParser()
        self.last_id: str | None = None

    def request(self) -> tuple[list[tuple[str, str]], dict[str, str], Received | None]:
        """(query, headers) of the next connection, and an item to hand out before anything
        it sends: ``reset`` when a snapshot was cut before it was whole."""
        reset = None
        if self._tried and self.last_id is None and self._since == "snapshot":
            reset = Received("reset", None, "")
        self._tried = True
        query = list(self._params)
        headers = dict(self._headers)
        if self.last_id is not None:
            headers["Last-Event-ID"] = self.last_id
        elif self._since is not None:
            query.append(("since", str(self._since)))
        self._parser = SSEParser()
        return query, headers, reset

    def refused(self, status: int, text: str) -> FeedError:
        return FeedError(status, text.strip())

    def connected(self) -> None:
        self._backoff = 0.1

    def received(self, chunk: bytes) -> list[Received]:
        """What ``chunk`` completes. Raises :class:`FeedError` for what no retry would mend,
        ``httpx.RemoteProtocolError`` when the relay says it is shutting down."""
        try:
            messages = self._parser.feed(chunk)
        except MessageTooLarge as e:  # resuming would get the same message again
            raise FeedError(
                None, f"relay {self.url} sent a feed this client cannot read: {e}"
            ) from None
        out = []
        for msg in messages:
            if msg.event == "shutdown":
                self.last_id = self._parser.last_event_id or self.last_id
                raise httpx.RemoteProtocolError("the relay is shutting down")
            out.append(Received(msg.event, _event_id(self.url, msg.id), msg.data))
        # The relay sends the resume point first, so even an idle connection knows where to
        # pick up.
        self.last_id = self._parser.last_event_id or self.last_id
        return out

    def dropped(self, error: Exception | None) -> float:
        """The connection ended (``error``: how); seconds to wait before the next."""
        self.last_id = self._parser.last_event_id or self.last_id
        wait = self._backoff
        if error is not None:
            log.warning(
                "feed %s dropped (%s); resuming after id %s in %.1f s",
                self.url,
                error,
                self.last_id,
                wait,
            )
        self._backoff = min(self._backoff * 2, self._max_backoff)
        return wait


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
    feed = _Resume(
        url,
        paths=paths,
        sites=sites,
        nodes=nodes,
        types=types,
        since=since,
        token=token,
        max_backoff=max_backoff,
    )
    with httpx.Client(timeout=httpx.Timeout(10.0, read=None)) as http:
        while True:
            query, headers, reset = feed.request()
            if reset is not None:
                yield reset
            try:
                with http.stream("GET", feed.url, params=query, headers=headers) as resp:
                    if 400 <= resp.status_code < 500:
                        raise feed.refused(resp.status_code, resp.read().decode(errors="replace"))
                    resp.raise_for_status()
                    feed.connected()
                    for chunk in resp.iter_bytes():
                        yield from feed.received(chunk)
            except (httpx.TransportError, httpx.HTTPStatusError) as e:
                wait = feed.dropped(e)
                if not reconnect:
                    raise
            else:
                wait = feed.dropped(None)
                if not reconnect:
                    return
            time.sleep(wait)


async def asubscribe(
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
) -> AsyncIterator[Received]:
    """:func:`subscribe` for asyncio: ``async for item in asubscribe(url, ...)``, the same items
    and the same resuming."""
    feed = _Resume(
        url,
        paths=paths,
        sites=sites,
        nodes=nodes,
        types=types,
        since=since,
        token=token,
        max_backoff=max_backoff,
    )
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None)) as http:
        while True:
            query, headers, reset = feed.request()
            if reset is not None:
                yield reset
            try:
                async with http.stream("GET", feed.url, params=query, headers=headers) as resp:
                    if 400 <= resp.status_code < 500:
                        body = (await resp.aread()).decode(errors="replace")
                        raise feed.refused(resp.status_code, body)
                    resp.raise_for_status()
                    feed.connected()
                    async for chunk in resp.aiter_bytes():
                        for item in feed.received(chunk):
                            yield item
            except (httpx.TransportError, httpx.HTTPStatusError) as e:
                wait = feed.dropped(e)
                if not reconnect:
                    raise
            else:
                wait = feed.dropped(None)
                if not reconnect:
                    return
            await asyncio.sleep(wait)
