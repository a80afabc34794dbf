"""A channel API request, as the replica a client reached passes it to the replica holding the
channels over NATS request/reply, and the answer as it comes back. No I/O here.

The holder runs the request through the same handlers as its own clients' requests, under the
scheme and ``Host`` the client used: the URLs it makes (``Location``) name the replica the
client asked, not the holder.
"""

from __future__ import annotations

import zlib
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

# What the handlers read of a request; nothing else is passed on.
HEADERS = ("accept", "authorization", "content-type", "last-event-id")
COMPRESS = 64 * 1024  # bodies from this size on travel compressed (a channel's 10,000 watches)


class Forwarded(msgspec.Struct, array_like=True):
    method: str
    scheme: str
    host: str
    path: str
    query: bytes
    headers: list[tuple[str, str]]
    body: bytes


class Answer(msgspec.Struct, array_like=True):
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    compressed: bool = False


encode = msgspec.msgpack.encode
decode_request = msgspec.msgpack.Decoder(Forwarded).decode
decode_answer = msgspec.msgpack.Decoder(Answer).decode


async def forwarded(
    request: Request, max_body: int, extra: dict[str, str] | None = None
) -> Forwarded:
    """``request`` with its body up to one byte past ``max_body`` (enough for the holder to
    refuse it as too large without this replica holding more); ``extra``: headers added."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_body:
            body = body[: max_body + 1]
            break
    headers = [(k, v) for k, v in request.headers.items() if k in HEADERS]
    return Forwarded(
        request.method,
        request.url.scheme,
        request.url.netloc,
        request.scope["path"],
        request.scope.get("query_string", b""),
        headers + list((extra or {}).items()),
        body,
    )


def scope(f: Forwarded) -> dict[str, Any]:
    """The ASGI scope of the request as the client sent it (for route matching)."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": f.method,
        "scheme": f.scheme,
        "path": f.path,
        "raw_path": f.path.encode(),
        "root_path": "",
        "query_string": f.query,
        "headers": [
            (b"host", f.host.encode("latin-1")),
            *((k.encode("latin-1"), v.encode("latin-1")) for k, v in f.headers),
        ],
        "client": None,
        "server": None,
    }


def request(scope: dict[str, Any], body: bytes) -> Request:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(scope, receive)


def answer(response: Response) -> Answer:
    body = bytes(response.body)
    headers = [
        (k.decode("latin-1"), v.decode("latin-1"))
        for k, v in response.raw_headers
        if k != b"content-length"  # (made again for the body as it is sent)
    ]
    if len(body) >= COMPRESS:
        return Answer(response.status_code, headers, zlib.compress(body), True)
    return Answer(response.status_code, headers, body)


def response(a: Answer) -> Response:
    body = zlib.decompress(a.body) if a.compressed else a.body
    return Response(body, status_code=a.status, headers=dict(a.headers))
