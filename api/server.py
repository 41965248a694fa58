"""``redbatch api``: the Flask app under gunicorn with threaded workers.

Each waiting request holds one thread blocked in BLPOP, so one process holds as many waiting
requests as it has threads (``--threads``); processes (``--workers``) add CPU for image decoding.
"""

from __future__ import annotations

import argparse
from typing import Any

from gunicorn.app.base import BaseApplication

from common.config import API_FLAGS, Settings, add_flags


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, API_FLAGS)
    parser.add_argument("--workers", dest="api_workers", type=int, default=None, help="alias of --api-workers")
    parser.add_argument("--threads", dest="api_threads", type=int, default=None, help="alias of --api-threads")


class _Gunicorn(BaseApplication):  # type: ignore[misc]
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        super().__init__()

    def load_config(self) -> None:
        s = self.settings
        options: dict[str, Any] = {
            "bind": s.bind,
            "workers": s.api_workers,
            "threads": s.api_threads,
            "worker_class": "gthread",
            "timeout": int(s.request_timeout_s) + 30,
            "graceful_timeout": int(s.request_timeout_s) + 5,
            "keepalive": 5,
            "loglevel": s.log_level.lower(),
            "accesslog": None,
        }
        if "control_socket_disable" in self.cfg.settings:  # gunicorn >= 24: one shared path per user
            options["control_socket_disable"] = True
        for k, v in options.items():
            self.cfg.set(k, v)

    def load(self) -> Any:
        from api.app import create_app  # in each worker process, after the fork

        return create_app(self.settings)


def run(settings: Settings) -> int:
    _Gunicorn(settings).run()
    return 0
