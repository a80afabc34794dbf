"""The command tests/test_exec.py has storage-events exec run: ``exec_handler.py LOG PATH ID``.
Writes ``start`` and ``end`` records to LOG (one line each, appended whole); a file whose name
holds ``flaky`` fails its first two runs, one with ``always-fails`` every run."""

from __future__ import annotations

import json
import os
import sys
import time


def record(log: str, what: str, path: str, id: str) -> None:
    line = json.dumps({"what": what, "path": path, "id": int(id), "pid": os.getpid()}) + "\n"
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode("utf-8", "surrogateescape"))
    finally:
        os.close(fd)


def main(log: str, path: str, id: str) -> int:
    record(log, "start", path, id)
    name = os.path.basename(path)
    if "always-fails" in name:
        return 3
    if "flaky" in name:
        tries = log + f".tries-{id}"
        with open(tries, "a") as f:
            f.write("x")
        if os.path.getsize(tries) <= 2:
            return 1
    time.sleep(0.02)
    record(log, "end", path, id)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
