from __future__ import annotations

import argparse

import pytest

from common.config import WORKER_FLAGS, Settings, add_flags, settings_from_args
from common.keys import Keys


def test_environment_is_read_with_types() -> None:
    s = Settings.from_env(
        {
            "REDBATCH_MAX_BATCH_SIZE": "16",
            "REDBATCH_WINDOW_MS": "1.5",
            "REDBATCH_CHANNELS_LAST": "false",
            "REDIS_URL": "redis://example:6380/2",
            "UNRELATED": "x",
        }
    )
    assert (s.max_batch_size, s.window_ms, s.channels_last, s.redis_url) == (16, 1.5, False, "redis://example:6380/2")


def test_prefixed_redis_url_wins_over_plain() -> None:
    s = Settings.from_env({"REDIS_URL": "redis://a/0", "REDBATCH_REDIS_URL": "redis://b/0"})
    assert s.redis_url == "redis://b/0"


def test_bad_value_names_the_variable() -> None:
    with pytest.raises(ValueError, match="REDBATCH_MAX_BATCH_SIZE"):
        Settings.from_env({"REDBATCH_MAX_BATCH_SIZE": "lots"})


def test_flags_override_environment_and_absent_flags_do_not() -> None:
    parser = argparse.ArgumentParser()
    add_flags(parser, WORKER_FLAGS)
    args = parser.parse_args(["--max-batch-size", "8", "--no-channels-last"])
    s = settings_from_args(args, {"REDBATCH_MAX_BATCH_SIZE": "4", "REDBATCH_WINDOW_MS": "7"})
    assert (s.max_batch_size, s.window_ms, s.channels_last) == (8, 7.0, False)


def test_keys_live_under_the_prefix() -> None:
    k = Keys("p")
    assert k.queue("resnet18") == "p:queue:resnet18"
    assert k.reply("id1") == "p:reply:id1"
    assert k.inflight("w1") == "p:inflight:w1"
    assert k.worker_id_of_inflight(k.inflight("host-1-ab")) == "host-1-ab"
    assert Settings(prefix="p", model="m").keys.stats("m") == "p:stats:m"


def test_api_refuses_an_unknown_worker_class(capsys: pytest.CaptureFixture[str]) -> None:
    from common.cli import main

    assert main(["api", "--api-worker-class", "eventlet"]) == 2
    assert "gevent, gevent_pywsgi, gthread" in capsys.readouterr().err


def test_the_worker_spins_openmp_briefly_unless_told_how_to_wait() -> None:
    from common.cli import OMP_SPIN_COUNT, openmp_defaults

    env: dict[str, str] = {}
    openmp_defaults(env)
    assert env == {"GOMP_SPINCOUNT": OMP_SPIN_COUNT}
    for mine in ({"OMP_WAIT_POLICY": "PASSIVE"}, {"GOMP_SPINCOUNT": "0"}, {"OMP_WAIT_POLICY": ""}):
        env = dict(mine)
        openmp_defaults(env)
        assert env == mine  # the user's choice stands, even an empty one (libgomp's own default)
    env = {}
    openmp_defaults(env, adaptive_threads=False)  # every pass on all threads: they sleep at once
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
