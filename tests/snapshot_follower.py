"""A subscriber as a list-then-watch pipeline runs one: ``since=snapshot`` through the project's
client, the tree kept with :class:`storage_events.namespace.Mirror`, until the event for the
file ``STOP`` arrives; then the tree it holds, as JSON, on stdout. Run by tests/test_snapshot.py
as a process of its own (ten at once would share one interpreter's lock otherwise)."""

from __future__ import annotations

import json
import os
import sys

from storage_events.client import subscribe
from storage_events.namespace import Mirror


def main(url: str, prefix: str, stop: str, said: str) -> None:
    """``said``: a file to write the snapshot's id to as soon as it is known."""
    mirror = Mirror()
    snapshot = None
    states = 0
    last = 0  # id of the snapshot, then of each event after it
    out_of_order = []  # ids not after the one before: a duplicate, or a hand-over gone wrong
    for item in subscribe(url, paths=[prefix], since="snapshot"):
        if item.type == "reset":
            mirror, states = Mirror(), 0
        elif item.type == "state":
            mirror.apply_state(item.event)
            states += 1
        elif item.type == "snapshot":
            snapshot = json.loads(item.data)
            last = snapshot["id"]
            with open(said + ".part", "w") as f:
                f.write(str(last))
            os.rename(said + ".part", said)
        elif item.type in ("inotify", "overflow"):
            ev = item.event
            if snapshot is None or ev.id <= last:
                out_of_order.append(ev.id)
            last = ev.id
            mirror.apply(ev)
            if ev.path == stop and "IN_CLOSE_WRITE" in ev.flags:
                break
        elif item.type == "gap":
            raise SystemExit(f"the feed lost events: {item.data}")
    json.dump(
        {
            "snapshot": snapshot,
            "states": states,
            "out_of_order": out_of_order,
            "tree": mirror.paths(),
        },
        sys.stdout,
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
