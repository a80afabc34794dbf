"""dCache-style event channels, sans-I/O.

A channel belongs to one user and holds inotify-style watches ("subscriptions"). Every event the
relay stores is routed here; each watch that it concerns gets it in dCache's form (``name`` of
the child, ``mask`` list, shared ``cookie`` on move halves) under the channel's own integer ids,
0, 1, 2, … Watches are not recursive, exactly like inotify(7) and dCache: a directory watch sees
its direct children and itself.

No HTTP and no storage here: the API module calls in, and persists what comes out.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field

import msgspec

from storage_events.wire import Event, Flag

from .filters import Scope, under
from .log import Record

# The twelve events a dCache selector may name, and the names that stand for several.
EVENTS = {
    "IN_ACCESS": Flag.ACCESS, "IN_ATTRIB": Flag.ATTRIB, "IN_CLOSE_WRITE": Flag.CLOSE_WRITE,
    "IN_CLOSE_NOWRITE": Flag.CLOSE_NOWRITE, "IN_CREATE": Flag.CREATE, "IN_DELETE": Flag.DELETE,
    "IN_DELETE_SELF": Flag.DELETE_SELF, "IN_MODIFY": Flag.MODIFY, "IN_MOVE_SELF": Flag.MOVE_SELF,
    "IN_MOVED_FROM": Flag.MOVED_FROM, "IN_MOVED_TO": Flag.MOVED_TO, "IN_OPEN": Flag.OPEN,
}
ALL_EVENTS = Flag(0)
for _bit in EVENTS.values():
    ALL_EVENTS |= _bit
MACROS = {
    "IN_ALL_EVENTS": ALL_EVENTS,
    "IN_CLOSE": Flag.CLOSE_WRITE | Flag.CLOSE_NOWRITE,
    "IN_MOVE": Flag.MOVED_FROM | Flag.MOVED_TO,
}
MODIFIERS = ("IN_MASK_ADD", "IN_ONESHOT", "IN_ONLYDIR")
REFUSED = ("IN_DONT_FOLLOW", "IN_EXCL_UNLINK")  # dCache refuses these too
_CHILD_EVENTS = int(ALL_EVENTS & ~(Flag.DELETE_SELF | Flag.MOVE_SELF))
_MOVES = int(Flag.MOVED_FROM | Flag.MOVED_TO)
_OVERFLOW, _MOVED_TO = int(Flag.Q_OVERFLOW), int(Flag.MOVED_TO)
# What happens to a watched directory, seen from its own watch.
_AS_SELF = {int(Flag.DELETE): Flag.DELETE_SELF, int(Flag.MOVED_FROM): Flag.MOVE_SELF}

MAX_PATH = 4096


class ChannelError(Exception):
    """A request the channel API refuses; ``status`` is the HTTP status dCache would give."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class Selector(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """What a client POSTs to subscribe. ``site`` is ours: without it a watch covers the path on
    every site the owner may read."""

    path: str
    flags: list[str] | None = None
    site: str | None = None


_selector = msgspec.json.Decoder(Selector)


def parse_selector(body: bytes) -> Selector:
    if not body.strip():
        raise ChannelError(400, "the subscription needs a JSON selector body, e.g. "
                                '{"path": "/data/in"}')
    try:
        sel = _selector.decode(body)
    except msgspec.ValidationError as e:
        raise ChannelError(400, f"bad selector: {e}") from None
    except msgspec.DecodeError as e:
        raise ChannelError(400, f"the selector is not valid JSON: {e}") from None
    p = sel.path
    if (len(p) > MAX_PATH or not p.startswith("/") or (p != "/" and p.endswith("/"))
            or any(ord(c) < 0x20 for c in p)
            or any(part in ("", ".", "..") for part in p.split("/")[1:] if p != "/")):
        raise ChannelError(400, f"bad selector: path {p[:200]!r} must be absolute, without a "
                                "trailing slash, '.', '..' or empty components")
    if sel.site is not None and not (0 < len(sel.site) <= 256 and sel.site.isprintable()):
        raise ChannelError(400, f"bad selector: site {sel.site[:80]!r} is not a site name")
    return sel


@dataclass(frozen=True, slots=True)
class Mask:
    events: int
    add: bool = False
    oneshot: bool = False


def parse_flags(flags: list[str] | None) -> Mask:
    if flags is None:
        return Mask(int(ALL_EVENTS))
    events, modifiers = 0, set()
    for name in flags:
        if name in EVENTS:
            events |= EVENTS[name]
        elif name in MACROS:
            events |= MACROS[name]
        elif name in MODIFIERS:
            modifiers.add(name)
        elif name in REFUSED:
            raise ChannelError(400, f"bad selector: flag {name} is not supported")
        else:
            raise ChannelError(400, f"bad selector: unknown flag {name[:80]!r}; valid flags: "
                                    f"{', '.join([*EVENTS, *MACROS, *MODIFIERS])}")
    if not events:
        raise ChannelError(400, "bad selector: flags name no event to watch")
    return Mask(events, "IN_MASK_ADD" in modifiers, "IN_ONESHOT" in modifiers)


def watch_id(site: str | None, path: str) -> str:
    """Fixed per (channel, watched object), like dCache's PNFS-ID based id: 24 URL-safe chars."""
    digest = hashlib.blake2b(f"{site or ''}\0{path}".encode(), digest_size=18).digest()
    return base64.urlsafe_b64encode(digest).decode()


def move_cookie(r: Record, cookie: int) -> str:
    """The same string for both halves of one rename, distinct across nodes."""
    digest = hashlib.blake2b(f"{r.site}\0{r.node}\0{cookie}".encode(), digest_size=16).digest()
    return base64.b64encode(digest).decode().rstrip("=")


@dataclass(slots=True, eq=False)
class Watch:
    sid: str
    channel: Channel
    site: str | None
    path: str  # where the watched object is now: follows it when it is moved
    mask: int
    oneshot: bool
    selector: Selector  # as the client last sent it, for GET

    @property
    def url(self) -> str:
        return f"{self.channel.url}/subscriptions/inotify/{self.sid}"


@dataclass(slots=True, eq=False)
class Channel:
    id: str
    owner: str
    # The owner's reading rights as of their latest request, enforced on every event routed
    # here (also while they are away).
    scope: Scope
    client_id: str | None
    url: str  # absolute, as the creating client reached the relay
    timeout: int
    next_id: int = 0  # the id the next event gets
    first_id: int = 0  # the oldest id still in the backlog
    connected: bool = False
    disconnected_at: float = 0.0  # wall clock; the channel expires `timeout` s after it
    watches: dict[str, Watch] = field(default_factory=dict)
    # Watches change rarely and events often: storage rewrites them only when this moved on
    # from the version it last saved.
    watch_version: int = 0
    saved_watch_version: int = -1


class Payload(msgspec.Struct, omit_defaults=True):
    mask: list[str]
    name: str | None = None
    cookie: str | None = None


class Envelope(msgspec.Struct):
    event: Payload
    subscription: str


class SystemEvent(msgspec.Struct, omit_defaults=True):
    type: str
    subscription: str | None = None


_encode = msgspec.json.Encoder().encode


def system(type: str, subscription: str | None = None) -> bytes:
    return _encode(SystemEvent(type, subscription))


@dataclass(slots=True)
class Routed:
    """What routing produced: events for channels' backlogs, and watches that ended."""

    events: list[tuple[Channel, int, bytes]] = field(default_factory=list)  # channel, id, JSON
    closed: list[Watch] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Limits:
    per_user: int = 128
    watches: int = 10_000  # per channel
    timeout: int = 300
    max_timeout: int = 86400
    backlog: int = 16383


class Registry:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.channels: dict[str, Channel] = {}
        self._by_path: dict[str, set[Watch]] = {}

    # -- channels ------------------------------------------------------------------------

    def create(self, owner: str, scope: Scope, client_id: str | None, base_url: str,
               now: float) -> Channel:
        if sum(c.owner == owner for c in self.channels.values()) >= self.limits.per_user:
            raise ChannelError(429, f"{owner!r} already has {self.limits.per_user} channels: "
                                    "delete one first")
        cid = secrets.token_urlsafe(16)
        ch = Channel(cid, owner, scope, client_id, f"{base_url}/{cid}", self.limits.timeout,
                     disconnected_at=now)
        self.channels[cid] = ch
        return ch

    def add(self, ch: Channel) -> None:
        """Put back a channel loaded from storage."""
        ch.saved_watch_version = ch.watch_version
        self.channels[ch.id] = ch
        for w in ch.watches.values():
            self._by_path.setdefault(w.path, set()).add(w)

    def get(self, cid: str, owner: str) -> Channel:
        ch = self.channels.get(cid)
        if ch is None:
            raise ChannelError(404, f"no channel {cid[:40]!r}: it was deleted, expired, or "
                                    "never existed")
        if ch.owner != owner:
            raise ChannelError(403, f"channel {cid} belongs to another user")
        return ch

    def listing(self, owner: str, client_id: str | None, filtered: bool) -> list[Channel]:
        return [c for c in self.channels.values() if c.owner == owner
                and (not filtered or (c.client_id or "") == (client_id or ""))]

    def set_timeout(self, ch: Channel, timeout: object) -> None:
        if isinstance(timeout, bool) or not isinstance(timeout, int) or not (
                1 <= timeout <= self.limits.max_timeout):
            raise ChannelError(400, f"timeout must be a whole number of seconds from 1 to "
                                    f"{self.limits.max_timeout}, not {str(timeout)[:40]}")
        ch.timeout = timeout

    def delete(self, ch: Channel) -> list[Watch]:
        """Forget the channel; returns the watches that ended with it."""
        self.channels.pop(ch.id, None)
        ended = list(ch.watches.values())
        for w in ended:
            self._drop(w)
        return ended

    def expired(self, now: float) -> list[Channel]:
        return [c for c in self.channels.values()
                if not c.connected and now - c.disconnected_at >= c.timeout]

    def connect(self, ch: Channel) -> None:
        ch.connected = True

    def disconnect(self, ch: Channel, now: float) -> None:
        ch.connected = False
        ch.disconnected_at = now

    # -- subscriptions -------------------------------------------------------------------

    def subscribe(self, ch: Channel, sel: Selector) -> tuple[Watch, bool]:
        """(the watch, True if new); merging into an existing watch is dCache's 303."""
        mask = parse_flags(sel.flags)
        scope = ch.scope
        if (scope.sites is not None and sel.site is not None and sel.site not in scope.sites) \
                or (scope.prefixes is not None
                    and not any(under(sel.path, p) for p in scope.prefixes)):
            raise ChannelError(400, f"Permission denied: {ch.owner!r} may not read "
                                    f"{sel.path}{' on ' + sel.site if sel.site else ''}")
        for w in self._by_path.get(sel.path, ()):
            if w.channel is ch and w.site == sel.site:
                w.mask = w.mask | mask.events if mask.add else mask.events
                w.oneshot = mask.oneshot
                w.selector = sel
                ch.watch_version += 1
                return w, False
        if len(ch.watches) >= self.limits.watches:
            raise ChannelError(400, f"channel {ch.id} already has {self.limits.watches} "
                                    "subscriptions: use another channel")
        sid = watch_id(sel.site, sel.path)
        while sid in ch.watches:  # the id's object has moved away and something took its place
            sid = watch_id(sel.site, sel.path + "\0" + secrets.token_hex(4))
        w = Watch(sid, ch, sel.site, sel.path, mask.events, mask.oneshot, sel)
        ch.watches[sid] = w
        ch.watch_version += 1
        self._by_path.setdefault(w.path, set()).add(w)
        return w, True

    def watch(self, ch: Channel, sid: str) -> Watch:
        w = ch.watches.get(sid)
        if w is None:
            raise ChannelError(404, f"channel {ch.id} has no subscription {sid[:40]!r}")
        return w

    def unsubscribe(self, w: Watch) -> None:
        w.channel.watches.pop(w.sid, None)
        w.channel.watch_version += 1
        self._drop(w)

    def _drop(self, w: Watch) -> None:
        same = self._by_path.get(w.path)
        if same is not None:
            same.discard(w)
            if not same:
                del self._by_path[w.path]

    # -- routing -------------------------------------------------------------------------

    def route(self, records: Iterable[Record]) -> Routed:
        out = Routed()
        if not self._by_path:
            return out
        for r in records:
            if r.flags & _OVERFLOW:
                for w in self._all():
                    if (under(w.path, r.path) or under(r.path, w.path)) and \
                            self._loss_visible(w, r):
                        self._emit(out, w, r, Payload(["IN_Q_OVERFLOW"]))
                continue
            parent = r.path.rpartition("/")[0] or "/"
            children = self._by_path.get(parent) if r.path != "/" else None
            selves = self._by_path.get(r.path)
            if children:
                for w in list(children):
                    self._child(out, w, r)
            if selves:
                for w in list(selves):
                    self._self(out, w, r)
            if r.flags & _MOVED_TO:
                self._follow(r)
        return out

    @property
    def has_watches(self) -> bool:
        return bool(self._by_path)

    def _all(self) -> list[Watch]:
        return [w for ws in self._by_path.values() for w in ws]

    def _visible(self, w: Watch, r: Record) -> bool:
        if w.site is not None and r.site != w.site:
            return False
        return w.channel.scope.allows(r.site, r.path)

    def _loss_visible(self, w: Watch, r: Record) -> bool:
        if not r.site:  # the router's own notice: records were lost before routing
            return True
        if w.site is not None and r.site != w.site:
            return False
        return w.channel.scope.allows(r.site, r.path, overflow=True)

    def _child(self, out: Routed, w: Watch, r: Record) -> None:
        bits = r.flags & _CHILD_EVENTS & w.mask
        if not bits or not self._visible(w, r):
            return
        ev = r.event()
        name = r.path.rpartition("/")[2]
        cookie = None
        if bits & _MOVES and ev.cookie is not None and self._pair_visible(w, r, ev):
            cookie = move_cookie(r, ev.cookie)
        for bit in Flag(bits):
            mask = [f"IN_{bit.name}", "IN_ISDIR"] if ev.is_dir else [f"IN_{bit.name}"]
            if self._emit(out, w, r, Payload(mask, name, cookie if bit & _MOVES else None)):
                return

    def _pair_visible(self, w: Watch, r: Record, ev: Event) -> bool:
        """A move's cookie only links halves the owner may both see."""
        return ev.old_path is None or w.channel.scope.allows(r.site, ev.old_path)

    def _self(self, out: Routed, w: Watch, r: Record) -> None:
        if not self._visible(w, r):
            return
        own = _AS_SELF.get(r.flags)
        bits = int(own) if own is not None else r.flags & _CHILD_EVENTS & ~_MOVES
        bits &= w.mask | int(Flag.DELETE_SELF)  # a watch always learns that its object is gone
        is_dir = r.event().is_dir
        for bit in Flag(bits):
            mask = [f"IN_{bit.name}", "IN_ISDIR"] if is_dir and own is None else [
                f"IN_{bit.name}"]
            if bit is Flag.DELETE_SELF:
                ended = bool(w.mask & int(Flag.DELETE_SELF)) and self._emit(out, w, r,
                                                                            Payload(mask))
                if not ended:
                    self._end(out, w)
                return
            if self._emit(out, w, r, Payload(mask)):
                return

    def _follow(self, r: Record) -> None:
        """A watched object that was moved keeps its watch, under its new path."""
        ev = r.event()
        old = ev.old_path
        if old is None:
            return
        moved = [p for p in self._by_path if under(p, old)] if ev.is_dir else (
            [old] if old in self._by_path else [])
        for path in moved:
            for w in self._by_path.pop(path):
                if w.site is None or w.site == r.site:
                    w.path = r.path + path[len(old):]
                    w.channel.watch_version += 1
                self._by_path.setdefault(w.path, set()).add(w)

    def _emit(self, out: Routed, w: Watch, r: Record, payload: Payload) -> bool:
        """Queue one event for ``w``'s channel; True when the watch ended (IN_ONESHOT)."""
        ch = w.channel
        out.events.append((ch, ch.next_id, _encode(Envelope(payload, w.url))))
        ch.next_id += 1
        if w.oneshot and payload.mask[0] not in ("IN_Q_OVERFLOW", "IN_IGNORED"):
            self._end(out, w)
            return True
        return False

    def end(self, w: Watch) -> Routed:
        """The client deleted the watch."""
        out = Routed()
        self._end(out, w)
        return out

    def _end(self, out: Routed, w: Watch) -> None:
        ch = w.channel
        out.events.append((ch, ch.next_id, _encode(Envelope(Payload(["IN_IGNORED"]), w.url))))
        ch.next_id += 1
        self.unsubscribe(w)
        out.closed.append(w)

    def trimmed(self, ch: Channel) -> None:
        """The backlog keeps the newest ``limits.backlog`` events."""
        ch.first_id = max(ch.first_id, ch.next_id - self.limits.backlog)


def resume(ch: Channel, last_event_id: str | None) -> tuple[int | None, bool]:
    """Where a (re)connecting client's stream starts: (replay events after this id, or None
    for live only; whether to announce ``EVENT_LOSS`` first).

    As in dCache, no (or a non-numeric) ``Last-Event-ID`` means live only. An id whose
    successor is no longer held means loss; unlike dCache we then still replay what is held,
    since the client is told exactly that something is missing. ``-1`` asks for the whole
    backlog of a channel that has lost nothing yet.
    """
    value = (last_event_id or "").strip()
    if not re.fullmatch(r"-?[0-9]{1,18}", value):
        return None, False
    last = int(value)
    if ch.first_id - 1 <= last < ch.next_id:
        return last, False
    return ch.first_id - 1, True
