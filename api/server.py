"""``redbatch api``: the Flask app under gunicorn.

Under gevent_pywsgi (the default: gunicorn's gevent worker with gevent's own HTTP server,
api/pywsgi.py) or gevent each connection holds one greenlet, and a waiting request blocks only its
greenlet in BLPOP: one process holds ``--api-connections`` connections. Under gthread each
waiting request holds one of ``--threads`` threads. Processes (``--workers``) add CPU.

gevent serves a request on one OS thread with no hand-off between threads: with the model out of
the way (bench/api_check.sh), the API's CPU per request was 0.69-0.87 ms under gevent_pywsgi,
0.76-1.00 under gevent and 1.17-1.30 under gthread (docs/benchmarks.md, fourth session).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys
import tempfile
from typing import Any

from gunicorn.app.base import BaseApplication

from common.config import API_FLAGS, Settings, add_flags

# Where every process writes its metric values (read by api/metrics.py; not imported here, as
# importing prometheus_client before the variable is set would fix it in single-process mode).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, API_FLAGS)
    parser.add_argument("--workers", dest="api_workers", type=int, default=None, help="alias of --api-workers")
    parser.add_argument("--threads", dest="api_threads", type=int, default=None, help="alias of --api-threads")


class _Gunicorn(BaseApplication):  # type: ignore[misc]
    def __init__(self, settings: Settings, metrics_dir: str | None = None) -> None:
        self.settings = settings
        self.metrics_dir = metrics_dir  # made by us, removed at exit
        super().__init__()

    def load_config(self) -> None:
        s = self.settings
        options: dict[str, Any] = {
            "bind": s.bind,
            "workers": s.api_workers,
            "threads": s.api_threads,  # gthread
            "worker_connections": s.api_connections,  # gevent
            "worker_class": WORKER_CLASSES[s.api_worker_class],
            "timeout": int(s.request_timeout_s) + 30,
            "graceful_timeout": int(s.request_timeout_s) + 5,
            "keepalive": 5,
            "loglevel": s.log_level.lower(),
            "accesslog": None,
            "child_exit": _child_exit,
            "on_exit": _on_exit,
        }
        if "control_socket_disable" in self.cfg.settings:  # gunicorn >= 24: one shared path per user
            options["control_socket_disable"] = True
        for k, v in options.items():
            self.cfg.set(k, v)

    def load(self) -> Any:
        from api.app import create_app  # in each worker process, after the fork

        return create_app(self.settings)


# --api-worker-class -> what gunicorn loads (gevent_pywsgi with an idle timeout: api/pywsgi.py)
WORKER_CLASSES = {"gevent": "gevent", "gevent_pywsgi": "api.pywsgi.PyWSGIWorker", "gthread": "gthread"}


def run(settings: Settings) -> int:
    if settings.api_worker_class not in WORKER_CLASSES:
        print(f"--api-worker-class must be one of {', '.join(WORKER_CLASSES)}", file=sys.stderr)
        return 2
    _Gunicorn(settings, prepare_metrics_dir()).run()
    return 0


def prepare_metrics_dir() -> str | None:
    """Point ``PROMETHEUS_MULTIPROC_DIR`` at an empty directory before gunicorn forks: a fresh
    temporary one (returned, to be removed at exit) unless the variable is set, in which case the
    files a previous run left there are wiped (their counts would be added to this run's)."""
    path = os.environ.get(MULTIPROC_ENV)
    if not path:
        if "prometheus_client" in sys.modules:  # it chose single-process mode already
            raise RuntimeError(f"prometheus_client was imported before {MULTIPROC_ENV} was set")
        made = tempfile.mkdtemp(prefix="redbatch-metrics-")
        os.environ[MULTIPROC_ENV] = made
        return made
    os.makedirs(path, exist_ok=True)
    for f in glob.glob(os.path.join(path, "*.db")):
        os.remove(f)
    return None


def _child_exit(_server: Any, worker: Any) -> None:
    """A dead process's live gauges (requests in progress) must stop counting."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


def _on_exit(server: Any) -> None:
    made = getattr(server.app, "metrics_dir", None)
    if made:
        shutil.rmtree(made, ignore_errors=True)
