"""Subscriber filters: which records a subscription wants. Pure; the same for live and catch-up."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from storage_events.errors import BadInput
from storage_events.relay.log.base import Record
from storage_events.wire import Flag, flags_mask

MAX_PREFIXES = 64
MAX_VALUE_LENGTH = 4096
_OVERFLOW, _MOVED_TO = int(Flag.Q_OVERFLOW), int(Flag.MOVED_TO)


class FilterError(BadInput):
    """A filter value a user sent is unusable; the message says which and why."""


def normalize_prefix(raw: str) -> str:
    """``/data//run1/`` → ``/data/run1``. Rejects relative paths and ``..``."""
    if len(raw) > MAX_VALUE_LENGTH:
        raise FilterError(f"path filter is longer than {MAX_VALUE_LENGTH} characters")
    if not raw.startswith("/"):
        raise FilterError(f"path filter {raw!r} must be absolute (start with /)")
    if any(ord(c) < 0x20 for c in raw):
        raise FilterError(f"path filter {raw!r} contains control characters")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise FilterError(f"path filter {raw!r} must not contain '..'")
    return "/" + "/".join(parts)


def _names(kind: str, values: Iterable[str]) -> frozenset[str]:
    out = set()
    for v in values:
        if not v or len(v) > 256 or any(ord(c) < 0x20 for c in v):
            raise FilterError(f"{kind} filter {v[:80]!r} is not a valid {kind} name")
        out.add(v)
    return frozenset(out)


@dataclass(frozen=True, slots=True)
class Scope:
    """What a reader may see (from its token): ``None`` for a dimension means anything."""

    sites: frozenset[str] | None = None
    prefixes: tuple[str, ...] | None = None

    def allows(self, site: str, path: str, *, overflow: bool = False) -> bool:
        if self.sites is not None and site not in self.sites:
            return False
        if self.prefixes is None:
            return True
        return any(under(path, p) or (overflow and under(p, path)) for p in self.prefixes)


class Filter:
    """Conditions are ANDed; the values within one condition are ORed. Empty means "any".
    A ``scope`` (the reader's rights) is ANDed with everything the reader asked for."""

    __slots__ = ("flags", "matches_all", "nodes", "prefixes", "scope", "sites")

    def __init__(
        self,
        prefixes: Iterable[str] = (),
        sites: Iterable[str] = (),
        nodes: Iterable[str] = (),
        types: Iterable[str] = (),
        scope: Scope | None = None,
    ) -> None:
        prefixes = list(prefixes)
        if len(prefixes) > MAX_PREFIXES:
            raise FilterError(f"at most {MAX_PREFIXES} path filters per subscription")
        normalized = {normalize_prefix(p) for p in prefixes}
        # "/" covers everything; a prefix under another one adds nothing (and would make a
        # snapshot list its entries twice).
        self.prefixes = (
            tuple(
                sorted(
                    p
                    for p in normalized
                    if p != "/" and not any(q != p and under(p, q) for q in normalized)
                )
            )
            if "/" not in normalized
            else ()
        )
        self.sites = _names("site", sites)
        self.nodes = _names("node", nodes)
        try:
            self.flags = flags_mask(list(types))
        except ValueError as e:
            raise FilterError(str(e)) from None
        self.scope = scope if scope is not None and scope != Scope() else None
        self.matches_all = not (
            self.prefixes or self.sites or self.nodes or self.flags or self.scope
        )

    def matches(self, r: Record) -> bool:
        if self.sites and r.site not in self.sites:
            return False
        if self.nodes and r.node not in self.nodes:
            return False
        # A loss announcement reaches everyone whose part of the tree it covers, whatever types
        # they asked for: otherwise the loss would be silent for them.
        overflow = r.flags & _OVERFLOW
        if self.flags and not (r.flags & self.flags or overflow):
            return False
        if self.scope is not None and not self.scope.allows(
            r.site, r.path, overflow=bool(overflow)
        ):
            return False
        if self.prefixes:
            path = r.path
            return any(under(path, p) or (overflow and under(p, path)) for p in self.prefixes)
        return True

    def render(self, r: Record) -> bytes:
        """The record's SSE bytes for this subscriber: a move from outside the reader's scope
        arrives without the path (and cookie) it came from."""
        if self.scope is None or not r.flags & _MOVED_TO:
            return r.sse
        old = r.old_path()
        if old is None or self.scope.allows(r.site, old):
            return r.sse
        return r.redacted()


def under(path: str, prefix: str) -> bool:
    """``path`` is ``prefix`` or below it, on a path-component boundary."""
    return path.startswith(prefix) and (
        len(path) == len(prefix) or path[len(prefix)] == "/" or prefix == "/"
    )
