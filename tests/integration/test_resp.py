"""common/resp.py against a real redis-server: what it packs is what redis-py packs, and an exchange
answers in order, survives an error answer and a connection Redis closed while it sat idle."""

from __future__ import annotations

import os

import pytest
import redis

from common.config import Settings
from common.redisconn import connect
from common.resp import Link, pack


def test_pack_writes_what_redis_py_writes() -> None:
    frame = os.urandom(90_000)  # above redis-py's buffer cutoff: it sends such a piece on its own
    commands = [
        ("MULTI",),
        ("RPUSH", "q:normal", frame),
        ("EVAL", "return 1", 2, "a", "ключ", -7, 2.5, 1e-05, b"\x00\r\n"),
        ("EXEC",),
        ("BLPOP", "reply:1", "0.010"),
    ]
    conn = redis.Connection()  # never connected: packing only
    theirs = b"".join(bytes(c) for c in conn.pack_commands(commands))  # type: ignore[no-untyped-call]
    assert pack(commands) == theirs


@pytest.mark.parametrize("bad", [True, None, object()])
def test_pack_refuses_what_redis_py_refuses(bad: object) -> None:
    with pytest.raises(redis.DataError):
        pack([("SET", "k", bad)])


def test_an_exchange_answers_in_order_and_moves_frames(settings: Settings, r: redis.Redis) -> None:
    link = Link(connect(settings, 2.0))
    frames = [os.urandom(n) for n in (0, 1, 70_000, 200_000)]
    q, inflight = f"{settings.prefix}:q", f"{settings.prefix}:inflight"
    got = link.exchange([("RPUSH", q, *frames), ("LLEN", q), ("BLPOP", f"{settings.prefix}:none", "0.010")])
    assert got == [4, 4, None]
    moved = link.exchange([("LMOVE", q, inflight, "LEFT", "RIGHT")] * 5)
    assert moved == [*frames, None]
    assert r.lrange(inflight, 0, -1) == frames


def test_an_error_answer_raises_after_every_answer_is_read(settings: Settings, r: redis.Redis) -> None:
    link = Link(connect(settings, 2.0))
    k = f"{settings.prefix}:k"
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        link.exchange([("SET", k, "x"), ("LPUSH", k, "y"), ("SET", f"{k}2", "after")])
    assert r.get(f"{k}2") == b"after"  # the command behind the error ran
    # and the connection went back in step: the next exchange reads its own answers
    assert link.exchange([("GET", k), ("ECHO", "z")]) == [b"x", b"z"]


def test_a_connection_redis_closed_while_idle_is_replaced(settings: Settings, r: redis.Redis) -> None:
    link = Link(connect(settings, 2.0))
    name = f"{settings.prefix}-link"
    assert link.exchange([("CLIENT", "SETNAME", name)]) == b"OK".split()
    mine = [c["id"] for c in r.client_list() if c["name"] == name]
    assert len(mine) == 1
    r.client_kill_filter(_id=mine[0])  # as a restart or a proxy's idle timeout would
    k = f"{settings.prefix}:n"
    assert link.exchange([("INCR", k), ("CLIENT", "GETNAME")]) == [1, None]  # a new connection
    assert r.get(k) == b"1"  # sent once more, and run once
