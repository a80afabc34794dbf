"""The event log on a NATS JetStream stream (``--store nats://…``): for scale-out.

Relays on the same stream are stateless replicas: an event stored through any of them gets the
stream's sequence number as its global id, and every relay hears every event from its own
subscription to the stream, in stream order, so all of them serve the same feed and the same
catch-up. JetStream replicates the stream over its cluster (``nats_replicas``) and applies
retention itself.

Exactly once: each event is published with ``Nats-Msg-Id: <stream>:<seq>``, so JetStream drops
a copy published again within its duplicate window (an agent resending after a lost ack, or
reconnecting through another relay); positions of streams are read back from the stream.

The nats-py client is asyncio; this class keeps it on a loop of its own, in a thread, so the
log offers the same blocking interface as :class:`~.sqlite_log.SQLiteLog`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import msgspec

from storage_events.relay.log.admission import Owner, admit
from storage_events.relay.log.base import LogCounters, Record, StoreError, make_record
from storage_events.wire import Event, event_from_json, event_json, flags_mask

log = logging.getLogger("storage_events.relay")

SUBJECTS = "storage-events.stream"
ACK_TIMEOUT = 10.0  # seconds JetStream may take to acknowledge a batch
_ID0 = b'{"id":0,'  # every event is stored with id 0: its id is the sequence JetStream gives it


def subject(stream: str) -> str:
    return f"{SUBJECTS}.{stream.encode().hex()}"  # any stream name, as one subject token


class NATSLog(LogCounters):
    position_io = True  # a stream's position is read back from JetStream on its first hello

    def __init__(
        self,
        servers: list[str],
        *,
        name: str,
        stream: str = "STORAGE_EVENTS",
        replicas: int = 1,
        max_age: float = 0,
        max_events: int = 0,
        max_bytes: int = 0,
        duplicate_window: float = 600.0,
    ) -> None:
        self.name = name
        self.stream = stream
        self.listener: Callable[[list[Record]], None] | None = None  # called on the NATS thread
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="nats", daemon=True)
        self._thread.start()
        self._head = self._first = 0
        self._bytes = 0
        self._epoch = 0
        self.stored = 0
        self._positions: dict[str, int] = {}  # per stream: the last seq stored, as acknowledged
        self._suspect: dict[str, int] = {}  # per stream: resend after this (a batch failed)
        self._owners: dict[str, Owner] = {}  # only agents publish to a NATS log
        self._limits = (replicas, max_age, max_events, max_bytes, duplicate_window)
        try:
            self._call(self._start(servers), timeout=60)
        except Exception:
            self.close()
            raise

    def _call(self, coro: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _start(self, servers: list[str]) -> None:
        import nats
        from nats.errors import Error as NATSError
        from nats.js import api
        from nats.js.errors import NotFoundError

        async def error(e: Exception) -> None:
            log.warning("NATS: %s", e)

        async def disconnected() -> None:
            log.warning("NATS: disconnected, reconnecting")

        async def reconnected() -> None:
            log.info("NATS: reconnected to %s", self._nc.connected_url.netloc)

        options: dict[str, Any] = {
            "servers": servers,
            "connect_timeout": 5,
            "name": f"storage-events-relay {self.name}",
            "error_cb": error,
        }
        try:  # once without retrying, so that a wrong address is an error at start
            probe = await asyncio.wait_for(
                nats.connect(allow_reconnect=False, max_reconnect_attempts=0, **options), 10
            )
            await probe.close()
        except Exception as e:
            raise StoreError(
                f"cannot connect to NATS at {', '.join(servers)}: "
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
        replicas, max_age, max_events, max_bytes, window = self._limits
        config = api.StreamConfig(
            name=self.stream,
            subjects=[f"{SUBJECTS}.*"],
            storage=api.StorageType.FILE,
            num_replicas=replicas,
            max_age=max_age or None,
            max_msgs=max_events or None,
            max_bytes=max_bytes or None,
            duplicate_window=window,
            discard=api.DiscardPolicy.OLD,
        )
        # A cluster that is starting with us may not have a JetStream leader yet: keep asking
        # for a while before calling it an error.
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            try:
                try:
                    await self._js.stream_info(self.stream)
                    info = await self._js.update_stream(config)
                except NotFoundError:
                    info = await self._js.add_stream(config)
                break
            except NATSError as e:
                if asyncio.get_running_loop().time() > deadline:
                    raise StoreError(
                        f"cannot use JetStream stream {self.stream!r}: {e} (is "
                        "JetStream enabled, with enough servers for "
                        f"{replicas} replicas?)"
                    ) from None
                log.warning("JetStream not ready (%s); asking again", e)
                await asyncio.sleep(1)
        self._state(info.state)
        self._epoch = int.from_bytes(
            hashlib.blake2b(str(info.created).encode(), digest_size=6).digest(), "big"
        )
        self._pending: list[Record] = []
        self._delivered = self._head  # the last sequence handed to the listener
        # Every relay hears every event, in stream order, from the next one on.
        self._sub = await self._js.subscribe(
            f"{SUBJECTS}.*",
            stream=self.stream,
            cb=self._received,
            ordered_consumer=True,
            config=api.ConsumerConfig(
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=self._head + 1
            ),
            idle_heartbeat=5.0,
        )
        # nats-py re-creates an ordered consumer after a reconnect from the last sequence it
        # delivered, which is 0 until the first message: tell it where we started instead,
        # or an idle relay would be sent the whole stream again.
        jsi = getattr(self._sub, "_jsi", None)
        if jsi is not None and hasattr(jsi, "_sseq"):
            jsi._sseq = self._head
        self._refresher = asyncio.get_running_loop().create_task(self._refresh())

    def _state(self, state: Any) -> None:
        self._head = max(self._head, state.last_seq)
        self._first = state.first_seq if state.messages else self._head + 1
        self._bytes = state.bytes

    async def _refresh(self) -> None:
        """first and size move with JetStream's retention, which happens over there."""
        while True:
            await asyncio.sleep(1.0)
            try:
                self._state((await self._js.stream_info(self.stream)).state)
            except Exception as e:  # the cluster may be electing a leader: keep going
                log.warning("NATS stream %s: no state (%s)", self.stream, e)

    def _record(self, seq: int, data: bytes) -> Record:
        if not data.startswith(_ID0):
            raise ValueError(f"message {seq} of stream {self.stream} is not a stored event")
        data = b'{"id":%d,' % seq + data[len(_ID0) :]
        ev = event_from_json(data)
        self._owners.setdefault(ev.stream, Owner(ev.site, ev.node, True))
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
        self._head = max(self._head, seq)
        if len(self._pending) == 1:  # hand them over together, once this burst is read
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        records, self._pending = self._pending, []
        if records and self.listener is not None:
            self.listener(records)

    # -- the EventLog interface ------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self._epoch

    def position(self, stream: str) -> int:
        """The last seq of ``stream`` this relay knows to be stored: what it acknowledged, or
        on a first hello the stream's last message (read off the event loop)."""
        if stream.startswith("@"):
            raise StoreError("federation checkpoints are not kept in the NATS store")
        return self._call(self._position(stream), timeout=15)

    async def _position(self, stream: str) -> int:
        from nats.errors import Error as NATSError
        from nats.js.errors import NotFoundError

        if stream not in self._positions:
            try:
                msg = await self._js.get_last_msg(self.stream, subject(stream))
                ev = event_from_json(msg.data)
                self._owners.setdefault(stream, Owner(ev.site, ev.node, True))
                seq = ev.seq
            except NotFoundError:
                seq = 0
            except NATSError as e:
                raise StoreError(f"cannot read stream {stream}'s position: {e}") from None
            self._positions[stream] = max(self._positions.get(stream, 0), seq)
        # After a batch that failed part-way, later events of it may be stored while an
        # earlier one is not: have the sender resend from the start of that batch.
        return min(self._positions[stream], self._suspect.get(stream, self._positions[stream]))

    def append(
        self, events: list[Event], checkpoint: tuple[str, int] | None = None
    ) -> list[Record]:
        """Publish; returns no records: they reach the hub through the subscription, on every
        relay of the stream alike."""
        if checkpoint is not None:
            raise StoreError("federation checkpoints are not kept in the NATS store")
        return self._call(self._append(events), timeout=ACK_TIMEOUT + 5)

    async def _append(self, events: list[Event]) -> list[Record]:
        taken = admit(events, self._positions, self._owners, relayed=False)
        for ev, why in taken.refused:
            log.error(
                "dropped an event of stream %s from %s/%s: %s", ev.stream, ev.site, ev.node, why
            )
        for stream, last, seq in taken.jumps:
            log.warning(
                "stream %s jumps from seq %d to %d: stored an overflow notice for "
                "events %d-%d, which never arrived",
                stream,
                last,
                seq,
                last + 1,
                seq - 1,
            )
        futures = []
        firsts: dict[str, int] = {}
        for ev in taken.events:
            firsts.setdefault(ev.stream, ev.seq)
            ev = msgspec.structs.replace(ev, id=0, via=[*ev.via, self.name])
            futures.append(
                await self._js.publish_async(
                    subject(ev.stream),
                    event_json(ev),
                    stream=self.stream,
                    headers={"Nats-Msg-Id": f"{ev.stream}:{ev.seq}"},
                )
            )
        try:
            acks = await asyncio.wait_for(asyncio.gather(*futures), ACK_TIMEOUT)
        except Exception as e:
            for future in futures:
                future.cancel()
            for stream, first in firsts.items():
                self._suspect[stream] = min(self._suspect.get(stream, first - 1), first - 1)
            raise StoreError(
                f"JetStream did not store a batch of {len(futures)} events "
                f"({str(e) or type(e).__name__})"
            ) from None
        self.stored += sum(not a.duplicate for a in acks)
        for stream, seq in taken.positions.items():
            self._positions[stream] = max(self._positions.get(stream, 0), seq)
            self._suspect.pop(stream, None)
        for stream, owner in taken.owners.items():
            self._owners.setdefault(stream, owner)
        if acks:
            self._head = max(self._head, max(a.seq for a in acks))
        return []

    def trim(self, *, max_age: float, max_events: int, max_bytes: int) -> int:
        return 0  # JetStream applies the stream's limits itself

    def read(self, after: int, limit: int) -> list[Record]:
        if after >= self._head:
            return []
        return self._call(self._read(after, limit, self._head))

    async def _read(self, after: int, limit: int, head: int) -> list[Record]:
        from nats.errors import Error as NATSError
        from nats.errors import TimeoutError as NATSTimeout
        from nats.js import api

        try:
            sub = await self._js.pull_subscribe(
                f"{SUBJECTS}.*",
                stream=self.stream,
                config=api.ConsumerConfig(
                    deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                    opt_start_seq=after + 1,
                    ack_policy=api.AckPolicy.NONE,
                    inactive_threshold=30.0,
                ),
            )
        except NATSError as e:
            raise StoreError(f"cannot read the NATS stream {self.stream}: {e}") from None
        records: list[Record] = []
        last = after
        try:
            # Up to what this relay knew was stored when asked; retention may have removed
            # some meanwhile, which a timeout then says.
            while len(records) < limit and last < head:
                try:
                    msgs = await sub.fetch(min(limit - len(records), head - last), timeout=2.0)
                except NATSTimeout:
                    break
                for m in msgs:
                    last = m.metadata.sequence.stream
                    try:
                        records.append(self._record(last, m.data))
                    except (ValueError, msgspec.DecodeError, msgspec.ValidationError) as e:
                        log.error("skipping message %d of NATS stream %s: %s", last, self.stream, e)
        finally:
            with contextlib.suppress(Exception):
                name = (await sub.consumer_info()).name
                await sub.unsubscribe()
                await self._js.delete_consumer(self.stream, name)
        return records

    def close(self) -> None:
        async def stop() -> None:
            if hasattr(self, "_refresher"):
                self._refresher.cancel()
            if hasattr(self, "_nc"):
                await self._nc.drain()

        if self._thread.is_alive():
            try:
                self._call(stop(), timeout=10)
            except Exception as e:
                log.warning("closing the NATS connection: %s", e)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
