"""Server-Sent Events framing (the HTML5 ``text/event-stream`` format), with no I/O.

The relay renders with :func:`render`; clients feed received bytes to :class:`SSEParser`.
"""

from __future__ import annotations

from dataclasses import dataclass


def render(data: bytes, *, event: str, id: int | None = None) -> bytes:
    """One SSE message. ``data`` must not contain a newline (compact JSON never does)."""
    head = b"" if id is None else b"id: %d\n" % id
    return head + b"event: " + event.encode() + b"\ndata: " + data + b"\n\n"


def comment(text: str) -> bytes:
    return b": " + text.encode() + b"\n\n"


@dataclass(slots=True)
class Message:
    event: str
    data: str
    id: str | None  # the stream's last event id when this message was dispatched


class SSEParser:
    """Incremental parser: ``feed(bytes)`` returns the messages completed by those bytes."""

    def __init__(self) -> None:
        self._buffer = b""
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None
        # Committed only when a message block ends, as the HTML spec says: an id line of a
        # block cut off mid-way must not count as received.
        self.last_event_id: str | None = None
        self.retry_ms: int | None = None

    def feed(self, chunk: bytes) -> list[Message]:
        self._buffer += chunk
        out: list[Message] = []
        # A trailing CR may be the first half of a CRLF split across chunks: keep it for later.
        held = b"\r" if self._buffer.endswith(b"\r") else b""
        text = self._buffer[: len(self._buffer) - len(held)]
        *lines, rest = text.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        self._buffer = rest + held
        for raw in lines:
            line = raw.decode("utf-8", "replace")
            if not line:
                self.last_event_id = self._id
                if self._data:
                    out.append(Message(self._event or "message", "\n".join(self._data),
                                       self.last_event_id))
                self._event, self._data = "", []
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                self._data.append(value)
            elif name == "event":
                self._event = value
            elif name == "id" and "\0" not in value:
                self._id = value
            elif name == "retry" and value.isdigit():
                self.retry_ms = int(value)
        return out
