"""The worker's Redis I/O against a real redis-server: blocking pops, in-flight records, replies, recovery."""

from __future__ import annotations

import threading
import time

import redis

from common.config import Settings
from common.protocol import Request, TensorData, decode_reply, encode_request, now_ms
from common.queues import Enqueuer
from common.redisconn import connect
from worker.broker import Outgoing, WorkerBroker

FAR = now_ms() + 3_600_000


def _frame(i: int, deadline_ms: int | None = None, model: str = "resnet18") -> bytes:
    return encode_request(
        Request(
            id=f"req{i}",
            model=model,
            deadline_ms=deadline_ms or FAR,
            input=TensorData("uint8", (1, 1, 3), bytes([i % 256] * 3)),
        )
    )


def _broker(settings: Settings, wid: str = "w1") -> WorkerBroker:
    return WorkerBroker(connect(settings, 2.0), settings, wid)


def test_take_blocks_until_a_frame_arrives_then_returns_at_once(settings: Settings, r: redis.Redis) -> None:
    broker = _broker(settings)
    enqueuer = Enqueuer(r, settings.keys)
    pusher = threading.Timer(0.3, lambda: enqueuer.push("resnet18", _frame(1), "normal", 100))
    t0 = time.monotonic()
    pusher.start()
    got = broker.take(8, block_s=5.0)
    waited = time.monotonic() - t0
    assert got == [_frame(1)]
    assert 0.25 < waited < 2.0  # woke on the push, long before the 5 s block ran out


def test_take_times_out_empty_on_an_idle_queue(settings: Settings) -> None:
    t0 = time.monotonic()
    assert _broker(settings).take(8, block_s=0.2) == []
    assert time.monotonic() - t0 >= 0.19


def test_take_moves_up_to_max_frames_into_the_inflight_list(settings: Settings, r: redis.Redis) -> None:
    keys = settings.keys
    frames = [_frame(i) for i in range(5)]
    for f in frames:
        Enqueuer(r, keys).push("resnet18", f, "normal", 100)
    broker = _broker(settings)
    got = broker.take(3, block_s=1.0)
    assert got == frames[:3]
    assert r.lrange(keys.inflight("w1"), 0, -1) == frames[:3]
    assert r.lrange(keys.queue("resnet18"), 0, -1) == frames[3:]
    assert broker.left == 2  # what the worker knows waits behind its batch
    Enqueuer(r, keys).push("resnet18", _frame(9), "high", 100)
    assert broker.take(8, block_s=1.0) == [_frame(9), *frames[3:]]
    assert broker.left == 0


def test_send_replies_with_a_ttl_and_clears_the_inflight_record(settings: Settings, r: redis.Redis) -> None:
    from common.protocol import Reply

    keys = settings.keys
    r.rpush(keys.queue("resnet18"), _frame(1), _frame(2))
    broker = _broker(settings)
    raws = broker.take(2, 1.0)
    broker.send(
        [Outgoing(raws[0], Reply("req1", True, result={"x": 1})), Outgoing(raws[1], None)],
        {"requests": 2, "items": 1, "errors": 1},
    )
    assert r.llen(keys.inflight("w1")) == 0
    assert 0 < r.pttl(keys.reply("req1")) <= settings.reply_ttl_s * 1000
    assert decode_reply(r.lpop(keys.reply("req1"))).result == {"x": 1}
    assert r.hgetall(keys.stats("resnet18")) == {b"requests": b"2", b"items": b"1", b"errors": b"1"}


def test_dead_workers_frames_go_back_to_the_head_in_order_or_expire(settings: Settings, r: redis.Redis) -> None:
    keys = settings.keys
    q = keys.queue("resnet18")
    r.rpush(q, _frame(9))  # newer work, already queued
    dead = keys.inflight("dead-worker")
    expired = _frame(3, deadline_ms=now_ms() - 1000)
    r.rpush(dead, _frame(1), _frame(2), expired, b"\x00garbage")
    live = _broker(settings, "live")
    assert live.recover_dead(scan=True) == 4
    assert r.lrange(q, 0, -1) == [_frame(1), _frame(2), _frame(9)]
    late = decode_reply(r.lpop(keys.reply("req3")))
    assert not late.ok and late.error is not None and late.error["code"] == "deadline_exceeded"
    assert r.exists(dead) == 0 and r.llen(keys.inflight("live")) == 0


def test_a_live_workers_inflight_list_is_left_alone(settings: Settings, r: redis.Redis) -> None:
    keys = settings.keys
    other = _broker(settings, "other")
    other.register({"model": "resnet18", "max_batch_size": 4, "spec": "{}"})
    r.rpush(keys.inflight("other"), _frame(1))
    assert _broker(settings, "me").recover_dead() == 0
    assert r.llen(keys.inflight("other")) == 1


def test_registration_expires_without_heartbeats(settings: Settings, r: redis.Redis) -> None:
    s = settings.replace(worker_ttl_s=0.3)
    _broker(s).register({"model": "m", "max_batch_size": 4, "spec": "{}"})
    assert r.exists(s.keys.worker("w1"))
    time.sleep(0.5)
    assert not r.exists(s.keys.worker("w1"))


def test_a_registered_worker_that_stops_heartbeating_is_recovered_and_forgotten(
    settings: Settings, r: redis.Redis
) -> None:
    keys = settings.keys
    short = settings.replace(worker_ttl_s=0.2)
    _broker(short, "doomed").register({"model": "resnet18", "max_batch_size": 4, "spec": "{}"})
    Enqueuer(r, keys).push("resnet18", _frame(1), "normal", 100)
    assert _broker(short, "doomed").take(4, 1.0) == [_frame(1)]
    survivor = _broker(settings, "survivor")
    assert survivor.recover_dead() == 0  # still registered: its frames are its own
    time.sleep(0.3)  # no heartbeat: the registration expires
    assert survivor.recover_dead() == 1  # found through the registry set, no keyspace scan
    assert r.lrange(keys.queue("resnet18"), 0, -1) == [_frame(1)]
    assert b"doomed" not in r.smembers(keys.workers())


def test_a_frame_pushed_without_the_doorbell_is_still_found(settings: Settings, r: redis.Redis) -> None:
    r.rpush(settings.keys.queue("resnet18"), _frame(1))  # e.g. by hand with redis-cli
    assert _broker(settings).take(8, block_s=0.2) == [_frame(1)]


def test_high_priority_goes_first_and_low_keeps_a_share(settings: Settings, r: redis.Redis) -> None:
    enq = Enqueuer(r, settings.keys)
    for i in range(30):
        enq.push("resnet18", _frame(100 + i), "low", 1000)
    for i in range(30):
        enq.push("resnet18", _frame(200 + i), "normal", 1000)
    for i in range(5):
        enq.push("resnet18", _frame(300 + i), "high", 1000)
    broker = _broker(settings)
    first = broker.take(10, 1.0)
    assert first[:5] == [_frame(300 + i) for i in range(5)]  # every high frame, in order, first
    assert _frame(100) in first  # 10 slots x 10 %: one for the waiting low frames
    taken = list(first)
    while len(taken) < 65:
        taken.extend(broker.take(10, 1.0))
    lows = [i for i, f in enumerate(taken) if f in {_frame(100 + i) for i in range(30)}]
    assert len(lows) == 30 and lows[2] < 40  # low is not starved behind the 30 normal frames


def test_the_bound_counts_all_priorities(settings: Settings, r: redis.Redis) -> None:
    enq = Enqueuer(r, settings.keys)
    assert [enq.push("m", _frame(i, model="m"), p, 3) for i, p in enumerate(["high", "low", "normal"])] == [1, 2, 3]
    assert enq.push("m", _frame(9, model="m"), "high", 3) == -1
    keys = settings.keys
    queued = [f for p in ("high", "normal", "low") for f in r.lrange(keys.queue("m", p), 0, -1)]
    assert len(queued) == 3 and _frame(9, model="m") not in queued  # the refused frame left no trace


def test_racing_takers_get_every_frame_exactly_once(settings: Settings, r: redis.Redis) -> None:
    enq = Enqueuer(r, settings.keys)
    frames = [_frame(i) for i in range(300)]
    got: dict[str, list[bytes]] = {"a": [], "b": [], "c": []}

    def drain(wid: str) -> None:
        broker = _broker(settings, wid)
        while sum(map(len, got.values())) < len(frames):
            got[wid].extend(broker.take(7, 0.2))

    threads = [threading.Thread(target=drain, args=(w,)) for w in got]
    for t in threads:
        t.start()
    for f in frames:  # pushed while the takers run, so their plans and moves interleave
        enq.push("resnet18", f, "normal", 1000)
    for t in threads:
        t.join(timeout=30)
    taken = [f for mine in got.values() for f in mine]
    assert sorted(taken) == sorted(frames)  # none lost, none twice
    for wid, mine in got.items():  # each frame sits in the in-flight list of the worker that took it
        assert r.lrange(settings.keys.inflight(wid), 0, -1) == mine


def test_an_idle_peer_is_woken_while_frames_remain(settings: Settings, r: redis.Redis) -> None:
    enq = Enqueuer(r, settings.keys)
    for i in range(6):
        enq.push("resnet18", _frame(i), "normal", 100)
    a, b = _broker(settings, "a"), _broker(settings, "b")
    assert len(a.take(4, 1.0)) == 4  # two frames remain: the doorbell rings again for b
    t0 = time.monotonic()
    assert len(b.take(4, 5.0)) == 2 and time.monotonic() - t0 < 1.0
    assert r.exists(settings.keys.wake("resnet18")) == 0  # queues empty: the bell is silent


def _answer(broker: WorkerBroker, raws: list[bytes]) -> None:
    from common.protocol import Reply, decode_request

    broker.send([Outgoing(raw, Reply(decode_request(raw).id, True, result={})) for raw in raws], {})


def _registered_taking(settings: Settings, r: redis.Redis, frames: list[bytes]) -> tuple[WorkerBroker, list[bytes]]:
    """A registered worker's broker that took ``frames`` (queued first); Redis's command counts reset."""
    r.rpush(settings.keys.queue("resnet18"), *frames)
    r.config_resetstat()
    broker = _broker(settings)
    broker.register({"model": "resnet18"})
    return broker, broker.take(len(frames), 1.0)


def _calls(r: redis.Redis, command: str) -> int:
    return int(r.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


def test_answered_frames_leave_the_inflight_list_from_its_head_without_being_sent_back(
    settings: Settings, r: redis.Redis
) -> None:
    keys = settings.keys
    frames = [_frame(i) for i in range(6)]
    broker, raws = _registered_taking(settings, r, frames)
    _answer(broker, [raws[1], raws[2]])  # out of order: the oldest is still unanswered
    assert r.lrange(keys.inflight("w1"), 0, -1) == frames
    _answer(broker, [raws[0]])
    assert r.lrange(keys.inflight("w1"), 0, -1) == frames[3:]
    _answer(broker, raws[3:])
    assert r.llen(keys.inflight("w1")) == 0
    assert _calls(r, "lrem") == 0  # no frame went back to Redis to find it
    for i in range(6):
        assert decode_reply(r.lpop(keys.reply(f"req{i}"))).ok


def test_a_worker_whose_registration_lapsed_keeps_exactly_its_unanswered_frames_in_flight(
    settings: Settings, r: redis.Redis
) -> None:
    """Its registration expired (a long stall), a peer took its newest frame, and it registered
    again and took more: trimming as many frames as it answered off the head would now drop one
    it has not answered."""
    keys = settings.keys
    frames = [_frame(i) for i in range(6)]
    broker, raws = _registered_taking(settings, r, frames[:4])
    r.delete(keys.worker("w1"))  # expired
    assert r.lmove(keys.inflight("w1"), keys.inflight("peer"), "RIGHT", "RIGHT") == frames[3]
    broker.register({"model": "resnet18"})  # its next heartbeat
    r.rpush(keys.queue("resnet18"), *frames[4:])
    raws += broker.take(2, 1.0)
    assert r.lrange(keys.inflight("w1"), 0, -1) == [*frames[:3], *frames[4:]]
    _answer(broker, raws[:4])  # the peer's frame among them: answered twice, harmless
    assert r.lrange(keys.inflight("w1"), 0, -1) == frames[4:]
    _answer(broker, [raws[5]])  # by value from now on, in any order
    assert r.lrange(keys.inflight("w1"), 0, -1) == [frames[4]]
    _answer(broker, [raws[4]])
    assert r.llen(keys.inflight("w1")) == 0


def test_recovering_a_dead_peer_leaves_the_recovering_workers_own_list_alone(
    settings: Settings, r: redis.Redis
) -> None:
    keys = settings.keys
    mine = [_frame(i) for i in range(3)]
    broker, raws = _registered_taking(settings, r, mine)
    r.rpush(keys.inflight("dead"), _frame(7))  # a worker that never renews its registration
    r.sadd(keys.workers(), "dead")
    seen = []  # where the frame is while it is being recovered
    requeue = broker._requeue_or_expire

    def watched(raw: bytes) -> None:
        seen.append((r.lrange(keys.inflight("w1"), 0, -1), r.lrange(keys.inflight("w1~recovering"), 0, -1)))
        requeue(raw)

    broker._requeue_or_expire = watched  # type: ignore[method-assign]
    assert broker.recover_dead() == 1
    assert seen == [(mine, [_frame(7)])]  # never in the list whose head the worker trims
    assert r.lrange(keys.inflight("w1"), 0, -1) == mine and r.llen(keys.inflight("w1~recovering")) == 0
    assert r.lrange(keys.queue("resnet18"), 0, -1) == [_frame(7)]
    _answer(broker, raws)
    assert r.llen(keys.inflight("w1")) == 0 and _calls(r, "lrem") == 1  # only the recovered frame's
