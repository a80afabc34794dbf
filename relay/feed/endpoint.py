"""``GET /events``: the SSE feed. Catch-up from the log, then live from the hub, without a gap or
a duplicate at the hand-over."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse

from storage_events import sse
from storage_events.errors import BadInput
from storage_events.relay.auth import Authenticator, AuthError, bearer
from storage_events.relay.feed.filters import Filter, FilterError, Scope
from storage_events.relay.feed.follow import follow
from storage_events.relay.feed.hub import Hub, Subscription
from storage_events.relay.log.base import EventLog
from storage_events.relay.state.reader import Snapshot, View

CATCH_UP_PAGE = 2000


class ResumeError(BadInput):
    pass


def resume_point(last_event_id: str | None, since: str | None, head: int, first: int = 1) -> int:
    """The id after which delivery starts. ``Last-Event-ID`` (a reconnecting browser) wins over
    ``since``; neither means "from now"."""
    if last_event_id is not None:
        value, what = last_event_id.strip(), "Last-Event-ID"
    elif since is not None:
        value, what = since.strip(), "since"
    else:
        return head
    if value == "now":
        return head
    if value == "earliest":
        return first - 1
    if not value.isascii() or not value.isdigit() or len(value) > 19:
        raise ResumeError(
            f"{what} {value[:40]!r} is not an event id: use a number, 'earliest' or 'now'"
        )
    point = int(value)
    if point > head:
        raise ResumeError(
            f"{what} {point} is beyond the newest event this relay holds ({head}); "
            "it may come from another relay or a log that was reset: resume with 'earliest'"
        )
    return point


def gap(lost_from: int, lost_to: int) -> bytes:
    """The ``gap`` event: ids ``lost_from..lost_to`` are no longer held; its id is where the
    feed resumes, so a reconnect does not report the same gap again."""
    data = json.dumps(
        {"type": "gap", "lost_from": lost_from, "lost_to": lost_to, "resumes_after": lost_to},
        separators=(",", ":"),
    ).encode()
    return sse.render(data, event="gap", id=lost_to)


class Feed:
    def __init__(
        self,
        log: EventLog,
        hub: Hub,
        *,
        heartbeat: float,
        buffer_bytes: int,
        auth: Authenticator | None = None,
        per_identity: int = 64,
        view: View | None = None,
    ) -> None:
        self.view = view  # the namespace view, for since=snapshot
        self.auth = auth
        self.per_identity = per_identity
        self._open: Counter[str] = Counter()  # subscriptions per identity
        self.log = log
        self.hub = hub
        self.heartbeat = heartbeat
        self.buffer_bytes = buffer_bytes
        self.delivered = 0  # events sent to subscribers since start

    def authorize(self, request: Request) -> tuple[str | None, Scope | None]:
        """(identity name, reading scope) of the caller; raises :class:`AuthError`."""
        if self.auth is None:
            return None, None
        who = self.auth.reader(
            bearer(
                request.headers.get("authorization", ""), request.query_params.get("access_token")
            )
        )
        if who is None:
            return None, None
        wanted = set(request.query_params.getlist("site"))
        allowed = who.scope.sites
        if wanted and allowed is not None and not wanted <= allowed:
            raise AuthError(
                f"{who.name!r} may not read site(s) {', '.join(sorted(wanted - allowed))}", 403
            )
        return who.name, who.scope

    def refusal(self, e: AuthError) -> Response:
        """A reader refused: what for, and how to log in."""
        return PlainTextResponse(
            f"{e}\n",
            status_code=e.status,
            headers={"WWW-Authenticate": self.auth.challenge if self.auth else "Bearer"},
        )

    async def endpoint(self, request: Request) -> Response:
        q = request.query_params
        try:
            name, scope = self.authorize(request)
        except AuthError as e:
            return self.refusal(e)
        if name is not None and self._open[name] >= self.per_identity:
            return PlainTextResponse(
                f"{name!r} already has {self.per_identity} open subscriptions\n", status_code=429
            )
        resume = request.headers.get("last-event-id")
        # A reconnecting browser's Last-Event-ID wins: it had its snapshot, and events since.
        wants_snapshot = resume is None and (q.get("since") or "").strip() == "snapshot"
        try:
            filter = Filter(
                q.getlist("path"), q.getlist("site"), q.getlist("node"), q.getlist("type"), scope
            )
            if wants_snapshot:
                if self.view is None:
                    raise ResumeError(
                        "since=snapshot needs the relay's namespace view, which this relay "
                        "does not keep (namespace = false in its config)"
                    )
                start = 0
            else:
                start = resume_point(resume, q.get("since"), self.log.head, self.log.first)
        except (FilterError, ResumeError) as e:
            return PlainTextResponse(f"{e}\n", status_code=400)
        # Subscribe before reading the log (or the view): whatever is published from now on is
        # buffered, and whatever was published before is in the log (or the view).
        sub = self.hub.subscribe(filter, self.buffer_bytes)
        snapshot = None
        if wants_snapshot:
            assert self.view is not None
            try:
                snapshot = await self.view.snapshot(filter)
            except BaseException:
                self.hub.unsubscribe(sub)
                raise
            start = snapshot.id
        if name is not None:
            self._open[name] += 1
        return StreamingResponse(
            self._stream(sub, start, name, snapshot),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _stream(
        self, sub: Subscription, last: int, name: str | None, snapshot: Snapshot | None = None
    ) -> AsyncIterator[bytes]:
        try:
            if snapshot is None:
                # The resume point first: a client that sees no event before a drop still
                # knows where to pick up (an id-only block sets EventSource.lastEventId).
                yield b"retry: 1000\nid: %d\n\n" % last
            else:
                # No id before the snapshot's own: a client cut off within the state entries
                # asks for a new snapshot, not for the events after one it never had whole.
                yield b"retry: 1000\n\n"
                async for data in snapshot.pages():
                    yield data
            async for data in follow(
                sub,
                last,
                lambda after: self._catch_up(sub.filter, after),
                heartbeat=self.heartbeat,
                sent=self._count,
            ):
                yield data
        finally:
            self.hub.unsubscribe(sub)
            if name is not None:
                self._open[name] -= 1

    def _count(self, n: int) -> None:
        self.delivered += n

    async def _catch_up(self, filter: Filter, after: int) -> AsyncIterator[tuple[int, bytes, int]]:
        """(last id examined, SSE bytes to send, events in them), page by page."""
        first = self.log.first
        if after + 1 < first:
            # Retention dropped what this client asks for: say exactly what, never skip it.
            yield first - 1, gap(after + 1, first - 1), 0
            after = first - 1
        while after < self.log.head:
            records = await self.log.read(after, CATCH_UP_PAGE)
            if not records:
                return
            if records[0].id > after + 1:  # retention ran between two pages
                yield records[0].id - 1, gap(after + 1, records[0].id - 1), 0
            after = records[-1].id
            if filter.matches_all:
                yield after, b"".join(r.sse for r in records), len(records)
            else:
                chunks = [filter.render(r) for r in records if filter.matches(r)]
                yield after, b"".join(chunks), len(chunks)
