"""A worker without a model, to measure what the serving path itself costs (HTTP, the API, Redis).

It registers like a real worker (a 224x224 classifier that takes JPEGs), takes frames the way the
real one does (atomically into its in-flight list, blocking on the doorbell when idle), decodes
each request frame and answers it at once with a fixed top-5, in one pipelined round trip per
take. Whatever a benchmark then measures is the path, not a model.

    REDBATCH_REDIS_URL=redis://127.0.0.1:6379/0 python bench/null_worker.py [MODEL_NAME]
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time

from common.config import Settings
from common.errors import FrameError
from common.protocol import Reply, decode_request, now_ms
from common.redisconn import connect
from worker.broker import Outgoing, WorkerBroker

SPEC = {
    "shape": [224, 224, 3],
    "dtype": "uint8",
    "resize_size": 256,
    "crop_size": 224,
    "interpolation": "bilinear",
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "accepts": ["uint8", "jpeg"],
}
RESULT = {"indices": [1, 2, 3, 4, 5], "scores": [0.5, 0.2, 0.1, 0.1, 0.05], "labels": ["a", "b", "c", "d", "e"]}
MAX_TAKE = 64


def main() -> int:
    model = sys.argv[1] if len(sys.argv) > 1 else "null"
    settings = Settings.from_env().replace(model=model)
    worker_id = f"null-{socket.gethostname()}-{os.getpid()}"
    broker = WorkerBroker(connect(settings, 1.0), settings, worker_id)
    fields: dict[str, str | int] = {
        "model": model,
        "arch": "null",
        "device": "cpu",
        "dtype": "float32",
        "max_batch_size": MAX_TAKE,
        "spec": json.dumps(SPEC),
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started_ms": now_ms(),
    }
    stop = False

    def on_term(_sig: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    registered = 0.0
    while not stop:
        if time.monotonic() - registered > settings.heartbeat_s:
            broker.register(fields)
            registered = time.monotonic()
        raws = broker.take(MAX_TAKE, 0.5)
        out = []
        for raw in raws:
            try:
                req = decode_request(raw)
            except FrameError:
                out.append(Outgoing(raw, None))
                continue
            meta = {"worker": worker_id, "batch_size": len(raws), "queue_ms": 0, "infer_ms": 0}
            out.append(Outgoing(raw, Reply(req.id, True, result=RESULT, meta=meta)))
        if out:
            broker.send(out, {"requests": len(out), "batches": 1, "items": len(out)})
    broker.unregister()
    return 0


if __name__ == "__main__":
    sys.exit(main())
