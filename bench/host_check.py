"""What kind of machine this is, and how it behaves: the facts each CPU section of
docs/benchmarks.md starts with, measured the same way every time.

    python bench/host_check.py               # facts, then 30 s of drift, then wake-up costs
    python bench/host_check.py --drift-s 0   # facts and wake-ups only

Facts from ``/proc/cpuinfo``, ``/proc/cmdline`` and sysfs: the CPU's vendor, family, model and
stepping (``model name`` alone says "AMD EPYC" for several generations), the instructions the model
paths care about (AVX-512, bfloat16, AMX), whether the kernel runs as a guest of a guest
(``nested_pvm=1``) and whether idle vCPUs poll before they halt. Then two timings on the idle
machine:

- **drift**: a fixed Python loop (200,000 additions, the best of three) every half second. On a
  shared host its time moved by up to half within a minute on some machines, which is why every
  ratio in the docs comes from one run side by side.
- **wake-up**: a one-byte pipe round trip between two processes pinned to the first two CPUs this
  one may use (0 and 1 on the project's 2-vCPU machines), back to back and after a pause (an idle
  vCPU halts, and waking it is what every hop of a lone request pays: client, API, Redis, the
  worker's threads).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from pathlib import Path

INSTRUCTIONS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_tile", "amx_bf16")
LOOP_N = 200_000
PAUSES_S = (0.0, 0.0002, 0.001)


def cpu_facts(cpuinfo: str, cmdline: str = "", idle_driver: str | None = None) -> dict[str, str]:
    """The facts, as text, from the contents of ``/proc/cpuinfo`` and ``/proc/cmdline``."""
    first: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, colon, value = line.partition(":")
        if colon:
            first.setdefault(key.strip(), value.strip())
    flags = set(first.get("flags", "").split())
    facts = {
        "cpu": first.get("model name", "unknown"),
        "vendor, family, model, stepping": ", ".join(
            first.get(k, "?") for k in ("vendor_id", "cpu family", "model", "stepping")
        ),
        "MHz (as the kernel reports it)": first.get("cpu MHz", "?"),
        "vCPUs": str(len(re.findall(r"^processor\s*:", cpuinfo, re.M))),
        "instructions": " ".join(i for i in INSTRUCTIONS if i in flags) or "none of " + " ".join(INSTRUCTIONS),
        "virtualised": "yes (hypervisor flag)" if "hypervisor" in flags else "no hypervisor flag",
    }
    args = dict(a.partition("=")[::2] for a in cmdline.split())
    if args.get("nested_pvm") == "1":
        facts["virtualised"] += ", a guest of a guest (nested_pvm=1)"
    poll = args.get("haltpoll.guest_halt_poll_ns")
    facts["idle"] = f"cpuidle driver {idle_driver or 'none'}" + (
        f", guest_halt_poll_ns={poll} on the kernel's command line" if poll is not None else ""
    )
    return facts


def loop_ms() -> float:
    """The fixed loop's time, the best of three, in ms."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        s = 0
        for k in range(LOOP_N):
            s += k
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def drift(seconds: float, every_s: float = 0.5) -> list[float]:
    """The loop's time every ``every_s`` for ``seconds`` (ms)."""
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        out.append(loop_ms())
        time.sleep(every_s)
    return out


def wakeup_us(pause_s: float, rounds: int, cpus: tuple[int, int] = (0, 1)) -> float:
    """Median one-byte pipe round trip (µs) between this process on ``cpus[0]`` and a child on
    ``cpus[1]``, with ``pause_s`` of sleep before each."""
    child_in, parent_out = os.pipe()  # (read end, write end)
    parent_in, child_out = os.pipe()
    pid = os.fork()
    if pid == 0:  # the echo: one byte back for each byte, until b"q"
        try:
            os.sched_setaffinity(0, {cpus[1]})
            while (b := os.read(child_in, 1)) not in (b"q", b""):
                os.write(child_out, b)
        finally:
            os._exit(0)
    affinity = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {cpus[0]})
        times = []
        for _ in range(rounds):
            if pause_s:
                time.sleep(pause_s)
            t0 = time.perf_counter()
            os.write(parent_out, b"x")
            os.read(parent_in, 1)
            times.append(time.perf_counter() - t0)
    finally:
        os.write(parent_out, b"q")
        os.waitpid(pid, 0)
        os.sched_setaffinity(0, affinity)
        for fd in (child_in, parent_out, parent_in, child_out):
            os.close(fd)
    return statistics.median(times) * 1e6


def usable_cpus() -> list[int]:
    """The CPUs this process may run on (Linux); none where CPU affinity is not available."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--drift-s", type=float, default=30.0, help="seconds of the drift loop (0: none)")
    ap.add_argument("--rounds", type=int, default=2000, help="round trips per wake-up figure")
    a = ap.parse_args(argv)
    driver = _read("/sys/devices/system/cpu/cpuidle/current_driver").strip() or None
    for key, value in cpu_facts(_read("/proc/cpuinfo"), _read("/proc/cmdline"), driver).items():
        print(f"{key}: {value}")
    if a.drift_s > 0:
        ms = sorted(drift(a.drift_s))
        print(
            f"python loop ({LOOP_N:,} additions, best of 3, every 0.5 s for {a.drift_s:g} s): "
            f"min {ms[0]:.1f} median {statistics.median(ms):.1f} max {ms[-1]:.1f} ms"
        )
    cpus = usable_cpus()
    if len(cpus) < 2:
        print("wake-up across CPUs: fewer than two CPUs to pin to (or no CPU affinity here), not measured")
        return 0
    pair = (cpus[0], cpus[1])
    parts = [
        f"{wakeup_us(p, a.rounds, pair):.0f} µs " + (f"after {p * 1e3:g} ms idle" if p else "back to back")
        for p in PAUSES_S
    ]
    print(f"wake-up across CPUs {pair[0]} and {pair[1]} (pipe round trip, median of {a.rounds}): " + ", ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
