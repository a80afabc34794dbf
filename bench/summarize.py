"""Tables from a benchmark's --json results: medians [min-max] and same-run ratios.

python bench/summarize.py docs/bench/agent_bench.json
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict

# per workload: the figures to show, and the one to compare with inotifywait run by run
FIELDS = {
    "setup": (["seconds", "rss_mib"], ["seconds", "rss_mib"]),
    "drain": (["seconds", "files_per_s"], ["files_per_s"]),
    "burst": (["files", "lost", "overflows"], []),
    "latency": (["p50_ms", "p99_ms", "missing"], []),
    "race": (["reported", "of"], []),
}


def fmt(values: list[float]) -> str:
    med = statistics.median(values)
    if min(values) == max(values):
        return f"{med:,.3g}" if isinstance(med, float) and med < 100 else f"{med:,.0f}"
    digits = ".3g" if med < 100 else ",.0f"
    return f"{med:{digits}} [{min(values):{digits}}–{max(values):{digits}}]"


def main(path: str) -> None:
    with open(path) as f:
        results = json.load(f)
    by = defaultdict(list)
    for r in results:
        by[(r["workload"], r["tool"])].append(r)
    for workload, (fields, ratios) in FIELDS.items():
        tools = [t for (w, t) in by if w == workload]
        if not tools:
            continue
        print(f"\n### {workload}\n")
        head = ["tool", "runs", *fields, *(f"{f} ÷ inotifywait" for f in ratios)]
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        base = {r["run"]: r for r in by[(workload, "inotifywait")]}
        for tool in tools:
            rows = by[(workload, tool)]
            cells = [tool, str(len(rows))]
            cells += [fmt([r[f] for r in rows]) for f in fields]
            for f in ratios:
                cells.append(fmt([r[f] / base[r["run"]][f] for r in rows if r["run"] in base]))
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
