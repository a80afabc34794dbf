"""The one root of every error this project raises on purpose, and its families.

Each message says what failed, on which path, peer or file, and what to do about it. Callers
catch a family where they treat its members alike (a CLI turns any :class:`StorageEventsError`
into a one-line message and exit status 1) and a member where it matters which.

- :class:`BadInput`: what a user or operator gave us (a config, a query, a request body, a
  name) cannot be used; the one who gave it can fix it.
- :class:`PeerError`: another party — an agent, a relay, an upstream feed, a client — broke the
  protocol or refused us.
- :class:`StorageError`: durable storage here (the relay's log, the agent's spool) cannot be
  used right now; nothing was lost, and the work is retried.
- :class:`AccessError`: the caller may not do this (a missing, wrong or too narrow token).
"""

from __future__ import annotations


class StorageEventsError(Exception):
    """Raised on purpose by storage-events; the message is meant for a human."""


class BadInput(StorageEventsError, ValueError):
    """Input that cannot be used (also a ``ValueError``, which is what it is)."""


class PeerError(StorageEventsError):
    """Another party broke the protocol or refused."""


class StorageError(StorageEventsError):
    """Durable storage cannot be used right now."""


class AccessError(StorageEventsError):
    """Not allowed: the credentials are missing, wrong, or do not reach this far."""
