"""The dCache channels' state on NATS JetStream, shared by the replicas of a NATS event log.

Channels, watches, the routing cursor and the loss notices held back live in the key-value bucket
``<stream>_CHANNELS`` (msgpack, the rows :func:`.store.snapshot` makes); each channel's backlog is
one subject of the stream ``<stream>_CHANNEL_EVENTS``, and the notices for connected clients
(SYSTEM messages, a new client taking a channel over) are one more subject of it, so that every
replica hears events and notices in one order.

Only the replica holding the channels' lease (:mod:`.shared`) writes. A key-value bucket has no
transaction over several keys, so each write goes first as one record, the ``commit`` key (the
changed rows, the cursor, the held notices), and only then to the rows' own keys: loading lays the
commit over the keys, so a writer that died between the two leaves nothing half-written, and its
successor finishes the writes. Every key is written with compare-and-set: a replica that lost the
lease without noticing (paused past its TTL) cannot write over its successor, who rewrote the
commit when it took over. Backlog messages go before the commit, each with
``Nats-Msg-Id: <channel>:<id>``: a successor routes the same records from the same committed
state to the same ids, and JetStream drops the copies.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import msgspec
from nats.errors import Error as NATSError
from nats.js import api
from nats.js.errors import (
    APIError,
    KeyWrongLastSequenceError,
    NotFoundError,
)

from storage_events.relay.dcache.channels import Origin, Registry
from storage_events.relay.dcache.store import BacklogRow, Snapshot, Stored, restore
from storage_events.relay.log.base import StoreError
from storage_events.relay.log.jetstream import (
    bucket,
    led,
    reader,
    ready,
    subscribe_after,
    writable,
)
from storage_events.relay.log.nats import NATSLog

log = logging.getLogger("storage_events.relay")

ACK_TIMEOUT = 10.0  # seconds JetStream may take to store a batch
# Copies of a batch published again after a failover are dropped within this window: a
# successor re-routes within seconds, but JetStream may be without quorum for minutes.
DUPLICATE_WINDOW = 600.0
INLINE = 256 * 1024  # a commit larger than this goes in parts (NATS carries 1 MiB by default)
WRITES = 500  # key writes in flight at once
NOTICES_KEPT = 1000  # notices are for clients connected now: older ones only take space
COMMIT = "commit"
_KV_OP = "KV-Operation"  # on the markers of deleted keys
_CAS_FAILED = (10071, 10164)  # JetStream's "wrong last sequence"


class Fenced(StoreError):
    def __init__(self) -> None:
        super().__init__(
            "another relay took the dCache channels over (this one lost their lease): it "
            "stops writing them and reloads them if it takes the lease again"
        )


class Row(msgspec.Struct, array_like=True):
    """One channel event in the backlog stream, with where it came from."""

    id: int
    data: bytes  # the JSON envelope the channel's stream sends
    site: str
    path: str
    overflow: bool
    old_path: str | None

    def origin(self) -> Origin:
        return Origin(self.site, self.path, self.overflow, self.old_path)


class Notice(msgspec.Struct, array_like=True):
    """For the client connected to a channel, wherever it is connected."""

    cid: str
    kind: str  # "tell": SYSTEM ``data``; "connected": ``conn`` took it; "closed": it is gone
    data: bytes = b""
    conn: str = ""


class Delta(msgspec.Struct, array_like=True):
    """One write: the rows that changed (each whole), as of the cursor it was made at."""

    cursor: int
    held: list[tuple[str, str]]
    channels: list[tuple]
    watches: list[tuple]
    removed: list[tuple[str, str]]
    deleted: list[str]


class Commit(msgspec.Struct, array_like=True):
    gen: str  # names the parts, so that an old writer's parts never mix with a new one's
    parts: int  # 0: the delta is here
    delta: bytes


_encode = msgspec.msgpack.encode
_rows = msgspec.msgpack.Decoder(Row)
_notices = msgspec.msgpack.Decoder(Notice)
_deltas = msgspec.msgpack.Decoder(Delta)
_commits = msgspec.msgpack.Decoder(Commit)
_tuple = msgspec.msgpack.Decoder(tuple)


def decode_row(data: bytes) -> Row:
    return _rows.decode(data)


def _hex(name: str) -> str:
    return name.encode().hex()  # any id as one subject token or key part


def _unhex(token: str) -> str:
    return bytes.fromhex(token).decode()


def _channel_key(cid: str) -> str:
    return f"c.{_hex(cid)}"


def _watch_key(cid: str, sid: str) -> str:
    return f"w.{_hex(cid)}.{_hex(sid)}"


def _cas_failed(e: APIError) -> bool:
    return isinstance(e, KeyWrongLastSequenceError) or e.err_code in _CAS_FAILED


class NATSChannelStore:
    """:class:`~.store.ChannelStorage` on the event log's NATS connection."""

    def __init__(self, log: NATSLog) -> None:
        self.log = log
        self.bucket = f"{log.stream}_CHANNELS"
        self.lease_bucket = f"{log.stream}_CHANNELS_LEASE"
        self.events = f"{log.stream}_CHANNEL_EVENTS"
        self._prefix = f"storage-events.{log.stream}.channels."
        self._notices = self._prefix + "n"
        # Set when a write failed: what the holder has in memory may be ahead of what is stored,
        # so nothing more is written until the state is loaded again.
        self.failed = asyncio.Event()
        self._reset()

    def _reset(self) -> None:
        self._revs: dict[str, int] = {}  # key → its revision, for compare-and-set
        self._sids: dict[str, set[str]] = {}  # channel → the watches it has keys for
        self._first: dict[str, int] = {}  # channel → the first_id its subject is trimmed to
        self._commit_rev: int | None = None
        self._parts: list[str] = []  # the keys holding the last commit's parts
        self._cursor = 0
        self._held: list[tuple[str, str]] = []

    def _subject(self, cid: str) -> str:
        return f"{self._prefix}e.{_hex(cid)}"

    # -- opening ---------------------------------------------------------------------------

    async def start(self, lease_ttl: float) -> None:
        """Open (or make) the buckets and the stream; the log is started."""
        self._js = self.log.client.jetstream()
        replicas = self.log.default_replicas()
        self._kv = await ready(
            lambda: bucket(self._js, self.bucket, replicas),
            f"key-value bucket {self.bucket}",
        )
        self.lease = await ready(
            lambda: bucket(self._js, self.lease_bucket, replicas, lease_ttl),
            f"key-value bucket {self.lease_bucket}",
        )
        await ready(lambda: self._open_stream(replicas), f"stream {self.events}")
        for stream in (f"KV_{self.bucket}", f"KV_{self.lease_bucket}", self.events):
            await led(self._js, stream)  # (writable only once each has a leader)
        for kv, name in ((self._kv, self.bucket), (self.lease, self.lease_bucket)):
            await writable(kv, f"key-value bucket {name}")

    async def _open_stream(self, replicas: int) -> None:
        try:
            await self._js.stream_info(self.events)
        except NotFoundError:
            await self._js.add_stream(
                api.StreamConfig(
                    name=self.events,
                    subjects=[self._prefix + ">"],
                    storage=api.StorageType.FILE,
                    num_replicas=replicas,
                    duplicate_window=DUPLICATE_WINDOW,
                )
            )

    async def listen(
        self, on_event: Callable[[str, bytes], None], on_notice: Callable[[int, Notice], None]
    ) -> None:
        """Hand every backlog message stored from now on to ``on_event`` (channel, encoded
        :class:`Row`) and every notice to ``on_notice`` (its stream sequence, the notice)."""
        heard = (await self._js.stream_info(self.events)).state.last_seq

        async def received(msg: Any) -> None:
            nonlocal heard
            seq = msg.metadata.sequence.stream
            if seq <= heard:
                return  # a consumer re-created after a reconnect may start earlier
            heard = seq
            try:
                if msg.subject == self._notices:
                    on_notice(seq, _notices.decode(msg.data))
                else:
                    on_event(_unhex(msg.subject.rpartition(".")[2]), msg.data)
            except (ValueError, msgspec.DecodeError) as e:
                log.error("skipping message %d of NATS stream %s: %s", seq, self.events, e)

        self._sub = await subscribe_after(
            self._js, self._prefix + ">", self.events, heard, received
        )

    # -- the holder's state ----------------------------------------------------------------

    async def load(self, registry: Registry, now: float) -> int:
        """Fill ``registry`` and take the store over for writing; returns the cursor."""
        self._reset()
        self.failed.set()  # until loaded
        entries = await self._entries()
        commit = entries.pop(COMMIT, None)
        channels: dict[str, tuple] = {}
        watches: dict[tuple[str, str], tuple] = {}
        parts: dict[str, bytes] = {}
        for key, (value, rev) in entries.items():
            self._revs[key] = rev
            kind, _, rest = key.partition(".")
            if kind == "c":
                channels[_unhex(rest)] = _tuple.decode(value)
            elif kind == "w":
                cid, sid = (_unhex(t) for t in rest.split("."))
                watches[cid, sid] = _tuple.decode(value)
                self._sids.setdefault(cid, set()).add(sid)
            elif kind == "p":
                parts[key] = value
        delta = Delta(0, [], [], [], [], [])
        if commit is not None:
            value, self._commit_rev = commit
            c = _commits.decode(value)
            self._parts = [f"p.{c.gen}.{i}" for i in range(c.parts)]
            delta = _deltas.decode(b"".join(parts[k] for k in self._parts) if c.parts else c.delta)
        for row in delta.channels:
            channels[row[0]] = row
        for row in delta.watches:
            watches[row[0], row[1]] = row
        for cid, sid in delta.removed:
            watches.pop((cid, sid), None)
        for cid in delta.deleted:
            channels.pop(cid, None)  # (restore skips the watches of channels not there)
        self._cursor, self._held = delta.cursor, delta.held
        restore(registry, channels.values(), watches.values(), now)
        registry.deferred.update(self._held)
        self._first = {cid: row[8] for cid, row in channels.items()}
        # Rewritten, so that anyone who loaded before can no longer write; then what its last
        # writer may not have written to the keys.
        stale = [k for k in parts if k not in self._parts]
        await self._commit(delta)
        await self._apply(delta)
        await self._run([partial(self._kv.purge, k) for k in stale])
        self.failed.clear()
        return self._cursor

    async def _entries(self) -> dict[str, tuple[bytes, int]]:
        """Every key's value and revision. (Not through nats-py's watcher: it may say it has
        sent all values before it has.)"""
        stream, prefix = f"KV_{self.bucket}", f"$KV.{self.bucket}."
        entries: dict[str, tuple[bytes, int]] = {}
        if not (await self._js.stream_info(stream)).state.messages:
            return entries
        async with reader(
            self._js, stream, prefix + ">", deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT
        ) as batch:
            pending = True
            while pending:
                msgs = await batch(1000)
                if not msgs:
                    raise StoreError(f"JetStream did not send the keys of bucket {self.bucket}")
                for m in msgs:
                    pending = m.metadata.num_pending > 0
                    if not (m.headers and _KV_OP in m.headers):
                        entries[m.subject[len(prefix) :]] = (m.data, m.metadata.sequence.stream)
        return entries

    async def write(
        self,
        channels: list[Snapshot],
        cursor: int | None,
        backlog: list[BacklogRow] | None = None,
        deleted: list[str] | None = None,
        held: list[tuple[str, str]] | None = None,
    ) -> None:
        """As :meth:`.store.ChannelStore.save`. Raises :class:`StoreError` (:class:`Fenced`
        when another relay holds the channels now), and after that until :meth:`load`."""
        if self.failed.is_set():
            raise StoreError("the dCache channel store failed and is being loaded again")
        try:
            await self._publish(backlog or [])
            delta = Delta(
                self._cursor if cursor is None else cursor,
                self._held if held is None else held,
                [snap.row for snap in channels],
                [w for snap in channels for w in snap.watches],
                [r for snap in channels for r in snap.removed],
                deleted or [],
            )
            await self._commit(delta)
            self._cursor, self._held = delta.cursor, delta.held
            await self._apply(delta)
            await self._trim(channels, deleted or [])
        except (NATSError, TimeoutError) as e:
            self.failed.set()
            raise StoreError(
                f"JetStream did not store the dCache channels ({str(e) or type(e).__name__})"
            ) from None
        except BaseException:
            self.failed.set()
            raise

    async def _publish(self, backlog: list[BacklogRow]) -> None:
        futures: list[asyncio.Future[Any]] = []

        async def put() -> None:
            for cid, i, data, o in backlog:
                futures.append(
                    await self._js.publish_async(
                        self._subject(cid),
                        _encode(Row(i, data, o.site, o.path, o.overflow, o.old_path)),
                        stream=self.events,
                        headers={"Nats-Msg-Id": f"{cid}:{i}"},
                    )
                )
            await asyncio.gather(*futures)

        try:  # all of it: nats-py holds publishing back while 4,000 acks are awaited
            await asyncio.wait_for(put(), ACK_TIMEOUT)
        finally:
            for future in futures:
                future.cancel()  # (done ones stay done)

    async def _commit(self, delta: Delta) -> None:
        data = _encode(delta)
        gen = secrets.token_hex(8)
        parts = []
        if len(data) > INLINE:
            chunks = [data[i : i + INLINE] for i in range(0, len(data), INLINE)]
            parts = [f"p.{gen}.{i}" for i in range(len(chunks))]
            await self._run(
                [partial(self._kv.put, k, c) for k, c in zip(parts, chunks, strict=True)]
            )
        value = _encode(Commit(gen, len(parts), b"" if parts else data))
        try:
            if self._commit_rev is None:
                self._commit_rev = await self._kv.create(COMMIT, value)
            else:
                self._commit_rev = await self._kv.update(COMMIT, value, last=self._commit_rev)
        except APIError as e:
            if _cas_failed(e):
                raise Fenced() from None
            raise
        old, self._parts = self._parts, parts
        await self._run([partial(self._kv.purge, k) for k in old])

    async def _apply(self, delta: Delta) -> None:
        writes: list[Callable[[], Awaitable[Any]]] = []
        for row in delta.channels:
            writes.append(partial(self._put, _channel_key(row[0]), _encode(row)))
        for row in delta.watches:
            self._sids.setdefault(row[0], set()).add(row[1])
            writes.append(partial(self._put, _watch_key(row[0], row[1]), _encode(row)))
        for cid, sid in delta.removed:
            self._sids.get(cid, set()).discard(sid)
            writes.append(partial(self._drop, _watch_key(cid, sid)))
        for cid in delta.deleted:
            writes.append(partial(self._drop, _channel_key(cid)))
            writes.extend(
                partial(self._drop, _watch_key(cid, sid)) for sid in self._sids.pop(cid, ())
            )
        await self._run(writes)

    async def _run(self, writes: list[Callable[[], Awaitable[Any]]]) -> None:
        for i in range(0, len(writes), WRITES):
            await asyncio.gather(*(w() for w in writes[i : i + WRITES]))

    async def _put(self, key: str, value: bytes) -> None:
        rev = self._revs.get(key)
        try:
            if rev is None:  # (also over a deleted key)
                self._revs[key] = await self._kv.create(key, value)
            else:
                self._revs[key] = await self._kv.update(key, value, last=rev)
        except APIError as e:
            if _cas_failed(e):
                raise Fenced() from None
            raise

    async def _drop(self, key: str) -> None:
        rev = self._revs.pop(key, None)
        if rev is None:
            return  # never written
        try:
            await self._kv.delete(key, last=rev)
        except APIError as e:
            if _cas_failed(e):
                raise Fenced() from None
            raise

    async def _trim(self, channels: list[Snapshot], deleted: list[str]) -> None:
        for snap in channels:
            if snap.first_id > self._first.get(snap.id, 0):
                next_id = snap.row[7]
                await self._js.purge_stream(
                    self.events, subject=self._subject(snap.id), keep=next_id - snap.first_id
                )
                self._first[snap.id] = snap.first_id
        for cid in deleted:
            await self._js.purge_stream(self.events, subject=self._subject(cid))
            self._first.pop(cid, None)

    async def notice(self, notice: Notice) -> int:
        """Publish ``notice``; returns its sequence in the stream."""
        try:
            ack = await self._js.publish(self._notices, _encode(notice), stream=self.events)
        except NATSError as e:
            raise StoreError(
                f"JetStream did not store a notice for channel {notice.cid}: {e}"
            ) from None
        return ack.seq

    async def trim_notices(self) -> None:
        await self._js.purge_stream(self.events, subject=self._notices, keep=NOTICES_KEPT)

    # -- reading, on any replica -----------------------------------------------------------

    async def fetch(self, cid: str, after: int, limit: int) -> list[Stored]:
        """Backlog rows after ``after``, from the channel's subject."""
        subject = self._subject(cid)
        rows: list[Stored] = []
        try:
            newest = await self._js.get_last_msg(self.events, subject)
            if _rows.decode(newest.data or b"").id <= after:
                return rows
            start = await self._seek(subject, after, newest.seq or 0)
            async with reader(
                self._js,
                self.events,
                subject,
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=start,
            ) as batch:
                seq, last = start - 1, after
                while len(rows) < limit and seq < (newest.seq or 0):
                    msgs = await batch(limit - len(rows))
                    if not msgs:
                        break  # trimmed meanwhile
                    for m in msgs:
                        seq = m.metadata.sequence.stream
                        row = _rows.decode(m.data)
                        if row.id > last:  # (a copy stored past the duplicate window: once)
                            rows.append((row.id, row.data, row.origin()))
                            last = row.id
        except NotFoundError:
            pass  # nothing stored for it (yet, or any more)
        except NATSError as e:
            raise StoreError(
                f"cannot read the backlog of channel {cid} from JetStream: {e}"
            ) from None
        return rows[:limit]

    async def _seek(self, subject: str, after: int, hi: int) -> int:
        """The stream sequence of the subject's first message with an id above ``after``
        (message ``hi`` has one): ids grow with sequence, so a binary search finds it."""
        lo = 1
        while lo < hi:
            mid = (lo + hi) // 2
            m = await self._js.get_msg(self.events, seq=mid, subject=subject, next=True)
            if _rows.decode(m.data or b"").id > after:
                hi = mid
            else:
                lo = (m.seq or mid) + 1
        return lo

    def close(self) -> None:
        """(The connection is the log's, and closes with it.)"""
