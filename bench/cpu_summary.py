"""Summarise a ``bench/cpu_check.sh`` run: each repeat's figures against issue 5's CPU targets,
then the median over repeats (ratios are taken within a repeat, where the machine's speed is the
same for both sides). Where the in-process limit was timed both before and after the served run
(``...-inproc`` and ``...-inproc-after``), the in-process figures are the mean of the two, and
``limit after / before`` shows how far the machine drifted in between. Where the machine drifts
within a minute, ``served / limit at the worker-timed unit cost`` gives the ratio with no drift
in it: the limit's unit cost (preparing and running one image) taken from what the worker itself
spent per request in the served run's own window, so a slow minute slows both sides alike.

    python bench/cpu_summary.py out/cpu [SECONDS_PER_LEVEL]

The CPU per request counts the requests of the snapshot window, 2 s short of each load's
length: given, or read from the run's own bench JSONs.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any

MB = "mobilenet_v3_small"


def load(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def level(out: Path, name: str, c: int) -> dict[str, Any] | None:
    doc = load(out / f"{name}-c{c}.json")
    return doc["levels"][0] if doc and doc.get("levels") else None


def cpu_split(out: Path, name: str, c: int, req_per_s: float, seconds: float) -> dict[str, float] | None:
    """CPU ms per request by process group over the snapshot window (``seconds`` long)."""
    a, b = load(out / f"{name}-c{c}-cpu0.json"), load(out / f"{name}-c{c}-cpu1.json")
    if not a or not b or req_per_s <= 0:
        return None
    n = req_per_s * seconds
    per = {g: 1000.0 * sum(t - a.get(g, {}).get(p, t) for p, t in pids.items()) / n for g, pids in b.items()}
    per["total"] = sum(per.values())
    return per


def stats(path: Path) -> dict[str, int]:
    """The model's stats hash as ``redis-cli HGETALL`` printed it (field and value lines)."""
    if not path.exists():
        return {}
    lines = path.read_text().split()
    return {k: int(v) for k, v in zip(lines[::2], lines[1::2]) if v.lstrip("-").isdigit()}


def worker_timed(out: Path, name: str, c: int) -> tuple[float, float, int] | None:
    """The worker's own CPU per request over the snapshot window, in ms: preparing inputs
    (``prep_cpu_us``) and the handler's preprocess, forward and postprocess (``model_cpu_us``);
    and the requests it answered in that window."""
    a, b = stats(out / f"{name}-c{c}-stats0.txt"), stats(out / f"{name}-c{c}-stats1.txt")
    n = b.get("requests", 0) - a.get("requests", 0)
    if n <= 0 or "model_cpu_us" not in b:
        return None
    prep, model = ((b.get(k, 0) - a.get(k, 0)) / 1000.0 / n for k in ("prep_cpu_us", "model_cpu_us"))
    return prep, model, n


def single_image_ms(inprocs: list[dict[str, Any]]) -> float:
    """In-process latency of a lone image: the faster preprocessing plus batch 1 with all threads
    (the mean over ``inprocs``, the in-process runs around one served run)."""
    rows = (next(r for r in d["sweeps"][0]["rows"] if r["batch_size"] == 1) for d in inprocs)
    return statistics.mean(float(d["prep_ms"] + row["model_ms"]) for d, row in zip(inprocs, rows))


def best_one_thread_ms(inprocs: list[dict[str, Any]]) -> float:
    """Preprocessing + model per image at the best batch size, one thread: the limit's unit cost
    (the mean over ``inprocs``)."""
    best = []
    for d in inprocs:
        one = next(s for s in d["sweeps"] if s["threads"] == 1)
        best.append(min(float(d["prep_ms"] + r["model_ms"] / r["batch_size"]) for r in one["rows"]))
    return statistics.mean(best)


def repeat_figures(out: Path, r: int, seconds: float) -> dict[str, float]:
    f: dict[str, float] = {}
    for model, n in ((MB, 32), ("resnet18", 8)):
        before = load(out / f"r{r}-{model}-float32-inproc.json")
        after = load(out / f"r{r}-{model}-float32-inproc-after.json")
        served = level(out, f"r{r}-{model}-float32-n{n}-worker", 64)
        one = level(out, f"r{r}-{model}-float32-n{n}-worker", 1)
        if not before or not served:
            continue
        inproc = [before, after] if after else [before]
        key = "mb" if model == MB else "r18"
        limit = statistics.mean(d["machine_limit_ips"] for d in inproc)
        f[f"{key} limit"] = limit
        if after:
            f[f"{key} limit after / before"] = after["machine_limit_ips"] / before["machine_limit_ips"]
        f[f"{key} served 64"] = served["ok_per_s"]
        f[f"{key} served/limit"] = served["ok_per_s"] / limit
        if all(d.get("cores_at_once_ips") for d in inproc):  # what the cores did at once, if timed
            at_once = statistics.mean(d["cores_at_once_ips"] for d in inproc)
            f[f"{key} cores at once / limit"] = at_once / limit
            f[f"{key} served / cores at once"] = served["ok_per_s"] / at_once
        f[f"{key} p99/p50 64"] = served["p99_ms"] / served["p50_ms"]
        if one:
            f[f"{key} p50 1 client"] = one["p50_ms"]
            f[f"{key} in-process 1 image"] = single_image_ms(inproc)
            f[f"{key} p50 1 - in-process"] = one["p50_ms"] - single_image_ms(inproc)
        split = cpu_split(out, f"r{r}-{model}-float32-n{n}-worker", 64, served["ok_per_s"], seconds)
        if split:
            f[f"{key} CPU ms/req"] = split["total"]
            f[f"{key} CPU ms/req outside prep+forward"] = split["total"] - best_one_thread_ms(inproc)
            # the issue's own wording: the API's and the worker's CPU only (no Redis, no bench client)
            own = split.get("api", 0.0) + split.get("worker", 0.0)
            f[f"{key} CPU ms/req api+worker outside prep+forward"] = own - best_one_thread_ms(inproc)
            for g in ("api", "worker", "redis", "bench"):
                f[f"{key} CPU ms/req {g}"] = split.get(g, 0.0)
            timed = worker_timed(out, f"r{r}-{model}-float32-n{n}-worker", 64)
            if timed:  # the same figure with prep and model as the worker timed them in this run
                prep, model_ms, answered = timed
                f[f"{key} worker-timed prep ms/req"], f[f"{key} worker-timed model ms/req"] = prep, model_ms
                # the window's CPU over the requests the worker answered in it (its counters are
                # read beside the CPU snapshots), not over the load's mean rate: on a drifting host
                # the rate moves within a load, and resnet18's batches of 8 make a small count coarse
                own_answered = own * served["ok_per_s"] * seconds / answered
                f[f"{key} CPU ms/req api+worker outside prep+model, worker-timed"] = own_answered - prep - model_ms
                cores = inproc[0].get("cores")
                if cores:  # the limit at what the worker paid for each image in this window (no drift)
                    f[f"{key} served / limit at the worker-timed unit cost"] = (
                        served["ok_per_s"] * (prep + model_ms) / 1000.0 / cores
                    )
    mb1 = level(out, f"r{r}-{MB}-float32-n1-worker", 64)
    mb_api = level(out, f"r{r}-{MB}-float32-n32-api", 64)
    if mb1 and "mb served 64" in f:
        f["mb batch 32 / batch 1"] = f["mb served 64"] / mb1["ok_per_s"]
    if mb_api and "mb served 64" in f:
        f["mb api-side served 64"] = mb_api["ok_per_s"]
        f["mb worker-side / api-side"] = f["mb served 64"] / mb_api["ok_per_s"]
    fixed1 = level(out, f"r{r}-{MB}-float32-n32-fixedthreads", 1)
    fixed64 = level(out, f"r{r}-{MB}-float32-n32-fixedthreads", 64)
    if fixed1 and "mb p50 1 client" in f:
        f["mb p50 1 client, all threads always"] = fixed1["p50_ms"]
    if fixed64 and "mb served 64" in f:
        f["mb served 64, all threads always"] = fixed64["ok_per_s"]
        f["mb thread plan / all threads, served 64"] = f["mb served 64"] / fixed64["ok_per_s"]
    bf = level(out, f"r{r}-resnet18-bfloat16-n8-worker", 64)
    if bf and "r18 served 64" in f:
        f["r18 bf16 served 64"] = bf["ok_per_s"]
        f["r18 bf16 / float32 served"] = bf["ok_per_s"] / f["r18 served 64"]
    return f


def snapshot_window(out: Path, load_s: float | None = None) -> float:
    """cpu_check.sh's CPU snapshot window: 2 s short of the load's length (SECONDS_PER_LEVEL),
    given, or as the run's bench JSONs record it (``duration_s``), or its default of 10 s."""
    if load_s is None:
        docs = (load(p) for p in sorted(out.glob("r*-c64.json")))
        load_s = next((float(d["duration_s"]) for d in docs if d and d.get("duration_s")), 10.0)
    return load_s - 2


def main(argv: list[str]) -> int:
    out = Path(argv[0] if argv else "out/cpu")
    repeats = sorted({int(m.group(1)) for p in out.glob("r*-*.json") if (m := re.match(r"r(\d+)-", p.name))})
    seconds = snapshot_window(out, float(argv[1]) if len(argv) > 1 else None)
    rows = {r: repeat_figures(out, r, seconds) for r in repeats}
    keys = list(dict.fromkeys(k for f in rows.values() for k in f))
    print("| figure | " + " | ".join(f"repeat {r}" for r in repeats) + " | median |")
    print("|---|" + "---:|" * (len(repeats) + 1))
    for k in keys:
        vals = [rows[r].get(k) for r in repeats]
        present = [v for v in vals if v is not None]
        cells = [f"{v:.2f}" if v is not None else "—" for v in vals]
        print(f"| {k} | " + " | ".join(cells) + f" | **{statistics.median(present):.2f}** |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
