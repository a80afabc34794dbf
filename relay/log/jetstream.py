"""What every part of the relay kept on JetStream needs the same way (the event log, the dCache
channels' state, the Kafka sink's lease and checkpoint): waiting for a starting cluster, buckets
made on first use, an ordered subscription from a known point, and a read through a consumer
made for it. Imported only when the store is NATS."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from nats.errors import Error as NATSError
from nats.errors import TimeoutError as NATSTimeout
from nats.js import JetStreamContext, api
from nats.js.errors import (
    BucketNotFoundError,
    KeyWrongLastSequenceError,
    ServiceUnavailableError,
)

from storage_events.relay.log.base import StoreError

log = logging.getLogger("storage_events.relay")


async def ready(attempt: Callable[[], Awaitable[Any]], what: str) -> Any:
    """A cluster that is starting with us may not have a JetStream leader yet: keep asking for
    a while before calling it an error."""
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        try:
            return await attempt()
        except NATSError as e:
            if asyncio.get_running_loop().time() > deadline:
                raise StoreError(
                    f"cannot use {what}: {e} (is JetStream enabled, with enough servers for "
                    "the replicas?)"
                ) from None
            log.warning("JetStream not ready for %s (%s); asking again", what, e)
            await asyncio.sleep(1)


async def bucket(js: JetStreamContext, name: str, replicas: int, ttl: float | None = None) -> Any:
    """Key-value bucket ``name``, made if it is not there (one value per key, on disk; values
    live ``ttl`` seconds if given)."""
    try:
        return await js.key_value(name)
    except BucketNotFoundError:
        return await js.create_key_value(
            api.KeyValueConfig(
                bucket=name, history=1, ttl=ttl, replicas=replicas, storage=api.StorageType.FILE
            )
        )


PROBE = "probe.writable"  # a key never written: probed with a write bound to fail


async def writable(kv: Any, what: str) -> None:
    """Wait until key-value bucket ``kv`` takes writes. A bucket just made may have a leader and
    still answer a write with "no responders" for a moment, until its subjects' interest has
    reached the server we are connected to. The probe is an update that must fail (it expects
    a revision the key never had): the bucket's refusal says it listens, and nothing is
    written."""

    async def probe() -> None:
        try:
            await kv.update(PROBE, b"", last=2**62)
        except KeyWrongLastSequenceError:
            return

    await ready(probe, what)


async def led(js: JetStreamContext, stream: str) -> Any:
    """``stream``'s info once it has a leader: a replicated stream just made (or one whose
    servers are starting) refuses writes until its servers have elected one."""

    async def leader() -> Any:
        info = await js.stream_info(stream)
        if info.cluster is not None and not info.cluster.leader:
            raise NATSError(f"stream {stream} has no leader yet")
        return info

    return await ready(leader, f"JetStream stream {stream!r}")


async def subscribe_after(
    js: JetStreamContext,
    subject: str,
    stream: str,
    after: int,
    cb: Callable[[Any], Awaitable[None]],
) -> Any:
    """Every message of ``stream`` on ``subject`` after sequence ``after``, in order, to ``cb``,
    across reconnects (``cb`` must drop a sequence it has had: a re-created consumer may
    repeat some)."""
    sub = await js.subscribe(
        subject,
        stream=stream,
        cb=cb,
        ordered_consumer=True,
        config=api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=after + 1
        ),
        idle_heartbeat=5.0,
    )
    # nats-py re-creates an ordered consumer after a reconnect from the last sequence it
    # delivered, which is 0 until the first message: tell it where we started instead, or an
    # idle relay would be sent the whole stream again.
    jsi = getattr(sub, "_jsi", None)
    if jsi is not None and hasattr(jsi, "_sseq"):
        jsi._sseq = after
    return sub


@contextlib.asynccontextmanager
async def reader(
    js: JetStreamContext, stream: str, subject: str, **config: Any
) -> AsyncIterator[Callable[[int], Awaitable[list[Any]]]]:
    """``batch(n)``: up to ``n`` messages from a consumer made for this read, [] when none came
    within 5 s. The consumer goes with the read."""
    try:
        sub = await js.pull_subscribe(
            subject,
            stream=stream,
            config=api.ConsumerConfig(
                ack_policy=api.AckPolicy.NONE, inactive_threshold=30.0, **config
            ),
        )
    except NATSError as e:
        raise StoreError(f"cannot read the NATS stream {stream}: {e}") from None

    async def batch(n: int) -> list[Any]:
        for attempt in range(20):
            try:
                return await sub.fetch(n, timeout=5.0)
            except NATSTimeout:
                return []
            except ServiceUnavailableError:  # a new consumer may not be reachable yet
                if attempt == 19:
                    raise
                await asyncio.sleep(0.05)
        return []

    try:
        yield batch
    finally:
        with contextlib.suppress(Exception):
            name = (await sub.consumer_info()).name
            await sub.unsubscribe()
            await js.delete_consumer(stream, name)
