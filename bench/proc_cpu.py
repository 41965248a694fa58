"""CPU seconds that groups of processes used, from /proc (Linux): where each request's CPU went.

    python bench/proc_cpu.py snap A.json api=12,13 worker=14 redis=15 bench=16
    ... load ...
    python bench/proc_cpu.py snap B.json api=12,13 worker=14 redis=15 bench=16
    python bench/proc_cpu.py diff A.json B.json REQUESTS [--json OUT.json]
    python bench/proc_cpu.py cores A.json B.json SECONDS     (cores each group kept busy in between)

Each PID counts with all its threads (utime + stime of /proc/PID/stat); a process that ended
between the snapshots counts only up to the first.
"""

from __future__ import annotations

import json
import os
import sys


def cpu_seconds(pid: str) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def snap(groups: list[str]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for g in groups:
        name, _, pids = g.partition("=")
        out[name] = {p: s for p in pids.split(",") if p and (s := cpu_seconds(p)) is not None}
    return out


def diff(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]], requests: int) -> dict[str, float]:
    """CPU milliseconds per request of each group, and of all together."""
    per = {}
    for name, pids in b.items():
        used = sum(t - a.get(name, {}).get(pid, t) for pid, t in pids.items())
        per[name] = 1000.0 * used / max(requests, 1)
    per["total"] = sum(per.values())
    return per


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "snap":
        with open(argv[1], "w") as f:
            json.dump(snap(argv[2:]), f)
        return 0
    if len(argv) >= 4 and argv[0] == "diff":
        with open(argv[1]) as fa, open(argv[2]) as fb:
            per = diff(json.load(fa), json.load(fb), int(argv[3]))
        print("  ".join(f"{k} {v:.2f}" for k, v in per.items()), "(CPU ms per request)")
        if len(argv) == 6 and argv[4] == "--json":
            with open(argv[5], "w") as f:
                json.dump(per, f)
        return 0
    if len(argv) == 4 and argv[0] == "cores":
        with open(argv[1]) as fa, open(argv[2]) as fb:
            per = diff(json.load(fa), json.load(fb), round(1000 * float(argv[3])))
        print("  ".join(f"{k} {v:.2f}" for k, v in per.items()), "(cores busy)")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
