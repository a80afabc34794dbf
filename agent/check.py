"""``storage-events-agent check``: is this node ready to run the agent? Says what to fix."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from .config import AgentConfig
from .select import Selector
from .spool import Spool, SpoolError

SYSCTL = Path("/proc/sys/fs/inotify")
DROP_IN = "/etc/sysctl.d/60-storage-events-agent.conf"


def count_directories(root: str, select: Selector, progress: Callable[[int], None]) -> int:
    """Directories a recursive watch of ``root`` needs (the root included)."""
    count, stack, last = 0, [(root, [])], time.monotonic()
    while stack:
        path, parts = stack.pop()
        count += 1
        if time.monotonic() - last > 2:
            progress(count)
            last = time.monotonic()
        try:
            with os.scandir(path) as it:
                for e in it:
                    if e.is_dir(follow_symlinks=False) and not (
                        select.active and select.excluded(parts, e.name, True)
                    ):
                        stack.append((e.path, [*parts, e.name]))
        except OSError:
            continue  # unreadable: the agent reports it by name when it starts
    return count


def watches_in_use(uid: int) -> tuple[int, int]:
    """(watches, inotify instances) held by this user's processes right now."""
    watches = instances = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if os.stat(f"/proc/{pid}").st_uid != uid:
                continue
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:inotify":
                    continue
                instances += 1
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    watches += sum(line.startswith("inotify wd:") for line in f)
        except OSError:
            continue  # gone, or not ours to read
    return watches, instances


def _sysctl(name: str) -> int:
    return int((SYSCTL / name).read_text())


def run_check(cfg: AgentConfig, say: Callable[[str], None]) -> bool:
    ok = True

    def problem(text: str) -> None:
        nonlocal ok
        ok = False
        say("  PROBLEM: " + text)

    try:
        # With the agent's token: a relay with tokens tells strangers only whether it is up.
        headers = {"Authorization": f"Bearer {cfg.token}"} if cfg.token else {}
        r = httpx.get(cfg.relay.rstrip("/") + "/healthz", timeout=5, headers=headers)
        health = r.json() if r.status_code in (200, 503) else {}
        if r.status_code == 503:
            say(
                f"relay {cfg.relay}: reachable but it cannot store events: "
                f"{health.get('store_error', 'its log is failing')}"
            )
        else:
            r.raise_for_status()
            say(
                f"relay {cfg.relay}: reachable (version {health.get('version')}, "
                f"{health.get('head')} events)"
            )
    except (httpx.HTTPError, ValueError) as e:
        say(f"relay {cfg.relay}: NOT reachable ({e})")
        say("  the agent keeps retrying and queues events meanwhile (in the spool if set)")

    if cfg.spool:
        try:
            spool = Spool(Path(cfg.spool), quota=cfg.spool_quota)
            say(
                f"spool {cfg.spool}: usable, {spool.size >> 20} MiB of "
                f"{cfg.spool_quota >> 20} MiB quota in use"
            )
            spool.close(clean=not spool.unclean)
        except SpoolError as e:
            problem(str(e))
    else:
        say("spool: none (unacknowledged events are lost if the agent stops; set `spool`)")

    needed = 0
    if not cfg.root:
        problem("no root to watch: add [[root]] path = ... to the config, or give PATHs")
    for r in cfg.root:
        if not os.path.isdir(r.path):
            problem(f"root {r.path} is not a directory")
            continue
        n = count_directories(
            r.path,
            Selector(r.include, r.exclude),
            lambda c, p=r.path: say(f"  ... {c:,} directories so far in {p}"),
        )
        needed += n
        say(f"root {r.path}: {n:,} directories to watch")

    max_watches, max_instances = _sysctl("max_user_watches"), _sysctl("max_user_instances")
    queued = _sysctl("max_queued_events")
    in_use, instances = watches_in_use(os.geteuid())
    say(
        f"fs.inotify.max_user_watches = {max_watches:,}: this agent needs {needed:,}, "
        f"{in_use:,} are in use by this user already"
    )
    if needed + in_use > max_watches:
        want = max(2 * (needed + in_use), 1 << 20)
        problem(
            f"not enough inotify watches. Raise the limit: `sysctl -w "
            f"fs.inotify.max_user_watches={want}`, and keep it across reboots in {DROP_IN}"
        )
    say(f"fs.inotify.max_user_instances = {max_instances}: {instances} in use by this user")
    if instances + 1 > max_instances:
        problem("no inotify instance left: raise fs.inotify.max_user_instances")
    say(
        f"fs.inotify.max_queued_events = {queued:,} (a burst larger than this between two "
        "reads overflows; the agent then announces it and rescans)"
    )
    say("ok" if ok else "problems found (see above)")
    return ok
