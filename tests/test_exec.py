"""``storage-events exec``: a command per event, at least once, through SIGKILLs of the runner,
with retries, a dead letter, and file names passed as they are (never through a shell)."""

from __future__ import annotations

import json
import signal
import sqlite3
import sys
import time
from collections import Counter
from pathlib import Path

from conftest import Proc, agents_connected, command, start_agent, wait_for

from storage_events.execute import Progress, argv_for
from storage_events.wire import Event

HERE = Path(__file__).parent
EVIL = ["$(touch pwned)", 'it\'s "quoted"', "new\nline", "-rf", "semi;colon &"]


def test_placeholders_fill_arguments_and_nothing_else():
    ev = Event(
        id=7,
        site="s",
        node="n",
        path="/d/\ufffd x",
        raw_path=b"/d/\xff x",
        flags=["IN_MOVED_TO"],
        old_path="/d/a",
        ts=1,
        stream="n:1",
        seq=1,
        size=10,
    )
    argv = argv_for(["cp", "{path}", "{old_path}.bak", "{id}:{size}:{flags}", "{nope}"], ev)
    assert argv == ["cp", "/d/\udcff x", "/d/a.bak", "7:10:IN_MOVED_TO", "{nope}"]


def test_the_checkpoint_waits_for_the_oldest_running_event():
    p = Progress()
    for i in (1, 2, 3, 5):
        p.start(i)
    assert p.finish(2) is None  # 1 still runs
    assert p.finish(1) == 2
    assert p.finish(5) is None and p.mark == 2  # 3 runs
    assert p.finish(3) == 5 and p.done == set()
    assert not p.wanted(4)  # (below the mark: not wanted, or finished)


def _records(log: Path) -> list[dict]:
    if not log.exists():
        return []
    return [
        json.loads(line)
        for line in log.read_bytes().decode("utf-8", "surrogateescape").splitlines()
    ]


def test_a_thousand_files_through_two_sigkills_each_handled_and_only_the_running_ones_again(
    tmp_path, procs, relay
):
    root = tmp_path / "w"
    root.mkdir()
    start_agent(tmp_path, procs, relay.url, root)
    wait_for(lambda: agents_connected(relay), 10, "agent connection")
    log, state = tmp_path / "runs.jsonl", tmp_path / "state"
    argv = [
        command("storage-events"),
        "exec",
        relay.url,
        "--path",
        str(root),
        "--type",
        "IN_CLOSE_WRITE",
        "--state",
        str(state),
        "--jobs",
        "4",
        "--retries",
        "2",
        "--since",
        "earliest",
        "--",
        sys.executable,
        str(HERE / "exec_handler.py"),
        str(log),
        "{path}",
        "{id}",
    ]
    names = [f"f{i:04d}" for i in range(1000)] + ["flaky-one", "always-fails", *EVIL]
    for name in names:
        (root / name).write_bytes(b"x")

    running_at_kills: set[int] = set()
    runner = Proc(argv, tmp_path / "exec-0.log")
    procs.append(runner)
    for kill, after in enumerate((250, 600)):
        wait_for(
            lambda n=after: sum(r["what"] == "end" for r in _records(log)) >= n,
            120,
            f"{after} commands finished",
        )
        runner.send(signal.SIGKILL)
        runner.popen.wait(10)
        # Running at the kill: started, and not recorded as finished in the runner's state
        # (a command that had just exited, its exit not yet seen, counts as running too).
        db = sqlite3.connect(state / "state.sqlite3")
        (mark,) = db.execute("SELECT id FROM mark").fetchone()
        done = {i for (i,) in db.execute("SELECT id FROM done")}
        db.close()
        time.sleep(1.0)  # (the commands it started go on, orphaned: their records come)
        started = {r["id"] for r in _records(log) if r["what"] == "start"}
        running_at_kills |= {i for i in started if i > mark and i not in done}
        runner = Proc(argv, tmp_path / f"exec-{kill + 1}.log")
        procs.append(runner)

    def finished() -> bool:
        ends = {r["path"] for r in _records(log) if r["what"] == "end"}
        dead = (state / "dead-letter.jsonl").exists()
        return len(ends) == len(names) - 1 and dead

    wait_for(finished, 180, "every command finished")
    records = _records(log)
    ends = Counter(r["path"] for r in records if r["what"] == "end")
    assert set(ends) == {str(root / n) for n in names if n != "always-fails"}
    # The flaky command ran three times (twice failing) and the always failing one three times,
    # then went to the dead letter.
    starts = Counter(r["path"] for r in records if r["what"] == "start")
    assert starts[str(root / "flaky-one")] == 3 and ends[str(root / "flaky-one")] == 1
    assert starts[str(root / "always-fails")] == 3
    (dead,) = [json.loads(line) for line in (state / "dead-letter.jsonl").read_text().splitlines()]
    assert dead["event"]["path"] == str(root / "always-fails") and dead["attempts"] == 3
    # Again only what was running at a kill.
    by_id = Counter(r["id"] for r in records if r["what"] == "start")
    special = {r["id"] for r in records if Path(r["path"]).name in ("flaky-one", "always-fails")}
    again = {i for i, n in by_id.items() if n > 1} - special
    assert again <= running_at_kills, sorted(again - running_at_kills)
    assert len(running_at_kills) <= 2 * 4  # at most --jobs at each of the two kills
    print(f"run again after the two SIGKILLs: {len(again)} (running then: {len(running_at_kills)})")
    # Names reached the command as they are: nothing ran through a shell.
    assert not (tmp_path / "pwned").exists() and not (root / "pwned").exists()
    for name in EVIL:
        assert ends[str(root / name)] >= 1
