"""The naive SSE broadcaster the relay is compared with: one queue per client, one write per
event (what a first starlette version of a relay looks like). Bench peer only.

    python bench/naive_broadcaster.py PORT
POST /pub with newline-separated JSON events; GET /sub streams them.
"""

from __future__ import annotations

import asyncio
import sys

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

clients: set[asyncio.Queue[bytes]] = set()
counter = 0


async def pub(request: Request) -> Response:
    global counter
    for line in (await request.body()).splitlines():
        counter += 1
        message = b"id: %d\nevent: inotify\ndata: %s\n\n" % (counter, line)
        for q in clients:
            q.put_nowait(message)
    return Response(status_code=204)


async def sub(request: Request) -> StreamingResponse:
    q: asyncio.Queue[bytes] = asyncio.Queue()
    clients.add(q)

    async def stream():
        try:
            while True:
                yield await q.get()
        finally:
            clients.discard(q)

    return StreamingResponse(stream(), media_type="text/event-stream")


app = Starlette(routes=[Route("/pub", pub, methods=["POST"]), Route("/sub", sub)])

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
