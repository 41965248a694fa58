"""What OpenMP's waiting costs between passes: CPU a short two-thread region spends, idle gaps included.

    python bench/omp_spin.py                 # default ways: libgomp's own, PASSIVE, GOMP_SPINCOUNT=...
    python bench/omp_spin.py 0 30000 passive  # chosen ways (a number is a GOMP_SPINCOUNT)

Each way runs in a fresh process (libgomp reads its settings once): torch on two threads does a
256x256 matmul, then sleeps 0.2 s, 20 times. The process's CPU time per round, beyond what the matmul
needs (about its wall time on two threads), is what the threads burned waiting for work that did not
come: the cost a spin count puts on cores that the worker's decoding, the API and Redis share.
`redbatch worker`'s ``GOMP_SPINCOUNT=30000`` comes from this table (docs/benchmarks.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

ROUNDS = 20
DEFAULT_WAYS = ["default", "passive", "0", "1000", "10000", "30000", "100000", "300000"]


def child() -> None:
    import torch

    torch.set_num_threads(2)
    a = torch.randn(256, 256)
    for _ in range(5):
        a @ a
    time.sleep(0.3)
    cpu = wall = 0.0
    for _ in range(ROUNDS):
        c0, w0 = time.process_time(), time.perf_counter()
        a @ a
        w1 = time.perf_counter()
        time.sleep(0.2)
        cpu += time.process_time() - c0
        wall += w1 - w0
    print(f"{cpu / ROUNDS * 1e3:.2f} {wall / ROUNDS * 1e3:.2f}")


def env_for(way: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if way == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    elif way == "active":
        env["OMP_WAIT_POLICY"] = "ACTIVE"
    elif way != "default":
        env["GOMP_SPINCOUNT"] = str(int(way))
    return env


def main(ways: list[str]) -> None:
    print("| way | CPU ms a round | matmul wall ms |\n|---|---:|---:|")
    for way in ways:
        out = subprocess.run(
            [sys.executable, __file__, "--child"],
            env=env_for(way),
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        name = way if way in ("default", "passive", "active") else f"GOMP_SPINCOUNT={way}"
        print(f"| {name} | {out[0]} | {out[1]} |", flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--child"]:
        child()
    else:
        main(sys.argv[1:] or DEFAULT_WAYS)
