"""The wire format, defined once: what travels between agent, relay and subscriber.

Agent → relay and relay → relay frames are msgpack over a WebSocket; the subscriber sees the
same :class:`Event` as JSON in the ``data:`` field of a Server-Sent Event.
"""

from __future__ import annotations

import enum
import functools
import os
from typing import Annotated, Literal

import msgspec

PROTOCOL_VERSION = 1


class Flag(enum.IntFlag):
    """Kernel inotify mask bits, named as the kernel names them (``IN_`` prefix dropped)."""

    ACCESS = 0x00000001
    MODIFY = 0x00000002
    ATTRIB = 0x00000004
    CLOSE_WRITE = 0x00000008
    CLOSE_NOWRITE = 0x00000010
    OPEN = 0x00000020
    MOVED_FROM = 0x00000040
    MOVED_TO = 0x00000080
    CREATE = 0x00000100
    DELETE = 0x00000200
    DELETE_SELF = 0x00000400
    MOVE_SELF = 0x00000800
    UNMOUNT = 0x00002000
    Q_OVERFLOW = 0x00004000
    IGNORED = 0x00008000
    ISDIR = 0x40000000


def flag_names(mask: int) -> list[str]:
    """``IN_*`` names of the bits set in ``mask``, ISDIR excluded (it is ``is_dir``)."""
    return list(_flag_names(mask))


@functools.cache
def _flag_names(mask: int) -> tuple[str, ...]:
    return tuple(f"IN_{f.name}" for f in Flag if f is not Flag.ISDIR and mask & f)


def parse_flag(name: str) -> Flag:
    """``IN_CLOSE_WRITE``, ``close_write`` → :class:`Flag`; ``ValueError`` names the valid ones."""
    key = name.strip().upper().removeprefix("IN_")
    try:
        return Flag[key]
    except KeyError:
        valid = ", ".join(f"IN_{f.name}" for f in Flag if f is not Flag.ISDIR)
        raise ValueError(f"unknown inotify flag {name!r}; valid flags: {valid}") from None


_BITS = {f"IN_{f.name}": int(f) for f in Flag if f is not Flag.ISDIR}


def flags_mask(names: list[str]) -> int:
    mask = 0
    for name in names:
        bit = _BITS.get(name)  # the exact kernel spelling is the hot path: no enum arithmetic
        mask |= bit if bit is not None else int(parse_flag(name))
    return mask


# Integer fields are bounded where the wire meets the log: SQLite (and JSON readers in other
# languages) hold signed 64-bit integers, and a value beyond must be refused, not overflow.
_U63 = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
_SEQ = Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]
_NAME = Annotated[str, msgspec.Meta(max_length=256)]
# A relay's name, as its config allows: what ``via`` may hold (it reaches logs and pages).
RELAY_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
MAX_HOPS = 32  # relays an event may pass through; more is a loop or a forgery


class Event(msgspec.Struct, kw_only=True):
    """One filesystem change as a subscriber sees it.

    ``path`` is always valid UTF-8 for display; when the real name is not, the exact bytes are in
    ``raw_path`` (base64 in JSON) and undecodable bytes show as U+FFFD in ``path``.
    """

    id: _U63 = 0  # global id, given by the relay's log; 0 until then
    site: _NAME
    node: _NAME
    path: str
    flags: Annotated[list[str], msgspec.Meta(max_length=16)]
    is_dir: bool = False
    cookie: Annotated[int, msgspec.Meta(ge=0, lt=2**32)] | None = None
    old_path: str | None = None
    ts: _U63  # nanoseconds since the epoch, taken by the agent when it read the event
    stream: _NAME
    seq: _SEQ
    synthetic: bool = False  # found by a directory scan rather than read from the kernel
    # What the agent's one ``fstatat`` of the entry said, when it made one (None otherwise):
    # bytes, mtime in nanoseconds since the epoch, st_mode, owner, group, inode number.
    size: _U63 | None = None
    mtime: Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)] | None = None
    mode: Annotated[int, msgspec.Meta(ge=0, lt=2**32)] | None = None
    uid: Annotated[int, msgspec.Meta(ge=0, lt=2**32)] | None = None
    gid: Annotated[int, msgspec.Meta(ge=0, lt=2**32)] | None = None
    ino: _U63 | None = None  # (a larger one is sent as None)
    raw_path: bytes | None = None
    raw_old_path: bytes | None = None
    # Federation: the id the first relay gave the event, and every relay that stored it, that
    # one first. Set by relays, never by agents.
    origin_id: Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)] | None = None
    via: Annotated[
        list[Annotated[str, msgspec.Meta(pattern=RELAY_NAME)]], msgspec.Meta(max_length=MAX_HOPS)
    ] = msgspec.field(default_factory=list)


# -- what an event may carry: checked by the agent before it numbers an event and by the relay
# for every event it receives, so the two never disagree and no event is refused forever ----

MAX_PATH = 16 * 4096  # characters of ``path`` / ``old_path``
MAX_RAW_PATH = 4 * MAX_PATH  # bytes of ``raw_path`` / ``raw_old_path`` (4: the longest UTF-8)
_KNOWN_FLAGS = frozenset(_BITS)


def _path_problem(field: str, path: str, raw: bytes | None) -> str | None:
    """Why ``path`` (with its exact bytes ``raw``, if any) is not a canonical absolute path."""
    if len(path) > MAX_PATH:
        return f"{field} is {len(path):,} characters long, more than the limit of {MAX_PATH:,}"
    if "\0" in path:
        return f"{field} contains NUL"
    if path != "/" and (
        not path.startswith("/") or any(part in ("", ".", "..") for part in path[1:].split("/"))
    ):
        # Readers' scopes are prefixes: /data/public/../secret must never pass for /data/public.
        return (
            f"{field} {short_path(path, 80)!r} is not a canonical absolute path (it must "
            "start with / and have no empty, '.' or '..' components)"
        )
    if raw is not None:
        if len(raw) > MAX_RAW_PATH:
            return (
                f"raw_{field} is {len(raw):,} bytes long, more than the limit of {MAX_RAW_PATH:,}"
            )
        # The exact bytes and the display form must name the same file: scopes and filters
        # look at the one, programs that open the file use the other.
        if display_path(os.fsdecode(raw)) != (path, raw):
            return (
                f"raw_{field} is not the bytes of {field} {short_path(path, 80)!r} (it "
                "must be sent only for a name that is not UTF-8, and decode to it)"
            )
    return None


def event_problem(ev: Event) -> str | None:
    """Why ``ev`` can never be accepted by a relay, whichever the connection; None when it can."""
    path = ev.path
    if (
        len(path) <= MAX_PATH
        and path[:1] == "/"
        and path[-1] != "/"
        and "//" not in path
        and "/." not in path
        and "\0" not in path
        and ev.old_path is None
        and ev.raw_path is None
        and len(ev.flags) == 1
        and ev.flags[0] in _KNOWN_FLAGS
    ):
        return None  # the common case in one test: most events of the agent pass here
    if not path:
        return "path is empty"
    problem = _path_problem("path", path, ev.raw_path)
    if problem is None and ev.old_path is not None:
        problem = _path_problem("old_path", ev.old_path, ev.raw_old_path)
    elif problem is None and ev.raw_old_path is not None:
        problem = "raw_old_path is set without old_path"
    if problem is not None:
        return problem
    if not ev.flags or not _KNOWN_FLAGS.issuperset(ev.flags):
        return f"flags {ev.flags[:8]!r} are not inotify flag names"
    if len(set(ev.flags)) != len(ev.flags):
        return f"flags {ev.flags[:8]!r} name a flag twice"
    return None


def loss_notice(ev: Event) -> Event:
    """What takes the place of an event that cannot be delivered (same stream, seq and time):
    loss is never silent, so it becomes an overflow notice of the nearest ancestor of its path
    that an event may carry (``/`` at worst). A subscriber treats it as any overflow: whatever
    is under that path may have changed."""
    path = os.fsdecode(ev.raw_path) if ev.raw_path is not None else ev.path
    while True:
        # Cut where the path stops being acceptable: what remains above is an ancestor.
        if "\0" in path:
            path = path[: path.index("\0") + 1]
        if len(path) > MAX_PATH:
            path = path[: MAX_PATH + 1]
        path = path.rpartition("/")[0]
        shown, raw = display_path(path or "/")
        notice = Event(
            site=ev.site,
            node=ev.node,
            path=shown,
            flags=["IN_Q_OVERFLOW"],
            is_dir=True,
            ts=ev.ts,
            stream=ev.stream,
            seq=ev.seq,
            raw_path=raw,
        )
        if not path or event_problem(notice) is None:
            return notice


def short_path(path: str, limit: int = 200) -> str:
    """A path cut down for a log line: its start and its end, which name it best."""
    if len(path) <= limit:
        return path
    return f"{path[: limit // 2]}…({len(path) - limit:,} characters)…{path[-limit // 2 :]}"


class Hello(msgspec.Struct, tag="hello", kw_only=True):
    """First frame of an ingest connection: who is publishing which stream. A relay pushing its
    log says ``role="relay"``, names itself as ``site`` and ``node``, and its batches carry
    events of any stream, each with the pushing relay's id in ``id``."""

    role: Literal["agent", "relay"] = "agent"
    site: str
    node: str
    stream: str
    token: str | None = None
    version: int = PROTOCOL_VERSION


class Welcome(msgspec.Struct, tag="welcome", kw_only=True):
    """The relay's answer to :class:`Hello`: the last ``seq`` of the stream it holds durably."""

    stream: str
    acked: int


MAX_BATCH = 10_000  # events in one batch: checked from the frame's header, before decoding
# Bytes a sender (agent or pushing relay) puts in one frame, at most: a quarter of the relay's
# default max_frame (16 MiB), so that a relay with a smaller one is met by shrinking, not at
# every batch.
FRAME_BUDGET = 4 * 1024 * 1024


class Batch(msgspec.Struct, tag="batch"):
    events: Annotated[list[Event], msgspec.Meta(max_length=MAX_BATCH)]


class Ack(msgspec.Struct, tag="ack"):
    """Cumulative: every event of ``stream`` up to and including ``seq`` is stored durably."""

    stream: str
    seq: int


class Error(msgspec.Struct, tag="error"):
    """Sent before the relay closes an ingest connection; ``message`` is for a human."""

    message: str


ToRelay = Hello | Batch
ToAgent = Welcome | Ack | Error

_msgpack_encoder = msgspec.msgpack.Encoder()
_to_relay = msgspec.msgpack.Decoder(ToRelay)
_to_agent = msgspec.msgpack.Decoder(ToAgent)
_json_encoder = msgspec.json.Encoder()
_json_event = msgspec.json.Decoder(Event)


def encode_frame(msg: Hello | Batch | Welcome | Ack | Error) -> bytes:
    return _msgpack_encoder.encode(msg)


def decode_to_relay(frame: bytes) -> Hello | Batch:
    """Raises ``msgspec.DecodeError`` / ``msgspec.ValidationError`` with a precise message."""
    return _to_relay.decode(frame)


def decode_to_agent(frame: bytes) -> Welcome | Ack | Error:
    return _to_agent.decode(frame)


def event_json(event: Event) -> bytes:
    return _json_encoder.encode(event)


def event_from_json(data: str | bytes) -> Event:
    return _json_event.decode(data)


def display_path(path: str) -> tuple[str, bytes | None]:
    """Split a filesystem path (``os.fsdecode`` form) into a UTF-8 display form and, only when the
    name is not valid UTF-8, its exact bytes."""
    if path.isascii():
        return path, None
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raw = path.encode("utf-8", "surrogateescape")
        return raw.decode("utf-8", "replace"), raw
    return path, None


def ingest_url(relay: str) -> str:
    """``http://host:port[/base]`` → ``ws://host:port[/base]/ingest`` (https → wss)."""
    base = relay.rstrip("/")
    for plain, ws in (("http://", "ws://"), ("https://", "wss://")):
        if base.startswith(plain):
            return ws + base[len(plain) :] + "/ingest"
    if base.startswith(("ws://", "wss://")):
        return base if base.endswith("/ingest") else base + "/ingest"
    raise ValueError(f"relay URL {relay!r} must start with http:// or https://")
