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

from storage_events.errors import StorageEventsError
from storage_events.relay.feed.filters import Scope, under
from storage_events.relay.log.base import Record
from storage_events.wire import Event, Flag

# The twelve events a dCache selector may name, and the names that stand for several.
EVENTS = {
    "IN_ACCESS": Flag.ACCESS,
    "IN_ATTRIB": Flag.ATTRIB,
    "IN_CLOSE_WRITE": Flag.CLOSE_WRITE,
    "IN_CLOSE_NOWRITE": Flag.CLOSE_NOWRITE,
    "IN_CREATE": Flag.CREATE,
    "IN_DELETE": Flag.DELETE,
    "IN_DELETE_SELF": Flag.DELETE_SELF,
    "IN_MODIFY": Flag.MODIFY,
    "IN_MOVE_SELF": Flag.MOVE_SELF,
    "IN_MOVED_FROM": Flag.MOVED_FROM,
    "IN_MOVED_TO": Flag.MOVED_TO,
    "IN_OPEN": Flag.OPEN,
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
LOSS_WINDOW = 1.0  # seconds: loss notices of one place, coalesced (and delayed) at most this


class ChannelError(StorageEventsError):
    """A request the channel API refuses; ``status`` is the HTTP status dCache would give (bad
    input, access, or a limit: hence the root, not one family)."""

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
        raise ChannelError(
            400, 'the subscription needs a JSON selector body, e.g. {"path": "/data/in"}'
        )
    try:
        sel = _selector.decode(body)
    except msgspec.ValidationError as e:
        raise ChannelError(400, f"bad selector: {e}") from None
    except msgspec.DecodeError as e:
        raise ChannelError(400, f"the selector is not valid JSON: {e}") from None
    p = sel.path
    if (
        len(p) > MAX_PATH
        or not p.startswith("/")
        or (p != "/" and p.endswith("/"))
        or any(ord(c) < 0x20 for c in p)
        or any(part in ("", ".", "..") for part in p.split("/")[1:] if p != "/")
    ):
        raise ChannelError(
            400,
            f"bad selector: path {p[:200]!r} must be absolute, without a "
            "trailing slash, '.', '..' or empty components",
        )
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
            raise ChannelError(
                400,
                f"bad selector: unknown flag {name[:80]!r}; valid flags: "
                f"{', '.join([*EVENTS, *MACROS, *MODIFIERS])}",
            )
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
    # Where the watched object is now: the watch follows it when it is moved. A watch without a
    # site is one watch per site sharing an id; `path` is where the object is on every site
    # except those in `moved`.
    path: str
    mask: int
    oneshot: bool
    selector: Selector  # as the client last sent it, for GET
    # site → path, for a site-less watch whose object was moved on that site (and only there):
    # that site's events come from the new path, every other site's still from `path`.
    moved: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"{self.channel.url}/subscriptions/inotify/{self.sid}"

    def path_on(self, site: str) -> str:
        return self.moved.get(site, self.path)

    def paths(self) -> set[str]:
        """Every path the watch covers on some site."""
        return {self.path, *self.moved.values()}


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
    # A channel may hold 10,000 watches: storage writes only those changed since it last saved
    # them. sid → the version of its latest change (a sid no longer in `watches` was removed);
    # a write marks a watch saved only if it has not changed again since its snapshot.
    watch_version: int = 0
    unsaved: dict[str, int] = field(default_factory=dict)

    def changed(self, sid: str) -> None:
        self.watch_version += 1
        self.unsaved[sid] = self.watch_version


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


@dataclass(frozen=True, slots=True)
class Origin:
    """Where an event routed to a channel came from. Kept with it, because rights follow the
    owner's current token: what is delivered later (a replay, or a push to a client that
    connected after routing) is checked again against the rights the owner has then."""

    site: str  # "" for the relay's own notices, which reveal nothing of any site
    path: str
    overflow: bool = False  # a loss notice: it concerns everything below and above `path`
    old_path: str | None = None  # a move's source, which its cookie links to


RELAY = Origin("", "/")
_envelope = msgspec.json.Decoder(Envelope)


def deliverable(scope: Scope, origin: Origin, data: bytes) -> bytes | None:
    """``data`` as an owner with ``scope`` may receive it now; None if not at all."""
    if not origin.site:
        return data
    if not scope.allows(origin.site, origin.path, overflow=origin.overflow):
        return None
    if origin.old_path is not None and not scope.allows(origin.site, origin.old_path):
        env = _envelope.decode(data)  # the half it links to is no longer the owner's to see
        env.event.cookie = None
        return _encode(env)
    return data


@dataclass(slots=True)
class Routed:
    """What routing produced: events for channels' backlogs, watches that ended, and channels
    with watches that followed a move (to be stored with this batch even if no event of it
    reached them)."""

    # channel, id, JSON envelope, where it came from
    events: list[tuple[Channel, int, bytes, Origin]] = field(default_factory=list)
    closed: list[Watch] = field(default_factory=list)
    followed: dict[str, Channel] = field(default_factory=dict)


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
        # The directories above watched paths, each → the next components down towards them:
        # what a directory move concerns is found without looking at every watched path.
        self._below: dict[str, set[str]] = {}
        # One notice for a loss at one place can reach 10,000 watches of each of many channels:
        # a sender announcing loss in a loop must not make that many events each time. So per
        # (site, path): when its notice last went out, and those held back since.
        self._loss_at: dict[tuple[str, str], float] = {}
        self.deferred: set[tuple[str, str]] = set()  # stored with the routing cursor

    # -- channels ------------------------------------------------------------------------

    def create(
        self, owner: str, scope: Scope, client_id: str | None, base_url: str, now: float
    ) -> Channel:
        if sum(c.owner == owner for c in self.channels.values()) >= self.limits.per_user:
            raise ChannelError(
                429, f"{owner!r} already has {self.limits.per_user} channels: delete one first"
            )
        cid = secrets.token_urlsafe(16)
        ch = Channel(
            cid,
            owner,
            scope,
            client_id,
            f"{base_url}/{cid}",
            self.limits.timeout,
            disconnected_at=now,
        )
        self.channels[cid] = ch
        return ch

    def add(self, ch: Channel) -> None:
        """Put back a channel loaded from storage."""
        self.channels[ch.id] = ch
        for w in ch.watches.values():
            self._index(w)

    def get(self, cid: str, owner: str) -> Channel:
        ch = self.channels.get(cid)
        if ch is None:
            raise ChannelError(
                404, f"no channel {cid[:40]!r}: it was deleted, expired, or never existed"
            )
        if ch.owner != owner:
            raise ChannelError(403, f"channel {cid} belongs to another user")
        return ch

    def listing(self, owner: str, client_id: str | None, filtered: bool) -> list[Channel]:
        return [
            c
            for c in self.channels.values()
            if c.owner == owner and (not filtered or (c.client_id or "") == (client_id or ""))
        ]

    def set_timeout(self, ch: Channel, timeout: object) -> None:
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, int)
            or not (1 <= timeout <= self.limits.max_timeout)
        ):
            raise ChannelError(
                400,
                f"timeout must be a whole number of seconds from 1 to "
                f"{self.limits.max_timeout}, not {str(timeout)[:40]}",
            )
        ch.timeout = timeout

    def delete(self, ch: Channel) -> list[Watch]:
        """Forget the channel; returns the watches that ended with it."""
        self.channels.pop(ch.id, None)
        ended = list(ch.watches.values())
        for w in ended:
            self._drop(w)
        return ended

    def expired(self, now: float) -> list[Channel]:
        return [
            c
            for c in self.channels.values()
            if not c.connected and now - c.disconnected_at >= c.timeout
        ]

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
        if (scope.sites is not None and sel.site is not None and sel.site not in scope.sites) or (
            scope.prefixes is not None and not any(under(sel.path, p) for p in scope.prefixes)
        ):
            raise ChannelError(
                400,
                f"Permission denied: {ch.owner!r} may not read "
                f"{sel.path}{' on ' + sel.site if sel.site else ''}",
            )
        for w in self._by_path.get(sel.path, ()):
            # The same watch only if it covers the path on every site it concerns: where its
            # object was moved away on one site, another object now has the path there.
            if w.channel is ch and w.site == sel.site and w.path == sel.path and not w.moved:
                w.mask = w.mask | mask.events if mask.add else mask.events
                w.oneshot = mask.oneshot
                w.selector = sel
                ch.changed(w.sid)
                return w, False
        if len(ch.watches) >= self.limits.watches:
            raise ChannelError(
                400,
                f"channel {ch.id} already has {self.limits.watches} "
                "subscriptions: use another channel",
            )
        sid = watch_id(sel.site, sel.path)
        while sid in ch.watches:  # the id's object has moved away and something took its place
            sid = watch_id(sel.site, sel.path + "\0" + secrets.token_hex(4))
        w = Watch(sid, ch, sel.site, sel.path, mask.events, mask.oneshot, sel)
        ch.watches[sid] = w
        ch.changed(sid)
        self._index(w)
        return w, True

    def watch(self, ch: Channel, sid: str) -> Watch:
        w = ch.watches.get(sid)
        if w is None:
            raise ChannelError(404, f"channel {ch.id} has no subscription {sid[:40]!r}")
        return w

    def unsubscribe(self, w: Watch) -> None:
        w.channel.watches.pop(w.sid, None)
        w.channel.changed(w.sid)
        self._drop(w)

    def _index(self, w: Watch) -> None:
        for path in w.paths():
            same = self._by_path.get(path)
            if same is None:
                same = self._by_path[path] = set()
                self._link(path)
            same.add(w)

    def _drop(self, w: Watch) -> None:
        for path in w.paths():
            same = self._by_path.get(path)
            if same is not None:
                same.discard(w)
                if not same:
                    del self._by_path[path]
                    self._unlink(path)

    def _link(self, path: str) -> None:
        while path != "/":
            parent = path.rpartition("/")[0] or "/"
            below = self._below.setdefault(parent, set())
            if path in below:
                return
            below.add(path)
            path = parent

    def _unlink(self, path: str) -> None:
        """``path`` is no longer watched: prune it, and directories left with nothing below."""
        while path != "/" and path not in self._by_path and path not in self._below:
            parent = path.rpartition("/")[0] or "/"
            below = self._below[parent]
            below.discard(path)
            if below:
                return
            del self._below[parent]
            path = parent

    def _beneath(self, path: str) -> list[str]:
        """The watched paths at or below ``path``."""
        found, todo = [], [path]
        while todo:
            p = todo.pop()
            if p in self._by_path:
                found.append(p)
            todo.extend(self._below.get(p, ()))
        return found

    # -- routing -------------------------------------------------------------------------

    def route(self, records: Iterable[Record], now: float | None = None) -> Routed:
        """``now`` (monotonic seconds): loss notices of one site and path are announced at
        most once per ``LOSS_WINDOW``; the ones held back in it become one more notice at its
        end (:meth:`flush`). None: every notice at once."""
        out = Routed()
        if not self._by_path:
            return out
        for r in records:
            if r.flags & _OVERFLOW:
                key = (r.site, r.path)
                if now is not None and now - self._loss_at.get(key, -LOSS_WINDOW) < LOSS_WINDOW:
                    self.deferred.add(key)
                    continue
                if now is not None:
                    self._loss_at[key] = now
                self._announce(out, *key)
                continue
            parent = r.path.rpartition("/")[0] or "/"
            children = self._by_path.get(parent) if r.path != "/" else None
            selves = self._by_path.get(r.path)
            # A watch is found under each path it covers; it concerns this record only under
            # the path it has on the record's site.
            if children:
                for w in list(children):
                    if w.path_on(r.site) == parent:
                        self._child(out, w, r)
            if selves:
                for w in list(selves):
                    if w.path_on(r.site) == r.path:
                        self._self(out, w, r)
            if r.flags & _MOVED_TO:
                self._follow(out, r)
        return out

    def flush(self, now: float) -> Routed:
        """The loss notices held back whose window has ended."""
        out = Routed()
        for key in [
            k for k in self.deferred if now - self._loss_at.get(k, -LOSS_WINDOW) >= LOSS_WINDOW
        ]:
            self.deferred.discard(key)
            self._loss_at[key] = now
            if self._by_path:
                self._announce(out, *key)
        for key in [
            k for k, t in self._loss_at.items() if now - t >= LOSS_WINDOW and k not in self.deferred
        ]:
            del self._loss_at[key]  # (a notice for it now goes out at once again)
        return out

    def _announce(self, out: Routed, site: str, path: str) -> None:
        """An IN_Q_OVERFLOW to every watch the loss at ``path`` of ``site`` may concern."""
        origin = Origin(site, path, overflow=True)
        for w in self._all():
            if self._loss_visible(w, site, path):
                self._emit(out, w, origin, Payload(["IN_Q_OVERFLOW"]))

    @property
    def has_watches(self) -> bool:
        return bool(self._by_path)

    def _all(self) -> list[Watch]:
        """Every watch, once. O(all watches), but only for loss notices, which are rare."""
        return [w for ch in self.channels.values() for w in ch.watches.values()]

    def _visible(self, w: Watch, r: Record) -> bool:
        if w.site is not None and r.site != w.site:
            return False
        return w.channel.scope.allows(r.site, r.path)

    def _loss_visible(self, w: Watch, site: str, path: str) -> bool:
        """Whether a loss at ``path`` of ``site`` concerns ``w``."""
        if not site:  # the router's own notice: records were lost before routing
            return True  # (its path is "/": it concerns every watch)
        if w.site is not None and site != w.site:
            return False
        watched = w.path_on(site)
        return (under(watched, path) or under(path, watched)) and w.channel.scope.allows(
            site, path, overflow=True
        )

    def _child(self, out: Routed, w: Watch, r: Record) -> None:
        bits = r.flags & _CHILD_EVENTS & w.mask
        if not bits or not self._visible(w, r):
            return
        ev = r.event()
        name = r.path.rpartition("/")[2]
        cookie = None
        if bits & _MOVES and ev.cookie is not None and self._pair_visible(w, r, ev):
            cookie = move_cookie(r, ev.cookie)
        origin = Origin(r.site, r.path, old_path=ev.old_path if cookie else None)
        for bit in Flag(bits):
            mask = [f"IN_{bit.name}", "IN_ISDIR"] if ev.is_dir else [f"IN_{bit.name}"]
            if self._emit(out, w, origin, Payload(mask, name, cookie if bit & _MOVES else None)):
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
        origin = Origin(r.site, r.path)
        for bit in Flag(bits):
            mask = [f"IN_{bit.name}", "IN_ISDIR"] if is_dir and own is None else [f"IN_{bit.name}"]
            if bit is Flag.DELETE_SELF:
                ended = bool(w.mask & int(Flag.DELETE_SELF)) and self._emit(
                    out, w, origin, Payload(mask)
                )
                if not ended:
                    self._end(out, w)
                return
            if self._emit(out, w, origin, Payload(mask)):
                return

    def _follow(self, out: Routed, r: Record) -> None:
        """A watched object that was moved keeps its watch, under its new path: on the site
        where it moved, and only there."""
        ev = r.event()
        old = ev.old_path
        if old is None:
            return
        moved = self._beneath(old) if ev.is_dir else ([old] if old in self._by_path else [])
        for path in moved:
            for w in list(self._by_path.get(path, ())):
                if (w.site is not None and w.site != r.site) or w.path_on(r.site) != path:
                    continue  # another site's object, which stayed where it was
                new = r.path + path[len(old) :]
                self._drop(w)
                if w.site is not None:
                    w.path = new
                elif new == w.path:  # moved back: this site is like the others again
                    w.moved.pop(r.site, None)
                else:
                    w.moved[r.site] = new
                self._index(w)
                w.channel.changed(w.sid)
                out.followed[w.channel.id] = w.channel

    def _emit(self, out: Routed, w: Watch, origin: Origin, payload: Payload) -> bool:
        """Queue one event for ``w``'s channel; True when the watch ended (IN_ONESHOT)."""
        ch = w.channel
        out.events.append((ch, ch.next_id, _encode(Envelope(payload, w.url)), origin))
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
        out.events.append(
            (ch, ch.next_id, _encode(Envelope(Payload(["IN_IGNORED"]), w.url)), RELAY)
        )
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
