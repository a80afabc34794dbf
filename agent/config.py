"""The agent's configuration file (TOML), as typed structs."""

from __future__ import annotations

import os
import socket
from typing import Annotated

import msgspec

from storage_events.wire import MAX_BATCH, flags_mask

Name = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
Positive = Annotated[float, msgspec.Meta(gt=0)]
PositiveInt = Annotated[int, msgspec.Meta(gt=0)]


class RootConfig(msgspec.Struct, forbid_unknown_fields=True):
    path: str  # local directory to watch, recursively
    prefix: str | None = None  # published in place of `path`; default: `path` itself
    include: list[str] = []  # globs of files to publish (default: all)
    exclude: list[str] = []  # globs of files and directories to leave out (not even watched)
    types: list[str] = []  # inotify flags to publish, e.g. ["IN_CLOSE_WRITE"] (default: all)

    def __post_init__(self) -> None:
        try:
            flags_mask(self.types)
        except ValueError as e:
            raise ValueError(f"root {self.path}: {e}") from None


class AgentConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    relay: str = "http://127.0.0.1:8808"
    site: Name = "local"
    node: Name = msgspec.field(default_factory=lambda: socket.gethostname().split(".")[0])
    token: str | None = None
    root: list[RootConfig] = []
    # Durable state: unacknowledged events and the tree snapshot. Without it, events the relay
    # has not acknowledged are lost when the agent stops, and restarts publish no differences.
    spool: str | None = None
    spool_quota: PositiveInt = 1 << 30  # bytes of unacknowledged events kept on disk, at most
    memory_events: PositiveInt = 100_000  # unacknowledged events held in memory, at most
    flush_interval: Positive = 0.2  # seconds between spool writes: what a SIGKILL can lose
    snapshot_interval: float = 300.0  # seconds between tree snapshots (0: only at shutdown)
    metrics: str | None = None  # HOST:PORT to serve Prometheus metrics on, e.g. 127.0.0.1:9808
    max_batch: Annotated[int, msgspec.Meta(gt=0, le=MAX_BATCH)] = 2000
    # On SIGTERM, how long to wait for the relay to acknowledge what is still queued.
    shutdown_grace: float = 5.0
    retry_interval: Positive = 30.0  # seconds between retries of directories that could not be
    # watched (SIGHUP retries at once)
    # The first time a root is watched (no snapshot of it in the spool), publish what it already
    # holds as synthetic IN_CREATE events, so that the relay's namespace view starts complete.
    announce_existing: bool = True
    # Add size, mtime, mode, uid, gid and ino to events that name an entry still there (one
    # fstatat each, in the directory's own descriptor).
    stat: bool = True

    def __post_init__(self) -> None:
        if self.spool:
            # Absolute once and for all: log lines name it, and `check` and `run` started from
            # different directories must mean the same spool.
            self.spool = os.path.abspath(self.spool)
