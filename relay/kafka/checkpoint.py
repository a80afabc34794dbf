"""Where the sink keeps how far the log is on the topic: with the embedded log, a small file in
the relay's data directory, replaced atomically, so a crash leaves the old checkpoint or the new,
never half (with a NATS store, a key beside the log: :mod:`.shared`)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Protocol

from storage_events.relay.log.base import StoreError


class CheckpointError(StoreError):
    """The checkpoint cannot be read or written; the message says which file and what to do."""


class Checkpoints(Protocol):
    where: str  # for messages

    async def load(self, epoch: int) -> tuple[int, str | None]:
        """The id to resume after, and why it is 0 when a checkpoint was there but is not used
        (it belongs to another log); raises :class:`CheckpointError`."""

    async def save(self, epoch: int, id: int) -> None: ...


def parse(text: str | bytes, where: str, epoch: int) -> tuple[int, str | None]:
    """A checkpoint as kept: ``{"epoch": E, "id": N}``."""
    try:
        held = json.loads(text)
        if not (isinstance(held, dict) and isinstance(held.get("id"), int) and held["id"] >= 0):
            raise ValueError("no id")
    except ValueError:
        shown = text[:60] if isinstance(text, str) else text[:60].decode(errors="replace")
        raise CheckpointError(
            f"the Kafka checkpoint {where} is damaged ({shown!r}): write "
            '{"epoch": E, "id": N} into it to resume after id N, or delete it to publish the '
            "whole log again"
        ) from None
    if held.get("epoch") != epoch:
        return 0, (
            f"{where} belongs to another event log (epoch {held.get('epoch')}, this log's "
            f"is {epoch}): publishing this log from its start"
        )
    return held["id"], None


def render(epoch: int, id: int) -> bytes:
    return json.dumps({"epoch": epoch, "id": id}).encode()


class FileCheckpoint:
    """``kafka-<topic>.checkpoint`` under ``data``: ``{"epoch": E, "id": N}``, the log's epoch
    (a checkpoint of a log that was deleted and made anew means nothing for the new one)."""

    def __init__(self, data: Path, topic: str) -> None:
        self.path = data / f"kafka-{topic}.checkpoint"
        self.where = str(self.path)

    async def load(self, epoch: int) -> tuple[int, str | None]:
        return self.read(epoch)

    async def save(self, epoch: int, id: int) -> None:
        await asyncio.to_thread(self.write, epoch, id)

    def read(self, epoch: int) -> tuple[int, str | None]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return 0, None
        except OSError as e:
            raise CheckpointError(f"cannot read the Kafka checkpoint {self.path}: {e}") from None
        return parse(text, self.where, epoch)

    def write(self, epoch: int, id: int) -> None:
        """Blocking (it syncs)."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(render(epoch, id))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as e:
            raise CheckpointError(f"cannot write the Kafka checkpoint {self.path}: {e}") from None
