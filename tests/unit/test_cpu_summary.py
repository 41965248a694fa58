"""bench/cpu_summary.py: ratios are taken within a repeat, medians across repeats."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import cpu_summary

MB = "mobilenet_v3_small"


def _level(rps: float, p50: float = 100.0, p99: float = 150.0) -> dict:
    return {"levels": [{"ok_per_s": rps, "p50_ms": p50, "p99_ms": p99}]}


def _inproc(limit: float) -> dict:
    rows = [{"batch_size": 1, "model_ms": 10.0}, {"batch_size": 8, "model_ms": 40.0}]
    return {
        "machine_limit_ips": limit,
        "cores": 2,
        "prep_ms": 3.0,
        "sweeps": [{"threads": 2, "rows": rows}, {"threads": 1, "rows": rows}],
    }


def _write(out: Path, name: str, doc: dict) -> None:
    (out / f"{name}.json").write_text(json.dumps(doc))


def test_each_repeat_is_compared_with_its_own_limit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for r, limit, served in ((1, 200.0, 100.0), (2, 100.0, 80.0), (3, 400.0, 100.0)):
        _write(tmp_path, f"r{r}-{MB}-float32-inproc", _inproc(limit))
        _write(tmp_path, f"r{r}-{MB}-float32-n32-worker-c64", _level(served))
        _write(tmp_path, f"r{r}-{MB}-float32-n32-worker-c1", _level(20.0, p50=18.0))
        _write(tmp_path, f"r{r}-{MB}-float32-n1-worker-c64", _level(served / 2))
        _write(tmp_path, f"r{r}-{MB}-float32-n32-fixedthreads-c64", _level(served / 1.25))
        _write(tmp_path, f"r{r}-{MB}-float32-n32-fixedthreads-c1", _level(15.0, p50=30.0))
        # 10 s of snapshot window at ``served`` req/s: CPU seconds = ms/request * served * 10 / 1000
        _write(
            tmp_path,
            f"r{r}-{MB}-float32-n32-worker-c64-cpu0",
            {"api": {"1": 0.0}, "worker": {"2": 0.0}, "redis": {"3": 0.0}},
        )
        _write(
            tmp_path,
            f"r{r}-{MB}-float32-n32-worker-c64-cpu1",
            {"api": {"1": 2 * served / 100}, "worker": {"2": 10 * served / 100}, "redis": {"3": served / 100}},
        )

        # the worker's own counters over the same window, as redis-cli prints HGETALL
        stats = f"r{r}-{MB}-float32-n32-worker-c64-stats"
        (tmp_path / f"{stats}0.txt").write_text("requests\n100\nprep_cpu_us\n100000\nmodel_cpu_us\n200000\n")
        # (as many requests as the load's rate gives the window: 10 s at ``served`` req/s)
        answered = int(served * 10)
        (tmp_path / f"{stats}1.txt").write_text(
            f"requests\n{100 + answered}\nprep_cpu_us\n{100000 + 3000 * answered}\n"
            f"model_cpu_us\n{200000 + 6000 * answered}\n"
        )

    figures = cpu_summary.repeat_figures(tmp_path, 2, seconds=10.0)
    assert figures["mb served/limit"] == pytest.approx(0.8)  # 80 / 100: repeat 2's own limit
    assert figures["mb batch 32 / batch 1"] == pytest.approx(2.0)
    assert figures["mb p99/p50 64"] == pytest.approx(1.5)
    assert figures["mb in-process 1 image"] == pytest.approx(13.0)  # prep 3 + batch 1 at 10 ms
    assert figures["mb p50 1 - in-process"] == pytest.approx(5.0)
    assert figures["mb thread plan / all threads, served 64"] == pytest.approx(1.25)
    assert figures["mb p50 1 client, all threads always"] == pytest.approx(30.0)
    assert figures["mb CPU ms/req api"] == pytest.approx(2.0) and figures["mb CPU ms/req"] == pytest.approx(13.0)
    assert figures["mb CPU ms/req outside prep+forward"] == pytest.approx(13.0 - 8.0)  # best: 3 + 40 / 8
    assert figures["mb CPU ms/req api+worker outside prep+forward"] == pytest.approx(12.0 - 8.0)  # Redis's 1 left out
    # 800 requests took 3 ms of preparing and 6 ms of model CPU each, as the worker timed them
    assert figures["mb worker-timed prep ms/req"] == pytest.approx(3.0)
    assert figures["mb worker-timed model ms/req"] == pytest.approx(6.0)
    assert figures["mb CPU ms/req api+worker outside prep+model, worker-timed"] == pytest.approx(12.0 - 9.0)
    # at 9 ms an image of the worker's own, 2 cores give 222 img/s in the same window: 80 of that
    assert figures["mb served / limit at the worker-timed unit cost"] == pytest.approx(80 * 9.0 / 1000 / 2)

    assert cpu_summary.main([str(tmp_path), "12"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| mb served/limit |"))
    assert row.split("|")[1:-1] == [" mb served/limit ", " 0.50 ", " 0.80 ", " 0.25 ", " **0.50** "]


def test_a_limit_timed_on_both_sides_of_the_served_run_counts_as_their_mean(tmp_path: Path) -> None:
    """The machine drifts between the in-process run and the served one: with a second in-process
    run after it, the limit (and the in-process unit costs) are the mean of the two."""
    _write(tmp_path, f"r1-{MB}-float32-inproc", _inproc(200.0))
    after = _inproc(300.0)
    after["prep_ms"] = 5.0  # unit cost 5 + 40 / 8 = 10 ms, against 3 + 5 = 8 before
    _write(tmp_path, f"r1-{MB}-float32-inproc-after", after)
    _write(tmp_path, f"r1-{MB}-float32-n32-worker-c64", _level(200.0))
    _write(tmp_path, f"r1-{MB}-float32-n32-worker-c1", _level(20.0, p50=18.0))
    _write(tmp_path, f"r1-{MB}-float32-n32-worker-c64-cpu0", {"api": {"1": 0.0}, "worker": {"2": 0.0}})
    _write(tmp_path, f"r1-{MB}-float32-n32-worker-c64-cpu1", {"api": {"1": 2.0}, "worker": {"2": 20.0}})
    figures = cpu_summary.repeat_figures(tmp_path, 1, seconds=10.0)
    assert figures["mb limit"] == pytest.approx(250.0)
    assert figures["mb served/limit"] == pytest.approx(0.8)
    assert figures["mb limit after / before"] == pytest.approx(1.5)
    assert figures["mb in-process 1 image"] == pytest.approx(14.0)  # (3 + 10) and (5 + 10)
    # 22 CPU seconds over 2,000 requests: 11 ms each, against a unit cost of (8 + 10) / 2
    assert figures["mb CPU ms/req api+worker outside prep+forward"] == pytest.approx(11.0 - 9.0)


def test_the_cpu_window_comes_from_the_runs_own_load_length(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Run by hand without SECONDS_PER_LEVEL, a run made with SECONDS_PER_LEVEL=8 counts its CPU
    over the 6 s its snapshots were apart, as its bench JSONs say, not over a default."""
    _write(tmp_path, f"r1-{MB}-float32-inproc", _inproc(200.0))
    _write(tmp_path, f"r1-{MB}-float32-n32-worker-c64", {"duration_s": 8.0, **_level(100.0)})
    _write(tmp_path, f"r1-{MB}-float32-n32-worker-c64-cpu0", {"api": {"1": 0.0}, "worker": {"2": 0.0}})
    _write(tmp_path, f"r1-{MB}-float32-n32-worker-c64-cpu1", {"api": {"1": 0.6}, "worker": {"2": 6.0}})
    assert cpu_summary.snapshot_window(tmp_path) == pytest.approx(6.0)
    assert cpu_summary.main([str(tmp_path)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| mb CPU ms/req api |"))
    assert row.split("|")[1:-1] == [" mb CPU ms/req api ", " 1.00 ", " **1.00** "]  # 0.6 s over 600 requests


def test_what_the_cores_did_at_once_is_set_against_the_limit_and_served(tmp_path: Path) -> None:
    """The in-process runs time every core at once too: the summary gives that against the limit
    (how far the cores slow each other) and served against it; runs made before it have neither."""
    for name, at_once in (("inproc", 160.0), ("inproc-after", 200.0)):
        doc = _inproc(200.0)
        doc["cores_at_once_ips"] = at_once
        _write(tmp_path, f"r1-{MB}-float32-{name}", doc)
    _write(tmp_path, f"r1-{MB}-float32-n32-worker-c64", _level(144.0))
    figures = cpu_summary.repeat_figures(tmp_path, 1, seconds=10.0)
    assert figures["mb cores at once / limit"] == pytest.approx(0.9)  # the mean of 160 and 200, over 200
    assert figures["mb served / cores at once"] == pytest.approx(0.8)  # 144 / 180

    older = _inproc(200.0)  # a run from before the measurement: no row rather than a wrong one
    _write(tmp_path, f"r1-{MB}-float32-inproc-after", older)
    assert "mb cores at once / limit" not in cpu_summary.repeat_figures(tmp_path, 1, seconds=10.0)


def test_the_worker_timed_figure_counts_the_requests_the_worker_answered_in_the_window(tmp_path: Path) -> None:
    """The load's mean rate says 800 requests fell in the CPU window, the worker's own counters
    (read beside the CPU snapshots) say 1000: the worker-timed figure divides by the worker's."""
    _write(tmp_path, f"r1-{MB}-float32-inproc", _inproc(200.0))
    _write(tmp_path, f"r1-{MB}-float32-n32-worker-c64", _level(80.0))
    _write(tmp_path, f"r1-{MB}-float32-n32-worker-c64-cpu0", {"api": {"1": 0.0}, "worker": {"2": 0.0}})
    _write(tmp_path, f"r1-{MB}-float32-n32-worker-c64-cpu1", {"api": {"1": 1.0}, "worker": {"2": 9.0}})
    stats = f"r1-{MB}-float32-n32-worker-c64-stats"
    (tmp_path / f"{stats}0.txt").write_text("requests\n0\nprep_cpu_us\n0\nmodel_cpu_us\n0\n")
    (tmp_path / f"{stats}1.txt").write_text("requests\n1000\nprep_cpu_us\n3000000\nmodel_cpu_us\n6000000\n")
    figures = cpu_summary.repeat_figures(tmp_path, 1, seconds=10.0)
    assert figures["mb CPU ms/req api+worker outside prep+forward"] == pytest.approx(10_000 / 800 - 8.0)
    assert figures["mb CPU ms/req api+worker outside prep+model, worker-timed"] == pytest.approx(10_000 / 1000 - 9.0)
