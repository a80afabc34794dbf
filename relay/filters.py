"""Subscriber filters: which records a subscription wants. Pure; the same for live and catch-up."""

from __future__ import annotations

from collections.abc import Iterable

from storage_events.wire import Flag, flags_mask

from .log import Record

MAX_PREFIXES = 64
MAX_VALUE_LENGTH = 4096
_OVERFLOW = int(Flag.Q_OVERFLOW)


class FilterError(ValueError):
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


class Filter:
    """Conditions are ANDed; the values within one condition are ORed. Empty means "any"."""

    __slots__ = ("flags", "matches_all", "nodes", "prefixes", "sites")

    def __init__(
        self,
        prefixes: Iterable[str] = (),
        sites: Iterable[str] = (),
        nodes: Iterable[str] = (),
        types: Iterable[str] = (),
    ) -> None:
        prefixes = list(prefixes)
        if len(prefixes) > MAX_PREFIXES:
            raise FilterError(f"at most {MAX_PREFIXES} path filters per subscription")
        normalized = {normalize_prefix(p) for p in prefixes}
        # "/" covers everything; a prefix under another one adds nothing.
        self.prefixes = tuple(sorted(p for p in normalized if p != "/")) if "/" not in normalized \
            else ()
        self.sites = _names("site", sites)
        self.nodes = _names("node", nodes)
        try:
            self.flags = flags_mask(list(types))
        except ValueError as e:
            raise FilterError(str(e)) from None
        self.matches_all = not (self.prefixes or self.sites or self.nodes or self.flags)

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
        if self.prefixes:
            path = r.path
            return any(_under(path, p) or (overflow and _under(p, path)) for p in self.prefixes)
        return True


def _under(path: str, prefix: str) -> bool:
    """``path`` is ``prefix`` or below it, on a path-component boundary."""
    return path.startswith(prefix) and (
        len(path) == len(prefix) or path[len(prefix)] == "/" or prefix == "/"
    )
