"""A writer that keeps a tree changing: files created, renamed within and across directories,
and removed; directories made, renamed with what they hold, and removed. ``N`` operations
from seed ``SEED``. Run as a process by tests/test_snapshot.py while subscribers take
snapshots."""

from __future__ import annotations

import os
import random
import shutil
import sys


def churn(root: str, n: int, seed: int) -> None:
    rng = random.Random(seed)
    files: dict[str, list[str]] = {root: []}  # directory → the names of the files in it

    dirs = [root]
    for i in range(n):
        r = rng.random()
        made = i + 1
        full = [d for d in rng.sample(dirs, min(8, len(dirs))) if files[d]]
        if r < 0.45 or not full:
            d = rng.choice(dirs)
            with open(os.path.join(d, f"f{made}"), "wb") as f:
                f.write(b"x")
            files[d].append(f"f{made}")
        elif r < 0.70:
            d, to = rng.choice(full), rng.choice(dirs)
            j = rng.randrange(len(files[d]))
            os.rename(os.path.join(d, files[d][j]), os.path.join(to, f"r{made}"))
            files[d][j] = files[d][-1]
            files[d].pop()
            files[to].append(f"r{made}")
        elif r < 0.90:
            d = rng.choice(full)
            os.unlink(os.path.join(d, files[d].pop()))
        elif r < 0.97 or len(dirs) < 4:
            d = os.path.join(rng.choice(dirs), f"d{made}")
            os.mkdir(d)
            files[d] = []
            dirs.append(d)
        else:
            old = rng.choice(dirs[1:])
            moving = [d for d in dirs if d == old or d.startswith(old + "/")]
            if r < 0.995:  # renamed with all it holds, elsewhere in the tree
                target = rng.choice([d for d in dirs if d not in moving])
                new = os.path.join(target, f"m{made}")
                os.rename(old, new)
                for d in moving:
                    files[new + d[len(old) :]] = files.pop(d)
            else:
                shutil.rmtree(old)
                for d in moving:
                    del files[d]
            dirs = list(files)
        if i % 10_000 == 0:
            print(i, flush=True)


if __name__ == "__main__":
    churn(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
