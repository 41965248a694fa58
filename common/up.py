"""``redbatch up``: a newcomer's whole system in one command.

Uses ``REDIS_URL`` when it is set and answers, else starts a private ``redis-server`` on a free
port; then one worker and the API as child processes. Ctrl-C (or SIGTERM) stops all of them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from types import FrameType

import redis

from common.config import API_FLAGS, ENV_PREFIX, WORKER_FLAGS, Settings, add_flags, redact_url

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "redis-server is not on PATH and REDIS_URL does not point at a Redis that answers.\n"
    "Install it (Debian/Ubuntu: sudo apt-get install redis-server; macOS: brew install redis)\n"
    "or point REDIS_URL at one (e.g. docker run -p 6379:6379 redis:7)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, sorted(set(API_FLAGS) | set(WORKER_FLAGS)))
    parser.add_argument("--ready-timeout-s", type=float, default=600.0, help="how long to wait for the model")


def child_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a child process exactly these settings."""
    env = dict(os.environ)
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        env[ENV_PREFIX + f.name.upper()] = str(value).lower() if isinstance(value, bool) else str(value)
    env.pop("REDIS_URL", None)
    return env


class Stack:
    """The child processes of ``up``, stopped in reverse order of start."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.tmpdir = tempfile.mkdtemp(prefix="redbatch-up-")

    def start(self, name: str, cmd: list[str], env: dict[str, str] | None = None, quiet: bool = False) -> None:
        out = subprocess.DEVNULL if quiet else None
        # A session of their own: the terminal's Ctrl-C reaches only us, and we stop them in order
        # (one SIGTERM each), instead of each child seeing two signals and exiting hard.
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=out, cwd=self.tmpdir, start_new_session=True)
        self.procs.append((name, proc))

    def dead(self) -> str | None:
        for name, p in self.procs:
            if p.poll() is not None:
                return f"{name} exited with status {p.returncode}"
        return None

    def stop(self) -> None:
        for _name, p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(self.tmpdir, ignore_errors=True)


def run(settings: Settings, args: argparse.Namespace) -> int:
    if getattr(args, "weights", None) is None and ENV_PREFIX + "WEIGHTS" not in os.environ:
        settings = settings.replace(weights="auto")  # pretrained when it can be had, else random
    stack = Stack()
    stopping = {"yes": False}

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stopping["yes"] = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)  # also when started with SIGINT ignored (a shell's `&`)
    try:
        settings = _redis(settings, stack)
        env = child_env(settings)
        cmd = [sys.executable, "-m", "common.cli"]
        stack.start("worker", [*cmd, "worker"], env)
        stack.start("api", [*cmd, "api"], env)
        url = f"http://{settings.bind}"
        if not _wait_ready(url, stack, args.ready_timeout_s):
            return 1
        _banner(url, settings)
        while (why := stack.dead()) is None:
            time.sleep(0.5)  # supervision of children, not of work
        logger.error("%s; stopping", why)
        return 1
    except KeyboardInterrupt:
        print("\nstopping redbatch ...", file=sys.stderr)
        return 0
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return 2
    finally:
        stack.stop()


def _redis(settings: Settings, stack: Stack) -> Settings:
    explicit = os.environ.get("REDIS_URL") or os.environ.get(ENV_PREFIX + "REDIS_URL")
    if explicit and _answers(settings.redis_url):
        logger.info("using Redis at %s", redact_url(settings.redis_url))
        return settings
    if explicit:
        logger.warning("REDIS_URL does not answer; starting a private redis-server instead")
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit(INSTALL_HINT)
    port = free_port()
    stack.start(
        "redis-server",
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        quiet=True,
    )
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while not _answers(url):
        if time.monotonic() > deadline or stack.dead():
            raise SystemExit(f"the private redis-server on port {port} did not start")
        time.sleep(0.05)
    logger.info("started a private redis-server at %s", url)
    return settings.replace(redis_url=url)


def _answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping())
    except (redis.RedisError, ValueError):
        return False


def _wait_ready(url: str, stack: Stack, timeout_s: float) -> bool:
    print(f"loading the model; the API will answer at {url} ...", file=sys.stderr)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (why := stack.dead()) is not None:
            logger.error("%s before the service was ready", why)
            return False
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as resp:
                if resp.status == 200:
                    return True
        except (urllib.error.URLError, OSError, json.JSONDecodeError):
            pass
        time.sleep(0.25)
    logger.error("the service was not ready after %.0fs", timeout_s)
    return False


def _banner(url: str, settings: Settings) -> None:
    model = settings.served_name
    print(
        f"\nredbatch is up: {url}  (model {model}, Redis {redact_url(settings.redis_url)})\n"
        "try:\n  curl -s -H 'Content-Type: image/jpeg' --data-binary @your.jpg "
        f"'{url}/v1/models/{model}/predict?topk=3'\n"
        "Ctrl-C stops everything.\n",
        file=sys.stderr,
        flush=True,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
