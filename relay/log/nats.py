"""The event log on a NATS JetStream stream (``--store nats://…``): for scale-out.

Relays on the same stream are replicas: an event stored through any of them gets the stream's
sequence number as its global id, and every relay hears every event from its own ordered
subscription to the stream, in stream order, so all of them serve the same feed and the same
catch-up. JetStream replicates the stream over its cluster and applies retention itself.

What a relay acknowledges lives beside the stream, in a JetStream key-value bucket shared by all
replicas: per stream, the last seq stored *with everything before it* and who owns the stream;
per federation peer, how far its feed was taken in. A key is written only once the whole batch
is stored, so when JetStream fails part-way through a batch, the sender, wherever it reconnects,
is told to resend from before that batch; each event is published with
``Nats-Msg-Id: <stream>:<seq>``, so JetStream drops the copies it already holds (within its
duplicate window, ``duplicate_window``), and a second route of one event is stored once.

Everything runs on the relay's event loop (nats-py is asyncio): no thread, no lock around state.
This module is imported only when the store is NATS (``nats-py`` is needed then alone).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Any

import msgspec
import nats
from nats.errors import Error as NATSError
from nats.js import api
from nats.js.errors import (
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NotFoundError,
)

from storage_events.relay.log.admission import Owner, Reporter, admit
from storage_events.relay.log.base import (
    KEEP_ALL,
    LogState,
    Record,
    Retention,
    StoreError,
    make_record,
)
from storage_events.relay.log.jetstream import bucket, led, reader, ready, subscribe_after
from storage_events.wire import Event, event_from_json, event_json, flags_mask

log = logging.getLogger("storage_events.relay")

ACK_TIMEOUT = 10.0  # seconds JetStream may take to acknowledge a batch
MAX_REPLICAS = 3  # the default replication: the cluster's size, up to this
# Every event is stored with id 0 and, where it first enters a relay here, no origin_id: both
# are the sequence JetStream gives it, filled in as it is read.
_ID0 = b'{"id":0,'
_NO_ORIGIN = b',"origin_id":null,'


def subjects(log_stream: str) -> str:
    """The subjects of one JetStream stream (several logs may share a cluster)."""
    return f"storage-events.{log_stream}.*"


def subject(log_stream: str, stream: str) -> str:
    return f"storage-events.{log_stream}.{stream.encode().hex()}"  # any name, as one token


def _key(key: str) -> str:
    return key.encode().hex()  # stream names and checkpoint keys hold ':' and '@'


class Mark(msgspec.Struct, omit_defaults=True):
    """A key's value in the state bucket."""

    seq: int  # the last seq stored with all before it (a checkpoint: its value)
    site: str | None = None  # the stream's owner (None for checkpoints)
    node: str | None = None
    direct: bool | None = None


_marks = msgspec.msgpack.Decoder(Mark)


class NATSLog(LogState):
    def __init__(
        self,
        servers: list[str],
        *,
        name: str,
        stream: str = "STORAGE_EVENTS",
        replicas: int | None = None,
        retention: Retention = KEEP_ALL,
        duplicate_window: float = 600.0,
    ) -> None:
        self.name = name
        self.servers = servers
        self.stream = stream
        self.replicas = replicas  # None: the cluster's size, up to MAX_REPLICAS
        self.retention = retention
        self.duplicate_window = duplicate_window
        self.stored = 0
        self.commits = 0
        self._listeners = []
        self._head = self._first = self._bytes = self._epoch = 0
        self._positions: dict[str, int] = {}  # what is known stored (state bucket, own writes)
        self._revisions: dict[str, int] = {}  # of each key in the bucket, for updates
        self._owners: dict[str, Owner] = {}
        self._report = Reporter()
        # One batch at a time: admission reads positions that the append then advances. (A lock
        # per stream, storing several agents' batches at once, measured 2.4x slower with four
        # agents: JetStream did five times the work per event; bench/store_bench.py.)
        self._lock = asyncio.Lock()
        self._pending: list[Record] = []
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- opening ---------------------------------------------------------------------------

    async def start(self) -> None:

        async def error(e: Exception) -> None:
            log.warning("NATS: %s", e)

        async def disconnected() -> None:
            log.warning("NATS: disconnected, reconnecting")

        async def reconnected() -> None:
            log.info("NATS: reconnected to %s", self._nc.connected_url.netloc)

        options: dict[str, Any] = {
            "servers": self.servers,
            "connect_timeout": 5,
            "name": f"storage-events-relay {self.name}",
            "error_cb": error,
        }
        where = ", ".join(self.servers)
        try:  # once without retrying, so that a wrong address is an error at start
            probe = await asyncio.wait_for(
                nats.connect(allow_reconnect=False, max_reconnect_attempts=0, **options), 10
            )
            await probe.close()
        except Exception as e:
            raise StoreError(
                f"cannot connect to NATS at {where}: "
                f"{str(e) or 'no server answered within 10 s'}; check the "
                "addresses and that nats-server runs with JetStream"
            ) from None
        self._nc = await nats.connect(
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            disconnected_cb=disconnected,
            reconnected_cb=reconnected,
            **options,
        )
        self._js = self._nc.jetstream()
        info = await self._open_stream()
        self._state(info.state)
        self._trimmed_to = self._first  # where the last trim() found the log to start
        self._epoch = int.from_bytes(
            hashlib.blake2b(str(info.created).encode(), digest_size=6).digest(), "big"
        )
        self._kv = await ready(self._open_bucket, f"state bucket {self.stream}_STATE")
        await led(self._js, f"KV_{self.stream}_STATE")
        self._delivered = self._head  # the last sequence handed to listeners
        # Every relay hears every event, in stream order, from the next one on. (Asked again
        # like every step above: a cluster just started may time out making the consumer.)
        self._sub = await ready(
            lambda: subscribe_after(
                self._js, subjects(self.stream), self.stream, self._head, self._received
            ),
            f"a consumer of stream {self.stream}",
        )
        self._spawn(self._refresh())

    @property
    def client(self) -> nats.aio.client.Client:
        """The connection (after :meth:`start`), for other state kept on the same cluster."""
        return self._nc

    def cluster_size(self) -> int:
        """Servers in the cluster, as the one we reached announces them (or as configured)."""
        announced = self._nc._server_info.get("connect_urls") or []
        return max(len(set(announced)), len(set(self.servers)), 1)

    async def _open_stream(self) -> Any:

        size = self.cluster_size()
        config = self._config(self.replicas or min(size, MAX_REPLICAS))
        replicas = config.num_replicas

        async def open() -> Any:
            try:
                await self._js.stream_info(self.stream)
                return await self._js.update_stream(config)
            except NotFoundError:
                return await self._js.add_stream(config)

        await ready(open, f"JetStream stream {self.stream!r} ({replicas} replicas)")
        info = await led(self._js, self.stream)
        cluster = info.cluster
        peers = [cluster.leader, *(p.name for p in cluster.replicas or [])] if cluster else []
        log.info(
            "event log: JetStream stream %s, %d replica%s (%s) on a cluster of %d server%s%s",
            self.stream,
            info.config.num_replicas,
            "" if info.config.num_replicas == 1 else "s",
            ", ".join(p for p in peers if p) or "no cluster",
            size,
            "" if size == 1 else "s",
            "" if self.replicas else " (nats_replicas not set: the cluster's size, up to 3)",
        )
        if info.config.num_replicas == 1 and size > 1:
            log.warning(
                "JetStream stream %s has one replica: losing its server stops ingest",
                self.stream,
            )
        return info

    def _config(self, replicas: int) -> Any:

        r = self._applied = self.retention
        return api.StreamConfig(
            name=self.stream,
            subjects=[subjects(self.stream)],
            storage=api.StorageType.FILE,
            num_replicas=replicas,
            max_age=r.max_age or None,
            max_msgs=r.max_events or None,
            max_bytes=r.max_bytes or None,
            # (JetStream wants the window within the age limit.)
            duplicate_window=min(self.duplicate_window, r.max_age or self.duplicate_window),
            discard=api.DiscardPolicy.OLD,
        )

    async def _open_bucket(self) -> Any:
        return await bucket(self._js, f"{self.stream}_STATE", self.default_replicas())

    def default_replicas(self) -> int:
        """Copies JetStream keeps of what the relays store: as configured, else the cluster's
        size up to 3."""
        return self.replicas or min(self.cluster_size(), MAX_REPLICAS)

    def _spawn(self, job: Any) -> None:
        task = asyncio.get_running_loop().create_task(job)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _state(self, state: Any) -> None:
        self._head = max(self._head, state.last_seq)
        self._first = state.first_seq if state.messages else self._head + 1
        self._bytes = state.bytes

    def _saw(self, seq: int) -> None:
        """Message ``seq`` is in the stream (heard, or acknowledged to this relay)."""
        if self._first > self._head:  # it was empty
            self._first = seq
        self._head = max(self._head, seq)

    async def _refresh(self) -> None:
        """first and size move with JetStream's retention, which happens over there."""
        while True:
            await asyncio.sleep(1.0)
            try:
                self._state((await self._js.stream_info(self.stream)).state)
            except Exception as e:  # the cluster may be electing a leader: keep going
                log.warning("NATS stream %s: no state (%s)", self.stream, e)

    # -- from the stream to the listeners --------------------------------------------------

    def _record(self, seq: int, data: bytes) -> Record:
        if not data.startswith(_ID0):
            raise ValueError(f"message {seq} of stream {self.stream} is not a stored event")
        data = b'{"id":%d,' % seq + data[len(_ID0) :]
        # (A JSON string cannot hold this byte sequence: its quotes would be escaped.)
        data = data.replace(_NO_ORIGIN, b',"origin_id":%d,' % seq, 1)
        ev = event_from_json(data)
        return make_record(seq, ev.site, ev.node, ev.path, flags_mask(ev.flags), data, ev)

    async def _received(self, msg: Any) -> None:
        seq = msg.metadata.sequence.stream
        if seq <= self._delivered:
            return  # a consumer re-created after a reconnect may start earlier
        self._delivered = seq
        try:
            self._pending.append(self._record(seq, msg.data))
        except (ValueError, msgspec.DecodeError, msgspec.ValidationError) as e:
            log.error("skipping message %d of NATS stream %s: %s", seq, self.stream, e)
        self._saw(seq)
        if len(self._pending) == 1:  # hand them over together, once this burst is read
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        records, self._pending = self._pending, []
        if records:
            self._publish(records)

    # -- the EventLog interface ------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self._epoch

    async def position(self, key: str) -> int:
        """Read from the state bucket each time: another replica may have stored more."""
        await self._learn([key])
        return self._positions.get(key, 0)

    async def _learn(self, keys: list[str]) -> None:

        async def one(key: str) -> None:
            try:
                entry = await self._kv.get(_key(key))
            except KeyNotFoundError:
                return
            except NATSError as e:
                raise StoreError(f"cannot read the position of {key} from JetStream: {e}") from e
            mark = _marks.decode(entry.value or b"")
            self._revisions[key] = entry.revision or 0
            self._positions[key] = max(self._positions.get(key, 0), mark.seq)
            if mark.site is not None:
                self._owners[key] = Owner(mark.site, mark.node, mark.direct)

        await asyncio.gather(*(one(k) for k in keys))

    async def append(
        self, events: list[Event], checkpoint: tuple[str, int] | None = None
    ) -> list[Record]:

        async with self._lock:
            streams = {ev.stream for ev in events} - self._positions.keys()
            await self._learn(sorted(streams))
            relayed = checkpoint is not None
            taken = admit(events, self._positions, self._owners, relayed=relayed)
            if taken.jumps:
                # Another replica may have stored what this one thinks is missing (the sender
                # published through it meanwhile): ask the bucket before announcing a loss.
                await self._learn(sorted({stream for stream, _, _ in taken.jumps}))
                taken = admit(events, self._positions, self._owners, relayed=relayed)
            self._report(taken)
            try:
                acks = await asyncio.wait_for(self._put(taken.events), ACK_TIMEOUT)
            except (TimeoutError, NATSError) as e:
                raise StoreError(
                    f"JetStream did not store a batch of {len(taken.events)} events "
                    f"({str(e) or type(e).__name__}); the sender resends it"
                ) from None
            marks = {
                s: Mark(seq, *self._owner_fields(taken.owners.get(s) or self._owners.get(s)))
                for s, seq in taken.positions.items()
            }
            for s, owner in taken.owners.items():
                marks.setdefault(s, Mark(self._positions.get(s, 0), *self._owner_fields(owner)))
            if checkpoint is not None:
                marks[checkpoint[0]] = Mark(checkpoint[1])
            await self._write_marks(marks)
            self._owners.update(taken.owners)
            records = []
            for ev, ack in zip(taken.events, acks, strict=True):
                self._saw(ack.seq)
                if ack.duplicate:
                    continue  # stored already (a resend, or another route through a replica)
                records.append(self._stored(ev, ack.seq))
            self.stored += len(records)
            self.commits += 1
            self._bytes += sum(len(r.data) for r in records)  # (until the next state read)
            records.sort(key=lambda r: r.id)
            return records

    async def _put(self, events: list[Event]) -> list[Any]:
        """Each event's PubAck; published ahead of the acks (nats-py holds back when 4,000
        wait), all given up together when the caller's timeout ends this."""
        futures: list[asyncio.Future[Any]] = []
        try:
            for ev in events:
                ev = msgspec.structs.replace(ev, id=0, via=[*ev.via, self.name])
                futures.append(
                    await self._js.publish_async(
                        subject(self.stream, ev.stream),
                        event_json(ev),
                        stream=self.stream,
                        headers={"Nats-Msg-Id": f"{ev.stream}:{ev.seq}"},
                    )
                )
            return await asyncio.gather(*futures)
        finally:
            for future in futures:
                future.cancel()  # (done ones stay done; the rest free their slot)

    def _stored(self, ev: Event, seq: int) -> Record:
        ev = msgspec.structs.replace(
            ev, id=seq, via=[*ev.via, self.name], origin_id=ev.origin_id if ev.via else seq
        )
        return make_record(seq, ev.site, ev.node, ev.path, flags_mask(ev.flags), event_json(ev), ev)

    @staticmethod
    def _owner_fields(owner: Owner | None) -> tuple[str | None, str | None, bool | None]:
        return (owner.site, owner.node, owner.direct) if owner else (None, None, None)

    async def _write_marks(self, marks: dict[str, Mark]) -> None:
        """Advance each key to at least its mark (another replica may have written more)."""

        async def one(key: str, mark: Mark) -> None:
            for _ in range(10):
                rev = self._revisions.get(key)
                value = msgspec.msgpack.encode(mark)
                try:
                    if rev is None:
                        self._revisions[key] = await self._kv.create(_key(key), value)
                    else:
                        self._revisions[key] = await self._kv.update(_key(key), value, last=rev)
                except KeyWrongLastSequenceError:
                    # Written meanwhile by another replica: take what it says, keep the higher.
                    self._revisions.pop(key, None)
                    await self._learn([key])
                    mark = msgspec.structs.replace(
                        mark, seq=max(mark.seq, self._positions.get(key, 0))
                    )
                    continue
                except NATSError as e:
                    raise StoreError(
                        f"JetStream stored the events but not the position of {key} ({e}); "
                        "the sender resends them and the copies are dropped"
                    ) from None
                self._positions[key] = max(self._positions.get(key, 0), mark.seq)
                return
            raise StoreError(f"the position of {key} keeps changing under this relay")

        await asyncio.gather(*(one(k, m) for k, m in marks.items()))

    def held(self, key: str) -> int:
        return self._positions.get(key, 0)

    async def trim(self) -> int:
        """JetStream applies the stream's limits itself; this hands it changed limits and
        reads what it dropped."""
        try:
            if self.retention != self._applied:
                info = await self._js.stream_info(self.stream)
                await self._js.update_stream(self._config(info.config.num_replicas))
            self._state((await self._js.stream_info(self.stream)).state)
        except Exception as e:
            raise StoreError(f"retention: cannot read the NATS stream {self.stream}: {e}") from e
        gone, self._trimmed_to = max(0, self._first - self._trimmed_to), self._first
        return gone

    async def read(self, after: int, limit: int) -> list[Record]:
        head = self._head
        if after >= head:
            return []
        records: list[Record] = []
        last = after
        async with reader(
            self._js,
            self.stream,
            subjects(self.stream),
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=after + 1,
        ) as batch:
            # Up to what this relay knew was stored when asked; retention may have removed
            # some meanwhile, which an empty batch then says.
            while len(records) < limit and last < head:
                msgs = await batch(min(limit - len(records), head - last))
                if not msgs:
                    break
                for m in msgs:
                    last = m.metadata.sequence.stream
                    try:
                        records.append(self._record(last, m.data))
                    except (ValueError, msgspec.DecodeError, msgspec.ValidationError) as e:
                        log.error("skipping message %d of NATS stream %s: %s", last, self.stream, e)
        return records

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if hasattr(self, "_nc"):
            try:
                await asyncio.wait_for(self._nc.drain(), 10)
            except Exception as e:
                log.warning("closing the NATS connection: %s", e)
