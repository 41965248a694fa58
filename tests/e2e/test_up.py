"""``redbatch up``: one command brings up Redis, a worker and the API; Ctrl-C takes all of it down."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests

from tests.conftest import free_port, make_image
from tests.e2e.conftest import ROOT

pytestmark = pytest.mark.e2e


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_up_serves_on_a_private_redis_and_ctrl_c_stops_everything(tmp_path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("REDBATCH_") and k != "REDIS_URL"}
    env.update(REDBATCH_MODEL="mobilenet_v3_small", REDBATCH_TORCH_THREADS="1", HOME=str(tmp_path))
    proc = subprocess.Popen(
        [sys.executable, "-m", "common.cli", "up", "--bind", f"127.0.0.1:{port}"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "".join(lines)
            lines.append(line)
            if "Ctrl-C stops everything" in line:
                break
        out = "".join(lines)
        assert f"http://127.0.0.1:{port}" in out and "curl" in out
        assert "RANDOMLY INITIALISED" in out  # no download possible here: the loud fallback
        redis_port = int(re.search(r"redis://127\.0\.0\.1:(\d+)", out).group(1))  # type: ignore[union-attr]
        resp = requests.post(
            f"http://127.0.0.1:{port}/v1/models/mobilenet_v3_small/predict",
            data=make_image(1),
            headers={"Content-Type": "image/jpeg"},
            timeout=30,
        )
        assert resp.status_code == 200 and len(resp.json()["predictions"]) == 5
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(60)
    assert rc == 0
    assert not _port_open(port) and not _port_open(redis_port)


def test_up_without_redis_server_says_how_to_install_it(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REDBATCH_") and k != "REDIS_URL"}
    env["PATH"] = str(tmp_path)  # no redis-server to be found
    proc = subprocess.run(
        [sys.executable, "-m", "common.cli", "up"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert "redis-server is not on PATH" in proc.stderr and "apt-get install redis-server" in proc.stderr
