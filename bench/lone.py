"""Lone requests back to back on one keep-alive connection: what one client at a time sees.

    python bench/lone.py http://127.0.0.1:8000 mobilenet_v3_small 200

Prints the median latency, the median of the worker's own step (``infer_ms`` in the answer:
preprocess, forward and postprocess on its main thread), the median of their difference: the
path (HTTP, the API, Redis, queueing, and on a CPU with ``--preprocess worker`` the decoding), and
of that the median ``queue_ms``: from the API's enqueue to the step's start (the Redis hop, the
worker's take, decoding and the hand-over to the lane; whole milliseconds of the wall clock). Then
the median of each part of the answers' ``Server-Timing`` header (api, queue, prep, batch, infer:
``api/inference.py``'s ``server_timing``) and the rest of the client's time (``http``: the HTTP
exchange, the server's and this client's parsing). The images are ``redbatch bench``'s generated
640x480 JPEGs; the first 10 requests are not counted.
"""

from __future__ import annotations

import http.client
import json
import statistics
import sys
import time
from urllib.parse import urlsplit

from common.bench import load_bodies
from common.client import parse_server_timing

WARMUP = 10


def main(url: str, model: str, n: int) -> str:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=60)
    bodies = [b.data for b in load_bodies(None, (640, 480))]
    total_ms: list[float] = []
    infer_ms: list[float] = []
    queue_ms: list[float] = []
    spans: dict[str, list[float]] = {}
    for i in range(n + WARMUP):
        t0 = time.perf_counter()
        conn.request("POST", f"/v1/models/{model}/predict", bodies[i % len(bodies)], {"Content-Type": "image/jpeg"})
        resp = conn.getresponse()
        answer = json.loads(resp.read())
        timing = parse_server_timing(resp.getheader("Server-Timing"))
        if resp.status != 200:
            raise SystemExit(f"HTTP {resp.status}: {answer}")
        if i >= WARMUP:
            total_ms.append((time.perf_counter() - t0) * 1000.0)
            infer_ms.append(float(answer.get("infer_ms") or 0.0))
            queue_ms.append(float(answer.get("queue_ms") or 0.0))
            timing["http"] = total_ms[-1] - sum(timing.values())
            for name, ms in timing.items():
                spans.setdefault(name, []).append(ms)
    outside = statistics.median(t - f for t, f in zip(total_ms, infer_ms))
    queue = statistics.median(queue_ms)
    split = ", ".join(f"{name} {statistics.median(ms):.2f}" for name, ms in spans.items())
    return (
        f"p50 {statistics.median(total_ms):.2f} ms, step {statistics.median(infer_ms):.2f}, "
        f"outside {outside:.2f} (queue {queue:.1f}); {split}"
    )


if __name__ == "__main__":
    print(main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 200))
