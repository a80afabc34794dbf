"""How the relay serves HTTP: uvicorn, with the bounds on clients that uvicorn leaves open.

uvicorn's httptools protocol sets no deadline for a request head: its keep-alive timer runs only
between requests and stops at any byte received, so a client that sends a head slowly, or
nothing at all, holds its connection forever. Its ``limit_concurrency`` answers 503 beyond a
number of connections, but lets WebSocket upgrades through without looking.
"""

from __future__ import annotations

import asyncio
import logging

import uvicorn
from starlette.types import ASGIApp
from uvicorn._types import ASGISendEvent
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import Frame, Opcode

from storage_events.relay.config import RelayConfig
from storage_events.relay.ingest.session import MAX_HELLO

log = logging.getLogger("storage_events.relay")

CHANNELS = b"/api/v1/events/channels"
TOO_LARGE = b"the request head is larger than this relay takes (64 KiB)\n"
BUSY = b"this relay is serving as many connections as it may (max_connections); retry later\n"


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """Every request head must be complete within ``head_timeout`` seconds of the connection
    being made, of the request's first byte, or of the previous response's end (blank lines
    between requests start no request, yet stop uvicorn's keep-alive timer). A WebSocket's
    upgrade request is a request head like any other, and counts against the connection limit.
    """

    head_timeout = 10.0  # seconds; each relay sets its own in server_config()
    # Bytes a request head may take (the HTTP parser itself sets no limit: a client could make
    # the relay hold megabytes of header within the timeout). Far more than any real client's.
    max_head = 64 * 1024
    _head_timer: asyncio.TimerHandle | None = None
    _head_bytes = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._head_timer is None or self.transport.is_closing():
            return  # (a chunk that completed the head, and the body after it, are not counted)
        self._head_bytes += len(data)
        if self._head_bytes > self.max_head:
            self._disarm()
            self._answer_and_close(b"431 Request Header Fields Too Large", TOO_LARGE)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()  # before uvicorn hands an upgraded connection to the WebSocket protocol
        super().on_headers_complete()
        cycle = getattr(self, "cycle", None)
        # Only the dCache channel API writes Location: SSE feeds keep their writes direct.
        if (
            cycle is not None
            and cycle.transport is self.transport
            and self.url.startswith(CHANNELS)
        ):
            cycle.transport = _AsDCache(self.transport)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.timeout_keep_alive_task is not None:  # uvicorn now waits for the next request
            self._arm()

    def handle_websocket_upgrade(self) -> None:
        # The same test uvicorn makes for plain requests, which it skips for upgrades.
        limit = self.limit_concurrency
        if limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit):
            self.logger.warning("Exceeded concurrency limit: WebSocket upgrade refused.")
            self._answer_and_close(b"503 Service Unavailable", BUSY)
            return
        super().handle_websocket_upgrade()

    def _answer_and_close(self, status: bytes, text: bytes) -> None:
        """A refusal written here, before (or instead of) any request reaching the app."""
        self.transport.write(
            b"HTTP/1.1 %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (status, len(text), text)
        )
        self.transport.close()

    def _arm(self) -> None:
        self._disarm()
        self._head_bytes = 0
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            log.debug(
                "closing the connection of %s: no complete request head within %g s",
                self.client,
                self.head_timeout,
            )
            self.transport.close()


class _AsDCache:
    """The transport of a response of the dCache channel API, writing it as dCache's own
    clients read it.

    - ``Location`` capitalized: uvicorn writes every header name in lower case, which HTTP
      allows; but SURF's ``ada`` finds the new channel's URL with ``awk '/Location:/'``.
    - A channel's event stream without chunked framing, its end being the connection's
      (HTTP/1.1 allows it: a response with neither length nor chunking ends at the close):
      sseclient 0.0.27, which the reference client and panoptes read streams with, reads the
      socket beneath the HTTP parser, so it takes chunk sizes for stream lines; the final
      ``0\r\n\r\n`` then makes an event with empty data, which they ``json.loads`` and crash
      on, whenever a stream ends (COMPETING_CLIENT, a relay's SHUTDOWN).

    uvicorn writes the head first, on its own, then each body part as one chunk frame."""

    __slots__ = ("_head", "_transport", "_unframe")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._head = True
        self._unframe = False

    def write(self, data: bytes) -> None:
        if self._head:
            self._head = False
            if data.startswith(b"HTTP/1.1 3") or data.startswith(b"HTTP/1.1 2"):
                head, sep, body = data.partition(b"\r\n\r\n")
                head = head.replace(b"\r\nlocation: ", b"\r\nLocation: ", 1)
                if b"\r\ncontent-type: text/event-stream" in head and (
                    b"\r\nconnection: close" in head.lower()
                ):
                    head = head.replace(b"\r\ntransfer-encoding: chunked", b"", 1)
                    self._unframe = True
                data = head + sep + body
        elif self._unframe:
            size, _, rest = data.partition(b"\r\n")  # b"%x\r\n" body b"\r\n" [b"0\r\n\r\n"]
            data = rest[: int(size, 16)]
            if not data:
                return
        self._transport.write(data)

    def __getattr__(self, name: str) -> object:
        return getattr(self._transport, name)


class HelloFirstWebSocketProtocol(WebSocketsSansIOProtocol):
    """A peer's first message (the hello, names and a token) may be at most a hello's size: a
    larger frame is refused from its header (close 1009) before its payload is even read, so
    an unauthenticated peer cannot make the relay receive megabytes. Later messages may be as
    large as ``max_frame``; they are decoded only once the hello has passed."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        conn = self.conn
        full, conn.max_message_size = conn.max_message_size, MAX_HELLO
        received = conn.recv_frame

        def recv_frame(frame: Frame) -> None:
            # The parser reads the limit when a frame starts, so it is raised right here,
            # between the hello's last frame and the next one.
            if frame.fin and frame.opcode in (Opcode.BINARY, Opcode.TEXT, Opcode.CONT):
                conn.max_message_size = full
                conn.recv_frame = received  # type: ignore[method-assign]
            received(frame)

        conn.recv_frame = recv_frame  # type: ignore[method-assign]

    # uvicorn stops reading a connection at each message until the app has taken it: at a
    # trickle of small frames that is two changes of the socket's poll registration per frame
    # (measured: a tenth of the relay's CPU per event). Small messages may queue a little
    # instead; a large one still stops reading at once, so memory stays bounded.
    QUEUED_MESSAGES = 16
    QUEUED_SIZE = 64 * 1024  # bytes of the latest message, at most

    async def send(self, message: ASGISendEvent) -> None:
        await super().send(message)
        if message["type"] == "websocket.accept":
            # Nothing reads the handshake's headers once it is accepted: an idle agent's
            # connection need not hold them (10,000 agents, 10,000 copies).
            self.response = None  # type: ignore[assignment]
            self.scope["headers"] = []

    def send_receive_event_to_app(self) -> None:
        size = sum(len(f) for f in self.frames)
        super().send_receive_event_to_app()
        if (
            self.read_paused
            and size <= self.QUEUED_SIZE
            and self.queue.qsize() < self.QUEUED_MESSAGES
        ):
            self.read_paused = False
            self.transport.resume_reading()


# uvicorn and websockets log every WebSocket connection at INFO: access-log lines, which for
# plain HTTP requests appear only with -v. Without it they are dropped here too: a peer that
# reconnects in a loop must not fill the log (the relay logs what matters of each connection).
_ACCESS_LINES = frozenset(
    {
        '%s - "WebSocket %s" [accepted]',
        '%s - "WebSocket %s" 403',
        '%s - "WebSocket %s" %d',
        "connection open",
        "connection closed",
        "connection rejected (%d %s)",
    }
)


class WebSocketAccessLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg not in _ACCESS_LINES


def server_config(app: ASGIApp, cfg: RelayConfig, *, verbose: int) -> uvicorn.Config:
    host, port = cfg.host_port()

    class Protocol(BoundedHttpToolsProtocol):
        head_timeout = cfg.request_head_timeout

    if not verbose:
        logging.getLogger("uvicorn.error").addFilter(WebSocketAccessLines())

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=Protocol,
        ws=HelloFirstWebSocketProtocol,
        interface="asgi3",  # (the app's __call__ returns a coroutine rather than being one)
        # uvicorn refuses a request once its connections, the new one included, or its running
        # requests reach the limit: one more than max_connections serves that many at once.
        # Each SSE subscriber and each agent or relay WebSocket is one of both while it lasts.
        limit_concurrency=cfg.max_connections + 1,
        ws_max_size=cfg.max_frame,
        ws_per_message_deflate=False,
        log_level="debug" if verbose else "info",
        log_config=None,  # uvicorn's loggers go through ours (text or JSON)
        timeout_graceful_shutdown=5,
        access_log=bool(verbose),
        ssl_certfile=cfg.certfile,
        ssl_keyfile=cfg.keyfile,
    )
