"""Catch-up, then live: the one loop behind every SSE stream the relay serves (``/events`` and
the dCache channels' streams).

A reader is subscribed to live records (its :class:`~.hub.Mailbox`) *before* it catches up from
durable storage, so whatever is stored meanwhile is in one or the other, and anything in both is
sent once: live items up to the last id already sent are dropped. When the mailbox overflows
(the reader fell a buffer behind), the loop goes back to durable storage from the last id sent.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from storage_events import sse
from storage_events.relay.feed.hub import Mailbox

HEARTBEAT = sse.comment("heartbeat")
# A comment line that ends no message: clients that take every blank-line-terminated block for
# an event (sseclient 0.0.27, which dCache's own clients read with) never see it, and parsers
# that follow the spec ignore it, as they ignore every comment.
KEEPALIVE_LINE = b":\n"

# (the last id examined, the SSE bytes to send, how many events they hold), page by page.
CatchUp = Callable[[int], AsyncIterator[tuple[int, bytes, int]]]


async def follow(
    box: Mailbox,
    last: int,
    catch_up: CatchUp,
    *,
    heartbeat: float,
    sent: Callable[[int], None],
    live_first: bool = False,
    keepalive: bytes = HEARTBEAT,
) -> AsyncIterator[bytes]:
    """SSE bytes for one reader after id ``last``; ``sent(n)``: n events were sent.
    ``live_first``: start live (the reader asked for nothing older). Live items with a
    negative id are messages about the stream itself (always sent, never counted).
    ``keepalive``: sent after ``heartbeat`` idle seconds."""
    caught_up = live_first
    while not box.closed:
        if not caught_up or box.overflowed:
            box.reset()
            async for examined, data, count in catch_up(last):
                last = examined
                if data:
                    sent(count)
                    yield data
            caught_up = True
        while not (box.overflowed or box.closed):
            if not await box.wait(heartbeat):
                yield keepalive
                continue
            items = box.take()
            if not items:
                continue
            # Usually nothing in it was sent by catch-up: then all of it goes.
            fresh = items if items[0][0] > last else [x for x in items if x[0] < 0 or x[0] > last]
            newest = items[-1][0]  # ids go up; a message about the stream may come last
            last = max(last, newest if newest > 0 else max(i for i, _ in items))
            if fresh:
                sent(sum(i > 0 for i, _ in fresh))
                yield b"".join(b for _, b in fresh)
    if box.farewell:
        yield box.farewell
