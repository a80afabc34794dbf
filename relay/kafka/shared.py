"""The Kafka sink on a NATS store: the relays sharing the stream must not each publish it, so one
at a time does, the holder of a lease (:class:`~..dcache.lease.LeaseKeeper`), and the
checkpoint is a key beside the log that every one of them reads when it takes over.

A checkpoint only ever names ids that were delivered, whoever wrote it last, so a holder that
was paused past its lease and writes once more can make its successor's next start send some
events again, never skip one.
"""

from __future__ import annotations

import secrets
from typing import Any

from nats.errors import Error as NATSError
from nats.js.errors import KeyNotFoundError

from storage_events.relay.dcache.lease import TTL, LeaseKeeper
from storage_events.relay.kafka.checkpoint import CheckpointError, parse, render
from storage_events.relay.log.jetstream import bucket, led, ready, writable
from storage_events.relay.log.nats import NATSLog


class KVCheckpoint:
    def __init__(self, kv: Any, bucket: str, topic: str) -> None:
        self.kv = kv
        self.key = f"checkpoint.{topic}"
        self.where = f"key {self.key} of bucket {bucket}"

    async def load(self, epoch: int) -> tuple[int, str | None]:
        try:
            entry = await self.kv.get(self.key)
        except KeyNotFoundError:
            return 0, None
        except NATSError as e:
            raise CheckpointError(f"cannot read the Kafka checkpoint ({self.where}): {e}") from None
        return parse(entry.value or b"", self.where, epoch)

    async def save(self, epoch: int, id: int) -> None:
        try:
            await self.kv.put(self.key, render(epoch, id))
        except NATSError as e:
            raise CheckpointError(
                f"cannot write the Kafka checkpoint ({self.where}): {e}"
            ) from None


async def open_shared(log: NATSLog, topic: str, me: str) -> tuple[KVCheckpoint, LeaseKeeper]:
    """The checkpoint and the lease of the sink publishing ``log`` to ``topic``, for replica
    ``me``; buckets made on first use. Raises ``StoreError`` when JetStream does not answer."""
    js = log.client.jetstream()
    replicas = log.default_replicas()
    state, lease = f"{log.stream}_KAFKA", f"{log.stream}_KAFKA_LEASE"
    kv = await ready(lambda: bucket(js, state, replicas), f"key-value bucket {state}")
    held = await ready(lambda: bucket(js, lease, replicas, TTL), f"key-value bucket {lease}")
    for name, kv_ in ((state, kv), (lease, held)):
        await led(js, f"KV_{name}")
        await writable(kv_, f"key-value bucket {name}")
    # One lease per topic: two topics are two sinks.
    # (A replica restarted is another holder.)
    who = f"{me}/{secrets.token_hex(4)}"
    keeper = LeaseKeeper(held, who, f"Kafka sink ({topic})", key=f"holder.{topic}")
    return KVCheckpoint(kv, state, topic), keeper
