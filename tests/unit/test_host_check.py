"""bench/host_check.py: the machine facts each CPU section of the docs starts with."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))
import host_check  # noqa: E402

ZEN5 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC
stepping\t: 1
cpu MHz\t\t: 2596.126
flags\t\t: fpu avx2 hypervisor avx512f avx512_bf16 avx512_vnni avx512_vp2intersect

processor\t: 1
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC
"""
XEON = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 207
model name\t: Intel(R) Xeon(R) Processor
stepping\t: 2
cpu MHz\t\t: 2100.000
flags\t\t: avx2 avx512f avx512_bf16 avx512_fp16 amx_bf16 amx_tile
"""
NESTED = "console=ttyS0 nested_pvm=1 cpuidle_haltpoll.force=1 haltpoll.guest_halt_poll_ns=0 rdinit=/init -- --x"


def test_facts_name_the_generation_and_the_instructions_that_decide_bfloat16() -> None:
    f = host_check.cpu_facts(ZEN5, NESTED, "haltpoll")
    assert f["cpu"] == "AMD EPYC"
    assert f["vendor, family, model, stepping"] == "AuthenticAMD, 26, 2, 1"  # the first CPU's
    assert f["vCPUs"] == "2"
    assert f["instructions"] == "avx2 avx512f avx512_bf16 avx512_vnni"  # no AMX, no fp16
    assert "guest of a guest" in f["virtualised"]
    assert f["idle"] == "cpuidle driver haltpoll, guest_halt_poll_ns=0 on the kernel's command line"


def test_an_intel_with_amx_and_no_nesting() -> None:
    f = host_check.cpu_facts(XEON, "console=ttyS0 quiet")
    assert f["vendor, family, model, stepping"] == "GenuineIntel, 6, 207, 2"
    assert "amx_tile amx_bf16" in f["instructions"]
    assert f["virtualised"] == "no hypervisor flag"
    assert f["idle"] == "cpuidle driver none"


def test_no_interesting_instruction_is_said_so() -> None:
    assert host_check.cpu_facts("flags\t: fpu sse2\n")["instructions"].startswith("none of avx2")


@pytest.mark.skipif(len(host_check.usable_cpus()) < 2, reason="the wake-up needs two CPUs to pin to")
def test_it_prints_the_facts_the_drift_and_three_wakeups() -> None:
    out = subprocess.run(
        [sys.executable, str(BENCH / "host_check.py"), "--drift-s", "0.6", "--rounds", "50"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert re.search(r"^vendor, family, model, stepping: \S", out, re.M)
    m = re.search(r"min ([\d.]+) median ([\d.]+) max ([\d.]+) ms$", out, re.M)
    assert m and 0 < float(m[1]) <= float(m[2]) <= float(m[3])
    wake = re.findall(r"(\d+) µs (back to back|after [\d.]+ ms idle)", out)
    assert [w[1] for w in wake] == ["back to back", "after 0.2 ms idle", "after 1 ms idle"]
    assert all(int(w[0]) > 0 for w in wake)
