"""Server-Sent Events framing (the HTML5 ``text/event-stream`` format), with no I/O.

The relay renders with :func:`render`; clients feed received bytes to :class:`SSEParser`.
"""

from __future__ import annotations

from dataclasses import dataclass

from storage_events.errors import PeerError


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


# The most a message (its data lines, or any one line) may hold, in bytes. The largest event
# the wire allows is about 1.5 MB of JSON: paths of 65,536 characters at up to 6 bytes each in
# JSON (a control character is \u00XX), two of them, and two raw paths of 262,144 bytes in
# base64; ``tests/test_sse_limits.py`` builds it. 4 MiB leaves room for that and for whatever
# fields come later, and still bounds what one hostile peer can make a reader hold.
MAX_MESSAGE = 4 * 1024 * 1024


def _split_lines(chunk: bytes) -> list[bytes]:
    """``chunk`` cut at its line ends (CRLF, CR or LF); the last piece is the start of a line
    yet to end. Only new bytes come here: each byte of a stream is scanned once."""
    if b"\r" in chunk:
        chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    return chunk.split(b"\n")


class MessageTooLarge(PeerError, ValueError):
    """The stream has a message (or a line) longer than the parser's limit: the sender is broken
    or hostile. The parser is unusable afterwards; drop the connection."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"an SSE message (or one of its lines) exceeds the limit of {limit:,} bytes; no "
            "storage-events event comes near that size, so the sender is broken or is not a "
            "storage-events relay"
        )
        self.limit = limit


class SSEParser:
    """Incremental parser: ``feed(bytes)`` returns the messages completed by those bytes.

    Each byte is scanned once, and at most ``max_message`` bytes are held for the message being
    received; beyond, :class:`MessageTooLarge` is raised."""

    def __init__(self, max_message: int = MAX_MESSAGE) -> None:
        self.max_message = max_message
        self._line = bytearray()  # the start of a line whose end has not arrived yet
        self._cr = False  # the last chunk ended with CR: an LF first in the next completes it
        self._held = 0  # bytes of the data lines of the message being received
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None
        # Committed only when a message block ends, as the HTML spec says: an id line of a
        # block cut off mid-way must not count as received.
        self.last_event_id: str | None = None
        self.retry_ms: int | None = None

    def feed(self, chunk: bytes) -> list[Message]:
        out: list[Message] = []
        if not chunk:
            return out
        if self._cr and chunk[0] == 0x0A:
            chunk = chunk[1:]  # the LF of a CRLF whose CR ended the last chunk
        # A CR is a line end by itself, taken at once; it may also be the first half of a CRLF.
        self._cr = chunk[-1:] == b"\r"
        *lines, rest = _split_lines(chunk)
        if lines and self._line:
            self._line += lines[0]  # at most the limit (checked below, last time) plus a chunk
            lines[0] = bytes(self._line)
            self._line.clear()
        limit = self.max_message
        for raw in lines:
            if self._held + len(raw) > limit:
                raise MessageTooLarge(limit)
            if not raw:
                self.last_event_id = self._id
                if self._data:
                    out.append(
                        Message(self._event or "message", "\n".join(self._data), self.last_event_id)
                    )
                self._event, self._data, self._held = "", [], 0
                continue
            if raw[0] == 0x3A:  # ":", a comment
                continue
            name, _, value = raw.decode("utf-8", "replace").partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                self._data.append(value)
                self._held += len(raw)
            elif name == "event":
                self._event = value
            elif name == "id" and "\0" not in value:
                self._id = value
            # ASCII digits only, as the spec says (int() would also take "²", and fails beyond
            # 4,300 digits); a retry of more than 11 days is ignored as the nonsense it is.
            elif name == "retry" and value.isascii() and value.isdigit() and len(value) <= 9:
                self.retry_ms = int(value)
        if self._held + len(self._line) + len(rest) > limit:
            raise MessageTooLarge(limit)
        self._line += rest
        return out
