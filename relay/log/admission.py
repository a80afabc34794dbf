"""Which events of a batch a log stores: one rule for every backend, with no I/O.

A stream belongs to whoever first published it. An agent's stream (published here over its own
connection) is bound to that agent's site and node; a stream that reached this relay through
federation is bound to its site and node too, and neither kind may take over the other: a
relayed copy of an agent's stream here could only be a forgery or a second route, and the log
would acknowledge the agent's own events as already held (that is how a forged seq jump
silenced a stream). An event whose (stream, seq) is held is a resend and is dropped; an agent's
stream that skips seqs is announced as loss, never passed over in silence.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from storage_events.wire import Event

log = logging.getLogger("storage_events.relay")


@dataclass(frozen=True, slots=True)
class Owner:
    site: str
    node: str | None  # None: recorded by a version that kept only the site
    direct: bool | None  # True: its agent publishes here; False: it arrives through federation;
    # None: not recorded (a log written before streams were bound)


@dataclass(slots=True)
class Admitted:
    events: list[Event] = field(default_factory=list)  # to store, in order
    positions: dict[str, int] = field(default_factory=dict)  # streams' new last seq
    owners: dict[str, Owner] = field(default_factory=dict)  # new, or completed, owners
    refused: list[tuple[Event, str]] = field(default_factory=list)  # with the reason
    jumps: list[tuple[str, int, int]] = field(default_factory=list)  # stream, last held, next


def gap_notice(ev: Event, last: int) -> Event:
    """Stands for seqs ``last + 1 .. ev.seq - 1`` of ``ev``'s stream, which never arrived: an
    overflow of that node's whole tree, numbered ``ev.seq - 1`` (a seq nobody else can have)."""
    return Event(
        site=ev.site,
        node=ev.node,
        path="/",
        flags=["IN_Q_OVERFLOW"],
        is_dir=True,
        ts=ev.ts,
        stream=ev.stream,
        seq=ev.seq - 1,
        synthetic=True,
    )


def admit(
    events: list[Event], positions: Mapping[str, int], owners: Mapping[str, Owner], *, relayed: bool
) -> Admitted:
    """What to store of ``events``; ``relayed``: they came from another relay (pushed or
    pulled), not from the agent that publishes the stream."""
    out = Admitted()
    for ev in events:
        stream = ev.stream
        owner = out.owners.get(stream) or owners.get(stream)
        if owner is None:
            out.owners[stream] = Owner(ev.site, ev.node, not relayed)
        else:
            why = _claim_problem(owner, ev, relayed)
            if why is not None:
                out.refused.append((ev, why))
                continue
            if owner.node is None or owner.direct is None:  # an old log's row: complete it
                out.owners[stream] = Owner(
                    owner.site,
                    owner.node or ev.node,
                    (not relayed) if owner.direct is None else owner.direct,
                )
        last = out.positions.get(stream, positions.get(stream, 0))
        if ev.seq <= last:
            continue  # already stored: a resend after a lost ack, or a second route
        if ev.seq != last + 1 and last and not relayed:
            # A relayed stream skips seqs for good reasons (the pulling relay's token may see
            # only some paths); an agent's never does: what is missing was lost.
            out.jumps.append((stream, last, ev.seq))
            out.events.append(gap_notice(ev, last))
        out.positions[stream] = ev.seq
        out.events.append(ev)
    return out


def _claim_problem(owner: Owner, ev: Event, relayed: bool) -> str | None:
    if owner.site != ev.site or (owner.node is not None and owner.node != ev.node):
        return (
            f"that stream belongs to {owner.site}/{owner.node or '?'}, not to {ev.site}/{ev.node}"
        )
    if owner.direct and relayed:
        return "that stream is published here by its own agent, not through federation"
    if owner.direct is False and not relayed:
        return "that stream reaches this relay through federation, not from an agent"
    return None


class Reporter:
    """Logs what admission refused or found missing, each forged claim once: a forger must not
    flood the relay's log."""

    def __init__(self) -> None:
        self._claims: set[tuple[str, str]] = set()  # (stream, claimant) already logged

    def __call__(self, taken: Admitted) -> None:
        for ev, why in taken.refused:
            claim = (ev.stream, f"{ev.site}/{ev.node}")
            if claim not in self._claims:
                self._claims.add(claim)
                log.error(
                    "dropped events of stream %s from %s/%s: %s (a forged or misconfigured sender)",
                    ev.stream,
                    ev.site,
                    ev.node,
                    why,
                )
        for stream, last, seq in taken.jumps:
            log.warning(
                "stream %s jumps from seq %d to %d: events %d-%d never arrived; stored an "
                "overflow notice in their place",
                stream,
                last,
                seq,
                last + 1,
                seq - 1,
            )
