"""The agent's configuration file (TOML), as typed structs."""

from __future__ import annotations

import socket
from typing import Annotated

import msgspec

Name = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]


class RootConfig(msgspec.Struct, forbid_unknown_fields=True):
    path: str  # local directory to watch, recursively
    prefix: str | None = None  # published in place of `path`; default: `path` itself


class AgentConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    relay: str = "http://127.0.0.1:8808"
    site: Name = "local"
    node: Name = msgspec.field(default_factory=lambda: socket.gethostname().split(".")[0])
    token: str | None = None
    root: list[RootConfig] = []
    max_batch: int = 2000
    # On SIGTERM, how long to wait for the relay to acknowledge what is still queued.
    shutdown_grace: float = 5.0
