"""Where the sink keeps how far the log is on the topic: a small file in the relay's data
directory, replaced atomically, so a crash leaves the old checkpoint or the new, never half."""

from __future__ import annotations

import json
import os
from pathlib import Path

from storage_events.relay.log.base import StoreError


class CheckpointError(StoreError):
    """The checkpoint cannot be read or written; the message says which file and what to do."""


class FileCheckpoint:
    """``kafka-<topic>.checkpoint`` under ``data``: ``{"epoch": E, "id": N}``, the log's epoch
    (a checkpoint of a log that was deleted and made anew means nothing for the new one)."""

    def __init__(self, data: Path, topic: str) -> None:
        self.path = data / f"kafka-{topic}.checkpoint"

    def load(self, epoch: int) -> tuple[int, str | None]:
        """The id to resume after, and why it is 0 when a checkpoint was there but is not used."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return 0, None
        except OSError as e:
            raise CheckpointError(f"cannot read the Kafka checkpoint {self.path}: {e}") from None
        try:
            held = json.loads(text)
            if not (isinstance(held, dict) and isinstance(held.get("id"), int) and held["id"] >= 0):
                raise ValueError("no id")
        except ValueError:
            raise CheckpointError(
                f"the Kafka checkpoint {self.path} is damaged ({text[:60]!r}): write "
                '{"epoch": E, "id": N} into it to resume after id N, or delete it to publish the '
                "whole log again"
            ) from None
        if held.get("epoch") != epoch:
            return 0, (
                f"{self.path} belongs to another event log (epoch {held.get('epoch')}, this log's "
                f"is {epoch}): publishing this log from its start"
            )
        return held["id"], None

    def save(self, epoch: int, id: int) -> None:
        """Blocking (it syncs): run it on a thread."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with open(tmp, "w") as f:
                json.dump({"epoch": epoch, "id": id}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as e:
            raise CheckpointError(f"cannot write the Kafka checkpoint {self.path}: {e}") from None
