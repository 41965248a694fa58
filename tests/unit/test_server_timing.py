"""The ``Server-Timing`` header of an answer (``api/inference.py``), and the client's reading of it
(``common/client.py``, which ``redbatch predict --timing`` and ``bench/lone.py`` use)."""

from __future__ import annotations

import math

from api.inference import server_timing, slowest_parts
from common.client import parse_server_timing

WORKER_META = {
    **{"worker": "w", "batch_size": 3, "queue_ms": 4, "infer_ms": 6.25},
    **{"prep_ms": 2.625, "wait_ms": 0.125},
}


def test_the_wait_splits_into_redis_and_the_workers_parts() -> None:
    header = server_timing(WORKER_META, api_ms=0.4, waited_ms=10.0)
    assert header == "api;dur=0.400, queue;dur=1.000, prep;dur=2.625, batch;dur=0.125, infer;dur=6.250"
    assert parse_server_timing(header) == {
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
    clamped = parse_server_timing(server_timing({**WORKER_META, "wait_ms": -0.5}, 0.1, 2.0))
    assert clamped["queue"] == 0.0 and clamped["batch"] == 0.0


def test_the_reader_takes_other_servers_entries_too() -> None:
    header = 'cache;desc="Cache Read";dur=23.2, db;dur=53 , app;dur=47.2, miss'
    assert parse_server_timing(header) == {"cache": 23.2, "db": 53.0, "app": 47.2}


def test_the_reader_skips_what_it_cannot_read_instead_of_failing() -> None:
    header = 'api;dur=0.5, queue;dur=abc, prep;dur=nan, batch;dur="0.25", infer;DUR=inf, ;dur=3, http;dur = 1.5'
    assert parse_server_timing(header) == {"api": 0.5, "batch": 0.25, "http": 1.5}
    assert parse_server_timing(None) == {} and parse_server_timing("") == {}


def test_several_images_report_each_workers_part_at_its_largest() -> None:
    a = {"prep_ms": 2.0, "wait_ms": 0.5, "infer_ms": 6.0}
    b = {"prep_ms": 3.5, "wait_ms": 0.25, "infer_ms": 6.0}
    parts = slowest_parts([a, b])
    assert parts == {"prep_ms": 3.5, "wait_ms": 0.5, "infer_ms": 6.0}
    timing = parse_server_timing(server_timing(parts, api_ms=1.0, waited_ms=12.0))
    assert list(timing) == ["api", "queue", "prep", "batch", "infer"] and math.isclose(timing["queue"], 2.0)
    # one image from a worker that does not time its part: the whole wait, unsplit
    assert slowest_parts([a, {"infer_ms": 6.0}]) == {} and slowest_parts([]) == {}
    assert server_timing({}, 1.0, 12.0) == "api;dur=1.000, wait;dur=12.000"
