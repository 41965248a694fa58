"""The ``redbatch`` command: ``api``, ``worker``, ``up``, ``bench``, ``predict`` and ``top``. Each side is
imported only when used, so ``redbatch api`` never imports torch."""

from __future__ import annotations

import argparse
import os
import sys

from common.config import WORKER_FLAGS, add_flags, settings_from_args
from common.logs import configure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="redbatch", description="Redis-backed dynamic batching for PyTorch models")
    sub = parser.add_subparsers(dest="command", required=True)

    from api import server
    from common import bench, predict, top, up

    p_api = sub.add_parser("api", help="serve the HTTP API (gunicorn, no torch)")
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
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    configure(settings.log_level)
    if args.command == "api":
        return server.run(settings)
    if args.command == "worker":
        # Read once, when torch loads OpenMP: idle OpenMP threads then sleep instead of spinning,
        # which on a CPU shared with the worker's own decoding, the API and Redis cost 20-30 % of
        # the served throughput (docs/benchmarks.md). Set it yourself to override.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
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


if __name__ == "__main__":
    sys.exit(main())
