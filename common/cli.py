"""The ``redbatch`` command: ``api``, ``worker``, ``up``, ``bench``, ``predict`` and ``top``. Each side is
imported only when used, so ``redbatch api`` never imports torch."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import MutableMapping

from common.config import WORKER_FLAGS, Settings, add_flags, settings_from_args
from common.logs import configure

API_HELP = "serve the HTTP API (gunicorn, no torch)"
# libgomp's spins before an idle OpenMP thread sleeps: 0.6-1.3 ms on a 2-core Xeon (bench/omp_spin.py)
OMP_SPIN_COUNT = "30000"


def openmp_defaults(env: MutableMapping[str, str], adaptive_threads: bool = True) -> None:
    """How the worker's idle OpenMP threads wait, unless ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``
    is set: a short spin with the thread plan (which keeps passes that have company on one thread),
    sleeping at once without it (every pass then runs on all threads, beside the decoding)."""
    if "OMP_WAIT_POLICY" not in env and "GOMP_SPINCOUNT" not in env:
        if adaptive_threads:
            env["GOMP_SPINCOUNT"] = OMP_SPIN_COUNT
        else:
            env["OMP_WAIT_POLICY"] = "PASSIVE"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["api"]:
        return _api(argv[1:])
    parser = argparse.ArgumentParser(prog="redbatch", description="Redis-backed dynamic batching for PyTorch models")
    sub = parser.add_subparsers(dest="command", required=True)

    from api import server
    from common import bench, predict, top, up

    p_api = sub.add_parser("api", help=API_HELP)
    server.add_arguments(p_api)
    p_worker = sub.add_parser("worker", help="run a batching worker for one model on one device")
    add_flags(p_worker, WORKER_FLAGS)
    p_up = sub.add_parser("up", help="Redis (if needed), a worker and the API, in one command")
    up.add_arguments(p_up)
    p_bench = sub.add_parser("bench", help="closed-loop HTTP load on a service, or --in-process: the model's own limit")
    bench.add_arguments(p_bench)
    p_predict = sub.add_parser("predict", help="classify images with a running service; print labels and scores")
    predict.add_arguments(p_predict)
    p_top = sub.add_parser("top", help="live view of queues, workers, rates and batch sizes, read from Redis")
    add_flags(p_top, ("redis_url", "prefix", "log_level"))
    top.add_arguments(p_top)

    args = parser.parse_args(argv)
    settings = _settings(parser, args)
    if args.command == "worker":
        # Read once, when torch loads OpenMP. libgomp's default spins ~6 ms after every parallel
        # region, on cores the worker's own decoding, the API and Redis share (20-30 % of the
        # served throughput); sleeping at once (PASSIVE) makes a pass on two threads pay a
        # wake-up at each of its hundreds of regions (resnet18's lone pass: 22 ms against 17). A
        # short spin bridges the gaps inside a pass and stops soon after it; the worker runs a
        # pass on several threads only when nothing else wants the cores (worker/runner.py).
        openmp_defaults(os.environ, settings.adaptive_threads)
        if settings.instances != 1:  # a supervisor of worker processes, which never imports torch
            from worker import instances

            return instances.run(settings)
        from worker import main as worker_main

        return worker_main.run(settings)
    if args.command == "bench":
        if args.in_process:
            from worker import bench_inprocess

            return bench_inprocess.run(args)
        return bench.run(args)
    if args.command == "predict":
        return predict.run(args)
    if args.command == "top":
        return top.run(settings, args.interval_s, args.once)
    return up.run(settings, args)


def _api(argv: list[str]) -> int:
    """``redbatch api``, parsed apart from the other commands so that gunicorn's master process never
    imports redis-py (the other commands' modules do): gevent then patches every module that uses
    ``ssl`` in the processes it forks, and warns about none."""
    from api import server

    parser = argparse.ArgumentParser(prog="redbatch api", description=API_HELP)
    server.add_arguments(parser)
    return server.run(_settings(parser, parser.parse_args(argv)))


def _settings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Settings:
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    configure(settings.log_level)
    return settings


if __name__ == "__main__":
    sys.exit(main())
