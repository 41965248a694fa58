"""bench/omp_spin.py: each way is measured in a process that waits the way it names."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))
import omp_spin  # noqa: E402


def test_each_way_sets_only_its_own_openmp_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # inherited settings must not leak into a way
    monkeypatch.setenv("GOMP_SPINCOUNT", "5")
    assert omp_spin.env_for("30000")["GOMP_SPINCOUNT"] == "30000"
    assert "OMP_WAIT_POLICY" not in omp_spin.env_for("30000")
    assert omp_spin.env_for("passive")["OMP_WAIT_POLICY"] == "PASSIVE"
    assert "GOMP_SPINCOUNT" not in omp_spin.env_for("passive")
    default = omp_spin.env_for("default")
    assert "OMP_WAIT_POLICY" not in default and "GOMP_SPINCOUNT" not in default
    with pytest.raises(ValueError):
        omp_spin.env_for("fast")


def test_it_prints_a_row_of_cpu_and_wall_time_for_each_way() -> None:
    pytest.importorskip("torch")
    out = subprocess.run(
        [sys.executable, str(BENCH / "omp_spin.py"), "passive", "1000"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    rows = re.findall(r"^\| (\S+) \| ([\d.]+) \| ([\d.]+) \|$", out, re.M)
    assert [r[0] for r in rows] == ["passive", "GOMP_SPINCOUNT=1000"]
    assert all(float(cpu) > 0 and float(wall) > 0 for _, cpu, wall in rows)
