"""The worker's Redis path alone: CPU per request of redis-server and of this process for taking
batches of B 89 KB JPEG frames through ``WorkerBroker`` and answering them (no API, no model).

    redis-server --port 6392 --save "" --appendonly no --daemonize yes --pidfile /tmp/r.pid
    PYTHONPATH=TREE python bench/broker_cost.py 6392 "$(cat /tmp/r.pid)" 8

Run it for two trees in alternating rounds (a ``git worktree`` of the baseline beside this one).
"""

from __future__ import annotations

import os
import sys
import time

import redis

from common.config import Settings
from common.protocol import Reply, Request, TensorData, encode_request, now_ms
from common.redisconn import connect
from worker.broker import Outgoing, WorkerBroker


def cpu_s(pid: str) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(port: int, redis_pid: str, batch: int) -> None:
    s = Settings(redis_url=f"redis://127.0.0.1:{port}/0", prefix=f"bc{os.getpid()}")
    r = redis.Redis(port=port)
    broker = WorkerBroker(connect(s, 2.0), s, "w")
    broker.register({"model": "resnet18"})
    blob = os.urandom(89_000)
    ids = [f"id{i:06d}" for i in range(batch)]
    deadline = now_ms() + 600_000
    frames = [encode_request(Request(i, "resnet18", deadline, TensorData("jpeg", (len(blob),), blob))) for i in ids]
    redis_used = mine_used = 0.0
    done = 0
    while done < max(2000, 40 * batch):
        r.rpush(s.keys.queue("resnet18"), *frames)  # not counted: the API's part
        r.rpush(s.keys.wake("resnet18"), "1")
        r0, w0 = cpu_s(redis_pid), time.process_time()
        got = broker.take(batch, 0.5)
        out = [Outgoing(g, Reply(i, True, result={"x": 1})) for i, g in zip(ids, got)]
        broker.send(out, {"requests": len(got)})
        redis_used += cpu_s(redis_pid) - r0
        mine_used += time.process_time() - w0
        done += len(got)
        r.delete(*[s.keys.reply(i) for i in ids])
    assert r.llen(s.keys.inflight("w")) == 0, "frames left in flight"
    print(f"B={batch:3d}: redis {1e6 * redis_used / done:5.0f} us/req, worker {1e6 * mine_used / done:5.0f} us/req")


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
