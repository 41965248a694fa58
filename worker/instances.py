"""``redbatch worker --instances N``: N worker processes for one model on one device, supervised.

Triton's ``instance_group { count: N }`` for this service: each instance is a whole ``redbatch
worker`` (its own copy of the model, its own Redis connections, its own registration), so N of them
take batches from the same queue exactly as workers on N machines would. What it buys is N Python
interpreters: on a GPU one worker's Python per request (taking frames, decoding JPEGs on nvjpeg,
cropping, replying) is the bound long before the GPU is (docs/benchmarks.md: one process on an H200
kept the GPU 40-49 % busy), and N processes issue work to the GPU side by side.

This process imports no torch. It starts the instances, each in a session of its own so that a
terminal's Ctrl-C reaches only it, and hands a SIGTERM or SIGINT on to them once (a worker
finishes its batch and exits), a second one too (a worker then exits at once). An instance that exits
with ``START_FAILED`` (bad options, a model that does not load) stops them all: starting it again
would fail again. One that dies later (a crash, the OOM killer) is started again, its unanswered
frames recovered by the others once its registration lapses; one that keeps dying within
``CRASH_WINDOW_S`` of its start stops them all. With ``--metrics-port`` this process serves the
instances' metrics added up (prometheus_client's multiprocess mode, ``worker/metrics.py``).
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from types import FrameType

from prometheus_client import multiprocess

from common.config import Settings
from common.up import child_env

logger = logging.getLogger(__name__)

START_FAILED = 3  # the exit status of a worker that could not start (gunicorn's WORKER_BOOT_ERROR)
CRASH_WINDOW_S = 60.0  # an instance that dies this soon after its start, twice in a row, is not restarted
STOP_GRACE_S = 30.0  # how long the instances have to finish their batches after a signal
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


@dataclass
class Instance:
    index: int
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    quick_deaths: int = 0

    def start(self) -> None:
        cmd = [sys.executable, "-m", "common.cli", "worker"]
        self.proc = subprocess.Popen(cmd, env=self.env, start_new_session=True, preexec_fn=_die_with_parent)
        self.started = time.monotonic()
        logger.info("instance %d started (pid %d)", self.index, self.proc.pid)


def instance_settings(settings: Settings, cpus: int) -> Settings:
    """What each instance of ``settings.instances`` runs with: one instance, no metrics port of its
    own (the supervisor serves them all) and, unless ``--torch-threads`` is set, an equal share of
    the CPUs."""
    return settings.replace(
        instances=1, metrics_port=0, torch_threads=settings.torch_threads or max(1, cpus // settings.instances)
    )


def run(settings: Settings) -> int:
    """Start ``settings.instances`` workers and supervise them until a signal; their exit status."""
    if settings.instances < 1:
        raise SystemExit("--instances must be at least 1")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    env = child_env(instance_settings(settings, cpus))
    metrics_dir = ""
    if settings.metrics_port:  # the instances write their values there; this process serves their sum
        metrics_dir = tempfile.mkdtemp(prefix="redbatch-instances-metrics-")
        env[MULTIPROC_ENV] = metrics_dir
    instances = [Instance(i, env) for i in range(settings.instances)]
    try:
        return _supervise(settings, instances, metrics_dir)
    finally:
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _supervise(settings: Settings, instances: list[Instance], metrics_dir: str) -> int:
    stopping: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if not stopping:
            logger.info("signal %d: stopping %d instance(s) after their current batches", signum, len(instances))
        else:  # a second signal: each instance, signalled a second time, exits at once
            logger.warning("second signal: the instances exit at once")
            _signal_live(instances)
        stopping.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if metrics_dir:  # before any instance starts: a port in use stops nothing but this process
        from worker.metrics import serve_instances

        serve_instances(settings, metrics_dir, lambda: {i.proc.pid for i in instances if i.proc is not None})
    logger.info("starting %d instances of %s", len(instances), settings.served_name)
    for inst in instances:
        inst.start()
    status = 0
    while not stopping and not status:
        for inst in instances:
            if status := _tend(inst, metrics_dir):
                break
        else:
            time.sleep(0.5)  # supervision of processes, not of work
    _stop(instances)
    return status


def _tend(inst: Instance, metrics_dir: str) -> int:
    """Start ``inst`` again if it died while serving; 0, or the status to stop everything with."""
    assert inst.proc is not None
    code = inst.proc.poll()
    if code is None:
        return 0
    if metrics_dir:  # its live gauges leave the sum
        multiprocess.mark_process_dead(inst.proc.pid, metrics_dir)  # type: ignore[no-untyped-call]
    if code == START_FAILED:
        logger.error("instance %d could not start (status %d); stopping the others", inst.index, code)
        return code
    if _crash_looping(inst):
        logger.error("instance %d exited with status %d twice within %.0fs of its start; stopping",
                     inst.index, code, CRASH_WINDOW_S)  # fmt: skip
        return 1
    logger.warning("instance %d exited with status %d; starting it again", inst.index, code)
    inst.start()
    return 0


def _crash_looping(inst: Instance) -> bool:
    inst.quick_deaths = inst.quick_deaths + 1 if time.monotonic() - inst.started < CRASH_WINDOW_S else 0
    return inst.quick_deaths >= 2


def _signal_live(instances: list[Instance]) -> list[subprocess.Popen[bytes]]:
    """SIGTERM to every instance still running; those instances."""
    live = [i.proc for i in instances if i.proc is not None and i.proc.poll() is None]
    for p in live:
        p.send_signal(signal.SIGTERM)
    return live


def _stop(instances: list[Instance]) -> None:
    """SIGTERM once to every live instance, then wait for all; SIGKILL what is left after the grace."""
    live = _signal_live(instances)
    deadline = time.monotonic() + STOP_GRACE_S
    for p in live:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.warning("instance pid %d did not stop in %.0fs; killing it", p.pid, STOP_GRACE_S)
            p.kill()
            p.wait()


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the supervisor dies, even by SIGKILL (Linux only)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
