"""The ``Server-Timing`` header of a v1 answer (``api/inference.py``), and ``bench/lone.py``'s reading of it."""

from __future__ import annotations

import sys
from pathlib import Path

from api.inference import server_timing

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import lone

WORKER_META = {
    **{"worker": "w", "batch_size": 3, "queue_ms": 4, "infer_ms": 6.25},
    **{"prep_ms": 2.625, "wait_ms": 0.125},
}


def test_the_wait_splits_into_redis_and_the_workers_parts() -> None:
    header = server_timing(WORKER_META, api_ms=0.4, waited_ms=10.0)
    assert header == "api;dur=0.400, queue;dur=1.000, prep;dur=2.625, batch;dur=0.125, infer;dur=6.250"
    assert lone.parse_server_timing(header) == {
        "api": 0.4,
        "queue": 1.0,
        "prep": 2.625,
        "batch": 0.125,
        "infer": 6.25,
    }


def test_a_worker_that_does_not_time_its_part_leaves_the_wait_whole() -> None:
    old = {"worker": "w", "batch_size": 1, "queue_ms": 0, "infer_ms": 3.0}
    assert server_timing(old, api_ms=0.25, waited_ms=5.5) == "api;dur=0.250, wait;dur=5.500"


def test_odd_values_from_redis_never_break_the_header() -> None:
    # a frame of another version, or written by hand: strings, nulls, a hold longer than the wait
    assert server_timing({**WORKER_META, "wait_ms": "9"}, 0.1, 2.0) == "api;dur=0.100, wait;dur=2.000"
    assert server_timing({**WORKER_META, "prep_ms": None}, 0.1, 2.0) == "api;dur=0.100, wait;dur=2.000"
    clamped = lone.parse_server_timing(server_timing({**WORKER_META, "wait_ms": -0.5}, 0.1, 2.0))
    assert clamped["queue"] == 0.0 and clamped["batch"] == 0.0


def test_the_reader_takes_other_servers_entries_too() -> None:
    header = 'cache;desc="Cache Read";dur=23.2, db;dur=53 , app;dur=47.2, miss'
    assert lone.parse_server_timing(header) == {"cache": 23.2, "db": 53.0, "app": 47.2}
